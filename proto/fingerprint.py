"""Tokenizer fingerprint: edge and cloud must speak the same token ids.

A hash over every token's bytes and the special-token ids. Two models with the
same vocabulary get the same fingerprint whatever their weights, which is what
speculative decoding needs: a draft and a target may differ in everything else.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence


def fingerprint(pieces: Sequence[bytes], special_ids: Sequence[int]) -> str:
    h = hashlib.sha256()
    h.update(len(pieces).to_bytes(4, "little"))
    for piece in pieces:
        h.update(len(piece).to_bytes(2, "little"))
        h.update(piece)
    for sid in special_ids:
        h.update(int(sid).to_bytes(4, "little", signed=True))
    return h.hexdigest()[:16]


def fingerprint_llama(llm) -> str:
    """Fingerprint of a llama_cpp.Llama model's vocabulary."""
    piece: Callable[[int], bytes] = lambda i: llm.detokenize([i], special=True)
    return fingerprint([piece(i) for i in range(llm.n_vocab())], [llm.token_bos(), llm.token_eos()])
