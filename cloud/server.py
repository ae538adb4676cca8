"""The Verifier gRPC service: sessions in, verdicts out.

Pure session logic lives in session.py; this file only converts between proto
messages and that logic, maps errors to status codes, and keeps the registry.
A bad request ends its own RPC with a precise status and never the server.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.config import VerifierConfig
from cloud.inbox import END, LEAD, Inbox
from cloud.session import BadDraft, ContextFull, Session
from cloud.target import TargetModel
from kernels import packing
from kernels.sampling import STREAM_TARGET, SamplingConfig, logits_to_probs, rng_for, sample
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from sim.latency import TARGETS, Hold, lookup

log = logging.getLogger("tandem.cloud")
SERVICE = "tandem.v1.Verifier"
def sampling_from_proto(s: pb.Sampling) -> SamplingConfig:
    if s.temperature < 0 or s.top_p < 0 or s.top_p > 1:
        raise BadDraft(f"invalid sampling: temperature={s.temperature} top_p={s.top_p}")
    return SamplingConfig(temperature=float(s.temperature), top_k=int(s.top_k),
                          top_p=float(s.top_p) if s.top_p > 0 else 1.0, seed=int(s.seed))


class VerifierService(pb_grpc.VerifierServicer):
    def __init__(self, cfg: VerifierConfig, target: TargetModel):
        self.cfg, self.target = cfg, target
        self.emulate = lookup(TARGETS, cfg.emulate_target, "target") if cfg.emulate_target else None
        self.width = packing.token_width(target.n_vocab)
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.pass_a_s, self.pass_b_s = self._measure_pass()
        self.ar_token_s = self.pass_a_s + self.pass_b_s
        # Creating a llama.cpp context costs ~0.2 s: have a few ready before the first Open.
        warm = [target.acquire() for _ in range(min(2, cfg.max_sessions))]
        for ctx in warm:
            target.release(ctx)

    # -- Open --------------------------------------------------------------
    def Open(self, request: pb.OpenRequest, context):
        t_open = time.monotonic()
        self._check_fingerprint(request.fingerprint, context)
        self._reap_idle()
        try:
            sampling = sampling_from_proto(request.sampling)
        except BadDraft as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self.lock:
            if len(self.sessions) >= self.cfg.max_sessions:
                context.set_trailing_metadata((("retry-after-ms", "2000"),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"verifier full: {len(self.sessions)}/{self.cfg.max_sessions} sessions; retry in 2 s")
            sid = uuid.uuid4().hex[:12]
            sess = Session(sid, None, sampling, int(request.codec), self.target.n_vocab, self.cfg.n_ctx,
                           self.cfg.max_draft, self.width, self.cfg.p_top_k, self.cfg.p_tail, self.emulate,
                           lead=request.lead, eos=None if request.ignore_eos else self.target.eos)
            self.sessions[sid] = sess  # reserve the slot before the slow part
        try:
            sess.ctx = self.target.acquire()
            sess.prefill(list(request.prompt))
            sess.lead_until = len(request.prompt) + (request.max_tokens or self.cfg.n_ctx)
        except BadDraft as e:
            self._close(sid, quiet=True)
            context.abort(grpc.StatusCode.OUT_OF_RANGE if isinstance(e, ContextFull)
                          else grpc.StatusCode.INVALID_ARGUMENT, str(e))
        sess.client = request.client or context.peer()
        sess.opened = time.monotonic()
        log.info("session %s opened: client=%s prompt=%d tokens codec=%s sampling=%s",
                 sid, sess.client, len(request.prompt), "PQ"[sess.codec], sampling)
        a, b = self.pass_a_s, self.pass_b_s
        return pb.OpenReply(session=sid, fingerprint=self.target.fingerprint, n_vocab=self.target.n_vocab,
                            token_width=self.width, n_ctx=self.cfg.n_ctx, max_draft=self.cfg.max_draft,
                            target=self.target_label, emulated=self.emulate is not None,
                            ar_token_s=self.ar_token_s, verify_a_s=a, verify_b_s=b,
                            p_top_k=self.cfg.p_top_k, p_tail=self.cfg.p_tail,
                            server_s=time.monotonic() - t_open)

    # -- Speculate ---------------------------------------------------------
    def Speculate(self, request_iterator, context):
        sid = dict(context.invocation_metadata()).get("tandem-session", "")
        with self.lock:
            sess = self.sessions.get(sid)
        if sess is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {sid!r}: call Open first")
        inbox = Inbox(request_iterator, self.width)
        try:
            while True:
                arrived, item = inbox.next(sess, context.is_active)
                if item is LEAD:
                    yield self._lead(sess)   # nothing worth waiting for: decode on instead of idling
                    continue
                if item is END:
                    break
                if isinstance(item, grpc.RpcError):
                    raise item
                sess.block_arrived(arrived, item[0].epoch)
                try:
                    verdicts = self._verify(sess, item)
                except ContextFull as e:
                    context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
                except (BadDraft, ValueError) as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad draft: {e}")
                yield from verdicts
        except grpc.RpcError:
            pass  # the edge went away mid-stream: nothing to answer
        finally:
            self._close(sid)

    def _lead(self, sess: Session) -> pb.Verdict:
        v = sess.lead_one()
        return pb.Verdict(epoch=v.epoch, start=v.start, token=v.token, lead=True, verify_us=int(v.verify_s * 1e6))

    def _verify(self, sess: Session, group: list[pb.Draft]) -> list[pb.Verdict]:
        """Verify queued blocks in one pass (a pass costs about the same for 5
        tokens as for 15) and answer each block as if it had been alone."""
        d0 = group[0]
        if d0.more_tail:
            v = sess.more_tail(d0.epoch)
            return [pb.Verdict(epoch=v.epoch, start=v.start, tail=v.tail)]
        blocks = [packing.unpack_tokens(d.tokens, self.width) for d in group]
        q_u8 = [x for d in group for x in (packing.unpack_u8(d.q) if d.q else [])]
        q_sparse = [packing.unpack_sparse(b, self.width, 8) for d in group for b in d.q_sparse]
        v = sess.verify(d0.epoch, d0.start, [t for b in blocks for t in b], d0.fixed, q_u8, q_sparse,
                        group[-1].want_bonus)
        if v is None:
            return []
        out, first = [], 0                   # first: offset of the block's drafts among all drafts
        for i, (d, b) in enumerate(zip(group, blocks)):
            n = len(b) - d.fixed
            end = first + n
            if n == 0 or end <= v.overlap:
                first = end
                continue                     # nothing drafted, or all decided by lead tokens: no answer expected
            verdict = pb.Verdict(epoch=d.epoch, start=d.start, accepted=min(v.accepted, end) - first,
                                 verify_us=int(v.verify_s * 1e6))
            last = i == len(group) - 1
            if v.accepted < end or last:
                verdict.p_payload = v.p_payload
                if v.token is not None:
                    verdict.token = v.token
                out.append(verdict)
                break
            out.append(verdict)
            first = end
        return out

    # -- Generate ----------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context):
        self._check_fingerprint(request.fingerprint, context)
        try:
            sampling = sampling_from_proto(request.sampling)
        except BadDraft as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prompt = list(request.prompt)
        if not prompt or any(not 0 <= t < self.target.n_vocab for t in prompt):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty or has token ids outside the vocabulary")
        if len(prompt) >= self.cfg.n_ctx:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"prompt of {len(prompt)} tokens exceeds n_ctx={self.cfg.n_ctx}")
        ctx, logits = self._adopt_session(request.session, prompt)
        emulated = self.emulate is not None
        n_out, reason = 0, "length"
        try:
            pos = len(prompt)
            draw = lambda lg: sample(logits_to_probs(lg, sampling), rng_for(sampling.seed, pos, STREAM_TARGET))
            todo = prompt[ctx.n_past:] if logits is None else []
            with Hold(self.emulate if todo else None, len(todo)):  # a pass samples inside its time
                tok = draw(ctx.eval(todo)[-1] if todo else logits)
            while n_out < request.max_tokens and context.is_active():
                if pos + 1 >= self.cfg.n_ctx:
                    reason = "context"
                    break
                n_out += 1
                yield pb.GenerateChunk(tokens=[tok], emulated=emulated)
                if tok == self.target.eos and not request.ignore_eos:
                    reason = "eos"
                    break
                if n_out >= request.max_tokens:
                    break
                pos += 1
                with Hold(self.emulate, 1):
                    tok = draw(ctx.eval([tok])[-1])
            yield pb.GenerateChunk(done=True, finish_reason=reason, emulated=emulated)
        finally:
            self.target.release(ctx)
            log.info("generate: client=%s prompt=%d tokens, %d out (%s)",
                     request.client or context.peer(), len(prompt), n_out, reason)

    def _adopt_session(self, sid: str, prompt: list[int]):
        """(context, logits or None): a fresh context, or the cache of an Open'ed
        session whose speculation the edge gave up on, cut to the common prefix."""
        with self.lock:
            sess = self.sessions.pop(sid, None) if sid else None
        if sess is None or sess.ctx is None:
            return self.target.acquire(), None
        ctx = sess.ctx
        if sess.tokens == prompt and sess.pending is not None and ctx.n_past == len(prompt):
            return ctx, sess.pending
        same = 0
        for a, b in zip(sess.tokens[:ctx.n_past], prompt):
            if a != b:
                break
            same += 1
        ctx.truncate(min(same, len(prompt) - 1))
        return ctx, None

    def Close(self, request, context):
        self._close(request.session)
        return pb.CloseReply()

    # -- registry ----------------------------------------------------------
    def status(self) -> dict:
        """Load for the MQTT status topic (cloud/status.py). This server gives
        every session its own context, so nothing waits in a queue: 0."""
        with self.lock:
            n = len(self.sessions)
        return {"target": self.target_label, "emulated": self.emulate is not None, "sessions": n,
                "max_sessions": self.cfg.max_sessions, "queue": 0, "load": round(n / self.cfg.max_sessions, 3)}

    @property
    def target_label(self) -> str:
        return f"emulated:{self.emulate.name}" if self.emulate else self.target.name

    def _check_fingerprint(self, fp: str, context) -> None:
        if fp != self.target.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"tokenizer mismatch: edge fingerprint {fp or '(none)'} != "
                          f"target fingerprint {self.target.fingerprint}")

    def _close(self, sid: str, quiet: bool = False) -> None:
        with self.lock:
            sess = self.sessions.pop(sid, None)
        if sess is None:
            return
        if sess.ctx is not None:
            self.target.release(sess.ctx)
        if not quiet:
            rate = sess.accepted / sess.drafted if sess.drafted else 0.0
            log.info("session %s closed: client=%s blocks=%d drafted=%d accepted=%d acceptance=%.2f "
                     "tokens=%d %.1f s", sid, getattr(sess, "client", "?"), sess.blocks, sess.drafted,
                     sess.accepted, rate, len(sess.tokens), time.monotonic() - getattr(sess, "opened", sess.last_used))

    def _reap_idle(self) -> None:
        now = time.monotonic()
        with self.lock:
            idle = [s for s, x in self.sessions.items()
                    if x.ctx is not None and now - x.last_used > self.cfg.idle_timeout_s]
        for sid in idle:
            log.info("session %s expired after %.0f s idle", sid, self.cfg.idle_timeout_s)
            self._close(sid, quiet=True)

    def _measure_pass(self) -> tuple[float, float]:
        """The verifier's own pass time t(n) = a + b*n, measured with 1- and
        8-token passes (on a CPU b is far from zero: a block costs more than a
        token), for the edge's planner. Emulated: the profile's."""
        if self.emulate:
            return self.emulate.a_s, self.emulate.b_s
        ctx = self.target.acquire()
        try:
            def timed(n: int, reps: int) -> float:
                t0 = time.monotonic()
                for _ in range(reps):
                    ctx.truncate(0)
                    ctx.eval([self.target.eos] * n)
                return (time.monotonic() - t0) / reps
            timed(1, 1)                                    # warm-up
            t1, t8 = timed(1, 8), timed(8, 4)
            b = max(0.0, (t8 - t1) / 7)
            return max(1e-4, t1 - b), b
        finally:
            self.target.release(ctx)


class _BearerAuth(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self.expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health") or details.method.startswith("/grpc.reflection"):
            return continuation(details)
        if dict(details.invocation_metadata).get("authorization") != self.expected:
            return self._deny
        return continuation(details)


def build_server(cfg: VerifierConfig, target: TargetModel):
    """Returns (server, service, health servicer); the caller starts it."""
    interceptors = [_BearerAuth(cfg.token)] if cfg.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_sessions * 2 + 8),
                         interceptors=interceptors,
                         options=[("grpc.so_reuseport", 0)])
    service = VerifierService(cfg, target)
    pb_grpc.add_VerifierServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Verifier"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if cfg.tls_cert:
        creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
        port = server.add_secure_port(cfg.listen, creds)
    else:
        port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    return server, service, health_servicer, port
