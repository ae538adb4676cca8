"""The verifier daemon assembled: target, scheduler, gRPC server, signals."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from cloud.auth import AuthInterceptor, server_credentials
from cloud import exactness
from cloud.config import VerifierConfig
from cloud.metrics import Metrics
from cloud.scheduler import Scheduler
from cloud.server import SERVICE, VerifierService
from cloud.startup import bind_problem
from cloud.target import INVARIANT_BATCH, Target, measure_pass
from cloud.target_cache import CachedTarget
from cloud.threads import ThreadTuner, candidates
from common.address import join_host_port, split_host_port
from common.errors import StartupError
from common.rowstore import RowStore, RowStoreError, model_identity
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from sim.latency import TARGETS, LatencyProfile, lookup

log = logging.getLogger("tandem.cloud")


@dataclass
class Built:
    server: grpc.aio.Server
    service: VerifierService
    health: health_aio.HealthServicer
    scheduler: Scheduler
    target: Target | CachedTarget
    port: int
    exact: str          # what the start-up check found, for the ready line


def pick_threads(target: Target, seq: int, counts: tuple[int, ...]) -> int:
    """The fastest thread count for a typical pass here (8 tokens), on the machine as it
    is at start-up: the first guess, which `ThreadTuner` revises while serving."""
    timing = {}
    for n in counts:
        target.set_threads(n)
        measure_pass(target, seq, 8, 2)                       # warm-up
        timing[n] = measure_pass(target, seq, 8, 5)
    best = min(timing, key=timing.get)
    log.info("threads at start-up: %s per 8-token pass; starting with %d",
             ", ".join(f"{n} -> {t * 1e3:.1f} ms" for n, t in timing.items()), best)
    return best


def thread_keeper(target: Target, metrics: Metrics, counts: tuple[int, ...]):
    """The scheduler's per-pass hook with --threads 0: metrics, then the thread count the
    passes being served run fastest with (cloud/threads.py). Runs on the scheduler's thread,
    the model's only user, between passes."""
    # One tuner for one-token passes, one for the rest: llama.cpp runs them with its two thread
    # counts, and they want different ones beside an edge on the same cores (measured on 2
    # cores: a stream's one-token passes ran 15 ms with 1 thread against 26 with 2, while
    # 8 streams' passes of 8 ran faster with 2).
    tuners = {True: ThreadTuner(counts, current=target.n_threads_single),
              False: ThreadTuner(counts, current=target.n_threads)}
    metrics.threads.set(target.n_threads)
    metrics.threads_single.set(target.n_threads_single)

    def on_pass(s):
        metrics.observe_pass(s)
        if s.cache_misses == 0 and s.cache_hits:
            return                          # served from the row cache: the model did not run
        single = s.tokens == 1
        tuner = tuners[single]
        switches = tuner.switches
        tuner.observe(s.tokens, s.real_s)   # real compute: an emulated hold would hide it
        batch, one = tuners[False].active, tuners[True].active
        if (batch, one) != (target.n_threads, target.n_threads_single):
            target.set_threads(batch, one)
            metrics.threads.set(batch)
            metrics.threads_single.set(one)
        if tuner.switches != switches:
            log.info("threads: now %d for %s passes (same-sized passes ran faster with it)",
                     tuner.current, "one-token" if single else "multi-token")
    return on_pass


def pass_model(target: Target, seq: int, emulate: LatencyProfile | None) -> tuple[float, float]:
    """The verifier's own pass time t(n) = a + b*n, for the edge's planner (on a
    CPU b is far from zero: a block costs more than a token). Emulated: the profile's."""
    if emulate:
        return emulate.a_s, emulate.b_s
    measure_pass(target, seq, 1, 1)
    t1, t8 = measure_pass(target, seq, 1, 8), measure_pass(target, seq, 8, 4)
    b = max(0.0, (t8 - t1) / 7)
    return max(1e-4, t1 - b), b


def check_exactness(target: Target, cfg: VerifierConfig, metrics: Metrics) -> tuple[VerifierConfig, str]:
    """Measure whether the passes this verifier will run are bit-identical to one-token
    decoding here; where batched ones are not, refuse (--require-bitwise) or serve one
    session per pass. Returns the config to serve with and the words for the ready line."""
    t0 = time.perf_counter()
    found = exactness.check(target, together=cfg.batching)
    alone = found if not cfg.batching or found.bitwise else exactness.check(target, together=False)
    metrics.exact_bitwise.set(1 if found.bitwise else 0)
    metrics.exact_max_diff.set(found.max_abs_diff)
    log.info("exactness: %s over %d rows of %d sequences, %s against one token at a time (%.2f s)",
             found.label(), found.rows, found.seqs, "batched" if cfg.batching else "one sequence per pass",
             time.perf_counter() - t0)
    if found.bitwise:
        return cfg, "exact: bitwise" + ("" if cfg.batching else ", batching off")
    if cfg.require_bitwise:
        what = "batched passes" if cfg.batching else "passes"
        raise StartupError(f"{what} are not bit-identical to one-token decoding on this build "
                           f"({found.label()}) and --require-bitwise is set")
    if not cfg.batching:
        log.warning("passes differ from one-token decoding on this build (%s)", found.label())
        return cfg, f"exact: {found.label()}, batching off"
    metrics.exact_bitwise.set(1 if alone.bitwise else 0)
    metrics.exact_max_diff.set(alone.max_abs_diff)
    log.warning("batched passes differ from one-token decoding (%s): serving one session per pass, "
                "which is %s", found.label(), alone.label())
    return replace(cfg, batching=False), f"exact: {alone.label()}, batching off (batched: {found.label()})"


