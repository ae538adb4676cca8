"""llama.cpp on the edge: the tokenizer and the dense drafter."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.drafter import Drafter
from proto.fingerprint import fingerprint_llama


def load_llama(path: Path, n_ctx: int = 2048, n_threads: int = 2, vocab_only: bool = False,
               logits_all: bool = False):
    # llama.cpp's OpenMP workers spin while idle by default; with an edge and a
    # cloud sharing cores that spinning starves the other process (measured: a
    # 64-token speculative run went from 6.7 s to 21 s). Must precede the load.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp  # late: loading the shared library is not free
    if not Path(path).exists():
        raise FileNotFoundError(f"model not found: {path}")
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=n_threads,
                               n_threads_batch=n_threads, flash_attn=True, vocab_only=vocab_only,
                               logits_all=logits_all, verbose=False)


class Tokenizer:
    """The edge's tokenizer, read from a GGUF's vocabulary (no weights loaded)."""

    def __init__(self, path: Path):
        self.llm = load_llama(path, n_ctx=64, n_threads=1, vocab_only=True)
        self.n_vocab = self.llm.n_vocab()
        self.eos = self.llm.token_eos()
        self.bos = self.llm.token_bos()
        meta = self.llm.metadata
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.template = meta.get("tokenizer.chat_template")
        self.fingerprint = fingerprint_llama(self.llm)

    def encode(self, prompt: str, raw: bool = False) -> list[int]:
        """`raw`: PROMPT as is, as llama.cpp tokenises it for this model; else
        wrapped in the model's chat template as one user turn."""
        text = prompt if raw else self.chat(prompt)
        return self.llm.tokenize(text.encode(), add_bos=self.add_bos, special=True)

    def chat(self, prompt: str) -> str:
        if not self.template:
            raise ValueError("the model has no chat template; use --raw")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        fmt = Jinja2ChatFormatter(self.template, eos_token="", bos_token="", add_generation_prompt=True)
        return fmt(messages=[{"role": "user", "content": prompt}]).prompt

    def decode(self, tokens: Sequence[int], prev: Sequence[int] = ()) -> str:
        return self.llm.detokenize(list(tokens), prev_tokens=list(prev) or None).decode("utf-8", "replace")


class LlamaDrafter(Drafter):
    """A dense GGUF model as the drafter (the default: a derived, cheaper SmolLM2)."""

    # the context settings (load_llama) that decide its rows, for a row cache's identity
    ROW_SETTINGS = {"flash_attn": True, "n_batch": 512}

    def __init__(self, path: Path, n_ctx: int = 2048, n_threads: int = 2):
        import llama_cpp
        self.llm = load_llama(path, n_ctx=n_ctx, n_threads=n_threads)
        self.name = Path(path).stem
        self._n_vocab = self.llm.n_vocab()
        self._get_logits = lambda: np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self._n_vocab,))

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_past(self) -> int:
        return self.llm.n_tokens

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        if not tokens:
            raise ValueError("eval needs at least one token")
        self.llm.eval(list(tokens))
        return self._get_logits().copy()

    def truncate(self, n_past: int) -> None:
        self.llm.n_tokens = min(self.llm.n_tokens, n_past)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        # Requests often share a prefix with the last one (system prompt, chat
        # history, retries): keep the cached part, evaluate only the rest.
        cached = self.llm.input_ids[:self.llm.n_tokens]
        n = len(tokens)
        same = int(np.argmin(np.append(cached[:n] == np.asarray(tokens[:len(cached)]), False)))
        self.truncate(min(same, n - 1))
        return self.eval(list(tokens[self.n_past:]))
