"""`tandem-bench serve`: `edge-agent serve` with MQTT telemetry while the broker is up, killed and hung.

The daemon publishes telemetry every 0.2 s to a real mosquitto; the same
greedy completions (over the real SmolLM2-135M target behind link-sim's
picospec-wan profile, real latency) are timed from the HTTP client with the
broker up, killed (connection refused), and replaced by a socket that accepts
and never answers. The cases take turns round by round, so a change in the
shared machine's load is not charged to one of them. Must hold: a broker that
vanishes slows generation by no more than 5 %.

The daemon speculates on every request (--no-adaptive). --quick: 4 prompts x
32 tokens, 2 rounds (< 1 min); default 8 x 64, 3 rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.harness import stack
from bench.report import RESULTS, markdown_table, pyplot, write_json
from common.mosquitto import Mosquitto
from common.procs import start_serve

PROMPTS = ["Explain why the sky is blue.", "Write a short poem about rivers.", "How do vaccines work?",
           "Give three tips for learning a language.", "What is a black hole?", "Describe how bread is made.",
           "Why do cats purr?", "What is the Pythagorean theorem?"]
CASES = ["broker up", "broker killed", "broker hung"]
PROFILE = "picospec-wan"


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="4 prompts x 32 tokens, 2 rounds")
    ap.add_argument("--json", type=Path, default=RESULTS / "serve.json", help="output JSON (default: %(default)s)")


def _post(address: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "tandem", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(f"http://{address}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return float("nan")


@contextlib.contextmanager
def broker_state(broker: Mosquitto, case: str):
    """The broker as `case` says while the block runs; up again afterwards."""
    hung = None
    if case != "broker up":
        broker.kill()
    if case == "broker hung":          # accepts connections, never answers
        hung = socket.create_server(("127.0.0.1", broker.port))
        hung.listen(64)
    try:
        yield
    finally:
        if hung is not None:
            hung.close()
        if case != "broker up":
            broker.start()


def run(args) -> int:
    n_prompts, n_tokens, rounds = (4, 32, 2) if args.quick else (8, 64, 3)
    totals = {c: {"tokens": 0, "seconds": 0.0, "requests": 0} for c in CASES}
    texts: dict[str, set] = {}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, stack(PROFILE) as (cloud, link):
        broker = Mosquitto(Path(tmp))
        # --no-adaptive: every request speculates alike (adaptive picospec re-probes the link every
        # few requests, and whichever case gets a probe would pay for it)
        serve = start_serve(link.address, "--no-adaptive", "--mqtt", broker.url, "--telemetry-interval", "0.2")
        try:
            _post(serve.address, PROMPTS[0], 8)          # warm-up: the planner meets the link
            for rnd in range(rounds):
                for i, p in enumerate(PROMPTS[:n_prompts]):
                    # every prompt in every case, in a rotating order: load drift hits all cases alike
                    k = (rnd * n_prompts + i) % len(CASES)
                    for case in CASES[k:] + CASES[:k]:
                        with broker_state(broker, case):
                            t = time.monotonic()
                            r = _post(serve.address, p, n_tokens)
                            totals[case]["seconds"] += time.monotonic() - t
                        totals[case]["tokens"] += r["usage"]["completion_tokens"]
                        totals[case]["requests"] += 1
                        texts.setdefault(p, set()).add(r["choices"][0]["message"]["content"])
                print(f"[serve round {rnd + 1}/{rounds}] {time.monotonic() - t_start:5.0f}s", flush=True)
            published = _metric(serve.address, "tandem_telemetry_published")
            failures = _metric(serve.address, "tandem_telemetry_failures")
        finally:
            serve.stop()
            broker.stop()
    base = totals["broker up"]["tokens"] / totals["broker up"]["seconds"]
    rows = []
    for case in CASES:
        t = totals[case]
        rate = t["tokens"] / t["seconds"]
        rows.append({"case": case, "requests": t["requests"], "tokens": t["tokens"], "tokens_per_s": round(rate, 3),
                     "slowdown_pct": round((base / rate - 1) * 100, 2), "emulated": False})
    meta = {"link": PROFILE, "target": "smollm2-135m (real)", "prompts": n_prompts, "max_tokens": n_tokens,
            "rounds": rounds, "telemetry_interval_s": 0.2, "telemetry_published": published,
            "telemetry_failures": failures, "same_text_in_every_case": all(len(v) == 1 for v in texts.values()),
            "machine": "2-core CPU shared with other jobs", "load_average": list(__import__("os").getloadavg())}
    write_outputs(rows, meta, args.json)
    worst = max(r["slowdown_pct"] for r in rows)
    print(markdown_table(rows, ["case", "requests", "tokens", "tokens_per_s", "slowdown_pct"]))
    print(f"serve: worst slowdown {worst:+.1f} % (must be <= 5 %); {time.monotonic() - t_start:.0f} s -> {args.json}")
    return 0


def write_outputs(rows: list[dict], meta: dict, path: Path) -> None:
    write_json({"meta": meta, "rows": rows}, path)  # type: ignore[arg-type]
    md = ["# tandem-bench serve", "", __doc__.strip(), "", markdown_table(rows, list(rows[0])), "",
          ", ".join(f"{k}: {v}" for k, v in meta.items())]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["case"] for r in rows], [r["tokens_per_s"] for r in rows], color=["tab:green", "tab:red", "tab:orange"])
    ax.set_ylabel("tokens/s (HTTP client, real latency)")
    ax.set_title("edge-agent serve: MQTT broker up / killed / hung")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)
