"""The options `edge-agent generate` and `edge-agent serve` share (verifier, mode,
codec, drafter, link), and the drafter they build from them."""
from __future__ import annotations

import argparse
from pathlib import Path

from edge.config import CODECS, MODES, TREES
from sim.latency import DEVICES

MODES_HELP = """modes:
  picospec    pipelined speculative decoding: keep drafting while the cloud verifies (default)
  sync        stop-and-wait speculative decoding (draft a block, wait for its verdict)
  cloud-only  stream the target's own decoding (the baseline)
  edge-only   the draft model alone (a different model: a fallback, not a speed choice)
"""


def device_profile(name: str) -> str:
    from sim.latency import lookup
    try:
        lookup(DEVICES, name, "device")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The flags `generate` and `serve` share: verifier, mode, codec, drafter, link."""
    ap.add_argument("--cloud", default="127.0.0.1:50051", help="verifier HOST:PORT (default: %(default)s)")
    ap.add_argument("--mode", choices=MODES, default="picospec", help="see below (default: %(default)s)")
    ap.add_argument("--codec", choices=CODECS, default="auto",
                    help="residual codec at T>0: P = sparse p down once per rejection, Q = sparse q up per "
                         "token, auto = Q where the verifier leading through rejections is predicted to pay "
                         "(measured by the last session), else by expected link cost (default: %(default)s)")
    ap.add_argument("--tree", choices=TREES, default="off",
                    help="draft trees: siblings beside the drafted chain where the drafter is unsure, verified in "
                         "the same pass. auto = where the planner predicts more tokens per second than the chain "
                         "(measured as it goes), always = every block (tests, measurement), off = chains. At T>0 "
                         "trees need codec Q (codec P never sees q's whole support) (default: %(default)s)")
    ap.add_argument("--drafter", choices=("dense", "moe"), default="dense",
                    help="dense: a llama.cpp GGUF (--draft-model); moe: the DyMoE runtime (default: %(default)s)")
    ap.add_argument("--draft-model", type=Path,
                    help="dense draft GGUF (default: models/draft-l29.gguf, derived on first use)")
    ap.add_argument("--gamma", type=int, help="fixed block length (default: adapt to the link)")
    ap.add_argument("--window", type=int, help="fixed blocks in flight, picospec (default: adapt)")
    ap.add_argument("--no-cloud-lead", action="store_true",
                    help="picospec: the verifier idles when no block is queued instead of decoding on by itself "
                         "(leading never loses tokens; it keeps the verifier busy across rejections)")
    ap.add_argument("--no-adaptive", action="store_true",
                    help="never fall back to cloud-only streaming, even where speculation is slower")
    ap.add_argument("--emulate-device", type=device_profile, metavar="|".join(sorted(DEVICES)) + "|custom:A+B",
                    help="hold each draft step to a device's modelled time t(n) = A + B*n seconds "
                         "(outputs say 'emulated')")
    ap.add_argument("--draft-cache", type=Path, metavar="DIR",
                    help="with --emulate-device and the dense drafter: memoise the drafter's output rows in DIR, "
                         "keyed by the exact token prefix, so a draft step seen before costs only the device's "
                         "modelled time, not this CPU's (one row is n_vocab float32, ~196 KB; a store per model)")
    ap.add_argument("--require-cloud", action="store_true",
                    help="fail (exit 3) when the verifier is unreachable or lost, instead of going on edge-only "
                         "with the draft model (marked in the output and warned on stderr) until it is back")
    ap.add_argument("--token-file", type=Path, metavar="FILE",
                    help="file holding the verifier's bearer token (default: $TANDEM_TOKEN if set)")
    ap.add_argument("--token", help="the same with TOKEN on the command line (visible in ps: prefer --token-file "
                                    "or $TANDEM_TOKEN)")
    ap.add_argument("--tls-ca", type=Path, help="PEM CA bundle: connect with TLS")
    ap.add_argument("--threads", type=int, default=2, help="draft model threads (default: %(default)s)")
    from edge.moe.cli import add_drafter_args      # flags only: torch is imported when the drafter is built
    add_drafter_args(ap)


def build_drafter(a):
    """(drafter or None, GGUF path whose vocabulary the edge tokenises with)."""
    from edge.derive import DEFAULT_DRAFT, ensure
    from edge.model_files import shipped_gguf
    if a.mode == "cloud-only":
        return None, shipped_gguf()
    check_draft_cache(a)
    if a.drafter == "moe":
        from edge.moe.cli import build_drafter as build_moe
        from edge.moe.cli import default_model
        return build_moe(a), Path(a.moe_model or default_model())
    from edge.llama_model import LlamaDrafter
    path = a.draft_model or ensure(DEFAULT_DRAFT)
    drafter = LlamaDrafter(path, n_threads=a.threads)
    if getattr(a, "draft_cache", None) is not None:
        from common.rowstore import RowStoreError
        from edge.draft_cache import cached_drafter
        try:
            drafter = cached_drafter(drafter, path, a.draft_cache, **LlamaDrafter.ROW_SETTINGS)
        except RowStoreError as e:
            drafter.close()
            raise ValueError(f"--draft-cache: {e}") from None
    return drafter, path


def check_draft_cache(a) -> None:
    """--draft-cache stands in for the drafter's compute only where a device's model prices it."""
    if getattr(a, "draft_cache", None) is None:
        return
    if a.emulate_device is None:
        raise ValueError("--draft-cache needs --emulate-device: it skips the drafter's real compute, which only "
                         "an emulated device's modelled time stands in for")
    if a.drafter != "dense":
        raise ValueError("--draft-cache memoises the dense drafter only (--drafter dense)")
