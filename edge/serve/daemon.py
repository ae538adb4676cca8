"""`edge-agent serve`: flags, start-up and shutdown of the HTTP daemon.

Start-up: load the drafter once, open one channel to the verifier (the daemon
starts and answers edge-only when the verifier is not there yet), ask the
verifier which target it serves (a one-token Open, closed at once), start
uvicorn on the socket, then print `edge-agent serve listening on HOST:PORT`.
SIGTERM/SIGINT: stop taking requests, end running generations at their next
token, stop telemetry, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import socket
import sys
from pathlib import Path

from common.address import host_port, mqtt_url
from common.daemon_config import add_config_args
from edge.config import GenConfig
from edge.options import MODES_HELP, add_model_args, build_drafter
from edge.serve.config import ServeConfig

log = logging.getLogger("tandem.serve")
CTX_MARGIN = 64          # positions kept free for draft blocks in flight past the last token
READY_LINE = "edge-agent serve listening on"
REACHABLE_TIMEOUT_S = 1.0
TARGET_PROBE_TIMEOUT_S = 5.0

SERVE_EPILOG = """endpoints:
  POST /v1/chat/completions, /v1/completions   OpenAI-compatible, streaming (SSE) or not
  GET  /v1/models                               the target the verifier serves (and the alias 'tandem')
  GET  /healthz                                 verifier reachable or not, and what the daemon serves now
  GET  /metrics                                 Prometheus: requests, tokens, acceptance, fallbacks, RTT, latency

Supported request fields: model, messages, prompt (text or token ids), max_tokens / max_completion_tokens,
temperature (default 1), top_p, seed (completion i uses seed+i), n, stop (up to 4 strings, never sent),
stream, stream_options.include_usage; extensions: top_k, ignore_eos, return_token_ids. Other fields
(tools, response_format, logprobs, ...) are refused with 400 naming the field. Every response carries
`usage` and a `tandem` object (mode, fallback, acceptance rate, drafted, bytes up/down, emulated, segments).

examples:
  edge-agent serve --http 127.0.0.1:8080 --cloud 127.0.0.1:50052
  edge-agent serve --config edge.toml --mqtt mqtt://127.0.0.1:1883 --id kitchen-pi
  curl -s 127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "tandem", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
