"""The Verifier gRPC service (grpc.aio): proto <-> session, status codes, admission.

A verdict's life, top to bottom:

    request -> Session (protocol state) -> Step -> Scheduler (one batched pass
    over every session's steps) -> logits -> Session -> verdict

This file converts messages and maps errors to status codes; the session
lifecycle is cloud/sessions.py's, and nothing here touches the model. A bad
request ends its own RPC with a precise status and never the server. Logits
rows come back here, on the event loop, and go to the session's `apply_*`
methods: a session's state changes on this one thread.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import uuid

import grpc
import numpy as np

from cloud.admission import SloAdmission
from cloud.auth import sanitize_log_field
from cloud.config import VerifierConfig
from cloud.inbox import CLOSED, END, LEAD, Inbox, StreamError
from cloud.metrics import Metrics
from cloud.scheduler import Scheduler, Step, no_rows
from cloud.session import BadDraft, Codec, ContextFull, LeadState, Limits, Session
from cloud.sessions import Busy, Full, Registry
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
# How long before a pass's modelled end a session queues its next step (`Speculate`'s
# `ahead`): enough for every session's event-loop turn at that end (measured: 32 sessions
# took 5-15 ms between passes when each queued after the end).
PREPARE_AHEAD_S = 0.01


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
        self.sessions = Registry(cfg.max_sessions, scheduler, target_info.clear, self._count)
        # Draft trees' branches run in these, copied from the session's sequence in the pass
        # that needs them; the scheduler never puts two steps of one sequence in a pass.
        self.scratch = list(range(cfg.max_sessions, cfg.max_sessions + cfg.tree_seqs))
        self.pass_a_s, self.pass_b_s = pass_model
        self.ar_token_s = self.pass_a_s + self.pass_b_s
        self.slo = None
        self._slo_refresh_due = False
        if cfg.slo_tokens_per_s:
            # a real target is priced by the pass time it measured at start-up (pass_model)
            profile = emulate or LatencyProfile("measured", self.pass_a_s, self.pass_b_s,
                                                "this verifier's pass time, measured at start-up")
            self.slo = SloAdmission(cfg.slo_tokens_per_s, profile, cap=scheduler.budget,
                                    floor=cfg.max_draft + 2, batched=cfg.batching, headroom=cfg.slo_headroom)
            metrics.slo.set(cfg.slo_tokens_per_s)
            self._refresh_slo()

    @property
    def target_label(self) -> str:
        return f"emulated:{self.emulate.name}" if self.emulate else self.info.name

    def status(self) -> dict:
        """Load for the MQTT status topic (cloud/status.py) and logs."""
        n = len(self.sessions)
        return {"target": self.target_label, "emulated": self.emulate is not None, "sessions": n,
                "max_sessions": self.cfg.max_sessions, "queue": self.sched.queued,
                "load": round(n / self.cfg.max_sessions, 3), "batching": self.cfg.batching,
                "exact": self.exact.removeprefix("exact: "), **(self.slo.status() if self.slo else {}),
                **self._compute_status()}

    # -- admission by SLO --------------------------------------------------------
    def _count(self, n: int) -> None:
        """The sessions held changed (an Open, or a session ended)."""
        self.metrics.sessions.set(n)
        self._refresh_slo()

    def _refresh_slo(self) -> None:
        """Predict for the sessions held now; the scheduler's budget follows."""
        self._slo_refresh_due = False
        if self.slo is None:
            return
        self.sched.set_budget(self.slo.refresh(self.sessions.held()))
        self.metrics.predicted_min_rate.set(self.slo.now.min_rate)
        self.metrics.batch_budget.set(self.slo.budget)
        self.metrics.slo_slowdown.set(self.slo.slow())

    def _served(self, sess: Session, steps: list[Step], before: int, speculative: bool = True) -> None:
        """A decode step of `sess` is done: count its pass for its acceptance (and the SLO)."""
        n_in = sum(len(s.tokens) if s.charged is None else s.charged for s in steps)
        gained = len(sess.tokens) - before
        sess.count.served(n_in, gained)
        if self.slo is not None:
            self.slo.observe(sess, n_in, gained, speculative)
            if not self._slo_refresh_due:
                # once for the burst of steps a pass resolves together, not once per session: a
                # refresh reads every session held, so per step it would cost O(N^2) a pass
                self._slo_refresh_due = True
                asyncio.get_running_loop().call_soon(self._refresh_slo)

    def _compute_status(self) -> dict:
        """Real compute against the emulated model, and the row cache's hits, so far."""
        s = self.sched
        out = {"pass_real_s": round(s.real_s, 3), "pass_modelled_s": round(s.modelled_s, 3),
               "passes_over_model": s.over_model}
        hits, misses = self.info.cache_counts()
        if hits or misses:
            out["target_cache"] = {"hits": hits, "misses": misses, "hit_rate": round(hits / (hits + misses), 4)}
        return out

    # -- plumbing --------------------------------------------------------------
    async def _rows(self, step: Step) -> np.ndarray:
        """A step's logits rows: from the scheduler, or none at once when it evaluates nothing."""
        if not step.tokens:
            return no_rows(self.info.n_vocab)
        return await asyncio.wrap_future(self.sched.submit(step))

    async def _lead_rows(self, sess: Session, step: Step, inbox: Inbox | None) -> np.ndarray | None:
        """A lead step's rows, or None when the edge's block arrived while the step still
        waited for a pass: the step is withdrawn and the block verified in that pass instead.
        A lead token decided first would take the pass's slot for one token and push the block,
        which decides several, to the pass after (measured at 32 sessions: a session's first
        verdict came a whole pass late)."""
        if not step.tokens or inbox is None or sess.must_lead():   # a fixed lead schedule never gives way
            return await self._rows(step)
        rows = asyncio.wrap_future(self.sched.submit(step))
        came = asyncio.ensure_future(inbox.block_due(sess))
        try:
            await asyncio.wait({rows, came}, return_when=asyncio.FIRST_COMPLETED)
            if not rows.done() and self.sched.withdraw(step):
                return None
            return await rows
        finally:
            came.cancel()

    @staticmethod
    async def _ahead(ahead, *steps: Step) -> None:
        if ahead is not None:
            await ahead(max(s.ready_at for s in steps))

    @staticmethod
    async def _pass_end(*steps: Step) -> None:
        """Wait out the modelled end of the pass that evaluated `steps`. The scheduler hands
        rows over as soon as the real pass is done, so accepting and sampling them overlaps
        the emulated target's hold, as it would run inside a GPU's pass; the answer leaves
        no earlier than the modelled time. No-op for a real target."""
        end = max(s.ready_at for s in steps)
        if end > time.monotonic():
            await asyncio.sleep(end - time.monotonic())

    async def _refuse(self, context, code: grpc.StatusCode, message: str):
        self.metrics.refused.labels(code.name).inc()
        await context.abort(code, message)

    async def _admit(self, context, make, prompt_len: int, streaming: bool = False) -> Session:
        """A new session from `make(seq)`, or RESOURCE_EXHAUSTED with a retry hint: when
        every sequence is taken, and with an SLO when one more session would miss it."""
        new = self.slo.prior(streaming, prompt_len) if self.slo else None
        admit = (lambda: self.slo.check(self.sessions.held(), new)) if self.slo else (lambda: None)
        try:
            sess = await self.sessions.open(make, streaming, admit)
        except Full as e:
            retry_ms = int(self.cfg.retry_after_s * 1000)
            context.set_trailing_metadata((("retry-after-ms", str(retry_ms)),))
            why = str(e) or f"verifier full: {self.cfg.max_sessions}/{self.cfg.max_sessions} sessions"
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{why}; retry in {retry_ms / 1000:.0f} s")
        if self.slo is not None:
            self.slo.admitted(sess, streaming)
            self._refresh_slo()
        return sess

    async def _attach(self, context, sess: Session, on_close=lambda: None) -> None:
        try:
            self.sessions.attach(sess, on_close)
        except Busy:
            await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {sess.sid} already has a live stream")

    @staticmethod
    async def _closed_under(context, sess: Session):
        """End a stream whose session a Close ended (not a refusal: the owner asked)."""
        await context.abort(grpc.StatusCode.ABORTED, f"session {sess.sid} closed")

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
        if request.codec not in (Codec.P, Codec.Q):              # proto3 enums are open: any int arrives
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"unknown codec {int(request.codec)}")
        prompt = await self._prompt(request, context)
        lead = LeadState(on=request.lead or request.lead_first > 0, first=request.lead_first,
                         until=len(prompt) + (request.max_tokens or self.cfg.n_ctx))
        eos = None if request.ignore_eos else self.info.eos
        sess = await self._admit(context, lambda seq: Session(
            uuid.uuid4().hex[:12], seq, sampling, Codec(request.codec), self.limits, eos=eos,
            client=printable(request.client or context.peer()), lead=lead), len(prompt))
        extra = await self._prefill(context, sess, prompt, request.lead_in_reply)
        if not self.sessions.opened(sess):
            await self._closed_under(context, sess)
        log.info("session %s opened: client=%s prompt=%d tokens codec=%s sampling=%s", sess.sid, sess.client,
                 len(prompt), sess.codec.name, sampling)
        return pb.OpenReply(session=sess.sid, session_key=sess.key, fingerprint=self.info.fingerprint,
                            n_vocab=self.info.n_vocab, token_width=self.width, n_ctx=self.cfg.n_ctx,
                            max_draft=self.cfg.max_draft, target=self.target_label, emulated=self.emulate is not None,
                            ar_token_s=self.ar_token_s, verify_a_s=self.pass_a_s, verify_b_s=self.pass_b_s,
                            p_top_k=self.cfg.p_top_k, p_tail=self.cfg.p_tail, tree_branches=len(self.scratch),
                            server_s=time.monotonic() - t_open, accepts_prompt_zstd=True, **extra)

    async def _prefill(self, context, sess: Session, prompt: list[int], lead_in_reply: bool) -> dict:
        """Evaluate the prompt (and lead the first token if asked); a failed or cancelled
        prefill ends the session."""
        try:
            step = sess.prefill_step(prompt)
            sess.apply_prefill(await self._rows(step))
            await self._pass_end(step)
            if lead_in_reply and sess.can_lead():
                # the prefill's last row already holds its distribution: no pass
                work = sess.lead_step()
                v = sess.apply_lead(work, await self._rows(work.step))
                await self._pass_end(work.step)
                return {"lead_token": v.token}
            return {}
        except BadDraft as e:
            self.sessions.detach(sess)
            await self._refuse(context, grpc.StatusCode.OUT_OF_RANGE if isinstance(e, ContextFull)
                               else grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except BaseException:
            self.sessions.detach(sess)
            raise

    # -- Speculate -------------------------------------------------------------
    async def Speculate(self, request_iterator, context):
        sid = dict(context.invocation_metadata()).get(SESSION_HEADER, "")
        sess = await self._bound_session(context, sid)
        await self._attach(context, sess, on_close=lambda: inbox.interrupt())
        inbox = Inbox(request_iterator, self.width, self.cfg.max_draft)
        prepared: list[asyncio.Future] = []      # the next item's answer, its step already queued

        async def ahead(end: float) -> None:
            """Called between an answer's rows and its pass's modelled end: queue the next
            item's step shortly before that end, as a serving loop prepares its next batch
            while the current one runs. Queued after the end, it would reach the scheduler
            after the next pass had gathered, and the session would skip that pass."""
            if prepared:
                return
            wait = end - PREPARE_AHEAD_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            got = inbox.ready(sess) if not prepared and not self.sessions.closing(sess) else None
            if got is not None:
                prepared.append(asyncio.ensure_future(self._answer(sess, *got, inbox, ahead)))

        handed = False                              # the edge goes on with the session elsewhere
        try:
            while True:
                if self.sessions.closing(sess):
                    await self._closed_under(context, sess)
                if prepared:
                    answer = prepared.pop()
                else:
                    arrived, item = await inbox.next(sess)
                    if item is END:
                        break
                    if item is CLOSED:
                        await self._closed_under(context, sess)
                    if isinstance(item, StreamError):
                        log.info("session %s: stream ended: %s", sid, item)
                        break
                    if item is not LEAD and item[0].handover:
                        handed = True
                        break
                    answer = self._answer(sess, arrived, item, inbox, ahead)
                try:
                    for verdict in await answer:
                        yield verdict
                except ContextFull as e:
                    await self._refuse(context, grpc.StatusCode.OUT_OF_RANGE, str(e))
                except (BadDraft, ValueError) as e:
                    await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad draft: {e}")
                except TargetError as e:
                    await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"verifier pass failed: {e}")
        finally:
            for task in prepared:
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()           # the stream is over: nobody hears what it raised
            inbox.close()
            if handed and self.sessions.hand_over(sess):
                log.info("session %s: speculation ended, the edge streams on from its cache", sid)
            elif self.sessions.detach(sess):
                self._log_closed(sess)

    async def _answer(self, sess: Session, arrived: float, item, inbox: Inbox | None = None,
                      ahead=None) -> list[pb.Verdict]:
        """The verdicts for one inbox item: a lead token, or blocks to verify. `inbox`, the
        stream's: a verify step asks it at the pass end whether the session's next step follows
        at once (`Inbox.due`), a lead step gives way when it brings the edge's block
        (`Inbox.block_due`). ahead(end), once the item is applied, may queue the next item's
        step before the pass's end."""
        if item is LEAD:
            work, before = sess.lead_step(), len(sess.tokens)
            work.step.follows = True       # a leading session leads on at once: see Scheduler._await_followers
            rows = await self._lead_rows(sess, work.step, inbox)
            if rows is None:
                return []                  # the branch's block came first: it takes the pass
            v = sess.apply_lead(work, rows)
            self._served(sess, [work.step], before)
            await self._ahead(ahead, work.step)
            await self._pass_end(work.step)
            return [pb.Verdict(epoch=v.epoch, start=v.start, token=v.token, lead=True, verify_us=int(v.verify_s * 1e6))]
        self.metrics.bytes_in.inc(sum(d.ByteSize() for d in item))
        sess.block_arrived(arrived, item[0].epoch)
        verdicts = await self._verify(sess, item, inbox, ahead)
        for verdict in verdicts:
            self.metrics.bytes_out.inc(verdict.ByteSize())
        return verdicts

    async def _verify(self, sess: Session, group: list[pb.Draft], inbox: Inbox | None = None,
                      ahead=None) -> list[pb.Verdict]:
        """Verify queued blocks in one pass (a pass costs about the same for 5
        tokens as for 15) and answer each block as if it had been alone."""
        d0 = group[0]
        if d0.more_tail:
            v = sess.more_tail(d0.epoch)
            return [pb.Verdict(epoch=v.epoch, start=v.start, tail=v.tail)]
        blocks = [packing.unpack_tokens(d.tokens, self.width) for d in group]
        if any(d.parents for d in group):
            return await self._verify_tree(sess, group, blocks, inbox, ahead)
        q_u8 = [x for d in group for x in (packing.unpack_u8(d.q) if d.q else [])]
        q_sparse = [packing.unpack_sparse(b, self.width, 8) for d in group for b in d.q_sparse]
        work = sess.verify_step(d0.epoch, d0.start, [t for b in blocks for t in b], d0.fixed, q_u8, q_sparse,
                                group[-1].want_bonus)
        if work is None:
            return []
        work.step.follows = _follows(sess, inbox)
        before = len(sess.tokens)
        v = sess.apply_chain(work, await self._rows(work.step))
        self._served(sess, [work.step], before)
        await self._ahead(ahead, work.step)
        await self._pass_end(work.step)
        self.metrics.drafted.inc(sum(len(b) - d.fixed for d, b in zip(group, blocks)) - v.overlap)
        self.metrics.accepted.inc(v.accepted - v.overlap)
        return split_verdict(v, group, [len(b) - d.fixed for d, b in zip(group, blocks)])

    async def _verify_tree(self, sess: Session, group: list[pb.Draft], blocks: list[list[int]],
                           inbox: Inbox | None = None, ahead=None) -> list[pb.Verdict]:
        """Blocks of which at least one is a tree: merged into one tree (each block below the
        previous block's main-chain leaf), verified in one pass with its branches."""
        d0 = group[0]
        if any(d.fixed for d in group):
            raise BadDraft("a draft tree cannot carry a fixed token (codec P at T>0 takes no trees)")
        trees = [DraftTree(b, unpack_parents(d.parents, len(b))) for d, b in zip(group, blocks)]
        tree, origin = merge_chained(trees)
        q_sparse = []
        if not sess.sampling.greedy and sess.codec == Codec.Q:
            per_block = [[packing.unpack_sparse(q, self.width, 8) if q else None for q in d.q_sparse] for d in group]
            if any(len(qs) != len(t) for qs, t in zip(per_block, trees)):
                raise BadDraft("codec Q needs one entry of q_sparse per tree node (empty for later siblings)")
            q_sparse = [per_block[k][i] for k, i in origin]
        work = sess.verify_tree_step(d0.epoch, d0.start, tree, q_sparse, group[-1].want_bonus, self.scratch)
        if work is None:
            return []
        work.steps[0].follows = _follows(sess, inbox)
        before = len(sess.tokens)
        v = sess.apply_tree(work, list(await asyncio.gather(*(self._rows(s) for s in work.steps))))
        self._served(sess, work.steps, before)
        await self._ahead(ahead, *work.steps)
        await self._pass_end(*work.steps)
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
            await self._attach(context, sess)
        else:
            sess = await self._admit(context, lambda seq: Session(
                "gen-" + uuid.uuid4().hex[:8], seq, sampling, Codec.P, self.limits, eos=self.info.eos,
                client=printable(request.client or context.peer())), len(prompt), streaming=True)
        sess.restart_from(prompt, sampling)
        emulated = self.emulate is not None
        n_out = 0

        def stop(tok: int | None) -> str | None:
            """Why the stream ends after `tok` (None: before any token), or None to go on."""
            if tok is not None and tok == self.info.eos and not request.ignore_eos:
                return "eos"
            if n_out >= request.max_tokens:
                return "length"
            return "context" if len(sess.tokens) + 1 >= self.cfg.n_ctx else None

        reason = stop(None)
        queued = None                      # the next token's (work, rows task), already in the queue
        try:
            while reason is None:
                if self.sessions.closing(sess):
                    await self._closed_under(context, sess)
                try:
                    work = queued[0] if queued else sess.stream_step()
                    rows = await (queued[1] if queued else self._rows(work.step))
                    before = len(sess.tokens)
                    tok = sess.apply_stream(work, rows)
                    self._served(sess, [work.step], before, speculative=False)
                    n_out += 1
                    reason, queued = stop(tok), None
                    if reason is None:
                        # Queue the next token's step now, before this pass's modelled end, as
                        # every streaming session does, so that they share the next pass. Queued
                        # after the end, the first to arrive starts a pass alone and the others
                        # take turns (measured: 2 sessions got half the rate of 1 each).
                        nxt = sess.stream_step()
                        nxt.step.follows = True
                        queued = (nxt, asyncio.ensure_future(self._rows(nxt.step)))
                    await self._pass_end(work.step)
                except TargetError as e:
                    await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"verifier pass failed: {e}")
                yield pb.GenerateChunk(tokens=[tok], emulated=emulated)
            yield pb.GenerateChunk(done=True, finish_reason=reason, emulated=emulated)
        finally:
            if queued is not None:
                queued[1].cancel()
            self.sessions.detach(sess)
            log.info("generate: client=%s prompt=%d tokens, %d out (%s)", sess.client, len(prompt), n_out,
                     reason or "ended early")

    async def Close(self, request, context):
        """End the session; one a stream still uses ends with that stream, which is told."""
        sess = await self._bound_session(context, request.session)
        if self.sessions.close(sess):
            self._log_closed(sess)
        return pb.CloseReply()

    # -- expiry and logs ---------------------------------------------------------
    async def reap_idle(self, every_s: float = 5.0) -> None:
        """Expire sessions no stream uses and nobody touched for idle_timeout_s."""
        while True:
            await asyncio.sleep(min(every_s, self.cfg.idle_timeout_s))
            for sess in self.sessions.expire(self.cfg.idle_timeout_s):
                log.info("session %s expired after %.0f s idle", sess.sid, self.cfg.idle_timeout_s)

    @staticmethod
    def _log_closed(sess: Session) -> None:
        c = sess.count
        rate = c.accepted / c.drafted if c.drafted else 0.0
        log.info("session %s closed: client=%s blocks=%d drafted=%d accepted=%d acceptance=%.2f leads=%d "
                 "tokens=%d %.1f s", sess.sid, sess.client, c.blocks, c.drafted, c.accepted, rate, c.leads,
                 len(sess.tokens), time.monotonic() - sess.opened)


def _follows(sess: Session, inbox: Inbox | None):
    """A verify step's `Step.follows`: asked at the pass end, as only then is it known whether
    the session's next block has come."""
    return functools.partial(inbox.due, sess) if inbox is not None else False


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
