"""Runs completions against a real verifier through a real link-sim and
summarises them: the shared engine of the demo and the `spec` benchmark."""
from __future__ import annotations

import contextlib
import re
import statistics
import urllib.request
from dataclasses import dataclass

from common.procs import Daemon, start_cloud, start_link
from edge.agent import Agent
from edge.client import VerifierClient
from edge.config import GenConfig


@contextlib.contextmanager
def stack(profile: str, emulate_target: str | None = None, cloud_threads: int = 1, cloud_args: tuple = ()):
    """A verifier behind link-sim with `profile`; yields (cloud, link).

    Edge and cloud share this machine's cores: one thread each stands in for
    two machines (with two each, a drafting edge and a verifying cloud thrash)."""
    extra = ["--threads", str(cloud_threads)] + (["--emulate-target", emulate_target] if emulate_target else [])
    cloud = start_cloud(*extra, *cloud_args)
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
    passes: int = 0               # verdicts on blocks (tree or chain)
    siblings: int = 0             # tree siblings sent
    sibling_hits: int = 0         # ... taken by the verifier
    tree_shapes: dict = None      # shape -> blocks sent with it
    draft_real_s: float = 0.0     # emulated draft steps: the drafter's real compute ...
    draft_modelled_s: float = 0.0  # ... and the device's modelled time
    draft_stall_s: float = 0.0    # ... and their waits on modelled storage (the MoE drafter's expert reads)
    draft_steps: int = 0
    speculated_tokens: int = 0    # tokens decided by speculation (not streamed or edge-only)
    draft_hits: int = 0           # rows from the drafter's row cache (--draft-cache)
    draft_misses: int = 0
    draft_caught_up: int = 0      # tokens the drafter's model evaluated at misses ...
    draft_background: int = 0     # ... and behind hits, off the draft steps' path

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.verified if self.verified else None


class Cell:
    """One mode's agent and its running totals, fed one prompt at a time so that
    several cells can take turns: on a shared machine a slow drift in load then
    hits every mode alike instead of whichever cell ran during it."""

    def __init__(self, address: str | None, drafter, tokenizer, cfg: GenConfig, on_tokens=None):
        self.client = None
        if address is not None:
            self.client = VerifierClient(address)
            self.client.wait_ready()
        self.agent = Agent(self.client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos)
        self.cfg, self.on_tokens = cfg, on_tokens or (lambda t: None)
        self.result = CellResult(0, 0.0, 0.0, 0, 0, 0, 0, 0, False, 0, [])
        self._ttfts: list[float] = []

    def run(self, prompt: list[int]) -> None:
        drafter = self.agent.drafter
        before = drafter.stats() if drafter is not None else {}     # a drafter's counters are over its life
        c = self.agent.generate(prompt, self.cfg, self.on_tokens)
        s, res = c.stats, self.result
        res.tokens += s.tokens
        res.wall_s += s.wall_s
        self._ttfts.append(s.ttft_s)
        res.drafted += s.drafted
        res.verified += s.verified
        res.accepted += s.accepted
        res.bytes_up += s.bytes_up
        res.bytes_down += s.bytes_down
        res.emulated = res.emulated or s.emulated
        res.fallbacks += s.fallback is not None
        res.texts.append(c.tokens)
        tree = getattr(s, "tree", None) or {}
        res.passes += tree.get("passes", 0)
        res.siblings += tree.get("siblings", 0)
        res.sibling_hits += tree.get("sibling_hits", 0)
        res.tree_shapes = res.tree_shapes or {}
        for shape, n in tree.get("shapes", {}).items():
            res.tree_shapes[shape] = res.tree_shapes.get(shape, 0) + n
        res.ttft_s = statistics.median(self._ttfts)
        res.draft_real_s += s.draft_real_s
        res.draft_modelled_s += s.draft_modelled_s
        res.draft_stall_s += s.draft_stall_s
        res.draft_steps += s.draft_steps
        res.speculated_tokens += sum(x["tokens"] for x in s.segments if x["mode"] in ("picospec", "sync"))
        for name, field in (("draft_cache_hits", "draft_hits"), ("draft_cache_misses", "draft_misses"),
                            ("draft_cache_caught_up_tokens", "draft_caught_up"),
                            ("draft_cache_background_tokens", "draft_background")):
            setattr(res, field, getattr(res, field) + s.drafter.get(name, 0) - before.get(name, 0))

    def close(self) -> CellResult:
        if self.client is not None:
            self.client.close()
        return self.result


# the verifier's counters a benchmark reads around each completion (cloud/metrics.py)
VERIFIER_COUNTERS = ("tandem_verifier_pass_real_seconds", "tandem_verifier_pass_modelled_seconds",
                     "tandem_verifier_passes_over_model", "tandem_verifier_target_cache_hits",
                     "tandem_verifier_target_cache_misses")


def scrape(metrics_address: str) -> dict[str, float]:
    """The verifier's unlabelled tandem_* samples (counters carry their `_total` suffix)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(tandem_\w+) ([0-9.e+-]+)$", text, re.M)}


def verifier_counters(metrics_address: str) -> dict[str, float]:
    """The verifier's compute counters now (0 where it does not export one)."""
    now = scrape(metrics_address)
    return {name: now.get(name + "_total", 0.0) for name in VERIFIER_COUNTERS}


def run_cell(address: str | None, drafter, tokenizer, prompts: list[list[int]], cfg: GenConfig,
             on_tokens=None) -> CellResult:
    """Generate one completion per prompt, sequentially; aggregate like a user would see it."""
    cell = Cell(address, drafter, tokenizer, cfg, on_tokens)
    try:
        for p in prompts:
            cell.run(p)
    finally:
        cell.close()
    return cell.result
