"""Tokenizer fingerprint: edge and cloud must speak the same token ids.

A hash over every token's bytes and the special-token ids. Two models with the
same vocabulary get the same fingerprint whatever their weights, which is what
speculative decoding needs: a draft and a target may differ in everything else.
"""
from __future__ import annotations

import hashlib
from typing import Sequence


def fingerprint(pieces: Sequence[bytes], special_ids: Sequence[int]) -> str:
    h = hashlib.sha256()
    h.update(len(pieces).to_bytes(4, "little"))
    for piece in pieces:
        h.update(len(piece).to_bytes(2, "little"))
        h.update(piece)
    for sid in special_ids:
        h.update(int(sid).to_bytes(4, "little", signed=True))
    return h.hexdigest()[:16]


def fingerprint_vocab(vocab) -> str:
    """Fingerprint of a llama.cpp vocabulary (a `llama_vocab` pointer): the edge
    reads it from its tokenizer, the verifier from its target."""
    import ctypes

    import llama_cpp
    buf = ctypes.create_string_buffer(1024)   # whole pieces: some are long runs of spaces

    def piece(i: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)]
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return fingerprint([piece(i) for i in range(n)],
                       [llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)])


def fingerprint_llama(llm) -> str:
    """Fingerprint of a llama_cpp.Llama model's vocabulary."""
    return fingerprint_vocab(llm._model.vocab)
