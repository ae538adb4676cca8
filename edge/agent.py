"""One completion, whatever the mode: the orchestration around the loops.

Speculation falls back to cloud-only streaming when the planner finds it does
not pay, and to edge-only generation when the cloud is lost or unreachable,
at start as well as mid-generation (marked in the stats' `segments`, warned
on stderr; `require_cloud` makes it an error instead). A background probe
with exponential backoff and jitter watches for the verifier; once it answers,
the edge re-opens a session with the committed prefix (zstd-compressed when
that is smaller) and resumes. A verifier that is full (RESOURCE_EXHAUSTED) is
retried after the wait it asks for (`retry-after-ms`), jittered, before a
clear error. A token once handed to the user is never retracted.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from edge.baselines import cloud_only, edge_only
from edge.client import CloudError, VerifierClient
from edge.codec import Codec
from edge.config import GenConfig
from edge.drafter import Drafter
from edge.picospec import Speculator, SwitchToCloudOnly, choose_codec, open_request
from edge.planner import Planner
from edge.reconnect import Backoff, Reconnector
from edge.stats import GenStats
from kernels import packing
from proto.prompt_zstd import plain_size, prompt_fields
from sim.latency import DEVICES, Hold, lookup

log = logging.getLogger("tandem.edge")

# Errors that say the request itself is wrong: falling back would hide them.
# (NOT_FOUND is not among them: a session can vanish with its replica or by
# idle expiry, and re-opening is the cure.)
FATAL = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED}
# A verifier that answers the health probe but keeps failing the request is
# broken, not lost: give up after this many failures in a row with no progress.
MAX_FAILURES_WITHOUT_PROGRESS = 3
REPROBE_EVERY = 8
BUSY_RETRIES = 5              # RESOURCE_EXHAUSTED: waits before the error reaches the user


@dataclass
class Completion:
    tokens: list[int]
    stats: GenStats


class Agent:
    def __init__(self, client: VerifierClient | None, drafter: Drafter | None, fingerprint: str,
                 n_vocab: int, eos: int, backoff: Backoff | None = None, busy_retries: int = BUSY_RETRIES):
        self.client, self.drafter = client, drafter
        self.fingerprint, self.n_vocab, self.eos = fingerprint, n_vocab, eos
        self.backoff = backoff or Backoff()          # policy; each completion uses a fresh copy
        self.busy_retries = busy_retries
        # What the last session learned about this drafter/target pair: the next
        # one starts from it instead of a guess (an edge serves many requests).
        self.learned_accept: float | None = None
        self._last_planner: Planner | None = None
        self._live_stats: GenStats | None = None
        self.skipped = 0      # sessions sent straight to cloud-only since the last probe

    @property
    def live_stats(self) -> GenStats | None:
        """The counters of the generation running now (or of the last one): all a caller
        has of a generation it ended early by raising from on_tokens."""
        return self._live_stats

    @property
    def link_rtt_s(self) -> float | None:
        """The link's round trip as the last speculative session measured it (None before one)."""
        return self._last_planner.rtt if self._last_planner is not None else None

    def generate(self, prompt: list[int], cfg: GenConfig,
                 on_tokens: Callable[[list[int]], None] = lambda t: None) -> Completion:
        t0 = time.monotonic()
        stats = GenStats(mode=cfg.mode, emulated=cfg.emulate_device is not None)
        self._live_stats = stats
        out: list[int] = []
        bytes0 = (self.client.bytes.up, self.client.bytes.down) if self.client else (0, 0)

        def emitter(mode: str):
            def emit(tokens: list[int]) -> None:
                out.extend(tokens)
                stats.note_segment(mode, len(tokens))
                on_tokens(tokens)
            return emit

        mode = cfg.mode
        handover = ""         # a session the cloud-only stream may continue
        if mode in ("picospec", "sync", "edge-only") and self.drafter is None:
            raise ValueError(f"mode {mode} needs a draft model")
        if mode != "edge-only" and self.client is None:
            raise ValueError(f"mode {mode} needs a verifier (no client given)")
        reconnect = Reconnector(self.client.probe, self.backoff.fresh()) if self.client else None
        busy = self.backoff.fresh()
        cloud_lost, resume = False, False
        failures, progress_at = 0, -1
        while len(out) < cfg.max_tokens and not (out and out[-1] == self.eos and cfg.stop_at_eos):
            left = dataclasses.replace(cfg, max_tokens=cfg.max_tokens - len(out))
            if cloud_lost and not reconnect.ready():
                # keep the user served from the edge until the probe finds the verifier again
                edge_only(self.drafter, prompt + out, left, self.eos, emitter("edge-only"), stats, t0,
                          stop=reconnect.ready)
                continue
            if cloud_lost:
                log.warning("verifier back after %d edge-only tokens: re-opening with the %d-token prefix",
                            stats.edge_only_tokens, len(prompt) + len(out))
                stats.reconnects += 1
            cloud_lost = False
            before = len(out)
            try:
                if mode == "edge-only":
                    edge_only(self.drafter, prompt + out, left, self.eos, emitter("edge-only"), stats, t0)
                elif mode == "cloud-only":
                    fields = self._prefix_fields(prompt + out, stats) if resume and not handover else None
                    cloud_only(self.client, self.fingerprint, prompt + out, left, emitter("cloud-only"), stats, t0,
                               session=handover, prompt_fields=fields)
                else:
                    self._speculate(prompt + out, left, emitter(mode), stats, t0, resume)
                break
            except SwitchToCloudOnly as switch:
                handover = switch.session
                log.info("speculation does not pay here: streaming from the cloud after %d tokens", len(out))
                stats.fallback = "cloud-only"
                mode = "cloud-only"
            except CloudError as e:
                handover = ""
                if len(out) > before:
                    reconnect.backoff.reset()        # the cloud served tokens: a fresh loss starts short
                if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._wait_busy(e, busy, stats)
                    continue
                if e.code in FATAL or mode == "edge-only" or self.drafter is None or cfg.require_cloud:
                    raise
                failures = failures + 1 if progress_at == len(out) else 1
                progress_at = len(out)
                if failures >= MAX_FAILURES_WITHOUT_PROGRESS and self.client.probe():
                    raise CloudError(e.code, f"verifier failed {failures} times in a row without progress: {e}") from e
                where = "at start" if not out else f"after {len(out)} tokens"
                log.warning("verifier at %s unreachable %s (%s): generating edge-only with the draft model "
                            "(marked in the output), reconnecting in the background", self.client.target, where, e)
                stats.fallback = "edge-only"
                cloud_lost, resume = True, True
                reconnect.lost()
        stats.wall_s = time.monotonic() - t0
        if self.client is not None:
            stats.bytes_up = self.client.bytes.up - bytes0[0]
            stats.bytes_down = self.client.bytes.down - bytes0[1]
        if self.drafter is not None:
            stats.drafter = self.drafter.stats()
        return Completion(out[:cfg.max_tokens], stats)

    def _wait_busy(self, e: CloudError, busy: Backoff, stats: GenStats) -> None:
        """The verifier is full: wait what it asked (jittered upwards, growing),
        or give up with a clear error after `busy_retries` waits."""
        if stats.busy_retries >= self.busy_retries:
            raise CloudError(e.code, f"verifier still full after {stats.busy_retries} retries: {e}") from e
        stats.busy_retries += 1
        delay = busy.next_delay(e.retry_after_s or 0.0)
        log.warning("verifier full (%s): retry %d/%d in %.1f s", e, stats.busy_retries, self.busy_retries, delay)
        time.sleep(delay)

    def _prefix_fields(self, prefix: list[int], stats: GenStats) -> dict:
        """How a re-open sends the committed prefix: zstd where smaller; bytes counted either way."""
        fields = prompt_fields(prefix, packing.token_width(self.n_vocab), allow_zstd=self.client.accepts_zstd)
        plain = plain_size(prefix)
        stats.resume_bytes_plain += plain
        stats.resume_bytes += len(fields["prompt_zstd"]) if "prompt_zstd" in fields else plain
        return fields

    def _speculate(self, prompt: list[int], cfg: GenConfig, emit, stats: GenStats, t0: float,
                   resume: bool = False) -> None:
        device = lookup(DEVICES, cfg.emulate_device, "device") if cfg.emulate_device else None
        last = self._last_planner
        if cfg.adaptive and last is not None and last.pipelined == cfg.pipelined and not last.plan().worth_starting:
            if self.skipped < REPROBE_EVERY:
                self.skipped += 1     # known not to pay on this link: don't even open a session
                raise SwitchToCloudOnly()
            self.skipped = 0          # conditions change: measure again now and then
        codec = choose_codec(cfg, self.n_vocab, last)
        stats.codec = codec.name
        t_open = time.monotonic()
        req = open_request(self.fingerprint, cfg, codec, prompt)
        if resume:                    # the whole committed prefix goes up again: compress it where that pays
            fields = self._prefix_fields(prompt, stats)
            if "prompt_zstd" in fields:
                del req.prompt[:]
                req.prompt_zstd = fields["prompt_zstd"]
        fut = self.client.open_async(req)
        def stall():
            return self.drafter.stall_s
        with Hold(device, len(prompt), stall=stall):
            logits = self.drafter.prefill(prompt)
        if last is not None:
            t_draft = last.t_draft.value
        else:  # one probe token prices a draft step; rolled back at once
            t = time.monotonic()
            with Hold(device, 1, stall=stall):
                self.drafter.eval([int(logits.argmax())])
            t_draft = time.monotonic() - t
            self.drafter.truncate(len(prompt))
        reply = self.client.open_result(fut)
        stats.emulated = stats.emulated or reply.emulated
        open_s = time.monotonic() - t_open
        rtt = max(0.0005, open_s - reply.server_s)
        planner = Planner(cfg.pipelined, t_draft, rtt, reply.verify_a_s, reply.verify_b_s, reply.ar_token_s,
                          prior_accept=self.learned_accept if self.learned_accept is not None else 0.8,
                          gamma=cfg.gamma, window=cfg.window, lead=cfg.pipelined and cfg.cloud_lead,
                          lead_after_rtt=codec == Codec.P and not cfg.sampling.greedy, started=t_open)
        if last is not None:   # what siblings yield and cost on this pair and link (edge/planner.py)
            planner.sibling_gain, planner.sibling_s = last.sibling_gain, last.sibling_s
        self._last_planner = planner
        if cfg.adaptive and not planner.plan().worth_starting:
            raise SwitchToCloudOnly(reply.session)  # the stream continues from the prefilled cache
        stream = self.client.speculate(reply.session)
        spec = Speculator(stream, self.drafter, prompt, cfg, codec, reply.token_width, self.eos, planner,
                          device, emit, stats, t0, logits, tree_branches=reply.tree_branches, max_draft=reply.max_draft)
        handed = False
        try:
            if reply.HasField("lead_token"):
                spec.take_first_lead(reply.lead_token)
            spec.run()
        except SwitchToCloudOnly as switch:
            # Stream the rest from the same session: its cache holds the prompt and every token
            # so far, where a new session would prefill them all again (measured at 32 sessions:
            # 15 switched, each re-sending ~100-200 tokens while the others waited on the passes).
            if switch.session or not stream.hand_over(cfg.stall_timeout_s):
                raise
            handed = True
            raise SwitchToCloudOnly(reply.session) from None
        finally:
            stats.gamma, stats.window = spec.plan.gamma, spec.plan.window
            if planner.blocks:
                self.learned_accept = planner.accept.value
            if not handed:
                stream.close()
