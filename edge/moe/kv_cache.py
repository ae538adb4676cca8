"""Position-indexed KV cache with rollback, one tensor pair for all layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCacheConfig:
    n_layer: int
    max_ctx: int
    n_kv_head: int
    head_dim: int


class KVCache:
    """Slot p holds position p. Rolling back is only moving `n_past`: stale
    slots beyond it are overwritten by the next `update` before being read.
    Stored head-major, (layer, kv head, position, hd), so a layer's keys are
    read by attention as they lie, without a transposed copy per token."""

    def __init__(self, cfg: KVCacheConfig):
        self.cfg = cfg
        shape = (cfg.n_layer, cfg.n_kv_head, cfg.max_ctx, cfg.head_dim)
        self.k = torch.zeros(shape)
        self.v = torch.zeros(shape)
        self.n_past = 0

    def check_room(self, n_new: int) -> None:
        if self.n_past + n_new > self.cfg.max_ctx:
            raise ValueError(f"context overflow: {self.n_past} cached + {n_new} new "
                             f"> max_ctx {self.cfg.max_ctx}")

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (T, n_kv, hd) at positions pos..pos+T-1 and return the
        keys/values of positions 0..pos+T-1, (n_kv, pos+T, hd) each."""
        t = k.shape[0]
        self.k[layer, :, pos:pos + t] = k.transpose(0, 1)
        self.v[layer, :, pos:pos + t] = v.transpose(0, 1)
        return self.k[layer, :, :pos + t], self.v[layer, :, :pos + t]

    def truncate(self, n_past: int) -> None:
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot truncate to {n_past}: cache holds {self.n_past}")
        self.n_past = n_past
