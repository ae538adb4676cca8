"""The verifier's Prometheus metrics, in a registry of its own (no global state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cloud.scheduler import PassStats
from common.address import split_host_port


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("tandem_verifier_sessions", "sessions holding a sequence", registry=r)
        self.queue = Gauge("tandem_verifier_queue_steps", "steps waiting for a pass", registry=r)
        self.pass_tokens = Histogram("tandem_verifier_pass_tokens", "tokens evaluated per pass", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.pass_seconds = Histogram("tandem_verifier_pass_seconds", "wall time of a pass (with emulated hold)",
                                      registry=r, buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2))
        self.pass_steps = Histogram("tandem_verifier_pass_steps", "sessions' steps per pass", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.drafted = Counter("tandem_verifier_drafted_tokens", "drafted tokens verified", registry=r)
        self.accepted = Counter("tandem_verifier_accepted_tokens", "drafted tokens accepted", registry=r)
        self.bytes_in = Counter("tandem_verifier_draft_bytes", "serialised Draft bytes received", registry=r)
        self.bytes_out = Counter("tandem_verifier_verdict_bytes", "serialised Verdict bytes sent", registry=r)
        self.exact_bitwise = Gauge("tandem_verifier_exact_bitwise",
                                   "1 if the start-up check found batched passes bit-identical to one-token "
                                   "decoding", registry=r)
        self.exact_max_diff = Gauge("tandem_verifier_exact_max_logit_diff",
                                    "largest logit difference the start-up check found (0: bitwise)", registry=r)
        self.threads = Gauge("tandem_verifier_threads", "llama.cpp threads passes of several tokens run with now",
                             registry=r)
        self.threads_single = Gauge("tandem_verifier_threads_single_token",
                                    "llama.cpp threads one-token passes run with now", registry=r)
        # real compute against the model, per pass: where real exceeds modelled, an emulated
        # figure measures this machine instead of the modelled GPU (docs/emulation.md)
        self.pass_real = Counter("tandem_verifier_pass_real_seconds",
                                 "the target's real compute in passes (llama_decode and row-cache reads)", registry=r)
        self.pass_modelled = Counter("tandem_verifier_pass_modelled_seconds",
                                     "what the emulated target's model charges for the passes (0 when not emulated)",
                                     registry=r)
        self.over_model = Counter("tandem_verifier_passes_over_model",
                                  "emulated passes whose real compute exceeded the modelled time", registry=r)
        self.cache_hits = Counter("tandem_verifier_target_cache_hits",
                                  "rows served from the target's row cache (--target-cache)", registry=r)
        self.cache_misses = Counter("tandem_verifier_target_cache_misses",
                                    "rows the target computed with a row cache on (--target-cache)", registry=r)
        self.refused = Counter("tandem_verifier_refusals", "RPCs refused, by status code", ["code"], registry=r)
        # admission by SLO (--slo-tokens-per-s; 0 without it)
        self.slo = Gauge("tandem_verifier_slo_tokens_per_s", "tokens/s every admitted session is to keep",
                         registry=r)
        self.predicted_min_rate = Gauge("tandem_verifier_predicted_min_tokens_per_s",
                                        "cost model's tokens/s for the slowest session held (+Inf: none)",
                                        registry=r)
        self.batch_budget = Gauge("tandem_verifier_batch_budget_tokens",
                                  "tokens a pass may carry so that the slowest session keeps the SLO", registry=r)
        self.slo_slowdown = Gauge("tandem_verifier_slo_slowdown",
                                  "real over modelled pass time as streams see it, by which admission scales the "
                                  "cost model (1: as modelled)", registry=r)

    def observe_pass(self, s: PassStats) -> None:
        self.pass_tokens.observe(s.tokens)
        self.pass_seconds.observe(s.seconds)
        self.pass_steps.observe(s.steps)
        self.pass_real.inc(s.real_s)
        self.pass_modelled.inc(s.modelled_s)
        self.over_model.inc(s.over_model)
        self.cache_hits.inc(s.cache_hits)
        self.cache_misses.inc(s.cache_misses)

    def serve(self, hostport: str) -> None:
        host, port = split_host_port(hostport)
        start_http_server(port, addr=host, registry=self.registry)
