"""The verifier's passes are exact: a position's logits are bit-identical whether
it is evaluated alone, one token at a time, or inside a long pass, a block, or
a pass batched with other sessions' prompts and blocks, rollbacks included.
Reference: the target decoding one sequence one token at a time (flash attention on)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from cloud.scheduler import Scheduler, Step
from cloud.target import Chunk, Target
from edge.model_files import shipped_gguf


@pytest.fixture(scope="module")
def reference():
    ref = Target(shipped_gguf(), n_ctx=512, n_seqs=1, n_threads=1)
    cache = {}

    def rows(seq: list[int]) -> np.ndarray:
        key = tuple(seq)
        if key not in cache:
            ref.clear(0)
            cache[key] = np.concatenate([ref.decode([Chunk(0, i, [t], 1)])[0] for i, t in enumerate(seq)])
        return cache[key]
    yield rows
    ref.close()


def test_long_reprefill_continues_like_token_by_token_decoding(reference):
    """A 90-token pass (llama.cpp splits it into 32-token ubatches) equals one-by-one decoding."""
    target = Target(shipped_gguf(), n_ctx=512, n_seqs=1, n_threads=1)
    seq = [int(x) for x in np.random.default_rng(0).integers(100, 40000, size=90)]
    at_once = target.decode([Chunk(0, 0, seq, len(seq))])[0]
    assert np.array_equal(at_once, reference(seq))
    target.close()


def test_sessions_batched_together_get_the_logits_they_get_alone(reference):
    """6 sessions with prompts of 5..70 tokens (chunked), then rounds of blocks of 1..9
    tokens, some starting before the session's cache end (a rollback after a rejection),
    every round submitted at once so the scheduler batches it into one pass."""
    rng = np.random.default_rng(7)
    n = 6
    target = Target(shipped_gguf(), n_ctx=512, n_seqs=n, n_threads=1, max_batch_tokens=256)
    passes = []
    sched = Scheduler(target, on_pass=passes.append, prefill_chunk=32)
    history = [[int(x) for x in rng.integers(100, 40000, size=int(rng.integers(5, 70)))] for _ in range(n)]
    got = [dict() for _ in range(n)]                 # position -> logits row predicting the next one
    lock = threading.Lock()

    def step(s: int, start: int, tokens: list[int]) -> Step:
        def finish(rows):
            with lock:
                for p in [p for p in got[s] if p >= start]:
                    del got[s][p]                    # a rollback replaces what followed
                for k, row in enumerate(rows):
                    got[s][start + k] = row
        st = Step(s, start, tokens, len(tokens), prefill=start == 0)
        st.future.add_done_callback(lambda f: finish(f.result()))   # read after sched.stop()
        return st

    first = [step(s, 0, history[s]) for s in range(n)]
    sched.submit_many(first)
    sched.start()
    for f in first:
        f.future.result(timeout=120)
    for _ in range(6):
        steps = []
        for s in range(n):
            end = len(history[s])
            start = end - int(rng.integers(0, 3))    # 0: continue; 1-2: roll back first
            tokens = [int(x) for x in rng.integers(100, 40000, size=int(rng.integers(1, 10)))]
            history[s] = history[s][:start] + tokens
            steps.append(step(s, start, tokens))
        before = len(passes)
        sched.submit_many(steps)
        for st in steps:
            st.future.result(timeout=120)
        assert len(passes) == before + 1 and passes[-1].steps == n, "the round ran as one batched pass"
    sched.stop()
    checked = 0
    for s in range(n):
        ref = reference(history[s])
        for p, row in got[s].items():
            assert np.array_equal(row, ref[p]), f"session {s}, position {p}: batched logits differ from alone"
            checked += 1
    print(f"{checked} positions of {n} sessions bit-identical to one-sequence decoding")
    assert checked >= sum(len(h) for h in history) - n
    target.close()
