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

from pathlib import Path
from typing import Sequence

import numpy as np

from common.rowstore import PrefixKeys, RowStore, model_identity
from edge.drafter import Drafter

INVARIANT_BATCH = 32      # as cloud/target.py: rows are batch-invariant up to this many tokens per call


class CachedDrafter(Drafter):
    def __init__(self, inner: Drafter, store: RowStore):
        if store.n_vocab != inner.n_vocab:
            raise ValueError(f"row store holds rows of {store.n_vocab} tokens, the drafter has {inner.n_vocab}")
        self.inner, self.store = inner, store
        self.name = inner.name
        self._tokens: list[int] = []
        self._call: list[int] = []                 # per position: the eval call that evaluated it
        self._calls: dict[int, tuple[int, tuple[int, ...]]] = {}   # call -> (start, its tokens)
        self._keys = PrefixKeys(store.root)
        self._real: list[int] = []                 # per position the model holds: the call it came from
        self._next = 0
        self.hits = 0
        self.misses = 0

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
        call, self._next = self._next, self._next + 1
        self._calls[call] = (len(self._tokens), tokens)
        self._tokens.extend(tokens)
        self._call.extend([call] * len(tokens))
        self._keys.extend(tokens)
        key = self._keys.key(len(self._tokens) - 1)
        row = self.store.get(key)
        if row is not None:
            self.hits += 1
            return row
        self.misses += 1
        row = self._catch_up()
        self.store.put(key, row)
        return row

    def truncate(self, n_past: int) -> None:
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

    def _catch_up(self) -> np.ndarray:
        """Bring the model to the logical sequence by replaying its calls; the last one's row."""
        real, logical = self._real, self._call
        c = 0
        while c < min(len(real), len(logical)) and real[c] == logical[c]:
            c += 1
        # resuming inside a long call would evaluate its rest as a call of its own: replay it whole
        if c < len(logical) and self._long(logical[c]):
            c = min(c, self._calls[logical[c]][0])
        self.inner.truncate(c)
        del real[c:]
        row = None
        while c < len(logical):
            call = logical[c]
            start, tokens = self._calls[call]
            if self._long(call):
                end = c
                while end < len(logical) and logical[end] == call:
                    end += 1
                row = self.inner.eval(list(tokens))        # the call as it was, even a tail cut since
                real.extend([call] * len(tokens))
                if end < start + len(tokens):
                    self.inner.truncate(end)
                    del real[end:]
                    row = None
            else:
                # short calls, merged up to one invariant batch (they give the same rows as when
                # made one by one: see the module docstring)
                end = c
                while end < len(logical) and end - c < INVARIANT_BATCH and not self._long(logical[end]):
                    end += 1
                row = self.inner.eval(self._tokens[c:end])
                real.extend(logical[c:end])
            c = end
        assert row is not None, "the last call is whole, so its row was computed"
        return row

    def _long(self, call: int) -> bool:
        return len(self._calls[call][1]) > INVARIANT_BATCH

    def stats(self) -> dict:
        s = dict(self.inner.stats())
        s.update(draft_cache_hits=self.hits, draft_cache_misses=self.misses)
        return s

    def close(self) -> None:
        self.store.close()
        self.inner.close()


def cached_drafter(inner: Drafter, path: Path, cache_dir: Path, **settings) -> CachedDrafter:
    """`inner` (a dense llama.cpp drafter loaded from `path`) behind the row store for that model
    in `cache_dir`; `settings` name whatever else decides its rows (see LlamaDrafter)."""
    store = RowStore(cache_dir, model_identity(path, "drafter", **settings), inner.n_vocab)
    return CachedDrafter(inner, store)
