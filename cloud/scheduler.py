"""One loop owns the model: every session's work, batched into exact passes.

Sessions hand the scheduler *steps* (a prompt to prefill, a block to verify,
a token to lead or stream); each iteration gathers every queued step under a
token budget, evaluates them in one multi-sequence pass, and hands each step
its logits rows. The shape of a continuous-batching server loop:

    wait for work -> gather (decodes first, prefills chunked) -> one pass
                  -> resolve each step's future with its logits rows

The scheduler only evaluates: what the rows mean (accepting, sampling, moving a
session on) is the session's business, done on the event loop that awaits the
future, so a session's state changes on one thread only.

Fairness: steps that decode (verify, lead, stream) go first, oldest first; a
prompt is prefilled in chunks of at most `prefill_chunk` tokens, so a long
prompt delays other sessions' tokens by one chunk's time, never by the whole
prompt. With `batching` off every pass carries one step (for comparison).
An emulated target holds each pass to the modelled t(n) = a + b*n for the
n tokens in it: the one place latency is emulated.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cloud.target import INVARIANT_BATCH, Chunk, Target
from cloud.target_cache import CachedTarget
from sim.latency import Hold, LatencyProfile

log = logging.getLogger("tandem.cloud")
FOLLOW_MAX_S = 0.02      # the longest a pass waits for sessions that go on at once


@dataclass
class Step:
    """Model work for one sequence: evaluate `tokens` at positions `start`...; the
    step's future resolves with the logits rows of its last `n_logits` tokens.
    `prefill` steps may be split across passes. Housekeeping (`chore`, on
    sequence -1) runs on the model's thread between passes instead."""
    seq: int
    start: int
    tokens: list[int]
    n_logits: int
    prefill: bool = False
    future: Future = field(default_factory=Future)
    done: int = 0                               # tokens evaluated so far (chunked prefill)
    copy_from: int | None = None                # tree branch: start from a copy of that sequence (cloud/target.py)
    after: "Step | None" = None                 # ... taken once that step's tokens are in (its pass or before)
    charged: int | None = None                  # tokens an emulated target charges (None: all of them)
    rows: list = field(default_factory=list)    # logits gathered so far
    queued_at: float = field(default_factory=time.monotonic)
    chore: Callable[[], object] | None = None
    ready_at: float = 0.0                       # monotonic end of its pass as modelled (0: not emulated)
    # its session queues its next step as soon as it resolves; a callable is asked at the
    # pass end (a pipelined session follows only when its next block is already queued)
    follows: bool | Callable[[], bool] = False
    judge: Callable | None = None               # which rows its verdict reads (Chunk.judge): unsplit steps only


def no_rows(n_vocab: int) -> np.ndarray:
    """The rows of a step that evaluates nothing (its distribution is already known)."""
    return np.zeros((0, n_vocab), np.float32)


@dataclass
class PassStats:
    tokens: int
    steps: int
    seconds: float              # wall time of the pass, its emulated hold included (from when the
                                # modelled device began it: Scheduler._run)
    real_s: float = 0.0         # the target's real compute in it (llama_decode, row-cache reads)
    modelled_s: float = 0.0     # what the emulated target's model charges for it (0: not emulated)
    cache_hits: int = 0         # rows served from the target's row cache (cloud/target_cache.py)
    cache_misses: int = 0       # rows the model computed for it

    @property
    def over_model(self) -> bool:
        """The real compute outran the model: this pass measured the machine, not the modelled GPU."""
        return self.modelled_s > 0 and self.real_s > self.modelled_s


