"""The two single-model modes: cloud-only streaming and edge-only drafting."""
from __future__ import annotations

import time
from typing import Callable

from edge.client import VerifierClient
from edge.config import GenConfig
from edge.drafter import Drafter
from edge.stats import GenStats
from kernels.sampling import STREAM_TARGET, logits_to_probs, rng_for, sample
from proto import tandem_pb2 as pb
from sim.latency import DEVICES, Hold, lookup

OnTokens = Callable[[list[int]], None]


def sampling_proto(cfg: GenConfig) -> pb.Sampling:
    s = cfg.sampling
    return pb.Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)


def cloud_only(client: VerifierClient, fingerprint: str, prompt: list[int], cfg: GenConfig,
               on_tokens: OnTokens, stats: GenStats, t0: float, limit: int | None = None,
               session: str = "", prompt_fields: dict | None = None) -> list[int]:
    """Stream `limit` (default max_tokens) tokens from the verifier's own decoding,
    continuing `session`'s prefilled cache when given. `prompt_fields`: how the
    prompt travels (proto.prompt_zstd.prompt_fields), default plain."""
    out: list[int] = []
    req = pb.GenerateRequest(fingerprint=fingerprint, sampling=sampling_proto(cfg),
                             max_tokens=limit or cfg.max_tokens, ignore_eos=not cfg.stop_at_eos,
                             client="edge-agent", session=session, **(prompt_fields or {"prompt": prompt}))
    for tok in client.generate(req, stall_timeout_s=cfg.stall_timeout_s):
        if not stats.ttft_s and not stats.tokens:
            stats.ttft_s = time.monotonic() - t0
        out.append(tok)
        stats.tokens += 1
        on_tokens([tok])
    return out


def edge_only(drafter: Drafter, prompt: list[int], cfg: GenConfig, eos: int, on_tokens: OnTokens,
              stats: GenStats, t0: float, limit: int | None = None,
              stop: Callable[[], bool] | None = None) -> list[int]:
    """The drafter alone: a different model from the target, so never a speed
    choice, only what the edge can do when the cloud is gone. `stop` is asked
    after every token (the verifier is back: hand over to it)."""
    device = lookup(DEVICES, cfg.emulate_device, "device") if cfg.emulate_device else None
    def stall():
        return drafter.stall_s
    with Hold(device, len(prompt), stall=stall):
        logits = drafter.prefill(prompt)
    out: list[int] = []
    pos = len(prompt)
    while len(out) < (limit or cfg.max_tokens):
        tok = sample(logits_to_probs(logits, cfg.sampling), rng_for(cfg.sampling.seed, pos, STREAM_TARGET))
        out.append(tok)
        stats.tokens += 1
        stats.edge_only_tokens += 1
        if stats.tokens == 1:
            stats.ttft_s = time.monotonic() - t0
        on_tokens([tok])
        if (tok == eos and cfg.stop_at_eos) or (stop is not None and stop()):
            break
        with Hold(device, 1, stall=stall) as hold:
            logits = drafter.eval([tok])
        stats.note_draft_step(hold)
        pos += 1
    return out
