"""`tandem-bench load`: N concurrent edge sessions against one verifier.

What one verifier carries: aggregate tokens/s, each session's tokens/s and the
99th percentile gap between tokens, for N = 1, 2, 4, 8 (--quick) and 16, 32,
cloud-only and picospec, batching on and off (`cloud-verifier --no-batching`),
the real SmolLM2 target and an emulated Qwen3-32B on an A100. Every session
goes through link-sim (picospec-wan: 10/10 Mbit/s, 50 ms RTT).

The load generator: N real edge agents (the real gRPC client and PicoSpec
loop) in one process, whose drafter *replays* the real drafter's proposals.
Before the run, the target's greedy continuation of each prompt is computed,
and the default drafter (draft-l29) is evaluated teacher-forced along it; at
T=0 a session's output is that continuation, so the replayed draft at each
position is exactly what the real drafter would propose there (a draft past a
wrong token is rejected anyway) and acceptance equals the real drafter's. The
edges thus cost almost no CPU and leave the cores to the verifier. Draft steps
take an emulated Jetson Orin's time (jetson-orin profile), so picospec rows are
labelled emulated on the edge side whatever the target.

Beside it, in the same run: a bare llama-cpp-python loop decoding 1 and 8
sequences together (best of 1 and 2 threads), the ceiling for the real target.
Capacity: the most sessions one verifier carries while every session still
gets >= 10 tokens/s (emulated 32B), cloud-only against picospec.
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

from common.procs import ROOT, start_cloud, start_link
from bench.report import RESULTS, markdown_table, pyplot, write_json
from edge.drafter import Drafter

TARGETS = ["smollm2-135m", "emulated:qwen3-32b-a100"]
MODES = ["cloud-only", "picospec"]
QUICK_N = [1, 2, 4, 8]
FULL_N = QUICK_N + [16, 32]
PROMPTS = [
    "Explain why the sky is blue.", "Write a short poem about rivers and the sea, in four lines.",
    "How do vaccines work?", "Give three tips for learning a language quickly.",
    "What is a black hole? Answer for a curious ten-year-old who likes space.", "Describe how bread is made.",
    "Why do cats purr?", "What is the Pythagorean theorem, and who first proved it?",
    "List the planets of the solar system.", "Write a haiku about mountains.",
    "What are the main causes of climate change, and what can one person do about them?",
    "How does a bicycle stay upright?", "Suggest a name for a coffee shop.", "What is photosynthesis?",
    "Tell me a joke about computers.", "Why is exercise good for the brain?",
]
DEVICE = "jetson-orin"
CAPACITY_TOKENS_PER_S = 10.0
COLUMNS = ["target", "mode", "batching", "n_sessions", "aggregate_tokens_per_s", "session_tokens_per_s_p50",
           "session_tokens_per_s_min", "session_decode_tokens_per_s_p50", "inter_token_p99_s", "tokens_per_pass", "acceptance_rate", "fallbacks",
           "emulated"]


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


def greedy_paths(prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """The target's own greedy continuation of each prompt (one sequence, one token at a time)."""
    from cloud.target import INVARIANT_BATCH, Chunk, Target
    from edge.model_files import shipped_gguf
    target = Target(shipped_gguf(), n_ctx=1024, n_seqs=1, n_threads=1)
    paths = []
    for p in prompts:
        target.clear(0)
        for i in range(0, len(p), INVARIANT_BATCH):
            row = target.decode([Chunk(0, i, p[i:i + INVARIANT_BATCH], 1)])[0][-1]
        out = []
        for _ in range(n_tokens):
            out.append(int(np.argmax(row)))
            row = target.decode([Chunk(0, len(p) + len(out) - 1, out[-1:], 1)])[0][-1]
        paths.append(out)
    target.close()
    return paths


def drafter_proposals(prompt: list[int], path: list[int]) -> dict[int, int]:
    """position -> the real drafter's greedy token there, given the target's path before it."""
    from edge.derive import DEFAULT_DRAFT, ensure
    from edge.llama_model import LlamaDrafter
    d = drafter_proposals.model = getattr(drafter_proposals, "model", None) or LlamaDrafter(
        ensure(DEFAULT_DRAFT, quiet=True), n_threads=1)
    logits = d.prefill(prompt)
    out = {}
    for j, tok in enumerate(path):
        out[len(prompt) + j] = int(np.argmax(logits))
        logits = d.eval([tok])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(tandem_\w+) ([0-9.e+-]+)$", text, re.M)}