class Scheduler:
    def __init__(self, target: Target | CachedTarget, batching: bool = True, emulate: LatencyProfile | None = None,
                 prefill_chunk: int = 2 * INVARIANT_BATCH,
                 on_pass: Callable[[PassStats], None] = lambda s: None,
                 follow_s: float = 0.004, follow_max_s: float = FOLLOW_MAX_S):
        self.target, self.batching, self.emulate = target, batching, emulate
        self.budget = target.max_batch_tokens
        self.prefill_chunk = max(1, min(prefill_chunk, self.budget))
        self._chunk_cap = prefill_chunk
        self.on_pass = on_pass
        self._queue: collections.deque[Step] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.follow_s, self.follow_max_s = follow_s, follow_max_s
        self._expect: set[int] = set()              # sequences whose next step is due at once
        self._expect_until = 0.0
        self._model_end = 0.0                       # when the last emulated pass ended as modelled
        self.passes = 0
        # totals over every pass, for the status and logs (read from other threads: plain floats)
        self.real_s = 0.0
        self.modelled_s = 0.0
        self.over_model = 0

    def start(self) -> None:
        self._model_end = time.monotonic()          # the modelled device starts idle, now
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, step: Step) -> Future:
        self.submit_many([step])
        return step.future

    def submit_many(self, steps: list[Step]) -> None:
        """Queue several steps at once: the next pass sees all of them."""
        with self._cv:
            for step in steps:
                if self._stopping:
                    step.future.set_exception(RuntimeError("the verifier is shutting down"))
                else:
                    self._queue.append(step)
            self._cv.notify()

    def drop(self, seq: int) -> None:
        """Forget the queued steps of a sequence whose session is gone."""
        with self._cv:
            for s in [s for s in self._queue if s.seq == seq]:
                self._queue.remove(s)
                s.future.cancel()

    def withdraw(self, step: Step) -> bool:
        """Take back a step no pass has started: True when it was still queued (its future is
        then cancelled), False when a pass already has it."""
        with self._cv:
            # by identity: Step's generated __eq__ would compare every field of every queued step
            at = next((i for i, s in enumerate(self._queue) if s is step), None)
            if at is None or step.done:
                return False
            del self._queue[at]
        step.future.cancel()
        return True

    def set_budget(self, n_tokens: int) -> None:
        """Carry at most `n_tokens` per pass from now on (an SLO's budget), never more than
        the target's batch. Below two prefill chunks a prompt gets half the pass, so
        decodes keep room beside it."""
        n = max(1, min(n_tokens, self.target.max_batch_tokens))
        if n == self.budget:
            return
        with self._cv:
            self.budget = n
            self.prefill_chunk = max(1, min(self._chunk_cap, n // 2))

    def run_now(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the model's thread between passes (e.g. freeing a sequence)."""
        return self.submit(Step(-1, 0, [], 0, chore=fn))

    # -- the loop ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._queue:
                    return
                self._await_followers()
                batch = self._gather()
            if not batch:                           # a step withdrawn while the pass waited leaves none
                continue
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - one pass's bug must not stop every session's passes
                log.exception("pass of %d steps failed", len(batch))
                for s, _ in batch:
                    _resolve(s.future, e)

    def _await_followers(self) -> None:
        """Hold the next pass briefly for the sessions whose steps just resolved and that
        go on at once (a cloud lead's next token). They all answer at the same pass end and
        queue their next steps one after another; starting the pass with the first to
        arrive would leave the others to the pass after, and the sessions would take turns
        instead of sharing passes (a serving loop keeps its running sequences in the next
        batch for the same reason). Called under the lock; waits at most a few ms."""
        while self._expect and self.batching and not self._stopping:
            if self._expect <= {s.seq for s in self._queue}:
                break
            left = self._expect_until - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)
        self._expect = set()

    def _gather(self) -> list[tuple[Step, int]]:
        """(step, tokens to evaluate now) for the next pass; called under the lock."""
        q = self._queue
        chore = next((s for s in q if s.seq < 0), None)
        if chore is not None:
            # housekeeping runs alone, in order, before the next pass: it frees the sequence of a
            # session whose steps are already dropped, so it need not wait its turn, and decodes
            # queued after it must not wait behind the prompts queued before it
            q.remove(chore)
            return [(chore, 0)]
        if not self.batching:
            s = q[0]
            n = self._chunk(s, self.budget)
            if s.done + n >= len(s.tokens):
                q.popleft()
            return [(s, n)]
        taken: list[tuple[Step, int]] = []
        taken_ids: set[int] = set()
        left = self.budget
        seqs: set[int] = set()
        waiting_prefill = any(s.prefill for s in q)
        # decodes first (keep a chunk's room for a waiting prompt), then prompts
        for want_prefill in (False, True):
            room = left - (self.prefill_chunk if waiting_prefill and not want_prefill else 0)
            for s in list(q):
                if s.prefill != want_prefill or s.seq in seqs:
                    continue
                if s.after is not None and s.after.done < len(s.after.tokens) and id(s.after) not in taken_ids:
                    continue                        # its copy's source is not written yet
                n = self._chunk(s, room)
                if n <= 0 and len(s.tokens) > 0:
                    continue
                taken.append((s, n))
                taken_ids.add(id(s))
                seqs.add(s.seq)
                room -= n
                left -= n
                if s.done + n >= len(s.tokens):
                    q.remove(s)
        return taken

    def _chunk(self, s: Step, room: int) -> int:
        rest = len(s.tokens) - s.done
        if not s.prefill:
            return rest if rest <= room else 0      # a block is never split
        return min(rest, self.prefill_chunk, room)

    def _run(self, batch: list[tuple[Step, int]]) -> None:
        t0 = time.monotonic()
        n_tokens = sum(n for _, n in batch)
        # A tree branch re-evaluates its shared path only because llama.cpp's per-sequence KV
        # streams cannot share it; a target verifying trees with a tree attention mask pays
        # for the branch's own nodes alone, so that is what an emulated pass is held to.
        n_charged = sum(n if s.charged is None else s.charged for s, n in batch)
        chunks = []
        for s, n in batch:
            first_row = len(s.tokens) - s.n_logits          # tokens from here on need their logits
            whole = s.done == 0 and n == len(s.tokens)
            chunks.append(Chunk(s.seq, s.start + s.done, s.tokens[s.done:s.done + n],
                                max(0, min(n, s.done + n - first_row)), copy_from=s.copy_from,
                                judge=s.judge if whole else None))
        # what a GPU's attention reads: each sequence's whole cache once (one chunk per sequence)
        kv_tokens = sum(c.start + len(c.tokens) for c in chunks if c.seq >= 0)
        # The modelled device starts this pass when the last one ended, or when its first step
        # came if the queue was empty then: this thread's own wake-up on a busy CPU (ms, at a
        # pass end where every session answers at once) is not the device's time.
        began = min(t0, max(self._model_end, min(s.queued_at for s, _ in batch))) if self.emulate else t0
        hold = Hold(self.emulate if n_tokens else None, n_charged, kv_tokens, start=began)
        hits0, misses0 = self.target.cache_counts()
        with hold:
            t_real = time.perf_counter()
            try:
                # Branches copied from a sequence this pass writes go in a second decode, after
                # it: they then evaluate their own nodes only, not the path they share with it.
                # One pass to the emulated target either way (a tree mask would do it in one).
                live = [(c, s.after is not None) for c, (s, _) in zip(chunks, batch) if s.seq >= 0 and c.tokens]
                out = {}
                for second in (False, True):
                    part = [c for c, late in live if late == second]
                    out.update(zip(map(id, part), self.target.decode(part) if part else []))
                rows = iter([out[id(c)] for c, _ in live])
                real_s = time.perf_counter() - t_real
            except Exception as e:  # noqa: BLE001 - a failed pass fails its steps, not the loop
                log.warning("pass of %d tokens failed: %s", n_tokens, e)
                for s, _ in batch:
                    _resolve(s.future, e)
                return
            self.passes += 1                        # before any step resolves: a caller then sees it
            self._model_end = max(self._model_end, hold.ends_at)
            for (s, n), c in zip(batch, chunks):
                s.ready_at = hold.ends_at
                if s.seq >= 0 and c.tokens:
                    s.rows.append(next(rows))
                s.done += n
                if s.done < len(s.tokens):
                    continue                        # a prompt with chunks still to go
                if s.future.cancelled():
                    continue                        # its session is gone
                if s.chore is not None:
                    _run_chore(s)
                else:
                    _resolve(s.future, _joined(s.rows), ok=True)
        if n_tokens:
            hits, misses = self.target.cache_counts()
            stats = PassStats(n_tokens, len(batch), time.monotonic() - began, real_s, hold.modelled_s,
                              hits - hits0, misses - misses0)
            self.real_s += stats.real_s
            self.modelled_s += stats.modelled_s
            self.over_model += stats.over_model
            self.on_pass(stats)
        self._expect = {s.seq for s, _ in batch
                        if s.done >= len(s.tokens) and not s.future.cancelled() and _follows(s)}
        # their sessions answer at the modelled pass end, then queue ~0.5 ms apart
        self._expect_until = max(hold.ends_at, time.monotonic()) + min(self.follow_max_s,
                                                                     self.follow_s + 0.0005 * len(self._expect))


def _follows(s: Step) -> bool:
    try:
        return bool(s.follows()) if callable(s.follows) else s.follows
    except Exception:  # noqa: BLE001 - a session's answer only tunes a wait of a few ms
        return False


def _joined(rows: list[np.ndarray]) -> np.ndarray:
    """A step's rows from all its passes (a chunked prompt has several)."""
    if len(rows) == 1:
        return rows[0]
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def _run_chore(s: Step) -> None:
    try:
        result = s.chore()
    except Exception as e:  # noqa: BLE001 - a failed chore fails its own caller, not the loop
        _resolve(s.future, e)
    else:
        _resolve(s.future, result, ok=True)


def _resolve(fut: Future, value, ok: bool = False) -> None:
    try:
        fut.set_result(value) if ok else fut.set_exception(value)
    except InvalidStateError:
        pass                                        # cancelled meanwhile: its session is gone
