"""`tandem-bench load`: N concurrent edge sessions against one verifier.

What one verifier carries: aggregate tokens/s, each session's tokens/s and the
99th percentile gap between tokens, for N = 1, 2, 4, 8 (--quick) and 16, 32,
cloud-only and picospec, batching on and off (`cloud-verifier --no-batching`),
the real SmolLM2 target and an emulated Qwen3-32B on an A100. Every session
goes through link-sim (picospec-wan: 10/10 Mbit/s, 50 ms RTT).

The load generator (bench/loadgen.py, shared with `tandem-bench capacity`): N
real edge agents (the real gRPC client and PicoSpec loop) in one process, whose
drafter *replays* the real drafter's (draft-l29) proposals along the target's
greedy path, so acceptance equals the real drafter's at T=0 while the edges
leave the cores to the verifier. Draft steps take an emulated Jetson Orin's
time (jetson-orin profile), so picospec rows are labelled emulated on the edge
side whatever the target.

Beside it, in the same run: a bare llama-cpp-python loop decoding 1 and 8
sequences together (best of 1 and 2 threads), the ceiling for the real target.
Capacity: the most sessions one verifier carries while every session still
gets >= 10 tokens/s (emulated 32B), cloud-only against picospec.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.procs import ROOT
from bench.loadgen import DEVICE, replay_work, run_cell
from bench.loadgen import start_stack as start_stack_of
from bench.report import RESULTS, markdown_table, pyplot, write_json

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
CAPACITY_TOKENS_PER_S = 10.0
COLUMNS = ["target", "mode", "batching", "n_sessions", "aggregate_tokens_per_s", "session_e2e_tokens_per_s_p50",
           "session_e2e_tokens_per_s_min", "session_tokens_per_s_p50", "inter_token_p99_s", "tokens_per_pass", "acceptance_rate", "fallbacks",
           "share_of_bare", "emulated"]


def gen_config(mode: str, n_tokens: int):
    from edge.config import GenConfig
    return GenConfig(mode=mode, max_tokens=n_tokens, stop_at_eos=False, require_cloud=True,
                     emulate_device=DEVICE if mode != "cloud-only" else None)


def start_stack(target: str, batching: bool, max_sessions: int):
    """A verifier with metrics behind link-sim (picospec-wan): (cloud, link, metrics port, threads)."""
    s = start_stack_of(target, ["picospec-wan"], max_sessions, *([] if batching else ["--no-batching"]))
    return s.cloud, s.links["picospec-wan"], s.metrics_port, s.threads


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


def add_shares(rows: list[dict], before: dict, after: dict) -> None:
    """Each real-target row of 1 or 8 sessions gets the bare loop of as many sequences
    (`bare_tokens_per_s`, the mean of the runs before and after the cells) and its streams'
    aggregate over it (`share_of_bare`): what the verifier keeps of the model's own speed with
    its edges and link-sim on the same cores."""
    for r in rows:
        n = r["n_sessions"]
        if r["target"].startswith("emulated:") or n not in before or n not in after:
            continue
        r["bare_tokens_per_s"] = (before[n]["tokens_per_s"] + after[n]["tokens_per_s"]) / 2
        r["share_of_bare"] = r["aggregate_stream_tokens_per_s"] / r["bare_tokens_per_s"]


def capacity(rows: list[dict]) -> list[dict]:
    out = []
    for mode in MODES:
        ok = [r["n_sessions"] for r in rows if r["target"] == TARGETS[1] and r["mode"] == mode and r["batching"]
              and r["session_e2e_tokens_per_s_min"] >= CAPACITY_TOKENS_PER_S and not r.get("failed")]
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
    work = replay_work(prompts, n_tokens)
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
                        r = run_cell(link.address, tok, work, gen_config(mode, n_tokens), n, port)
                        r.update(target=target, mode=mode, batching=batching,
                                 emulated=target.startswith("emulated:") or mode != "cloud-only",
                                 verifier_threads=threads, tokens_per_session=n_tokens)
                        rows.append(r)
                        print(f"[load {target} batching={'on' if batching else 'off'} {mode} N={n}: "
                              f"{r['aggregate_tokens_per_s']:.1f} tok/s aggregate, "
                              f"{r['session_e2e_tokens_per_s_p50']:.1f} per session  "
                              f"[{time.monotonic() - t_start:.0f}s]", flush=True)
        finally:
            for cloud, link, *_ in stacks.values():
                link.stop()
                cloud.stop()
    # the bare loop again: a shared machine's load drifts, so each share is against both ends
    after = {n: bare_loop(n, n_tokens) for n in (1, 8)}
    print(f"[load] bare loop again: 1 sequence {after[1]['tokens_per_s']:.1f} tok/s, 8 sequences "
          f"{after[8]['tokens_per_s']:.1f} tok/s  [{time.monotonic() - t_start:.0f}s]", flush=True)
    add_shares(rows, bare, after)
    cap = capacity(rows)
    summary = {"bare_loop": bare, "bare_loop_after": after, "capacity": cap, "capacity_threshold_tokens_per_s": CAPACITY_TOKENS_PER_S,
               "load_generator": "replayed draft-l29 proposals along the target's greedy path (T=0), "
                                 f"{DEVICE} draft-step timing; every session through link-sim picospec-wan",
               "machine": "2 CPU cores (shared)", "seconds": round(time.monotonic() - t_start, 1)}
    write_json(rows, args.json)
    args.json.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = [f"# tandem-bench load\n\n{__doc__.split(chr(10) * 2)[0]}\n",
          markdown_table(rows, COLUMNS), "",
          f"Bare llama-cpp-python loop (same run, before / after the cells): 1 sequence "
          f"{bare[1]['tokens_per_s']:.1f} / {after[1]['tokens_per_s']:.1f} tok/s, 8 sequences "
          f"{bare[8]['tokens_per_s']:.1f} / {after[8]['tokens_per_s']:.1f} tok/s (best of 1 and 2 threads). "
          "share_of_bare: a real-target row's streaming aggregate over their mean.", "",
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
