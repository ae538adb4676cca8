"""The verifier's passes are batch-invariant at any length: a re-prefill of
prompt + output (after a fallback or a reconnect) continues exactly as
one-token-at-a-time decoding would. llama.cpp on CPU stays bit-identical only
up to ~48 tokens per pass, so the target splits longer passes."""
from __future__ import annotations

import numpy as np

from cloud.target import TargetModel
from edge.model_files import shipped_gguf


def test_long_reprefill_continues_like_token_by_token_decoding():
    target = TargetModel(shipped_gguf(), n_threads=1)
    ctx = target.acquire()
    seq = [int(x) for x in np.random.default_rng(0).integers(100, 40000, size=90)]
    ctx.truncate(0)
    one_by_one = np.stack([ctx.eval([t])[-1] for t in seq])
    ctx.truncate(0)
    at_once = ctx.eval(seq)                      # a 90-token pass: would differ if not split
    assert np.array_equal(at_once, one_by_one)
    target.release(ctx)
