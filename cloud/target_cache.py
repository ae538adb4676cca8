"""The target behind a row cache: an emulated target's pass without its CPU cost.

An emulated target (sim/latency.py) holds every pass to the modelled GPU time,
but the real model still computes every row on this CPU: ~7 ms of real compute
per verified token under load against ~1.9 ms modelled, so a capacity
measurement measured the CPU. `CachedTarget` has `Target`'s interface
(`decode(chunks) -> rows`, `clear`, `copy`, `seq_len`) and memoises every row it
computes in a `common.rowstore.RowStore`, keyed by the sequence's exact token
prefix (a running hash chain per sequence, one hash per token).

Lazy evaluation. Each sequence has a *logical* state (the tokens the scheduler
has put in it, with their keys) and a *real* one (the prefix of them that the
llama.cpp sequence has actually evaluated). A chunk only appends to the logical
tokens; where every row a pass asks for is in the store, the pass costs no
llama_decode at all, only the modelled time the scheduler holds it to. Where a
row is missing, the real sequence catches up: it decodes the stretch from its
real length to the last missing row (taking a copy of another sequence that
already holds a longer stretch of the same prefix, as a tree branch's scratch
sequence does of its session's), in passes of at most the batch, and every row
it computes goes into the store.

A verdict reads rows only up to its first rejection. A chunk may carry a judge
(`Chunk.judge`, set by a greedy chain's verify step): the rows are read in order,
and once a stored row rejects its drafted token the rows after it are neither
fetched nor computed (NaN; `skipped` counts them). Without this, a row after a
rejected draft, keyed by a prefix no earlier run took, was a miss that made the
sequence's real cells catch up on its whole prefix: measured at up to 1.5 s of
CPU for one pass at 8 sessions. Past a missing row every later row counts, as
the judge cannot see beyond it.

Rollbacks (a chunk starting earlier) cut the logical tokens and, where the real
sequence holds more, only the real length; the cells go at its next catch-up,
which starts there. `copy` (tree branches) copies the logical state; the real
one follows when the branch misses. `clear` clears both.

Exactness. A stored row is reused in passes of any make-up, so the cache relies
on the same property batching does (docs/exactness.md): a row is the same
whichever pass computed it. The verifier only accepts a cache where its start-up
check found batched passes bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cloud.target import Chunk, Target, begin_pass
from common.rowstore import PrefixKeys, RowStore

# A catch-up starts from a copy of another sequence's cells only where that saves at least
# this many tokens of decoding: a copy moves the whole KV stream (~47 MB for SmolLM2-135M).
MIN_COPY_GAIN = 16


@dataclass
class _Seq:
    tokens: list[int]
    keys: PrefixKeys
    real: int = 0            # logical tokens[:real] are what the llama.cpp sequence holds, evaluated


class CachedTarget:
    """`Target` with its rows memoised by prefix (see the module docstring). Same caller
    contract: the scheduler's thread only."""

    def __init__(self, target: Target, store: RowStore):
        if store.n_vocab != target.n_vocab:
            raise ValueError(f"row store holds rows of {store.n_vocab} tokens, the target has {target.n_vocab}")
        self.target, self.store = target, store
        self._seqs = [_Seq([], PrefixKeys(store.root)) for _ in range(target.n_seqs)]
        self.hits = 0            # rows served from the store
        self.misses = 0          # rows the model computed for a pass
        self.skipped = 0         # rows a pass's judge said its verdict does not read (Chunk.judge)
        self.real_passes = 0     # llama_decode calls (catch-ups)

    # -- Target's read-only surface ------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.target.n_vocab

    @property
    def n_seqs(self) -> int:
        return self.target.n_seqs

    @property
    def n_ctx(self) -> int:
        return self.target.n_ctx

    @property
    def max_batch_tokens(self) -> int:
        return self.target.max_batch_tokens

    @property
    def fingerprint(self) -> str:
        return self.target.fingerprint

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def eos(self) -> int:
        return self.target.eos

    @property
    def n_threads(self) -> int:
        return self.target.n_threads

    @property
    def n_threads_single(self) -> int:
        return self.target.n_threads_single

    def cache_counts(self) -> tuple[int, int]:
        """(rows served from the store, rows computed) so far."""
        return self.hits, self.misses

    def seq_len(self, seq: int) -> int:
        return len(self._seqs[seq].tokens)

    def close(self) -> None:
        self.store.close()
        self.target.close()

    # -- state -----------------------------------------------------------------------
    def clear(self, seq: int) -> None:
        self.target.clear(seq)
        s = self._seqs[seq]
        s.tokens.clear()
        s.keys.truncate(0)
        s.real = 0

    def copy(self, src: int, dst: int) -> None:
        """Make `dst` hold what `src` holds, logically; its real cells follow on a miss."""
        if src == dst:
            return
        a, b = self._seqs[src], self._seqs[dst]
        keys = a.keys.copy()
        # what dst's cells already hold of src's prefix stays usable
        b.real = keys.common(b.keys, b.real)
        b.tokens, b.keys = list(a.tokens), keys

    def _cut(self, s: _Seq, n: int) -> None:
        del s.tokens[n:]
        s.keys.truncate(n)
        s.real = min(s.real, n)

    # -- the pass ----------------------------------------------------------------------
    def decode(self, chunks: Sequence[Chunk]) -> list[np.ndarray]:
        """Every chunk's (n_logits, V) rows, as `Target.decode` gives them: from the store
        where it has them, else from a catch-up of the sequences that need them."""
        begin_pass(self, chunks, lambda seq: len(self._seqs[seq].tokens))
        out, missing = [], {}
        for c in chunks:
            s = self._seqs[c.seq]
            self._cut(s, c.start)
            s.tokens.extend(int(t) for t in c.tokens)
            s.keys.extend(c.tokens)
            rows = np.empty((c.n_logits, self.n_vocab), np.float32)       # (n_logits, V)
            first = c.start + len(c.tokens) - c.n_logits                   # row k predicts after token first+k
            judge = c.judge
            for k in range(c.n_logits):
                row = self.store.get(s.keys.key(first + k))
                if row is None and judge is not None:
                    if not _reads(judge, rows, k):
                        # lazy: the verdict stops at an earlier row; NaN marks what nobody computed
                        rows[k:] = np.nan
                        self.skipped += c.n_logits - k
                        break
                    judge = None                   # the verdict reads this row: every later one counts
                if row is None:
                    missing.setdefault(c.seq, {})[first + k] = (rows, k)
                else:
                    rows[k] = row
                    self.hits += 1
            out.append(rows)
        n_missing = sum(len(m) for m in missing.values())
        self.misses += n_missing
        if missing:
            try:
                self._catch_up(missing)
            except Exception:
                for c in chunks:                   # as Target: a failed pass leaves nothing of itself
                    self._cut(self._seqs[c.seq], c.start)
                for seq in missing:                # and what the catch-up's cells hold is unknown
                    self.target.clear(seq)
                    self._seqs[seq].real = 0
                raise
        return out

    def _catch_up(self, missing: dict[int, dict[int, tuple]]) -> None:
        """Decode each sequence's stretch from its real length to its last missing row, in passes
        of at most the batch; fill the rows the pass asked for and store every row computed."""
        t = self.target
        for seq, m in missing.items():           # a row is computed by the pass that evaluates its token
            s = self._seqs[seq]
            s.real = min(s.real, min(m))
        # Where another sequence's cells hold more of this prefix (a tree branch's session), start
        # from a copy of them: one buffer copy instead of decoding the stretch. A source is never
        # a destination, so every copy reads cells that this catch-up does not touch below `real`.
        sources: set[int] = set()
        dests: set[int] = set()
        for seq, m in missing.items():
            if seq in sources:
                continue
            s = self._seqs[seq]
            best, src = s.real + MIN_COPY_GAIN, None
            for other, o in enumerate(self._seqs):
                if other == seq or other in dests:
                    continue
                n = o.keys.common(s.keys, min(o.real, min(m)))
                if n > best:
                    best, src = n, other
            if src is not None:
                t.copy(src, seq)
                s.real = best
                sources.add(src)
                dests.add(seq)
        todo = {seq: max(m) + 1 for seq, m in missing.items()}       # evaluate tokens[real:upto]
        while any(self._seqs[q].real < upto for q, upto in todo.items()):
            room, part = t.max_batch_tokens, []
            for seq, upto in todo.items():
                s = self._seqs[seq]
                n = min(upto - s.real, room)
                if n <= 0:
                    continue
                want = [p for p in missing[seq] if s.real <= p < s.real + n]
                part.append(Chunk(seq, s.real, s.tokens[s.real:s.real + n], s.real + n - min(want) if want else 0))
                room -= n
            rows = t.decode(part)
            self.real_passes += 1
            for c, r in zip(part, rows):
                s = self._seqs[c.seq]
                first = c.start + len(c.tokens) - c.n_logits
                for k in range(c.n_logits):
                    self.store.put(s.keys.key(first + k), r[k])
                    slot = missing[c.seq].get(first + k)
                    if slot is not None:
                        slot[0][slot[1]] = r[k]
                s.real = c.start + len(c.tokens)


def _reads(judge, rows: np.ndarray, k: int) -> bool:
    """Whether a verdict reads row k, given the rows before it: asked only at a miss, so a
    pass whose rows are all stored never runs the judge (a sampled one costs ~1 ms a row)."""
    return judge(-1, None) and all(judge(j, rows[j]) for j in range(k))
