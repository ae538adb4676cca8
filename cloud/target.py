"""The target model: one llama.cpp context, many sequences, one batch per pass.

This is the only code that touches llama.cpp. Every session owns a sequence id
in one context (`n_seq_max` sequences); a pass evaluates chunks of several
sequences in one `llama_decode` and returns each chunk's logits rows.

Exactness. Flash attention is always on: on CPU it is the only llama.cpp
setting measured to give bit-identical logits whether a token is evaluated
alone, inside a block, or beside other sequences' tokens in one batch. That
holds for ubatches of up to ~48 tokens (a 64-token ubatch differs by up to
0.9 in a logit), so ubatches are INVARIANT_BATCH tokens; llama.cpp splits a
larger pass into them.

The attention kernel also sums over KV cells in cell order, so a sequence's
cells must stay in position order. In a unified KV cache they do not: a
rollback frees cells in the middle of the cache and the next pass of *another*
sequence fills them, placing its new positions before its older ones (measured:
6 of 6 rows of such a pass differed from one-token decoding). So every sequence
gets a KV stream of its own (`kv_unified = False`), where a rollback's holes are
refilled only by the same sequence's next positions, in order; batched passes
over several streams stay bit-identical to one-sequence decoding. `Chunk.start`
says where a chunk's tokens go; anything the sequence held from there on is
removed first, so a rollback is simply the next chunk starting earlier.

Draft trees. A sequence's stream holds one path, so a tree's branches off its
main chain are evaluated in scratch sequences: `Chunk.copy_from` first makes
the scratch sequence a copy of the session's (llama.cpp copies the whole
stream buffer, cells in the same order, at the start of the pass), then the
chunk evaluates the branch's path from the session's valid prefix on. Each
branch is thus a chain evaluation, bit-identical to decoding it alone
(tests/test_tree_verify.py measures it).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from proto.fingerprint import fingerprint_vocab

INVARIANT_BATCH = 32


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs to fd 2 from C; keep a daemon's stderr for its own lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _llama():
    import llama_cpp  # late: loading the shared library costs ~0.2 s
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)   # llama.cpp's own chatter
    return llama_cpp


@dataclass
class Chunk:
    """Tokens of one sequence for one pass. `start`: position of tokens[0]
    (the sequence's cache is cut there first). `n_logits`: how many of the
    last tokens need their logits (row i predicts the position after token i)."""
    seq: int
    start: int
    tokens: Sequence[int]
    n_logits: int = 0
    copy_from: int | None = None          # first make this sequence a copy of that one (tree branches)
    # judge(k, row) -> whether rows after row k (k = -1: any row) are still needed. A target that
    # can skip rows (the row cache) asks it; one computing every row anyway ignores it.
    judge: Callable[[int, np.ndarray | None], bool] | None = None


class TargetError(RuntimeError):
    """llama.cpp refused a pass (e.g. the KV cache is full)."""


def begin_pass(target, chunks: Sequence[Chunk], held) -> None:
    """What every pass does first, cached or not: refuse a pass larger than the batch, take
    the copies chunks ask for (`target.copy`), then refuse a chunk that starts past what its
    sequence holds (`held(seq)` tokens) or runs past the context."""
    total = sum(len(c.tokens) for c in chunks)
    if total > target.max_batch_tokens:
        raise ValueError(f"pass of {total} tokens exceeds the batch of {target.max_batch_tokens}")
    for c in chunks:
        if c.copy_from is not None:
            target.copy(c.copy_from, c.seq)
    n_ctx = target.n_ctx
    for c in chunks:
        if not 0 <= c.start <= held(c.seq):
            raise ValueError(f"sequence {c.seq}: chunk starts at {c.start}, cache holds {held(c.seq)}")
        if c.start + len(c.tokens) > n_ctx:
            raise TargetError(f"sequence {c.seq}: {c.start + len(c.tokens)} tokens exceed n_ctx={n_ctx}")


class Target:
    """One model, one context of `n_seqs` sequences of up to `n_ctx` tokens each.
    Not thread-safe: the scheduler's thread is its only caller."""

    def __init__(self, path: Path, n_ctx: int = 2048, n_seqs: int = 8, n_threads: int = 2,
                 max_batch_tokens: int = 256, gpu_layers: int = 0, kv_unified: bool = False):
        self.path, self.n_ctx, self.n_seqs = Path(path), n_ctx, n_seqs
        if not self.path.exists():
            raise FileNotFoundError(f"target model not found: {self.path}")
        ll = _llama()
        self._ll = ll
        with _quiet():
            ll.llama_backend_init()
            mp = ll.llama_model_default_params()
            mp.n_gpu_layers = gpu_layers       # 0 on a CPU build; a CUDA build offloads this many layers
            self.model = ll.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {self.path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.eos = ll.llama_vocab_eos(self.vocab)
        self.bos = ll.llama_vocab_bos(self.vocab)
        self.fingerprint = fingerprint_vocab(self.vocab)
        self.name = self.path.stem
        self.max_batch_tokens = max(INVARIANT_BATCH, max_batch_tokens)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seqs
        cp.n_batch = self.max_batch_tokens
        cp.n_ubatch = INVARIANT_BATCH
        cp.n_seq_max = n_seqs
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.kv_unified = kv_unified         # False: one KV stream per sequence (see the module docstring)
        cp.no_perf = True
        with _quiet():
            self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise ValueError(f"llama.cpp could not create a context of {n_seqs} x {n_ctx} tokens")
        self.mem = ll.llama_get_memory(self.ctx)
        self.n_threads, self.gpu_layers, self.kv_unified = n_threads, gpu_layers, kv_unified
        self.n_threads_single = n_threads
        self._batch = ll.llama_batch_init(self.max_batch_tokens, 0, 1)
        self._seq_len = [0] * n_seqs

    def set_threads(self, n: int, n_single: int | None = None) -> None:
        """Threads for passes of several tokens (`n`) and of one token (`n_single`, default n):
        llama.cpp runs a one-token pass with its n_threads and any other with n_threads_batch."""
        self.n_threads, self.n_threads_single = n, n if n_single is None else n_single
        self._ll.llama_set_n_threads(self.ctx, self.n_threads_single, self.n_threads)

    def seq_len(self, seq: int) -> int:
        return self._seq_len[seq]

    def cache_counts(self) -> tuple[int, int]:
        """(rows served from a row cache, rows computed for it): none here (cloud/target_cache.py)."""
        return 0, 0

    def clear(self, seq: int) -> None:
        self._ll.llama_memory_seq_rm(self.mem, seq, 0, -1)
        self._seq_len[seq] = 0

    def copy(self, src: int, dst: int) -> None:
        """Make `dst` hold what `src` holds (the buffer copy runs at the next pass's start)."""
        if src == dst:
            return
        self._ll.llama_memory_seq_rm(self.mem, dst, 0, -1)
        self._ll.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self._seq_len[dst] = self._seq_len[src]

    def decode(self, chunks: Sequence[Chunk]) -> list[np.ndarray]:
        """Evaluate every chunk in one pass; per chunk, its (n_logits, V) rows."""
        begin_pass(self, chunks, self.seq_len)
        for c in chunks:
            if c.start < self._seq_len[c.seq]:
                self._ll.llama_memory_seq_rm(self.mem, c.seq, c.start, -1)
                self._seq_len[c.seq] = c.start
        b = self._batch
        i, rows = 0, []
        for c in chunks:
            n = len(c.tokens)
            for k, tok in enumerate(c.tokens):
                b.token[i] = tok
                b.pos[i] = c.start + k
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = c.seq
                b.logits[i] = k >= n - c.n_logits
                i += 1
            rows.append(range(i - c.n_logits, i))
        b.n_tokens = i
        if i:
            rc = self._ll.llama_decode(self.ctx, b)
            if rc != 0:
                for c in chunks:   # a failed pass may leave part of it in the cache
                    self._ll.llama_memory_seq_rm(self.mem, c.seq, c.start, -1)
                raise TargetError(f"llama_decode failed ({rc}) on a pass of {i} tokens")
        for c in chunks:
            self._seq_len[c.seq] = c.start + len(c.tokens)
        return [self._logits(r) for r in rows]

    def _logits(self, rows: range) -> np.ndarray:
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)   # (n_logits, V)
        for k, i in enumerate(rows):
            ptr = self._ll.llama_get_logits_ith(self.ctx, i)
            out[k] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self.ctx)
            self._ll.llama_model_free(self.model)
            self.ctx = None


def measure_pass(target: Target, seq: int, n_tokens: int, reps: int) -> float:
    """Median seconds of a pass of `n_tokens` on an empty sequence (then cleared)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        target.decode([Chunk(seq, 0, [target.eos] * n_tokens, 1)])
        times.append(time.perf_counter() - t0)
        target.clear(seq)
    return float(np.median(times))
