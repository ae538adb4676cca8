"""The edge's draft model behind one small interface.

A drafter owns a KV cache over one token sequence. The speculative loop only
ever appends tokens (`eval`) and cuts the sequence back after a rejection
(`truncate`); everything else (sampling, blocks, epochs) lives outside.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class Drafter(ABC):
    name: str = "drafter"

    @property
    @abstractmethod
    def n_vocab(self) -> int: ...

    @property
    @abstractmethod
    def n_past(self) -> int:
        """Number of positions currently in the cache."""

    @abstractmethod
    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` at positions n_past.. and return the logits
        (float32, shape (n_vocab,)) predicting the position after the last one."""

    @abstractmethod
    def truncate(self, n_past: int) -> None:
        """Keep only the first `n_past` positions (rollback after a rejection)."""

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `tokens`; logits for the next position.
        Drafters that remember their tokens override this to reuse a shared prefix."""
        self.truncate(0)
        return self.eval(tokens)

    @property
    def stall_s(self) -> float:
        """Seconds this drafter has waited on storage so far (the MoE drafter's expert
        reads); an emulated device prices its compute apart from them (sim.latency.Hold)."""
        return 0.0

    def stats(self) -> dict:
        """Runtime counters worth reporting (cache hits, bytes read, ...)."""
        return {}

    def close(self) -> None:
        pass
