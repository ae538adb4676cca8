"""The load generator `tandem-bench load` and `tandem-bench capacity` share.

N real edge agents (the real gRPC client and PicoSpec loop) in one process,
whose drafter *replays* the real drafter's proposals. Before a run, the
target's greedy continuation of each prompt is computed, and the default
drafter (draft-l29) is evaluated teacher-forced along it; at T=0 a session's
output is that continuation, so the replayed draft at each position is exactly
what the real drafter would propose there (a draft past a wrong token is
rejected anyway) and acceptance equals the real drafter's. The edges thus cost
little CPU and leave the cores to the verifier. Draft steps take an emulated
Jetson Orin's time (`DEVICE`).

A cell (`run_cell`) starts N sessions at once against one verifier, scrapes the
verifier's /metrics before and after, and measures what each session got and
what the generator itself spent (`loadgen_cpu_share`): when the generator's
threads need most of a core, sessions wait for it rather than for the verifier,
and the cell says so (`loadgen_kept_up` false).
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.harness import scrape
from common.procs import Daemon, free_port, start_cloud, start_link
from common.rates import stream_rate
from common.rowstore import identity_hash, model_identity
from edge.drafter import Drafter

DEVICE = "jetson-orin"
# The generator's Python threads share one interpreter lock, so they saturate at
# about one core: above this share of a core, sessions queue for the generator.
LOADGEN_MAX_CPU_SHARE = 0.8


class ReplayDrafter(Drafter):
    """Proposes, at each position, what the real drafter proposes there along the
    target's greedy path (`proposals[pos]`); one-hot logits, no model."""
    name = "replay:draft-l29"

    def __init__(self, proposals: dict[int, int], n_vocab: int, fallback: int):
        self.proposals, self._n_vocab, self.fallback = proposals, n_vocab, fallback
        self._n = 0

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_past(self) -> int:
        return self._n

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        self._n += len(tokens)
        logits = np.zeros(self._n_vocab, np.float32)
        logits[self.proposals.get(self._n, self.fallback)] = 1.0
        return logits

    def truncate(self, n_past: int) -> None:
        self._n = min(self._n, n_past)


@dataclass(frozen=True)
class Work:
    """One session's prompt and the real drafter's proposal at each position along the target's path."""
    prompt: list[int]
    proposals: dict[int, int]


def greedy_paths(prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """The target's own greedy continuation of each prompt (one sequence, one token at a time)."""
    from cloud.target import INVARIANT_BATCH, Chunk, Target
    from edge.model_files import shipped_gguf
    n_ctx = max(len(p) for p in prompts) + n_tokens + 16
    target = Target(shipped_gguf(), n_ctx=max(1024, n_ctx), n_seqs=1, n_threads=1)
    paths = []
    try:
        for p in prompts:
            target.clear(0)
            for i in range(0, len(p), INVARIANT_BATCH):
                row = target.decode([Chunk(0, i, p[i:i + INVARIANT_BATCH], 1)])[0][-1]
            out = []
            for _ in range(n_tokens):
                out.append(int(np.argmax(row)))
                row = target.decode([Chunk(0, len(p) + len(out) - 1, out[-1:], 1)])[0][-1]
            paths.append(out)
    finally:
        target.close()
    return paths


def drafter_proposals(drafter, prompt: list[int], path: list[int]) -> dict[int, int]:
    """position -> the real drafter's greedy token there, given the target's path before it."""
    logits = drafter.prefill(prompt)
    out = {}
    for j, tok in enumerate(path):
        out[len(prompt) + j] = int(np.argmax(logits))
        logits = drafter.eval([tok])
    return out


def replay_work(prompts: list[list[int]], n_tokens: int, memo_dir: Path | None = None) -> list[Work]:
    """Each prompt with the default drafter's proposals along the target's greedy path.
    With `memo_dir`, kept there (JSON) under both models' identities, this build's and the
    prompts': computing them takes minutes on 2 cores, and a rerun needs the same ones."""
    from edge.derive import DEFAULT_DRAFT, ensure
    from edge.llama_model import LlamaDrafter
    from edge.model_files import shipped_gguf
    draft = ensure(DEFAULT_DRAFT, quiet=True)
    memo = None
    if memo_dir is not None:
        key = identity_hash({"target": model_identity(shipped_gguf(), "target"),
                             "drafter": model_identity(draft, "drafter"), "prompts": prompts, "tokens": n_tokens})
        memo = memo_dir / f"replay-{key[:24]}.json"
        if memo.exists():
            return [Work(w["prompt"], {int(k): v for k, v in w["proposals"].items()})
                    for w in json.loads(memo.read_text())]
    paths = greedy_paths(prompts, n_tokens)
    drafter = LlamaDrafter(draft, n_ctx=max(1024, max(map(len, prompts)) + n_tokens + 16), n_threads=1)
    try:
        work = [Work(p, drafter_proposals(drafter, p, path)) for p, path in zip(prompts, paths)]
    finally:
        drafter.close()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"prompt": w.prompt, "proposals": w.proposals} for w in work]))
        tmp.replace(memo)                   # whole or absent: an interrupted run leaves no half file
    return work


