"""`make demo`: the three processes on one machine, generating over a shaped WAN.

1. The real SmolLM2-135M target behind link-sim's default WAN profile:
   picospec (adaptive), stop-and-wait speculation and cloud-only side by side.
2. The same prompt against an *emulated* Qwen3-32B-on-A100 target with an
   emulated Jetson Orin edge: real tokens, modelled compute time. On one CPU
   a same-size draft cannot beat its own target, so part 1 shows picospec
   falling back to cloud-only; part 2 shows the regime it is built for.
3. The edge as a daemon: `edge-agent serve` in front of the verifier and the
   link, one OpenAI-style request with curl, its answer, then everything stops.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

from bench.harness import run_cell, stack
from common.procs import start_serve
from edge.config import GenConfig
from sim.latency import DEVICES, TARGETS

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."
PROFILE = "picospec-wan"
EMULATED_TARGET = "qwen3-32b-a100"
DEVICE = "jetson-orin"


def table(rows: list[tuple[str, object]], title: str) -> str:
    head = f"{'mode':<22} {'tokens':>6} {'accept':>7} {'tok/s':>7} {'ttft ms':>8} {'B up/tok':>9} {'B down/tok':>10}"
    lines = [title, head, "-" * len(head)]
    for label, r in rows:
        acc = f"{r.acceptance_rate:.2f}" if r.acceptance_rate is not None else "-"
        lines.append(f"{label:<22} {r.tokens:>6} {acc:>7} {r.tokens_per_s:>7.1f} {r.ttft_s * 1e3:>8.0f} "
                     f"{r.bytes_up / max(r.tokens, 1):>9.1f} {r.bytes_down / max(r.tokens, 1):>10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-emulated", action="store_true", help="only the real-target part")
    ap.add_argument("--skip-serve", action="store_true", help="leave out the edge-agent serve part")
    a = ap.parse_args(argv)

    from edge.derive import DEFAULT_DRAFT, ensure
    from edge.llama_model import LlamaDrafter, Tokenizer
    from edge.model_files import shipped_gguf
    tok = Tokenizer(shipped_gguf())
    drafter = LlamaDrafter(ensure(DEFAULT_DRAFT), n_threads=1)
    prompt = [tok.encode(a.prompt)]
    print(f"prompt: {a.prompt!r}  (drafter: {DEFAULT_DRAFT}, link: link-sim profile {PROFILE})\n", flush=True)

    def streamer():
        shown: list[int] = []

        def emit(new):
            sys.stdout.write(tok.decode(new, prev=prompt[0] + shown))
            sys.stdout.flush()
            shown.extend(new)
        return emit

    base = GenConfig(max_tokens=a.max_tokens)
    t0 = time.monotonic()
    with stack(PROFILE) as (cloud, link):
        print("[real target: SmolLM2-135M on this CPU] picospec:\n", flush=True)
        rows = [("picospec (adaptive)", run_cell(link.address, drafter, tok, prompt, base, streamer()))]
        print("\n", flush=True)
        rows.append(("picospec (forced)", run_cell(link.address, drafter, tok, prompt,
                                                   GenConfig(max_tokens=a.max_tokens, adaptive=False))))
        rows.append(("sync (forced)", run_cell(link.address, drafter, tok, prompt,
                                               GenConfig(mode="sync", max_tokens=a.max_tokens, adaptive=False))))
        rows.append(("cloud-only", run_cell(link.address, None, tok, prompt,
                                            GenConfig(mode="cloud-only", max_tokens=a.max_tokens))))
    same = all(r.texts == rows[-1][1].texts for _, r in rows)
    print(table(rows, f"real latency, real SmolLM2-135M target, link {PROFILE}:"))
    print(f"greedy outputs identical across modes: {same}"
          f"{'' if rows[0][1].fallbacks == 0 else '  (adaptive picospec fell back to cloud-only: speculation cannot pay here)'}\n",
          flush=True)

    if not a.skip_emulated:
        emu = GenConfig(max_tokens=a.max_tokens, emulate_device=DEVICE)
        with stack(PROFILE, emulate_target=EMULATED_TARGET) as (cloud, link):
            print(f"[EMULATED target {EMULATED_TARGET} ({TARGETS[EMULATED_TARGET].source}); "
                  f"EMULATED edge {DEVICE}] picospec:\n", flush=True)
            erows = [("picospec", run_cell(link.address, drafter, tok, prompt, emu, streamer()))]
            print("\n", flush=True)
            erows.append(("sync", run_cell(link.address, drafter, tok, prompt,
                                           GenConfig(mode="sync", max_tokens=a.max_tokens, emulate_device=DEVICE,
                                                     adaptive=False))))
            erows.append(("cloud-only", run_cell(link.address, None, tok, prompt,
                                                 GenConfig(mode="cloud-only", max_tokens=a.max_tokens))))
            # the near-copy drafter shows what high acceptance buys on the same link
            best = LlamaDrafter(ensure("draft-q8"), n_threads=1)
            erows.append(("picospec (draft-q8)", run_cell(link.address, best, tok, prompt, emu)))
            erows.append(("sync (draft-q8)", run_cell(link.address, best, tok, prompt,
                                                      GenConfig(mode="sync", max_tokens=a.max_tokens,
                                                                emulate_device=DEVICE, adaptive=False))))
            best.close()
        print(table(erows, f"EMULATED latency (real tokens, modelled compute: {EMULATED_TARGET}, "
                           f"{DEVICE} = {DEVICES[DEVICE].source}), link {PROFILE}:"))
        cloud_rate = erows[2][1].tokens_per_s
        print("speedup over cloud-only: " + ", ".join(
            f"{label} {r.tokens_per_s / cloud_rate:.2f}x" for label, r in erows if label != "cloud-only"))
        print(f"(drafters: {DEFAULT_DRAFT} = cheaper target, realistic acceptance; draft-q8 = near-copy)\n")
    if not a.skip_serve:
        show_serve(a.prompt, a.max_tokens)
    print(f"demo done in {time.monotonic() - t0:.0f} s; all daemons stopped.")
    print("run the pieces by hand: see README.md ('Running the daemons by hand')")
    return 0


def show_serve(prompt: str, max_tokens: int) -> None:
    """Part 3: the daemon an app on the device would talk to, and one request to it."""
    with stack(PROFILE) as (cloud, link):
        serve = start_serve(link.address)
        try:
            print(f"[edge-agent serve] {' '.join(['edge-agent', *serve.cmd[3:]])}\n"
                  f"  -> OpenAI-compatible API on http://{serve.address}/v1 (verifier {cloud.address} via link-sim "
                  f"{link.address})\n", flush=True)
            body = json.dumps({"model": "tandem", "messages": [{"role": "user", "content": prompt}],
                               "max_tokens": max_tokens, "temperature": 0})
            url = f"http://{serve.address}/v1/chat/completions"
            print(f"$ curl -s {url} -H 'Content-Type: application/json' -d '{body}'", flush=True)
            if shutil.which("curl"):
                out = subprocess.run(["curl", "-s", url, "-H", "Content-Type: application/json", "-d", body],
                                     capture_output=True, text=True, timeout=300).stdout
            else:   # curl missing: the same request from Python
                import urllib.request
                req = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
                out = urllib.request.urlopen(req, timeout=300).read().decode()
            try:
                print(json.dumps(json.loads(out), indent=1, ensure_ascii=False))
            except ValueError:
                print(out)
        finally:
            serve.stop()
    print("\n[edge-agent serve stopped]\n", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: daemons stopped.", file=sys.stderr)
        sys.exit(130)
