"""One Speculate stream as the verifier reads it: what to do next.

A thread moves the edge's requests into a queue, stamped with their arrival
time, so the verifier can tell "nothing queued right now" (lead, or wait a
moment for a block that is due) from "the edge is done", and can take every
block already queued into one verify pass.
"""
from __future__ import annotations

import queue
import threading
import time

import grpc

END = object()     # the edge closed its side
LEAD = object()    # decode on alone: nothing worth waiting for is queued

# A live branch that sends nothing for this long is treated as broken, so the
# verifier leads instead of idling (e.g. an edge whose window is full on a long link).
LEAD_AFTER_IDLE_S = 0.2


class Inbox:
    def __init__(self, requests, width: int):
        self.width = width
        self._q: queue.Queue = queue.Queue()
        self._held: list = []          # taken from the queue but not mergeable with the last group
        threading.Thread(target=self._pump, args=(requests,), daemon=True).start()

    def _pump(self, requests) -> None:
        try:
            for r in requests:
                self._q.put((time.monotonic(), r))
        except grpc.RpcError as e:
            self._q.put((time.monotonic(), e))
        except Exception as e:  # noqa: BLE001 - a broken stream ends only its own RPC
            self._q.put((time.monotonic(), grpc.RpcError(str(e))))
        self._q.put((time.monotonic(), END))

    def next(self, sess, active) -> tuple[float, object]:
        """(arrival time, item): END, an RpcError, LEAD, or a list of drafts to
        verify together (a `more_tail` request always comes alone)."""
        if self._held:
            t, first = self._held.pop(0)
        else:
            got = self._wait(sess, active)
            if got is None:
                return time.monotonic(), LEAD
            t, first = got
        if first is END or isinstance(first, grpc.RpcError):
            return t, first
        group = [first]
        while not self._held and not first.more_tail and not self._q.empty():
            item = self._q.get_nowait()
            if continues(group, item[1], self.width, sess.max_draft):
                group.append(item[1])
            else:
                self._held.append(item)
        return t, group

    def _wait(self, sess, active):
        while True:
            if not (sess.can_lead() and active()):
                try:
                    return self._q.get(timeout=LEAD_AFTER_IDLE_S if sess.lead else None)
                except queue.Empty:
                    sess.awaiting_branch = True   # the live branch went quiet
                    continue
            wait = sess.lead_wait(time.monotonic())
            try:
                return self._q.get(timeout=wait) if wait > 0 else self._q.get_nowait()
            except queue.Empty:
                return None


def continues(group: list, d, width: int, max_draft: int) -> bool:
    """May block `d` join `group` in one verify pass? Only a plain block that
    starts where the group ends, of the same epoch, within the draft limit."""
    if d is END or isinstance(d, grpc.RpcError) or d.more_tail or d.fixed:
        return False
    last = group[-1]
    if last.more_tail or last.want_bonus or d.epoch != last.epoch:
        return False
    if d.start != last.start + len(last.tokens) // width:
        return False
    drafted = sum(len(g.tokens) // width - g.fixed for g in group) + len(d.tokens) // width
    return drafted <= max_draft