def wait_idle(port: int, timeout_s: float = 30.0) -> dict[str, float]:
    """Metrics once the last cell's sessions have all been freed."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(port)
        if m.get("tandem_verifier_sessions", 0) == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def run_cell(address: str, tok, work: list[tuple], mode: str, n: int, n_tokens: int, metrics_port: int) -> dict:
    """N sessions at once; work[i % len(work)] = (prompt, proposals)."""
    from edge.agent import Agent
    from edge.client import VerifierClient
    from edge.config import GenConfig
    cfg = GenConfig(mode=mode, max_tokens=n_tokens, stop_at_eos=False, require_cloud=True,
                    emulate_device=DEVICE if mode != "cloud-only" else None)
    before = wait_idle(metrics_port)
    start = threading.Barrier(n)
    results: list[dict] = [None] * n

    def session(i: int) -> None:
        prompt, proposals = work[i % len(work)]
        client = VerifierClient(address)
        client.wait_ready()
        drafter = None if mode == "cloud-only" else ReplayDrafter(proposals, tok.n_vocab, tok.eos)
        agent = Agent(client, drafter, tok.fingerprint, tok.n_vocab, tok.eos)
        stamps: list[float] = []
        start.wait()
        t0 = time.monotonic()
        try:
            c = agent.generate(prompt, cfg, lambda t: stamps.extend([time.monotonic()] * len(t)))
            results[i] = {"t0": t0, "t1": time.monotonic(), "tokens": len(c.tokens), "stamps": stamps,
                          "verified": c.stats.verified, "accepted": c.stats.accepted,
                          "fallback": c.stats.fallback, "error": None}
        except Exception as e:  # noqa: BLE001 - a failed session is reported, not fatal to the run
            results[i] = {"t0": t0, "t1": time.monotonic(), "tokens": 0, "stamps": [], "verified": 0,
                          "accepted": 0, "fallback": None, "error": str(e)}
        finally:
            client.close()

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = scrape(metrics_port)
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        print(f"[load] {len(errors)} of {n} sessions failed: {errors[0]}", file=sys.stderr)
    span = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    rates = [r["tokens"] / (r["t1"] - r["t0"]) for r in results]
    # after the first token (no prefill, no round trip to open): comparable with a bare decoding loop
    decode = [(len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in results if len(r["stamps"]) > 2]
    gaps = [b - a for r in results for a, b in zip([r["t0"]] + r["stamps"], r["stamps"])][1:]
    passes = after.get("tandem_verifier_pass_tokens_count", 0) - before.get("tandem_verifier_pass_tokens_count", 0)
    tokens = after.get("tandem_verifier_pass_tokens_sum", 0) - before.get("tandem_verifier_pass_tokens_sum", 0)
    verified = sum(r["verified"] for r in results)
    return {"n_sessions": n, "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / span,
            "session_tokens_per_s_p50": statistics.median(rates), "session_tokens_per_s_min": min(rates),
            "session_decode_tokens_per_s_p50": statistics.median(decode) if decode else None,
            "inter_token_p99_s": float(np.percentile(gaps, 99)) if gaps else None,
            "tokens_per_pass": tokens / passes if passes else None,
            "acceptance_rate": sum(r["accepted"] for r in results) / verified if verified else None,
            "fallbacks": sum(r["fallback"] is not None for r in results), "failed": len(errors)}


def start_stack(target: str, batching: bool, max_sessions: int):
    """A verifier with metrics behind link-sim (picospec-wan): (cloud, link, metrics port, threads)."""
    port = free_port()
    extra = ["--max-sessions", str(max_sessions), "--metrics", f"127.0.0.1:{port}"]
    extra += ["--emulate-target", target.split(":", 1)[1]] if target.startswith("emulated:") else []
    extra += [] if batching else ["--no-batching"]
    cloud = start_cloud(*extra)
    link = start_link(cloud.address, "--profile", "picospec-wan")
    threads = next((m.group(1) for line in cloud.stderr for m in [re.search(r"(\d+) threads", line)] if m), "?")
    return cloud, link, port, threads


def bare_loop(n_seqs: int, n_tokens: int) -> dict:
    """Best of 1 and 2 threads for a bare llama-cpp-python loop of n_seqs sequences."""
    best = {}
    for threads in (1, 2):
        out = subprocess.run([sys.executable, "-m", "bench.bare", "--seqs", str(n_seqs), "--threads", str(threads),
                              "--tokens", str(n_tokens)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"bare loop failed: {out.stderr[-500:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if r["tokens_per_s"] > best.get("tokens_per_s", 0):
            best = r
    return best


def capacity(rows: list[dict]) -> list[dict]:
    out = []
    for mode in MODES:
        ok = [r["n_sessions"] for r in rows if r["target"] == TARGETS[1] and r["mode"] == mode and r["batching"]
              and r["session_tokens_per_s_min"] >= CAPACITY_TOKENS_PER_S and not r.get("failed")]
        tried = [r["n_sessions"] for r in rows if r["target"] == TARGETS[1] and r["mode"] == mode and r["batching"]]
        out.append({"mode": mode, "sessions_at_10_tok_s": max(ok) if ok else 0, "largest_n_tried": max(tried or [0])})
    return out


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="N = 1, 2, 4, 8 and 32 tokens per session (< 6 min)")
    ap.add_argument("--json", type=Path, default=RESULTS / "load.json", help="output JSON (default: %(default)s)")
    ap.add_argument("--sessions", type=int, nargs="+", help="N values to run (default: 1 2 4 8, full: + 16 32)")
    ap.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    ap.add_argument("--tokens", type=int, help="tokens per session (default: 32 quick, 64 full)")


def run(args) -> int:
    from edge.llama_model import Tokenizer
    from edge.model_files import shipped_gguf
    t_start = time.monotonic()
    ns = args.sessions or (QUICK_N if args.quick else FULL_N)
    n_tokens = args.tokens or (32 if args.quick else 64)
    tok = Tokenizer(shipped_gguf())
    prompts = [tok.encode(p) for p in PROMPTS[:max(ns)]]
    print(f"[load] target greedy paths and replayed proposals for {len(prompts)} prompts ...", flush=True)
    paths = greedy_paths(prompts, n_tokens)
    work = [(p, drafter_proposals(p, path)) for p, path in zip(prompts, paths)]
    bare = {n: bare_loop(n, n_tokens) for n in (1, 8)}
    print(f"[load] bare llama-cpp-python loop: 1 sequence {bare[1]['tokens_per_s']:.1f} tok/s "
          f"({bare[1]['threads']} threads), 8 sequences {bare[8]['tokens_per_s']:.1f} tok/s "
          f"({bare[8]['threads']} threads)  [{time.monotonic() - t_start:.0f}s]", flush=True)
    rows: list[dict] = []
    for target in args.targets:
        # batching on and off side by side, taking turns cell by cell, so that a change in the load
        # of a shared machine is not charged to one of them
        stacks = {b: start_stack(target, b, max(ns)) for b in (True, False)}
        try:
            for n in ns:
                for mode in MODES:
                    for batching, (cloud, link, port, threads) in stacks.items():
                        r = run_cell(link.address, tok, work, mode, n, n_tokens, port)
                        r.update(target=target, mode=mode, batching=batching,
                                 emulated=target.startswith("emulated:") or mode != "cloud-only",
                                 verifier_threads=threads, tokens_per_session=n_tokens)
                        rows.append(r)
                        print(f"[load {target} batching={'on' if batching else 'off'} {mode} N={n}: "
                              f"{r['aggregate_tokens_per_s']:.1f} tok/s aggregate, "
                              f"{r['session_tokens_per_s_p50']:.1f} per session  "
                              f"[{time.monotonic() - t_start:.0f}s]", flush=True)
        finally:
            for cloud, link, *_ in stacks.values():
                link.stop()
                cloud.stop()
    cap = capacity(rows)
    summary = {"bare_loop": bare, "capacity": cap, "capacity_threshold_tokens_per_s": CAPACITY_TOKENS_PER_S,
               "load_generator": "replayed draft-l29 proposals along the target's greedy path (T=0), "
                                 f"{DEVICE} draft-step timing; every session through link-sim picospec-wan",
               "machine": "2 CPU cores (shared)", "seconds": round(time.monotonic() - t_start, 1)}
    write_json(rows, args.json)
    args.json.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = [f"# tandem-bench load\n\n{__doc__.split(chr(10) * 2)[0]}\n",
          markdown_table(rows, COLUMNS), "",
          f"Bare llama-cpp-python loop (same run): 1 sequence {bare[1]['tokens_per_s']:.1f} tok/s, "
          f"8 sequences {bare[8]['tokens_per_s']:.1f} tok/s (best of 1 and 2 threads).", "",
          "Capacity (emulated Qwen3-32B, batching on; sessions while each gets >= 10 tok/s): "
          + ", ".join(f"{c['mode']} {c['sessions_at_10_tok_s']} (of up to {c['largest_n_tried']} tried)" for c in cap)]
    args.json.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(rows, args.json.with_suffix(".png"))
    print("\n".join(md[1:]))
    print(f"[load] wrote {args.json} (+ .md, .png, .summary.json) in {time.monotonic() - t_start:.0f}s")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(11, 4))
    for ax, target in zip(np.atleast_1d(axes), TARGETS):
        for mode in MODES:
            for batching in (True, False):
                pts = sorted((r["n_sessions"], r["aggregate_tokens_per_s"]) for r in rows
                             if r["target"] == target and r["mode"] == mode and r["batching"] == batching)
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="-" if batching else "--",
                            label=f"{mode}, batching {'on' if batching else 'off'}")
        ax.set_title(target)
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
