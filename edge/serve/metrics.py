"""What the daemon measures: Prometheus metrics for `/metrics`, and the live
state the MQTT telemetry snapshot reads (edge/telemetry.py).

The generating thread only bumps counters here (no I/O, no waiting); the
HTTP scrape and the telemetry thread read them whenever they like.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


@dataclass
class LiveState:
    """The latest of everything telemetry reports; written by the worker thread."""
    tokens_total: int = 0               # tokens committed to clients, counted as they are committed
    completions_total: int = 0
    mode: str = ""                      # the daemon's configured mode
    last_mode: str | None = None        # mode of the last segment of the last completion
    fallback: str | None = None         # of the last completion
    acceptance_rate: float | None = None   # of the last completion that drafted
    link_rtt_s: float | None = None
    cache_hit_rate: float | None = None    # MoE drafter's expert cache, last completion
    emulated: bool = False
    verifier_reachable: bool = False
    waiting: int = 0
    running: int = 0


class Metrics:
    def __init__(self, mode: str, queue_capacity: int):
        r = self.registry = CollectorRegistry()
        self.live = LiveState(mode=mode)
        self.queue_capacity = queue_capacity
        self.lock = threading.Lock()
        self.requests = Counter("tandem_requests", "HTTP generation requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.completions = Counter("tandem_completions", "completions by finish reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "prompt tokens of completions", registry=r)
        self.completion_tokens = Counter("tandem_completion_tokens", "tokens generated for clients", registry=r)
        self.drafted = Counter("tandem_drafted_tokens", "draft tokens sent to the verifier", registry=r)
        self.verified = Counter("tandem_verified_tokens", "draft tokens the verifier tested", registry=r)
        self.accepted = Counter("tandem_accepted_tokens", "draft tokens the verifier accepted", registry=r)
        self.edge_only_tokens = Counter("tandem_edge_only_tokens", "tokens generated without the verifier",
                                        registry=r)
        self.fallbacks = Counter("tandem_fallbacks", "completions that left speculation, by where they went",
                                 ["to"], registry=r)
        self.cancelled = Counter("tandem_cancelled", "generations stopped because the client went away", registry=r)
        self.rejected = Counter("tandem_rejected", "requests refused with 429 because the queue was full", registry=r)
        self.link_bytes = Counter("tandem_link_bytes", "bytes on the verifier link", ["direction"], registry=r)
        self.acceptance = Gauge("tandem_acceptance_rate", "acceptance per drafted position, last completion",
                                registry=r)
        self.rtt = Gauge("tandem_link_rtt_seconds", "link round trip to the verifier, as the planner measured it",
                         registry=r)
        self.waiting = Gauge("tandem_queue_waiting", "requests waiting for the drafter", registry=r)
        self.running = Gauge("tandem_queue_running", "requests generating", registry=r)
        self.verifier_up = Gauge("tandem_verifier_reachable", "1 when the verifier answered the last health probe",
                                 registry=r)
        self.request_seconds = Histogram("tandem_request_seconds", "request latency, queue included", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("tandem_queue_seconds", "time a request waited for the drafter",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tandem_ttft_seconds", "time to first token of a completion", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tokens_per_s = Histogram("tandem_completion_tokens_per_second", "generation speed per completion",
                                      buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250), registry=r)

    def watch_publisher(self, publisher) -> None:
        """Export a telemetry publisher's own counters (is the broker there?)."""
        g = Gauge("tandem_telemetry_published", "telemetry messages published", registry=self.registry)
        g.set_function(lambda: publisher.published)
        g = Gauge("tandem_telemetry_failures", "telemetry connections lost or refused", registry=self.registry)
        g.set_function(lambda: publisher.failures)
        g = Gauge("tandem_telemetry_connected", "1 while connected to the MQTT broker", registry=self.registry)
        g.set_function(lambda: 1 if publisher.connected else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- written by the worker thread --------------------------------------
    def committed(self, n: int) -> None:
        with self.lock:
            self.live.tokens_total += n

    def queue(self, waiting: int, running: int) -> None:
        with self.lock:
            self.live.waiting, self.live.running = waiting, running
        self.waiting.set(waiting)
        self.running.set(running)

    def reachable(self, up: bool) -> None:
        self.live.verifier_reachable = up
        self.verifier_up.set(1 if up else 0)

    def completion(self, stats, prompt_tokens: int, n_tokens: int, finish_reason: str, segments: list[dict],
                   rtt_s: float | None) -> None:
        self.completions.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(n_tokens)
        self.drafted.inc(stats.drafted)
        self.verified.inc(stats.verified)
        self.accepted.inc(stats.accepted)
        self.edge_only_tokens.inc(stats.edge_only_tokens)
        self.link_bytes.labels("up").inc(stats.bytes_up)
        self.link_bytes.labels("down").inc(stats.bytes_down)
        if stats.fallback:
            self.fallbacks.labels(stats.fallback).inc()
        if stats.ttft_s:
            self.ttft.observe(stats.ttft_s)
        if stats.wall_s > 0 and n_tokens:
            self.tokens_per_s.observe(n_tokens / stats.wall_s)
        if stats.verified:
            self.acceptance.set(stats.acceptance_rate)
        if rtt_s is not None:
            self.rtt.set(rtt_s)
        total = (stats.drafter or {}).get("total") or {}
        with self.lock:
            live = self.live
            live.completions_total += 1
            live.fallback = stats.fallback
            live.last_mode = segments[-1]["mode"] if segments else live.mode
            live.emulated = live.emulated or stats.emulated
            if stats.verified:
                live.acceptance_rate = stats.acceptance_rate
            if rtt_s is not None:
                live.link_rtt_s = rtt_s
            if total.get("hit_rate") is not None:
                live.cache_hit_rate = total["hit_rate"]

    def snapshot(self) -> LiveState:
        with self.lock:
            return LiveState(**self.live.__dict__)
