"""Is a batched pass bit-identical to one-token decoding on *this* build?

Batching is lossless only if a session's logits do not depend on what else
shares its pass. That is a property of the llama.cpp build, the CPU or GPU and
the context's settings, not of tandem's code: a CPU build holds it with flash
attention, ubatches of up to ~48 tokens and one KV stream per sequence; a
unified KV cache, a larger ubatch or a CUDA build (llama.cpp #4479) may not.
So the verifier measures it at start-up instead of trusting it.

The check replays what serving does to a cache: a few sequences prefilled
together, blocks of mixed lengths in one pass (more tokens than one ubatch),
then rounds in which some sequences roll back after a rejection while others
extend, so cells freed by one sequence may be refilled by another's next
tokens. Every row still valid at the end is compared with the same position
decoded alone, one token at a time, in a clean cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cloud.target import INVARIANT_BATCH, Chunk, Target

# One row per sequence: its prompt length, then per round (tokens cut from its end, new tokens).
# Round 1 is every sequence's first block (1..20 tokens, 38 in all: more than one ubatch);
# later rounds roll some sequences back, as a rejection does, beside others that extend.
_SCRIPT = (
    (19, (0, 1), (0, 3), (0, 2), (1, 2)),
    (11, (0, 5), (4, 2), (0, 1), (0, 3)),
    (27, (0, 12), (0, 7), (9, 1), (0, 4)),
    (7, (0, 20), (18, 1), (0, 3), (0, 1)),
)


@dataclass(frozen=True)
class Exactness:
    max_abs_diff: float        # largest |logit| difference over every compared row
    rows: int                  # rows compared
    seqs: int                  # sequences in the batched passes

    @property
    def bitwise(self) -> bool:
        return self.max_abs_diff == 0.0

    def label(self) -> str:
        """What the ready line, /metrics and the status topic say."""
        return "bitwise" if self.bitwise else f"max logit diff {self.max_abs_diff:.3g}"


def check(target: Target, together: bool = True) -> Exactness:
    """Run the check on the target's first sequences (all of them cleared afterwards).
    A few batched passes and one single-token decode per compared row. `together`
    False: each sequence's chunk in a pass of its own, as the verifier runs with
    batching off (the same cache traffic, no shared passes)."""
    n = min(len(_SCRIPT), target.n_seqs)
    script = _SCRIPT[:n]
    rng = np.random.default_rng(1234)
    hi = min(target.n_vocab, 40000)
    draw = lambda k: [int(t) for t in rng.integers(100, hi, size=k)]   # noqa: E731
    tokens = [draw(row[0]) for row in script]
    got: dict[tuple[int, int], np.ndarray] = {}     # (seq, position) -> row predicting the next one
    for s in range(n):
        target.clear(s)

    def run(chunks: list[Chunk]) -> None:
        for c in chunks:                              # what a rollback replaces is no longer compared
            for key in [k for k in got if k[0] == c.seq and k[1] >= c.start]:
                del got[key]
        for part in _fit(chunks, target.max_batch_tokens, together):
            for c, rows in zip(part, target.decode(part)):
                first = c.start + len(c.tokens) - c.n_logits
                for k, row in enumerate(rows):
                    got[(c.seq, first + k)] = row

    longest = max(row[0] for row in script)
    for off in range(0, longest, INVARIANT_BATCH):    # prompts together, in ubatch-sized pieces
        run([Chunk(s, off, tokens[s][off:min(row[0], off + INVARIANT_BATCH)], 0)
             for s, row in enumerate(script) if off < row[0]])
    for r in range(1, len(script[0])):
        chunks = []
        for s, row in enumerate(script):
            cut, k = row[r]
            start = len(tokens[s]) - cut
            new = draw(k)
            tokens[s] = tokens[s][:start] + new
            chunks.append(Chunk(s, start, new, k))
        run(chunks)

    worst, compared = 0.0, 0
    for s in range(n):
        target.clear(s)
    for s, row in enumerate(script):
        p, toks = row[0], tokens[s]
        for off in range(0, p, INVARIANT_BATCH):
            target.decode([Chunk(s, off, toks[off:min(p, off + INVARIANT_BATCH)], 0)])
        for pos in range(p, len(toks)):
            alone = target.decode([Chunk(s, pos, [toks[pos]], 1)])[0][0]
            if (s, pos) in got:
                worst = max(worst, float(np.max(np.abs(alone - got[(s, pos)]))))
                compared += 1
        target.clear(s)
    return Exactness(worst, compared, n)


def _fit(chunks: list[Chunk], budget: int, together: bool) -> list[list[Chunk]]:
    """The chunks as passes: all in one where the batch allows (else filled in order), or
    one chunk a pass."""
    if not together:
        return [[c] for c in chunks]
    passes, cur, size = [], [], 0
    for c in chunks:
        if cur and size + len(c.tokens) > budget:
            passes.append(cur)
            cur, size = [], 0
        cur.append(c)
        size += len(c.tokens)
    return passes + [cur] if cur else passes