def cached_target(target: Target, cfg: VerifierConfig, exact: str) -> CachedTarget:
    """The target behind its row cache. A stored row is reused in passes of any make-up, which
    is exact only where batched passes are bitwise (docs/exactness.md): refuse otherwise."""
    if not cfg.batching or not exact.startswith("exact: bitwise"):
        raise StartupError(f"--target-cache reuses rows across passes of any make-up, which needs batched "
                           f"passes bit-identical to one-token decoding; this verifier serves {exact}")
    identity = model_identity(target.path, "target", flash_attn=True, ubatch=INVARIANT_BATCH,
                              kv_unified=target.kv_unified, gpu_layers=target.gpu_layers)
    try:
        store = RowStore(cfg.target_cache, identity, target.n_vocab)
    except RowStoreError as e:
        raise StartupError(str(e)) from None
    log.info("target cache: %s, %d rows (%.1f GB)%s", store.dir, len(store), store.size_bytes / 1e9,
             "" if store.writable else ", read-only (another process writes it)")
    return CachedTarget(target, store)


async def build(cfg: VerifierConfig, model: Path) -> Built:
    creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)   # file problems: before any work
    emulate = lookup(TARGETS, cfg.emulate_target, "target") if cfg.emulate_target else None
    target = Target(model, n_ctx=cfg.n_ctx, n_seqs=cfg.max_sessions + cfg.tree_seqs, n_threads=max(cfg.threads, 1),
                    max_batch_tokens=cfg.max_batch_tokens, gpu_layers=cfg.gpu_layers, kv_unified=cfg.kv_unified)
    metrics = Metrics()
    cfg, exact = check_exactness(target, cfg, metrics)
    on_pass = metrics.observe_pass
    if cfg.threads == 0:
        counts = candidates(os.cpu_count() or 1)
        target.set_threads(pick_threads(target, 0, counts))
        on_pass = thread_keeper(target, metrics, counts)
    else:
        metrics.threads.set(cfg.threads)
    model_ab = pass_model(target, 0, emulate)
    if cfg.target_cache is not None:
        target = cached_target(target, cfg, exact)
    scheduler = Scheduler(target, batching=cfg.batching, emulate=emulate, on_pass=on_pass)
    scheduler.start()
    service = VerifierService(cfg, target, scheduler, emulate, model_ab, metrics, exact)
    metrics.queue.set_function(lambda: scheduler.queued)
    interceptors = [AuthInterceptor(cfg.token)] if cfg.token else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes)])
    pb_grpc.add_VerifierServicer_to_server(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Verifier"].full_name, "grpc.health.v1.Health", reflection.SERVICE_NAME),
        server)
    try:
        port = server.add_secure_port(cfg.listen, creds) if creds else server.add_insecure_port(cfg.listen)
    except RuntimeError as e:
        port = 0
        log.debug("bind failed: %s", e)
    if port == 0:
        scheduler.stop()
        raise StartupError(f"cannot listen on {cfg.listen}: {bind_problem(cfg.listen) or 'address not available'}")
    if cfg.metrics:
        metrics.serve(cfg.metrics)
    return Built(server, service, health, scheduler, target, port, exact)


async def serve(cfg: VerifierConfig, model: Path, mqtt: tuple | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):          # before the ready line: a SIGTERM right after it drains
        loop.add_signal_handler(sig, stop.set)
    b = await build(cfg, model)
    cfg = b.service.cfg                      # as served: the start-up check may have turned batching off
    await b.server.start()
    reaper = asyncio.ensure_future(b.service.reap_idle())
    address = join_host_port(split_host_port(cfg.listen)[0], b.port)
    log.info("serving %s on %s (vocab %d, fingerprint %s, %.1f ms/token, %d threads, batching %s%s)",
             b.service.target_label, address, b.target.n_vocab, b.target.fingerprint,
             b.service.ar_token_s * 1e3, b.target.n_threads, "on" if cfg.batching else "off",
             (", mutual TLS" if cfg.tls_client_ca else ", TLS") if cfg.tls_cert else "")
    if b.service.slo is not None:
        slo = b.service.slo
        log.info("admission: every session to keep %g tokens/s as %s predicts (%s); a pass carries at most "
                 "%d tokens", slo.slo, slo.profile.name, slo.profile.source, slo.budget)
    print(f"cloud-verifier listening on {address} ({b.exact})", flush=True)
    status = None
    if mqtt and mqtt[0]:                     # (url, id, interval): the retained MQTT status (cloud/status.py)
        from cloud.status import start_status_publisher
        status = start_status_publisher(mqtt[0], mqtt[1], b.service.status, mqtt[2])
    await stop.wait()
    if status is not None:
        await asyncio.to_thread(status.stop)
    log.info("draining: no new sessions, %.0f s for running ones", cfg.grace_s)
    t0 = time.monotonic()
    await b.health.enter_graceful_shutdown()
    reaper.cancel()
    await b.server.stop(cfg.grace_s)
    b.scheduler.stop()
    hits, misses = b.target.cache_counts()
    if hits or misses:
        log.info("target cache: %d rows served, %d computed (hit rate %.3f)", hits, misses, hits / (hits + misses))
    log.info("stopped after %.1f s", time.monotonic() - t0)
    return 0
