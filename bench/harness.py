"""Runs completions against a real verifier through a real link-sim and
summarises them: the shared engine of the demo and the `spec` benchmark."""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass

from bench.procs import Daemon, start_cloud, start_link
from edge.agent import Agent
from edge.client import VerifierClient
from edge.config import GenConfig


@contextlib.contextmanager
def stack(profile: str, emulate_target: str | None = None, cloud_threads: int = 1):
    """A verifier behind link-sim with `profile`; yields (cloud, link).

    Edge and cloud share this machine's cores: one thread each stands in for
    two machines (with two each, a drafting edge and a verifying cloud thrash)."""
    extra = ["--threads", str(cloud_threads)] + (["--emulate-target", emulate_target] if emulate_target else [])
    cloud = start_cloud(*extra)
    link: Daemon | None = None
    try:
        link = start_link(cloud.address, "--profile", profile)
        yield cloud, link
    finally:
        if link is not None:
            link.stop()
        cloud.stop()


@dataclass
class CellResult:
    tokens: int
    wall_s: float
    ttft_s: float
    drafted: int
    verified: int
    accepted: int
    bytes_up: int
    bytes_down: int
    emulated: bool
    fallbacks: int
    texts: list

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.verified if self.verified else None


def run_cell(address: str | None, drafter, tokenizer, prompts: list[list[int]], cfg: GenConfig,
             on_tokens=None) -> CellResult:
    """Generate one completion per prompt, sequentially; aggregate like a user would see it."""
    client = None
    if address is not None:
        client = VerifierClient(address)
        client.wait_ready()
    agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos)
    res = CellResult(0, 0.0, 0.0, 0, 0, 0, 0, 0, False, 0, [])
    ttfts = []
    try:
        for p in prompts:
            c = agent.generate(p, cfg, on_tokens or (lambda t: None))
            s = c.stats
            res.tokens += s.tokens
            res.wall_s += s.wall_s
            ttfts.append(s.ttft_s)
            res.drafted += s.drafted
            res.verified += s.verified
            res.accepted += s.accepted
            res.bytes_up += s.bytes_up
            res.bytes_down += s.bytes_down
            res.emulated = res.emulated or s.emulated
            res.fallbacks += s.fallback is not None
            res.texts.append(c.tokens)
    finally:
        if client is not None:
            client.close()
    res.ttft_s = statistics.median(ttfts) if ttfts else 0.0
    return res