def wait_idle(port: int, timeout_s: float = 30.0) -> dict[str, float]:
    """Metrics once the last cell's sessions have all been freed."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(f"127.0.0.1:{port}")
        if m.get("tandem_verifier_sessions", 0) == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """How much a counter grew over a cell; None where the verifier does not export it."""
    if name not in after:
        return None
    return after[name] - before.get(name, 0.0)


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def machine_busy() -> tuple[float, float] | None:
    """(busy, total) jiffies of every core since boot, from /proc/stat (None off Linux)."""
    try:
        with open("/proc/stat") as fh:
            f = [float(x) for x in fh.readline().split()[1:]]
    except OSError:
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0.0)     # idle + iowait
    return sum(f) - idle, sum(f)


@dataclass
class Stack:
    """A verifier with metrics behind one link-sim per link profile."""
    cloud: Daemon
    links: dict[str, Daemon]
    metrics_port: int
    threads: str
    cache_read_only: bool = False    # another process writes the row cache: this run cannot warm it

    def stop(self) -> None:
        for link in self.links.values():
            link.stop()
        self.cloud.stop()


def start_stack(target: str, profiles: Sequence[str], max_sessions: int, *extra: str) -> Stack:
    """A verifier for `target` (`emulated:PROFILE` or the real one) with /metrics, and a
    link-sim per profile in front of it. Every session of a profile shares its link-sim."""
    port = free_port()
    args = ["--max-sessions", str(max_sessions), "--metrics", f"127.0.0.1:{port}", *extra]
    args += ["--emulate-target", target.split(":", 1)[1]] if target.startswith("emulated:") else []
    cloud = start_cloud(*args)
    links: dict[str, Daemon] = {}
    try:
        for p in profiles:
            links[p] = start_link(cloud.address, "--profile", p)
    except Exception:
        for link in links.values():
            link.stop()
        cloud.stop()
        raise
    threads = next((m.group(1) for line in cloud.stderr for m in [re.search(r"(\d+) threads", line)] if m), "?")
    read_only = any("target cache:" in line and "read-only" in line for line in cloud.stderr)
    return Stack(cloud, links, port, threads, read_only)


def run_sessions(address: str, tok, work: list[Work], cfg, n: int) -> list[dict]:
    """N sessions started together; session i runs work[i % len(work)]. One dict per session."""
    from edge.agent import Agent
    from edge.client import VerifierClient
    start = threading.Barrier(n)
    results: list[dict] = [{}] * n

    def session(i: int) -> None:
        w = work[i % len(work)]
        client = VerifierClient(address)
        client.wait_ready()
        drafter = None if cfg.mode == "cloud-only" else ReplayDrafter(w.proposals, tok.n_vocab, tok.eos)
        agent = Agent(client, drafter, tok.fingerprint, tok.n_vocab, tok.eos)
        stamps: list[float] = []
        start.wait()
        t0 = time.monotonic()
        try:
            c = agent.generate(w.prompt, cfg, lambda t: stamps.extend([time.monotonic()] * len(t)))
            # at each position of the output, whether the replayed drafter proposed that token:
            # where this session's drafts were accepted and rejected (a model replays it)
            hits = None if drafter is None else "".join(
                "1" if w.proposals.get(len(w.prompt) + j) == t else "0" for j, t in enumerate(c.tokens))
            results[i] = {"t0": t0, "t1": time.monotonic(), "tokens": len(c.tokens), "stamps": stamps,
                          "accept_path": hits,
                          "verified": c.stats.verified, "accepted": c.stats.accepted,
                          "fallback": c.stats.fallback, "bytes_up": c.stats.bytes_up,
                          "gamma": c.stats.gamma, "window": c.stats.window,
                          "bytes_down": c.stats.bytes_down, "error": None}
        except Exception as e:  # noqa: BLE001 - a failed session is reported, not fatal to the run
            results[i] = {"t0": t0, "t1": time.monotonic(), "tokens": 0, "stamps": [], "verified": 0,
                          "accepted": 0, "fallback": None, "bytes_up": 0, "bytes_down": 0, "error": str(e),
                          "accept_path": None,
                          "gamma": 0, "window": 0}
        finally:
            client.close()

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_cell(address: str, tok, work: list[Work], cfg, n: int, metrics_port: int, tag: str = "load") -> dict:
    """N concurrent sessions with generation config `cfg`: one row of what they got and what
    the verifier did meanwhile (from its /metrics), and what the generator spent.

    session_tokens_per_s_*: each session's rate once its stream started (`stream_rate`), the
    rate a reader of the stream sees; session_e2e_*: tokens over the whole request, time to
    first token included; ttft_s_*: request to first token."""
    before = wait_idle(metrics_port)
    cpu0, busy0 = time.process_time(), machine_busy()
    results = run_sessions(address, tok, work, cfg, n)
    cpu1, busy1 = time.process_time(), machine_busy()
    after = scrape(f"127.0.0.1:{metrics_port}")
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        print(f"[{tag}] {len(errors)} of {n} sessions failed: {errors[0]}", file=sys.stderr, flush=True)
    span = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    e2e = [r["tokens"] / (r["t1"] - r["t0"]) for r in results]
    # a session that got all its tokens in one arrival has no stream rate: its whole request's
    # rate stands in (0 for a failed one, so it counts against p10)
    rates = [stream_rate(r["stamps"]) or rate for r, rate in zip(results, e2e)]
    served = [rate for r, rate in zip(results, rates) if not r["error"]]
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    # within each session's stream: its time to first token is not a gap between tokens
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    passes = delta(before, after, "tandem_verifier_pass_tokens_count") or 0.0
    pass_tokens = delta(before, after, "tandem_verifier_pass_tokens_sum") or 0.0
    pass_seconds = delta(before, after, "tandem_verifier_pass_seconds_sum")
    # exported by verifiers that time each pass against its model (and may memoise target rows)
    real = delta(before, after, "tandem_verifier_pass_real_seconds_total")
    modelled = delta(before, after, "tandem_verifier_pass_modelled_seconds_total")
    over = delta(before, after, "tandem_verifier_passes_over_model_total")
    hits = delta(before, after, "tandem_verifier_target_cache_hits_total")
    misses = delta(before, after, "tandem_verifier_target_cache_misses_total")
    verified = sum(r["verified"] for r in results)
    cpu_share = (cpu1 - cpu0) / span if span > 0 else None
    busy = (busy1[0] - busy0[0]) / (busy1[1] - busy0[1]) if busy0 and busy1 and busy1[1] > busy0[1] else None
    return {"n_sessions": n,
            "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / span,
            # the sessions' streams together, prompts and first-token waits left out: the steady
            # state a model of the verifier predicts (the wall-time aggregate above includes prefill)
            "aggregate_stream_tokens_per_s": sum(rates),
            "session_tokens_per_s_p50": statistics.median(rates),
            "session_tokens_per_s_p10": float(np.percentile(rates, 10)),
            "session_tokens_per_s_min": min(rates),
            # the sessions the verifier served to the end (with SLO admission, the admitted ones)
            "served_sessions": n - len(errors),
            "served_tokens_per_s_p10": float(np.percentile(served, 10)) if served else None,
            "session_e2e_tokens_per_s_p50": statistics.median(e2e),
            "session_e2e_tokens_per_s_min": min(e2e),
            "ttft_s_p50": statistics.median(ttft) if ttft else None,
            "ttft_s_p90": float(np.percentile(ttft, 90)) if ttft else None,
            "inter_token_p99_s": float(np.percentile(gaps, 99)) if gaps else None,
            "verifier_passes_per_s": passes / span,
            "tokens_per_pass": pass_tokens / passes if passes else None,
            "pass_s_mean": ratio(pass_seconds, passes),
            "real_over_modelled": ratio(real, modelled),
            "passes_over_model_share": ratio(over, passes) if over is not None else None,
            "target_cache_hit_rate": ratio(hits, (hits or 0.0) + (misses or 0.0)) if hits is not None else None,
            "acceptance_rate": sum(r["accepted"] for r in results) / verified if verified else None,
            # each session's own (None where it verified nothing): prompts differ, and the slowest
            # sessions are the ones whose drafts the target takes least
            "session_acceptance": [r["accepted"] / r["verified"] if r["verified"] else None for r in results],
            # each session's prompt length (a model of the run prefills them: bench/fleet.py --validate)
            "session_prompt_tokens": [len(work[i % len(work)].prompt) for i in range(n)],
            "session_fallbacks": [r["fallback"] for r in results],
            # each session's stream rate and the block length and window its planner ended on
            "session_tokens_per_s": rates,
            "session_gamma": [r["gamma"] for r in results], "session_window": [r["window"] for r in results],
            # per session, a "1" or "0" per output position: the drafter's proposal there was the
            # target's token (bench/fleet.py --validate replays where rejections fell)
            "session_accept_path": [r["accept_path"] for r in results],
            # what all sessions together sent over their link: a shared link-sim must stay far above it
            "link_up_mbit_s": sum(r["bytes_up"] for r in results) * 8e-6 / span,
            "link_down_mbit_s": sum(r["bytes_down"] for r in results) * 8e-6 / span,
            "fallbacks": sum(r["fallback"] is not None for r in results), "failed": len(errors),
            "loadgen_cpu_share": cpu_share, "machine_cpu_busy": busy,
            "loadgen_kept_up": cpu_share is not None and cpu_share < LOADGEN_MAX_CPU_SHARE,
            "wall_s": span}