"""


def add_serve_command(sub, connect) -> argparse.ArgumentParser:
    """`serve` among edge-agent's subcommands (`sub`); `connect` makes the verifier's
    client from the parsed flags."""
    serve = sub.add_parser("serve", help="run as a daemon: an OpenAI-compatible HTTP API over the models, kept loaded",
                           description="Serve apps on this device through an OpenAI-compatible HTTP API: the drafter "
                                       "stays loaded, the verifier channel and what the edge learned about the link "
                                       "carry over between requests.",
                           epilog=MODES_HELP + "\n" + SERVE_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=functools.partial(run_serve, connect=connect))
    return serve


def add_serve_args(ap: argparse.ArgumentParser) -> None:
    """The serve-only flags (the model, codec, drafter and link flags are generate's)."""
    g = ap.add_argument_group("serving")
    g.add_argument("--http", type=host_port, default=("127.0.0.1", 8080), metavar="HOST:PORT",
                   help="address of the HTTP API (port 0: a free port; the ready line shows it) (default: 127.0.0.1:8080)")
    g.add_argument("--queue-size", type=int, default=8,
                   help="requests that may wait while one generates; more get 429 + Retry-After (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=256,
                   help="tokens for a chat request that sets no max_tokens (completions: 16, as the API) "
                        "(default: %(default)s)")
    g.add_argument("--n-ctx", type=int, default=2048,
                   help="context: prompt + max_tokens must fit (default: %(default)s; the verifier's own is respected)")
    g.add_argument("--max-n", type=int, default=8, help="most completions one request may ask for (default: %(default)s)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="model id in the API (default: the verifier's target, as it names it; 'tandem' always works)")
    t = ap.add_argument_group("telemetry (MQTT)")
    t.add_argument("--mqtt", type=mqtt_url, metavar="mqtt://HOST:PORT",
                   help="publish telemetry to tandem/edge/ID/telemetry; generation never waits on the broker")
    t.add_argument("--id", default="edge", help="this edge's id in MQTT topics (default: %(default)s)")
    t.add_argument("--telemetry-interval", type=float, default=5.0, metavar="SEC",
                   help="seconds between telemetry messages (default: %(default)s)")
    add_config_args(ap)


def serve_config(a) -> ServeConfig:
    host, port = a.http
    return ServeConfig(host=host, port=port, queue_size=a.queue_size, default_max_tokens=a.max_tokens,
                       n_ctx=a.n_ctx, max_n=a.max_n, served_model_name=a.served_model_name, edge_id=a.id,
                       mqtt=a.mqtt, telemetry_interval_s=a.telemetry_interval)


def base_config(a) -> GenConfig:
    """What every request shares; sampling and lengths come per request."""
    return GenConfig(mode=a.mode, codec=a.codec, gamma=a.gamma, window=a.window, adaptive=not a.no_adaptive,
                     cloud_lead=not a.no_cloud_lead, emulate_device=a.emulate_device)


class VerifierLink:
    """The daemon's view of its verifier: reachable or not, and what it serves."""

    def __init__(self, client, tokenizer):
        self.client, self.tok = client, tokenizer
        self.target: dict = {}

    def reachable(self) -> bool:
        # answered at once while the channel is down: /healthz and telemetry never wait on it
        return self.client.probe(timeout_s=REACHABLE_TIMEOUT_S, wait_for_ready=False)

    def learn_target(self) -> dict:
        """A one-token session, closed at once: the target's name, n_ctx, and
        whether its tokenizer is ours (a mismatch is a configuration error)."""
        import grpc
        from edge.client import CloudError
        from proto import tandem_pb2 as pb
        first = self.tok.bos if self.tok.bos is not None and self.tok.bos >= 0 else self.tok.eos
        req = pb.OpenRequest(fingerprint=self.tok.fingerprint, sampling=pb.Sampling(), prompt=[first],
                             client="edge-agent serve (probe)", max_tokens=1)
        try:
            reply = self.client.open_result(self.client.open_async(req, timeout_s=TARGET_PROBE_TIMEOUT_S))
            self.client.close_session(reply.session, timeout_s=TARGET_PROBE_TIMEOUT_S)
        except CloudError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise
            return self.target
        self.target = {"target": reply.target, "emulated": reply.emulated, "n_ctx": reply.n_ctx}
        return self.target


def run_serve(a, connect) -> int:
    from edge.agent import Agent
    from edge.llama_model import Tokenizer
    from edge.serve.engine import Engine
    from edge.serve.metrics import Metrics

    cfg = serve_config(a)
    base = base_config(a)
    drafter, vocab_path = build_serve_drafter(a, cfg.n_ctx + CTX_MARGIN)
    tok = Tokenizer(vocab_path)
    client = link = None
    if base.mode != "edge-only":
        client = connect(a)
        link = VerifierLink(client, tok)
        if link.learn_target():
            log.info("verifier %s serves %s", a.cloud, link.target["target"])
        else:
            print(f"edge-agent serve: verifier {a.cloud} not reachable yet; serving "
                  f"{'edge-only' if drafter else 'nothing'} until it is", file=sys.stderr, flush=True)
    agent = Agent(client, drafter, tok.fingerprint, tok.n_vocab, tok.eos)
    metrics = Metrics(base.mode, 1 + cfg.queue_size)
    engine = Engine(agent, tok, base, cfg, metrics)
    if link is not None and link.target.get("n_ctx"):
        engine.n_ctx = min(cfg.n_ctx, link.target["n_ctx"] - CTX_MARGIN)
    try:
        return asyncio.run(_serve(cfg, engine, metrics, link, drafter, a.cloud if client else None))
    finally:
        engine.close()
        if client is not None:
            client.close()
        if drafter is not None:
            drafter.close()


def build_serve_drafter(a, n_ctx: int):
    """(drafter or None, GGUF whose vocabulary the edge tokenises with)."""
    if a.mode == "cloud-only" or a.drafter == "moe":
        return build_drafter(a)
    from edge.derive import DEFAULT_DRAFT, ensure
    from edge.llama_model import LlamaDrafter
    path = a.draft_model or ensure(DEFAULT_DRAFT)
    return LlamaDrafter(path, n_ctx=n_ctx, n_threads=a.threads), Path(path)


async def _serve(cfg: ServeConfig, engine, metrics, link, drafter, verifier: str | None) -> int:
    import uvicorn
    from edge.serve.app import ServeInfo, build_app

    async def probe() -> bool:
        if link is None:
            return False
        up = await asyncio.to_thread(link.reachable)
        if up and not link.target:
            await asyncio.to_thread(link.learn_target)
            if link.target.get("n_ctx"):
                engine.n_ctx = min(cfg.n_ctx, link.target["n_ctx"] - CTX_MARGIN)
        return up

    def model_ids() -> list[str]:
        name = cfg.served_model_name or (link.target.get("target") if link else None)
        return [name, "tandem"] if name and name != "tandem" else ["tandem"]

    info = ServeInfo(mode=engine.base.mode, verifier=verifier, can_serve_alone=drafter is not None,
                     model_ids=model_ids, target=lambda: dict(link.target) if link else {}, probe=probe)
    app = build_app(engine, metrics, info)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=5))
    # uvicorn re-raises the signal that stopped it once it is done; a handler of
    # our own receives it then, so the daemon can clean up and exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    telemetry = None
    if cfg.mqtt:
        from edge.telemetry import start_telemetry
        telemetry = start_telemetry(cfg.mqtt, cfg.edge_id, metrics.snapshot, 1 + cfg.queue_size,
                                    cfg.telemetry_interval_s)
        metrics.watch_publisher(telemetry)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            return 1
        await asyncio.sleep(0.02)
    metrics.reachable(await probe())
    print(f"{READY_LINE} {host}:{port}", flush=True)
    health = asyncio.create_task(_watch_health(probe, metrics, cfg.health_interval_s))
    while not task.done() and not server.should_exit:
        await asyncio.wait({task}, timeout=0.1)
    engine.cancel_all()              # running streams end at their next token instead of holding shutdown
    await task
    health.cancel()
    if telemetry is not None:
        telemetry.stop()
    log.info("stopped")
    return 0


async def _watch_health(probe, metrics, every_s: float) -> None:
    """Keeps telemetry's and /metrics' view of the verifier fresh between requests."""
    while True:
        await asyncio.sleep(every_s)
        try:
            metrics.reachable(await probe())
        except Exception as e:   # a probe that fails says "unreachable", never ends the watch
            log.debug("health probe failed: %s", e)
            metrics.reachable(False)
