"""Which sessions hold a sequence, and what each may do next: the session lifecycle.

    open ──> PREFILLING ──opened──> IDLE ──attach──> STREAMING ──detach──> CLOSED
                 │                   │ close, expire      │ close
                 │ close             v                    v
                 └───────────────> CLOSED     CLOSING ──detach──> CLOSED
                  (Open ends it)

A session is one edge's conversation with the verifier: Open prefills its
prompt, then one stream (Speculate, or Generate taking it over) drives it, and
the stream's end ends the session (an edge switching modes opens a new one).
`Close` or idle expiry end a session no stream uses at once. A `Close` during
a stream marks it CLOSING and tells the stream (the hook given at `attach`),
which ends with a clear status; the sequence is freed once the stream has
detached, so no step of a running stream ever meets a freed sequence.

A freed sequence is cleared on the scheduler's thread between passes and only
then offered to the next session (an Open that finds the verifier full waits a
moment for a sequence being freed). The names follow llama.cpp's slot states
(SLOT_STATE_IDLE, SLOT_STATE_PROCESSING_PROMPT, ...).
"""
from __future__ import annotations

import asyncio
import enum
import heapq
import time
from typing import Callable

from cloud.scheduler import Scheduler
from cloud.session import Session

RELEASE_WAIT_S = 5.0


class SessionState(enum.Enum):
    PREFILLING = "prefilling"    # Open is evaluating the prompt
    IDLE = "idle"                # opened, no stream yet: expires when left alone too long
    STREAMING = "streaming"      # a Speculate or Generate stream drives it
    CLOSING = "closing"          # closed during a stream: freed once the stream detaches
    CLOSED = "closed"            # its sequence is freed (or being cleared)


class Full(Exception):
    """Every sequence is taken, or (with a reason) admission refuses one more session."""


class Busy(Exception):
    """The session is not idle: a stream (or its Open) still drives it."""


class Registry:
    def __init__(self, n_seqs: int, scheduler: Scheduler, clear: Callable[[int], None],
                 on_count: Callable[[int], None] = lambda n: None):
        self._sched, self._clear, self._on_count = scheduler, clear, on_count
        self._sessions: dict[str, Session] = {}
        self._state: dict[str, SessionState] = {}
        self._idle_since: dict[str, float] = {}
        self._on_close: dict[str, Callable[[], None]] = {}
        # A heap: a new session takes the lowest free sequence. With one KV stream per sequence, a
        # pass's attention spans the streams from its lowest sequence to its highest, so live
        # sessions kept low keep that span to the sessions served.
        self._free = list(range(n_seqs))
        self._releasing = 0                       # sequences of ended sessions not yet cleared
        self._freed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._sessions)

    def held(self) -> list[Session]:
        """Every session holding a sequence, whatever its state."""
        return list(self._sessions.values())

    def get(self, sid: str) -> Session | None:
        return self._sessions.get(sid)

    def state(self, sess: Session) -> SessionState:
        if self._sessions.get(sess.sid) is not sess:
            return SessionState.CLOSED
        return self._state[sess.sid]

    def closing(self, sess: Session) -> bool:
        return self.state(sess) is SessionState.CLOSING

    # -- transitions -------------------------------------------------------
    async def open(self, make: Callable[[int], Session], streaming: bool = False,
                   admit: Callable[[], None] = lambda: None) -> Session:
        """A new session on a free sequence (`make(seq)` builds it): PREFILLING, or STREAMING
        for a stream that opens its own session. Raises Full when none is free, or when
        `admit()` (called just before the sequence is taken, so no other Open comes
        between its decision and the session it admits) raises it."""
        if not self._free and self._releasing:
            # a session just ended (an edge switching from speculation to streaming
            # re-opens at once): its sequence is free after the scheduler's next pass
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), RELEASE_WAIT_S)
            except asyncio.TimeoutError:
                pass
        if not self._free:
            raise Full()
        admit()
        sess = make(heapq.heappop(self._free))
        self._sessions[sess.sid] = sess
        self._state[sess.sid] = SessionState.STREAMING if streaming else SessionState.PREFILLING
        self._on_count(len(self._sessions))
        return sess

    def opened(self, sess: Session) -> bool:
        """PREFILLING -> IDLE once Open is done. False (and the session is freed) when it
        was closed meanwhile."""
        if self.state(sess) is not SessionState.PREFILLING:
            self._release(sess)
            return False
        self._state[sess.sid] = SessionState.IDLE
        self._idle_since[sess.sid] = time.monotonic()
        return True

    def attach(self, sess: Session, on_close: Callable[[], None] = lambda: None) -> None:
        """IDLE -> STREAMING; `on_close` tells the stream when a Close ends it."""
        if self.state(sess) is not SessionState.IDLE:
            raise Busy()
        self._state[sess.sid] = SessionState.STREAMING
        self._on_close[sess.sid] = on_close
        self._idle_since.pop(sess.sid, None)

    def hand_over(self, sess: Session) -> bool:
        """STREAMING -> IDLE: the stream is done, but its edge goes on with the session in
        another call (a cloud-only stream taking it over), so its sequence and cache stay.
        False (and the session ends) when it was closed meanwhile."""
        if self.state(sess) is not SessionState.STREAMING:
            self._release(sess)
            return False
        self._state[sess.sid] = SessionState.IDLE
        self._idle_since[sess.sid] = time.monotonic()
        self._on_close.pop(sess.sid, None)
        return True

    def detach(self, sess: Session) -> bool:
        """The stream (or a failed Open) is done with the session: it ends. False when
        it had already ended."""
        return self._release(sess)

    def close(self, sess: Session) -> bool:
        """End the session: at once when no stream drives it, else once its stream detaches
        (the stream is told). True when its sequence is freed now."""
        state = self.state(sess)
        if state is SessionState.IDLE:
            return self._release(sess)
        if state in (SessionState.STREAMING, SessionState.PREFILLING):
            self._state[sess.sid] = SessionState.CLOSING
            self._on_close.pop(sess.sid, lambda: None)()
        return False

    def expire(self, idle_s: float, now: float | None = None) -> list[Session]:
        """End every IDLE session left alone for more than `idle_s`; the ones ended."""
        now = time.monotonic() if now is None else now
        stale = [s for s in list(self._sessions.values())
                 if self._state[s.sid] is SessionState.IDLE and now - self._idle_since[s.sid] > idle_s]
        for s in stale:
            self._release(s)
        return stale

    # -- freeing a sequence ----------------------------------------------------
    def _release(self, sess: Session) -> bool:
        """Free the session's sequence once no step of it can still run."""
        if self._sessions.get(sess.sid) is not sess:
            return False
        del self._sessions[sess.sid]
        for table in (self._state, self._idle_since, self._on_close):
            table.pop(sess.sid, None)
        self._on_count(len(self._sessions))
        self._sched.drop(sess.seq)
        loop, seq = asyncio.get_running_loop(), sess.seq
        self._releasing += 1

        def freed() -> None:
            self._releasing -= 1
            heapq.heappush(self._free, seq)
            self._freed.set()
        self._sched.run_now(lambda: self._clear(seq)).add_done_callback(lambda _: loop.call_soon_threadsafe(freed))
        return True
