"""One Speculate stream as the verifier reads it: what to do next.

A task moves the edge's requests into a bounded buffer, stamped with their
arrival time, so the verifier can tell "nothing queued right now" (lead, or
wait a moment for a block that is due) from "the edge is done", and can take
every block already queued into one verify pass. When the buffer is full the
task stops reading and HTTP/2 flow control holds the edge back.
"""
from __future__ import annotations

import asyncio
import collections
import time

from kernels.tree import main_length, unpack_parents

END = object()     # the edge closed its side
CLOSED = object()  # the session was closed under the stream (cloud/sessions.py)
LEAD = object()    # decode on alone: nothing worth waiting for is queued

# A live branch that sends nothing for this long is treated as broken, so the
# verifier leads instead of idling (e.g. an edge whose window is full on a long link).
LEAD_AFTER_IDLE_S = 0.2


class StreamError(Exception):
    """Reading the edge's stream failed (it went away, or sent garbage)."""


def _ends(item) -> bool:
    """An inbox item that ends the stream rather than asking for work."""
    return item is END or item is CLOSED or isinstance(item, StreamError)


class Inbox:
    def __init__(self, requests, width: int, max_draft: int, capacity: int = 64):
        self.width, self.max_draft, self.capacity = width, max_draft, capacity
        self._items: collections.deque = collections.deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._held: list = []          # taken but not mergeable with the last group
        self._watchers: list[asyncio.Future] = []   # block_due() calls waiting for the next arrival
        self._task = asyncio.ensure_future(self._pump(requests))

    async def _pump(self, requests) -> None:
        try:
            async for r in requests:
                while len(self._items) >= self.capacity:
                    self._room.clear()
                    await self._room.wait()
                self._put(r)
        except Exception as e:  # noqa: BLE001 - a broken stream ends only its own RPC
            self._put(StreamError(str(e) or type(e).__name__))
        self._put(END)

    def _put(self, item) -> None:
        self._items.append((time.monotonic(), item))
        self._arrived.set()
        for w in self._watchers:
            if not w.done():
                w.set_result(None)
        self._watchers.clear()

    def _pop(self):
        got = self._items.popleft()
        self._room.set()
        return got

    async def _take(self, timeout: float | None):
        """The next (arrival, item), or None when nothing came within `timeout`."""
        if not self._items and timeout != 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self._pop() if self._items else None

    def close(self) -> None:
        self._task.cancel()

    def interrupt(self) -> None:
        """The session was closed: the stream's next read, or the one waiting now,
        returns CLOSED before anything queued."""
        self._items.appendleft((time.monotonic(), CLOSED))
        self._arrived.set()

    def _next_for(self, sess):
        """The first queued item the session will act on (stale blocks are dropped unread):
        a block of its epoch, a hand-over, something that ends the stream, or None. Reads
        only: a snapshot of the queue (list() of a deque holds the interpreter lock), so the
        scheduler's thread may ask too."""
        for _, item in list(self._held) + list(self._items):
            if _ends(item) or item.handover or item.epoch >= sess.epoch:
                return item
        return None

    def due(self, sess) -> bool:
        """Whether the session's next step is due as soon as its current pass ends: a block of
        its epoch is already queued, or it will lead at once. Asked by the scheduler's thread at
        the pass end (`Step.follows`), so that the next pass waits the few ms the session takes
        to queue that step instead of leaving it to the pass after."""
        item = self._next_for(sess)
        if item is not None:
            return not (_ends(item) or item.handover)
        return sess.can_lead() and sess.lead_wait(time.monotonic()) <= 0

    async def block_due(self, sess) -> None:
        """Return once the edge's next block (or its hand-over) is queued: a lead waiting for
        its pass then gives way to it (`VerifierService._lead_rows`)."""
        while (item := self._next_for(sess)) is None or _ends(item):
            w = asyncio.get_running_loop().create_future()
            self._watchers.append(w)
            await w

    async def next(self, sess) -> tuple[float, object]:
        """(arrival time, item): END, CLOSED, a StreamError, LEAD, or a list of drafts
        to verify together (a `more_tail` request always comes alone)."""
        if sess.must_lead():
            return time.monotonic(), LEAD
        if self._held:
            t, first = self._held.pop(0)
        else:
            got = await self._wait(sess)
            if got is None:
                return time.monotonic(), LEAD
            t, first = got
        return t, self._group(first)

    def ready(self, sess) -> tuple[float, object] | None:
        """What `next` would return at once, without waiting: a lead the session takes now,
        or blocks already queued; None when `next` would wait, or when what is queued ends
        the stream (the loop meets that through `next`)."""
        now = time.monotonic()
        if sess.must_lead():
            return now, LEAD
        if self._held or self._items:
            t, first = self._held[0] if self._held else self._items[0]
            if _ends(first) or first.handover:
                return None
            if self._held:
                self._held.pop(0)
            else:
                self._pop()
            return t, self._group(first)
        if sess.can_lead() and sess.lead_wait(now) <= 0:
            return now, LEAD
        return None

    def _group(self, first):
        """`first` and the queued blocks that may join it in one pass."""
        if _ends(first):
            return first
        group = [first]
        while not self._held and not first.more_tail and not first.handover and self._items:
            item = self._pop()
            if continues(group, item[1], self.width, self.max_draft):
                group.append(item[1])
            else:
                self._held.append(item)
        return group

    async def _wait(self, sess):
        while True:
            if not sess.can_lead():
                idle = LEAD_AFTER_IDLE_S if sess.lead.on and not sess.lead.first else None
                got = await self._take(idle)
                if got is None:
                    sess.branch_went_quiet()
                    continue
                return got
            wait = sess.lead_wait(time.monotonic())
            return await self._take(wait if wait > 0 else 0)


def levels(d, width: int) -> int:
    """Positions a block drafts: its tokens, or a tree's main chain (the next block
    continues below the main chain's leaf). A malformed tree counts as its tokens: the
    verifier refuses it when it gets there."""
    n = len(d.tokens) // width - d.fixed
    if not d.parents:
        return n
    try:
        return main_length(unpack_parents(d.parents, n))
    except ValueError:
        return n


def continues(group: list, d, width: int, max_draft: int) -> bool:
    """May block `d` join `group` in one verify pass? Only a plain block that
    starts where the group ends, of the same epoch, within the draft limit."""
    if _ends(d) or d.more_tail or d.fixed or d.handover:
        return False
    last = group[-1]
    if last.more_tail or last.want_bonus or d.epoch != last.epoch:
        return False
    if d.start != last.start + last.fixed + levels(last, width):
        return False
    drafted = sum(len(g.tokens) // width - g.fixed for g in group) + len(d.tokens) // width
    return drafted <= max_draft
