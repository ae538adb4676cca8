"""One completion, whatever the mode: the orchestration around the loops.

Speculation falls back to cloud-only streaming when the planner finds it does
not pay, and to edge-only generation when the cloud is lost (marked in the
stats); it reconnects and resumes by re-opening with the committed prefix. A
token once handed to the user is never retracted.
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
from edge.config import GenConfig
from edge.drafter import Drafter
from edge.picospec import Speculator, SwitchToCloudOnly, choose_codec, open_request
from edge.planner import Planner
from edge.stats import GenStats
from sim.latency import DEVICES, Hold, lookup

log = logging.getLogger("tandem.edge")

# Errors that say the request itself is wrong: falling back would hide them.
FATAL = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED}
EDGE_ONLY_CHUNK = 16
# A verifier that answers the channel probe but keeps failing the request is
# broken, not lost: give up after this many failures in a row with no progress.
MAX_FAILURES_WITHOUT_PROGRESS = 3
REPROBE_EVERY = 8


@dataclass
class Completion:
    tokens: list[int]
    stats: GenStats


class Agent:
    def __init__(self, client: VerifierClient | None, drafter: Drafter | None, fingerprint: str,
                 n_vocab: int, eos: int):
        self.client, self.drafter = client, drafter
        self.fingerprint, self.n_vocab, self.eos = fingerprint, n_vocab, eos
        # What the last session learned about this drafter/target pair: the next
        # one starts from it instead of a guess (an edge serves many requests).
        self.learned_accept: float | None = None
        self.last_planner: Planner | None = None
        self.skipped = 0      # sessions sent straight to cloud-only since the last probe

    def generate(self, prompt: list[int], cfg: GenConfig,
                 on_tokens: Callable[[list[int]], None] = lambda t: None) -> Completion:
        t0 = time.monotonic()
        stats = GenStats(mode=cfg.mode, emulated=cfg.emulate_device is not None)
        out: list[int] = []
        bytes0 = (self.client.bytes.up, self.client.bytes.down) if self.client else (0, 0)

        def emit(tokens: list[int]) -> None:
            out.extend(tokens)
            on_tokens(tokens)

        mode = cfg.mode
        handover = ""         # a session the cloud-only stream may continue
        if mode in ("picospec", "sync", "edge-only") and self.drafter is None:
            raise ValueError(f"mode {mode} needs a draft model")
        cloud_lost = False
        failures, progress_at = 0, -1
        while len(out) < cfg.max_tokens and not (out and out[-1] == self.eos and cfg.stop_at_eos):
            left = dataclasses.replace(cfg, max_tokens=cfg.max_tokens - len(out))
            if cloud_lost and not self._reachable():
                # keep the user served from the edge, in chunks, until the verifier answers again
                chunk = dataclasses.replace(left, max_tokens=min(EDGE_ONLY_CHUNK, left.max_tokens))
                edge_only(self.drafter, prompt + out, chunk, self.eos, emit, stats, t0)
                continue
            cloud_lost = False
            try:
                if mode == "edge-only":
                    edge_only(self.drafter, prompt + out, left, self.eos, emit, stats, t0)
                elif mode == "cloud-only":
                    cloud_only(self.client, self.fingerprint, prompt + out, left, emit, stats, t0, session=handover)
                else:
                    self._speculate(prompt + out, left, emit, stats, t0)
                break
            except SwitchToCloudOnly as switch:
                handover = switch.session
                log.info("speculation does not pay here: streaming from the cloud after %d tokens", len(out))
                stats.fallback = "cloud-only"
                mode = "cloud-only"
            except CloudError as e:
                if e.code in FATAL or mode == "edge-only" or self.drafter is None:
                    raise
                failures = failures + 1 if progress_at == len(out) else 1
                progress_at = len(out)
                if failures >= MAX_FAILURES_WITHOUT_PROGRESS and self._reachable():
                    raise CloudError(e.code, f"verifier failed {failures} times in a row without progress: {e}") from e
                log.warning("cloud lost (%s): generating edge-only, will reconnect", e)
                stats.fallback = "edge-only"
                cloud_lost = True
        stats.wall_s = time.monotonic() - t0
        if self.client is not None:
            stats.bytes_up = self.client.bytes.up - bytes0[0]
            stats.bytes_down = self.client.bytes.down - bytes0[1]
        if self.drafter is not None:
            stats.drafter = self.drafter.stats()
        return Completion(out[:cfg.max_tokens], stats)

    def _reachable(self) -> bool:
        try:
            grpc.channel_ready_future(self.client.channel).result(timeout=0.5)
            return True
        except grpc.FutureTimeoutError:
            return False

    def _speculate(self, prompt: list[int], cfg: GenConfig, emit, stats: GenStats, t0: float) -> None:
        device = lookup(DEVICES, cfg.emulate_device, "device") if cfg.emulate_device else None
        last = self.last_planner
        if cfg.adaptive and last is not None and last.pipelined == cfg.pipelined and not last.plan().worth_starting:
            if self.skipped < REPROBE_EVERY:
                self.skipped += 1     # known not to pay on this link: don't even open a session
                raise SwitchToCloudOnly()
            self.skipped = 0          # conditions change: measure again now and then
        codec = choose_codec(cfg, self.n_vocab, last)
        stats.codec = codec
        t_open = time.monotonic()
        fut = self.client.open_async(open_request(self.fingerprint, cfg, codec, prompt))
        with Hold(device, len(prompt)):
            logits = self.drafter.prefill(prompt)
        if last is not None:
            t_draft = last.t_draft.value
        else:  # one probe token prices a draft step; rolled back at once
            t = time.monotonic()
            with Hold(device, 1):
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
                          lead_after_rtt=codec == "P" and not cfg.sampling.greedy)
        if last is not None:   # what siblings yield and cost on this pair and link (edge/planner.py)
            planner.sibling_gain, planner.sibling_s = last.sibling_gain, last.sibling_s
        self.last_planner = planner
        if cfg.adaptive and not planner.plan().worth_starting:
            raise SwitchToCloudOnly(reply.session)  # the stream continues from the prefilled cache
        stream = self.client.speculate(reply.session)
        spec = Speculator(stream, self.drafter, prompt, cfg, codec, reply.token_width, self.eos, planner,
                          device, emit, stats, t0, logits, tree_branches=reply.tree_branches, max_draft=reply.max_draft)
        try:
            spec.run()
        finally:
            stats.gamma, stats.window = spec.plan.gamma, spec.plan.window
            if planner.blocks:
                self.learned_accept = planner.accept.value
            stream.close()
