"""The drafter behind a row cache: an emulated device's draft step without its CPU cost.

`--emulate-device` holds each draft step to a device's modelled time, but the
real draft model still runs on this CPU; under load a step took longer than the
modelled Jetson's 12.8 ms, so edge-side figures measured the machine.
`CachedDrafter` wraps a dense drafter and memoises the row each `eval` returns in
a `common.rowstore.RowStore`, keyed by the exact token prefix (the same store and
keys as the verifier's `--target-cache`). A step whose row is stored costs no
model call at all.

Lazy evaluation. The wrapper keeps the *logical* sequence (the tokens of every
`eval` since the last cut, each position tagged with the call that evaluated it);
the model itself only catches up when a row is missing, and then evaluates the
stretch its cache lacks. Its cells must hold bit for bit what they would hold had
every call reached the model, and llama.cpp's rows can differ in their last bits
with the number of tokens evaluated together. Up to INVARIANT_BATCH (32) tokens
they do not: with flash attention on, a token evaluated alone or inside a batch
of up to 32 gives the same row (the verifier measures this at start-up on every
build, docs/exactness.md; tests/test_target_cache.py checks the drafter's
catch-up against the model without a cache). So draft steps (a token or a few
each) are replayed merged, up to 32 tokens per call; a longer call (a prompt's
prefill) is replayed as it was, whole, with the tokens it had, and cut back where
the sequence was cut inside it.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from common.rowstore import PrefixKeys, RowStore, model_identity
from edge.drafter import Drafter

INVARIANT_BATCH = 32      # as cloud/target.py: rows are batch-invariant up to this many tokens per call


class CachedDrafter(Drafter):
    def __init__(self, inner: Drafter, store: RowStore, background: bool = True):
        if store.n_vocab != inner.n_vocab:
            raise ValueError(f"row store holds rows of {store.n_vocab} tokens, the drafter has {inner.n_vocab}")
        self.inner, self.store = inner, store
        self.name = inner.name
        self._tokens: list[int] = []
        self._call: list[int] = []                 # per position: the eval call that evaluated it
        self._calls: dict[int, tuple[int, tuple[int, ...]]] = {}   # call -> (start, its tokens)
        self._keys = PrefixKeys(store.root)
        self._next = 0
        self.hits = 0
        self.misses = 0
        # the model's side, only ever touched under _model: what it holds, per position the
        # call it came from, and the row its last eval returned (with the length it ended at)
        self._model = threading.Lock()
        self._real: list[int] = []
        self._last: tuple[int, np.ndarray] | None = None
        self.caught_up = [0, 0.0]                  # tokens the model evaluated, seconds: at misses
        self.background = [0, 0.0]                 # ... and behind hits, off the draft step's path
        # the logical side is changed by the caller's thread only; _state lets the
        # background thread copy it whole
        self._state = threading.Lock()
        self._wake = threading.Event() if background else None
        self._closing = False
        self._worker: threading.Thread | None = None

    @property
    def n_vocab(self) -> int:
        return self.inner.n_vocab

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        if not tokens:
            raise ValueError("eval needs at least one token")
        tokens = tuple(int(t) for t in tokens)
        with self._state:
            call, self._next = self._next, self._next + 1
            self._calls[call] = (len(self._tokens), tokens)
            self._tokens.extend(tokens)
            self._call.extend([call] * len(tokens))
        self._keys.extend(tokens)
        key = self._keys.key(len(self._tokens) - 1)
        row = self.store.get(key)
        if row is not None:
            self.hits += 1
            self._behind()
            return row
        self.misses += 1
        row = self._catch_up()
        self.store.put(key, row)
        return row

    def truncate(self, n_past: int) -> None:
        with self._state:
            for call in set(self._call[n_past:]) - set(self._call[max(0, n_past - 1):n_past]):
                self._calls.pop(call, None)
            del self._tokens[n_past:], self._call[n_past:]
        self._keys.truncate(n_past)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        # as LlamaDrafter.prefill: keep the shared prefix, evaluate the rest in one call
        n, same = len(tokens), 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            same += 1
        self.truncate(min(same, n - 1))
        return self.eval(list(tokens[self.n_past:]))

    # -- bringing the model to the logical sequence ---------------------------------------
    def _catch_up(self) -> np.ndarray:
        """Bring the model to the logical sequence by replaying its calls; the last one's row."""
        t0 = time.monotonic()
        with self._model:
            n0 = len(self._real)
            c = self._departs(self._call, self._calls)
            row = None
            while c < len(self._call):
                c, row = self._advance(self._tokens, self._call, self._calls, c)
            if row is None:      # the background thread got here first: the row its last eval returned
                assert self._last is not None and self._last[0] == len(self._call), "the last call's row was kept"
                row = self._last[1]
            self.caught_up[0] += max(0, len(self._real) - n0)
        self.caught_up[1] += time.monotonic() - t0
        return row

    def _departs(self, logical: list[int], calls: dict) -> int:
        """The first position where the model departs from `logical` (under _model): where
        replaying starts. Resuming inside a long call would evaluate its rest as a call of its
        own, so that one is replayed whole."""
        real, c = self._real, 0
        while c < min(len(real), len(logical)) and real[c] == logical[c]:
            c += 1
        if c < len(logical) and self._long(calls, logical[c]):
            c = min(c, calls[logical[c]][0])
        return c

    def _advance(self, tokens: list[int], logical: list[int], calls: dict, c: int) -> tuple[int, np.ndarray | None]:
        """One model call (under _model) bringing the model from position c toward `logical`:
        the position it reached and the row there (None where a long call was cut back)."""
        real = self._real
        if len(real) > c or self.inner.n_past > c:
            self.inner.truncate(c)
            del real[c:]
            self._last = None
        call = logical[c]
        start, call_tokens = calls[call]
        if self._long(calls, call):
            end = c
            while end < len(logical) and logical[end] == call:
                end += 1
            row = self.inner.eval(list(call_tokens))        # the call as it was, even a tail cut since
            real.extend([call] * len(call_tokens))
            if end < start + len(call_tokens):
                self.inner.truncate(end)
                del real[end:]
                self._last = None
                return end, None
        else:
            # short calls, merged up to one invariant batch (they give the same rows as when
            # made one by one: see the module docstring)
            end = c
            while end < len(logical) and end - c < INVARIANT_BATCH and not self._long(calls, logical[end]):
                end += 1
            row = self.inner.eval(tokens[c:end])
            real.extend(logical[c:end])
        self._last = (end, row)
        return end, row

    def _behind(self) -> None:
        """A hit left the model behind the logical sequence: let the background thread bring
        it up while the step's modelled time runs, so a later miss finds it there."""
        if self._wake is None:
            return
        if self._worker is None:
            self._worker = threading.Thread(target=self._follow, name="draft-cache-catch-up", daemon=True)
            self._worker.start()
        self._wake.set()

    def _follow(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while not self._closing:
                with self._state:
                    tokens, logical, calls = list(self._tokens), list(self._call), dict(self._calls)
                t0 = time.monotonic()
                with self._model:
                    # one model call at a time: a miss waits for at most one
                    c = self._departs(logical, calls)
                    if c >= len(logical) or self._closing:
                        break
                    n0 = min(c, len(self._real))
                    self._advance(tokens, logical, calls, c)
                    self.background[0] += max(0, len(self._real) - n0)
                self.background[1] += time.monotonic() - t0
            if self._closing:
                return

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Until the background thread has brought the model to the logical sequence (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._state, self._model:
                if self._departs(self._call, self._calls) >= len(self._call):
                    return True
            time.sleep(0.01)
        return False

    @staticmethod
    def _long(calls: dict, call: int) -> bool:
        return len(calls[call][1]) > INVARIANT_BATCH

    def stats(self) -> dict:
        s = dict(self.inner.stats())
        s.update(draft_cache_hits=self.hits, draft_cache_misses=self.misses,
                 draft_cache_caught_up_tokens=self.caught_up[0], draft_cache_caught_up_s=round(self.caught_up[1], 4),
                 draft_cache_background_tokens=self.background[0],
                 draft_cache_background_s=round(self.background[1], 4))
        return s

    def stop(self) -> None:
        """End the background thread (after the model call it is in), leaving the model open."""
        self._closing = True
        if self._worker is not None:
            self._wake.set()
            self._worker.join()

    def close(self) -> None:
        self.stop()
        self.store.close()
        self.inner.close()


def cached_drafter(inner: Drafter, path: Path, cache_dir: Path, **settings) -> CachedDrafter:
    """`inner` (a dense llama.cpp drafter loaded from `path`) behind the row store for that model
    in `cache_dir`; `settings` name whatever else decides its rows (see LlamaDrafter)."""
    store = RowStore(cache_dir, model_identity(path, "drafter", **settings), inner.n_vocab)
    return CachedDrafter(inner, store)
