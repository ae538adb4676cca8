"""The target model: llama.cpp contexts, one per session, over one mmapped file.

Flash attention is always on: on CPU it is the only llama.cpp setting measured
to give bit-identical logits whether a token is evaluated alone or inside a
block, which is what makes block verification exactly equal to the target's
own one-token-at-a-time decoding. That holds for passes of up to 48 tokens
(measured; a 64-token pass differs by up to 0.9 in a logit, and so does every
later token's), so every pass is split into batches of INVARIANT_BATCH: a
re-prefill of prompt + output after a fallback or a reconnect then gives the
same tokens as decoding them one at a time.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from proto.fingerprint import fingerprint_llama

INVARIANT_BATCH = 32


def _llama(path: Path, n_ctx: int, n_threads: int, logits_all: bool, vocab_only: bool = False):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see edge/llama_model.py: idle spinning starves peers
    import llama_cpp  # imported late: loading the shared library costs ~0.2 s
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(INVARIANT_BATCH, n_ctx),
                               n_threads=n_threads, n_threads_batch=n_threads,
                               logits_all=logits_all, flash_attn=True, vocab_only=vocab_only,
                               verbose=False)


class TargetContext:
    """One sequence's KV cache. Not thread-safe: one session uses it at a time."""

    def __init__(self, llm, compute_lock: threading.Lock):
        self.llm, self.compute_lock = llm, compute_lock

    @property
    def n_past(self) -> int:
        return self.llm.n_tokens

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens; return their logits, row i predicting position n_past_before + i + 1."""
        n0 = self.llm.n_tokens
        with self.compute_lock:  # two llama.cpp passes at once would only thrash the cores
            self.llm.eval(list(tokens))
        return np.array(self.llm.scores[n0:n0 + len(tokens)], dtype=np.float32)  # (k, V)

    def truncate(self, n_past: int) -> None:
        # llama-cpp-python removes KV entries past n_tokens on the next eval.
        self.llm.n_tokens = min(self.llm.n_tokens, n_past)


class TargetModel:
    """Loads the GGUF once for metadata; hands out pooled per-session contexts."""

    def __init__(self, path: Path, n_ctx: int = 2048, n_threads: int = 2):
        self.path, self.n_ctx, self.n_threads = Path(path), n_ctx, n_threads
        if not self.path.exists():
            raise FileNotFoundError(f"target model not found: {self.path}")
        vocab = _llama(self.path, 64, 1, logits_all=False, vocab_only=True)
        self.n_vocab = vocab.n_vocab()
        self.eos = vocab.token_eos()
        self.fingerprint = fingerprint_llama(vocab)
        self.name = self.path.stem
        self._free: list[TargetContext] = []
        self._lock = threading.Lock()
        self.compute_lock = threading.Lock()

    def acquire(self) -> TargetContext:
        with self._lock:
            if self._free:
                ctx = self._free.pop()
                ctx.truncate(0)
                return ctx
        return TargetContext(_llama(self.path, self.n_ctx, self.n_threads, logits_all=True),
                             self.compute_lock)

    def release(self, ctx: TargetContext, keep: int = 4) -> None:
        with self._lock:
            if len(self._free) < keep:
                ctx.truncate(0)
                self._free.append(ctx)
