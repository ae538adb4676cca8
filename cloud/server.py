"""The Verifier gRPC service (grpc.aio): proto <-> session, status codes, admission.

A verdict's life, top to bottom:

    request -> Session (protocol state) -> Step -> Scheduler (one batched pass
    over every session's steps) -> logits -> Session -> verdict

This file converts messages, maps errors to status codes, admits sessions and
keeps the registry; nothing here touches the model. A bad request ends its own
RPC with a precise status and never the server.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid

import grpc
import numpy as np

from cloud.auth import sanitize_log_field
from cloud.config import VerifierConfig
from cloud.inbox import END, LEAD, Inbox, StreamError
from cloud.metrics import Metrics
from cloud.scheduler import Scheduler, Step
from cloud.session import BadDraft, ContextFull, Limits, Session
from cloud.target import TargetError
from common.metadata import SESSION_HEADER, SESSION_KEY_HEADER as KEY_HEADER
from kernels import packing
from kernels.sampling import SamplingConfig
from kernels.tree import DraftTree, main_length, merge_chained, unpack_parents
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from proto.prompt_zstd import decompress_prompt
from sim.latency import LatencyProfile

log = logging.getLogger("tandem.cloud")
SERVICE = "tandem.v1.Verifier"
RELEASE_WAIT_S = 5.0


def sampling_from_proto(s: pb.Sampling) -> SamplingConfig:
    try:
        return SamplingConfig(temperature=float(s.temperature), top_k=int(s.top_k),
                              top_p=float(s.top_p) if 0 < s.top_p else 1.0, seed=int(s.seed))
    except ValueError as e:
        raise BadDraft(f"invalid sampling: {e}") from None


def printable(text: str, limit: int = 64) -> str:
    """A client-supplied string made safe for one log line (cloud/auth.py)."""
    return sanitize_log_field(text, limit)


class VerifierService(pb_grpc.VerifierServicer):
    def __init__(self, cfg: VerifierConfig, target_info, scheduler: Scheduler, emulate: LatencyProfile | None,
                 pass_model: tuple[float, float], metrics: Metrics, exact: str = "exact: unchecked"):
        self.cfg, self.info, self.sched, self.emulate, self.metrics = cfg, target_info, scheduler, emulate, metrics
        self.exact = exact                  # the start-up check's finding (cloud/exactness.py)
        self.width = packing.token_width(target_info.n_vocab)
        self.limits = Limits(target_info.n_vocab, cfg.n_ctx, cfg.max_draft, self.width, cfg.p_top_k, cfg.p_tail)
        self.sessions: dict[str, Session] = {}
        self.free_seqs = list(range(cfg.max_sessions))[::-1]
        # Draft trees' branches run in these, copied from the session's sequence in the pass
        # that needs them; the scheduler never puts two steps of one sequence in a pass.
        self.scratch = list(range(cfg.max_sessions, cfg.max_sessions + cfg.tree_seqs))
        self.releasing = 0                 # sequences of ended sessions not yet cleared
        self._freed = asyncio.Event()
        self.pass_a_s, self.pass_b_s = pass_model
        self.ar_token_s = self.pass_a_s + self.pass_b_s

    @property
    def target_label(self) -> str:
        return f"emulated:{self.emulate.name}" if self.emulate else self.info.name

    def status(self) -> dict:
        """Load for the MQTT status topic (cloud/status.py) and logs."""
        n = len(self.sessions)
        return {"target": self.target_label, "emulated": self.emulate is not None, "sessions": n,
                "max_sessions": self.cfg.max_sessions, "queue": self.sched.queued,
                "load": round(n / self.cfg.max_sessions, 3), "batching": self.cfg.batching,
                "exact": self.exact.removeprefix("exact: ")}

    # -- plumbing --------------------------------------------------------------
    async def _run(self, step: Step):
        """A step's result: through the scheduler, or at once when it needs no pass."""
        if not step.tokens:
            return step.finish(np.zeros((0, self.info.n_vocab), np.float32))
        return await asyncio.wrap_future(self.sched.submit(step))

    async def _refuse(self, context, code: grpc.StatusCode, message: str):
        self.metrics.refused.labels(code.name).inc()
        await context.abort(code, message)

    async def _admit(self, context, sid: str, sampling: SamplingConfig, codec: int, client: str) -> Session:
        if not self.free_seqs and self.releasing:
            # a session just ended (an edge switching from speculation to streaming
            # re-opens at once): its sequence is free after the scheduler's next pass
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), RELEASE_WAIT_S)
            except asyncio.TimeoutError:
                pass
        if not self.free_seqs:
            retry_ms = int(self.cfg.retry_after_s * 1000)
            context.set_trailing_metadata((("retry-after-ms", str(retry_ms)),))
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"verifier full: {self.cfg.max_sessions}/{self.cfg.max_sessions} sessions; "
                               f"retry in {retry_ms / 1000:.0f} s")
        sess = Session(sid, self.free_seqs.pop(), sampling, codec, self.limits, eos=self.info.eos,
                       client=printable(client or context.peer()))
        self.sessions[sid] = sess
        self.metrics.sessions.set(len(self.sessions))
        return sess

    def _release(self, sess: Session) -> None:
        """Free a session's sequence once no step of it can still run."""
        if self.sessions.get(sess.sid) is sess:
            del self.sessions[sess.sid]
        self.metrics.sessions.set(len(self.sessions))
        self.sched.drop(sess.seq)
        loop = asyncio.get_running_loop()
        seq = sess.seq
        self.releasing += 1

        def freed() -> None:
            self.releasing -= 1
            self.free_seqs.append(seq)
            self._freed.set()
        self.sched.run_now(lambda: self.info.clear(seq)).add_done_callback(
            lambda _: loop.call_soon_threadsafe(freed))

    async def _check_fingerprint(self, fp: str, context) -> None:
        if fp != self.info.fingerprint:
            await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                               f"tokenizer mismatch: edge fingerprint {printable(fp) or '(none)'} != "
                               f"target fingerprint {self.info.fingerprint}")

    async def _bound_session(self, context, sid: str) -> Session:
        """The session `sid`, if the caller holds its key (the client that opened it)."""
        sess = self.sessions.get(sid)
        if sess is None:
            await self._refuse(context, grpc.StatusCode.NOT_FOUND, f"unknown session {printable(sid)!r}: call Open first")
        key = dict(context.invocation_metadata()).get(KEY_HEADER, "")
        if not hmac.compare_digest(key.encode(), sess.key.encode()):
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                               f"session {printable(sid)} belongs to another client (missing or wrong {KEY_HEADER})")
        return sess

    async def _prompt(self, request, context) -> list[int]:
        """`prompt`, or `prompt_zstd` unpacked under a hard output limit (n_ctx
        tokens), so a small message that would expand without end is refused."""
        if not request.prompt_zstd:
            return list(request.prompt)
        if request.prompt:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "give prompt or prompt_zstd, not both")
        try:
            return decompress_prompt(request.prompt_zstd, self.width, self.cfg.n_ctx)
        except ValueError as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    # -- Open ------------------------------------------------------------------
    async def Open(self, request: pb.OpenRequest, context):
        t_open = time.monotonic()
        await self._check_fingerprint(request.fingerprint, context)
        try:
            sampling = sampling_from_proto(request.sampling)
        except BadDraft as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request.codec not in (pb.CODEC_P, pb.CODEC_Q):        # proto3 enums are open: any int arrives
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"unknown codec {int(request.codec)}")
        prompt = await self._prompt(request, context)
        sess = await self._admit(context, uuid.uuid4().hex[:12], sampling, int(request.codec), request.client)
        ld = sess.lead
        ld.on = request.lead or request.lead_first > 0
        ld.until = len(prompt) + (request.max_tokens or self.cfg.n_ctx)
        ld.first = request.lead_first
        if request.ignore_eos:
            sess.eos = None
        sess.streams += 1                  # nothing may free it while it prefills
        lead = {}
        try:
            await self._run(sess.prefill_step(prompt))
            if request.lead_in_reply and sess.can_lead():
                # the prefill's last row already holds its distribution: no pass
                lead["lead_token"] = (await self._run(sess.lead_step())).token
        except BadDraft as e:
            self._release(sess)
            await self._refuse(context, grpc.StatusCode.OUT_OF_RANGE if isinstance(e, ContextFull)
                               else grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except BaseException:
            self._release(sess)            # a failed or cancelled prefill frees its slot
            raise
        finally:
            sess.streams -= 1
        sess.last_used = time.monotonic()
        log.info("session %s opened: client=%s prompt=%d tokens codec=%s sampling=%s", sess.sid, sess.client,
                 len(prompt), "PQ"[sess.codec], sampling)
        return pb.OpenReply(session=sess.sid, session_key=sess.key, fingerprint=self.info.fingerprint,
                            n_vocab=self.info.n_vocab, token_width=self.width, n_ctx=self.cfg.n_ctx,
                            max_draft=self.cfg.max_draft, target=self.target_label, emulated=self.emulate is not None,
                            ar_token_s=self.ar_token_s, verify_a_s=self.pass_a_s, verify_b_s=self.pass_b_s,
                            p_top_k=self.cfg.p_top_k, p_tail=self.cfg.p_tail, tree_branches=len(self.scratch),
                            server_s=time.monotonic() - t_open, accepts_prompt_zstd=True, **lead)

    # -- Speculate -------------------------------------------------------------
    async def Speculate(self, request_iterator, context):
        sid = dict(context.invocation_metadata()).get(SESSION_HEADER, "")
        sess = await self._bound_session(context, sid)
        if sess.streams:
            await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, f"session {sid} already has a live stream")
        sess.streams += 1
        inbox = Inbox(request_iterator, self.width, self.cfg.max_draft)
        try:
            while True:
                arrived, item = await inbox.next(sess)
                if item is END:
                    break
                if isinstance(item, StreamError):
                    log.info("session %s: stream ended: %s", sid, item)
                    break
                try:
                    if item is LEAD:
                        v = await self._run(sess.lead_step())
                        yield pb.Verdict(epoch=v.epoch, start=v.start, token=v.token, lead=True,
                                         verify_us=int(v.verify_s * 1e6))
                        continue
                    self.metrics.bytes_in.inc(sum(d.ByteSize() for d in item))
                    sess.block_arrived(arrived, item[0].epoch)
                    for verdict in await self._verify(sess, item):
                        self.metrics.bytes_out.inc(verdict.ByteSize())
                        yield verdict
                except ContextFull as e:
                    await self._refuse(context, grpc.StatusCode.OUT_OF_RANGE, str(e))
                except (BadDraft, ValueError) as e:
                    await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad draft: {e}")
                except TargetError as e:
                    await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"verifier pass failed: {e}")
        finally:
            inbox.close()
            sess.streams -= 1
            self._close(sess)

    async def _verify(self, sess: Session, group: list[pb.Draft]) -> list[pb.Verdict]:
        """Verify queued blocks in one pass (a pass costs about the same for 5
        tokens as for 15) and answer each block as if it had been alone."""
        d0 = group[0]
        if d0.more_tail:
            v = sess.more_tail(d0.epoch)
            return [pb.Verdict(epoch=v.epoch, start=v.start, tail=v.tail)]
        blocks = [packing.unpack_tokens(d.tokens, self.width) for d in group]
        if any(d.parents for d in group):
            return await self._verify_tree(sess, group, blocks)
        q_u8 = [x for d in group for x in (packing.unpack_u8(d.q) if d.q else [])]
        q_sparse = [packing.unpack_sparse(b, self.width, 8) for d in group for b in d.q_sparse]
        step = sess.verify_step(d0.epoch, d0.start, [t for b in blocks for t in b], d0.fixed, q_u8, q_sparse,
                                group[-1].want_bonus)
        if step is None:
            return []
        v = await self._run(step)
        self.metrics.drafted.inc(sum(len(b) - d.fixed for d, b in zip(group, blocks)) - v.overlap)
        self.metrics.accepted.inc(v.accepted - v.overlap)
        return split_verdict(v, group, [len(b) - d.fixed for d, b in zip(group, blocks)])

    async def _verify_tree(self, sess: Session, group: list[pb.Draft], blocks: list[list[int]]) -> list[pb.Verdict]:
        """Blocks of which at least one is a tree: merged into one tree (each block below the
        previous block's main-chain leaf), verified in one pass with its branches."""
        d0 = group[0]
        if any(d.fixed for d in group):
            raise BadDraft("a draft tree cannot carry a fixed token (codec P at T>0 takes no trees)")
        trees = [DraftTree(b, unpack_parents(d.parents, len(b))) for d, b in zip(group, blocks)]
        tree, origin = merge_chained(trees)
        q_sparse = []
        if not sess.sampling.greedy and sess.codec == pb.CODEC_Q:
            per_block = [[packing.unpack_sparse(q, self.width, 8) if q else None for q in d.q_sparse] for d in group]
            if any(len(qs) != len(t) for qs, t in zip(per_block, trees)):
                raise BadDraft("codec Q needs one entry of q_sparse per tree node (empty for later siblings)")
            q_sparse = [per_block[k][i] for k, i in origin]
        work = sess.verify_tree_step(d0.epoch, d0.start, tree, q_sparse, group[-1].want_bonus, self.scratch)
        if work is None:
            return []
        v = work.finish(list(await asyncio.gather(*(self._run(s) for s in work.steps))))
        self.metrics.drafted.inc(len(tree) - v.overlap)
        self.metrics.accepted.inc(v.accepted - v.overlap)
        return split_verdict(v, group, [main_length(t.parents) for t in trees])

    # -- Generate --------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        await self._check_fingerprint(request.fingerprint, context)
        try:
            sampling = sampling_from_proto(request.sampling)
        except BadDraft as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prompt = await self._prompt(request, context)
        if not prompt or any(not 0 <= t < self.info.n_vocab for t in prompt):
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               "prompt is empty or has token ids outside the vocabulary")
        if len(prompt) >= self.cfg.n_ctx:
            await self._refuse(context, grpc.StatusCode.OUT_OF_RANGE,
                               f"prompt of {len(prompt)} tokens exceeds n_ctx={self.cfg.n_ctx}")
        if request.session:                # continue an Open'ed session's cache: no second prefill
            sess = await self._bound_session(context, request.session)
            if sess.streams:
                await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                                   f"session {request.session} already has a live stream")
            sess.sampling = sampling
        else:
            sess = await self._admit(context, "gen-" + uuid.uuid4().hex[:8], sampling, 0, request.client)
        sess.restart_from(prompt)
        sess.streams += 1
        emulated = self.emulate is not None
        n_out, reason = 0, "length"
        try:
            while n_out < request.max_tokens:
                if len(sess.tokens) + 1 >= self.cfg.n_ctx:
                    reason = "context"
                    break
                try:
                    tok = await self._run(sess.stream_step())
                except TargetError as e:
                    await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"verifier pass failed: {e}")
                n_out += 1
                yield pb.GenerateChunk(tokens=[tok], emulated=emulated)
                if tok == self.info.eos and not request.ignore_eos:
                    reason = "eos"
                    break
            yield pb.GenerateChunk(done=True, finish_reason=reason, emulated=emulated)
        finally:
            sess.streams -= 1
            self._close(sess, quiet=True)
            log.info("generate: client=%s prompt=%d tokens, %d out (%s)", sess.client, len(prompt), n_out, reason)

    async def Close(self, request, context):
        sess = await self._bound_session(context, request.session)
        if not sess.streams:
            self._close(sess)
        return pb.CloseReply()

    # -- registry ----------------------------------------------------------------
    def _close(self, sess: Session, quiet: bool = False) -> None:
        if self.sessions.get(sess.sid) is not sess:
            return
        self._release(sess)
        if not quiet:
            c = sess.count
            rate = c.accepted / c.drafted if c.drafted else 0.0
            log.info("session %s closed: client=%s blocks=%d drafted=%d accepted=%d acceptance=%.2f leads=%d "
                     "tokens=%d %.1f s", sess.sid, sess.client, c.blocks, c.drafted, c.accepted, rate, c.leads,
                     len(sess.tokens), time.monotonic() - sess.opened)

    async def reap_idle(self, every_s: float = 5.0) -> None:
        """Expire sessions no stream uses and nobody touched for idle_timeout_s."""
        while True:
            await asyncio.sleep(min(every_s, self.cfg.idle_timeout_s))
            now = time.monotonic()
            for sess in list(self.sessions.values()):
                if not sess.streams and now - sess.last_used > self.cfg.idle_timeout_s:
                    log.info("session %s expired after %.0f s idle", sess.sid, self.cfg.idle_timeout_s)
                    self._close(sess, quiet=True)


def split_verdict(v, group: list[pb.Draft], levels: list[int]) -> list[pb.Verdict]:
    """One merged pass's result as one verdict per block: every block up to the
    first rejection, which carries the correction (or codec P's payload).
    levels: per block, the positions it drafts (a tree's: its main chain's)."""
    out, first = [], 0                   # first: offset of the block's drafts among all drafts
    for i, (d, n) in enumerate(zip(group, levels)):
        end = first + n
        if end == first or end <= v.overlap:
            first = end
            continue                     # nothing drafted, or all decided by lead tokens: no answer expected
        verdict = pb.Verdict(epoch=d.epoch, start=d.start, accepted=min(v.accepted, end) - first,
                             verify_us=int(v.verify_s * 1e6))
        ranks = v.path[first:min(v.accepted, end)]
        if any(ranks):
            verdict.path = bytes(ranks)  # the path left the main chain in this block: it is the last answered
        if v.accepted < end or any(ranks) or i == len(group) - 1:
            verdict.p_payload = v.p_payload
            if v.token is not None:
                verdict.token = v.token
            if v.sibling_accept is not None and v.accepted < end:
                verdict.sibling_accept = v.sibling_accept
            out.append(verdict)
            break
        out.append(verdict)
        first = end
    return out
