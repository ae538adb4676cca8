"""The DyMoE runtime as an edge drafter for PicoSpec."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edge.drafter import Drafter
from edge.moe.gguf_loader import GGUFModel
from edge.moe.model import MoETransformer
from edge.moe.policy import PolicyConfig, default_floors
from edge.moe.runtime import OffloadedExperts
from edge.moe.store import ExpertStore, StorageProfile, StoreConfig


@dataclass
class MoEDrafterConfig:
    model: Path
    policy: str = "dymoe"
    budget_mb: float | None = None
    budget_pct: float | None = None      # of the full-precision expert bytes
    storage: str = "none"
    max_ctx: int = 2048
    # One torch thread: on a 2-core box shared with the verifier (or anyone),
    # OpenMP workers of 2 threads wait on preempted peers; measured 10x
    # slower per token than 1 thread under load.
    threads: int = 1
    working_copies: dict | None = None   # shared working copies (benchmark cells), see StoreConfig
    # Weights computed in float16: exact for this file format, activations
    # rounded at each product; resident-fp TPOT 40 -> see bench/moe.py.
    # False: float32 throughout, as the calibration and the tests against
    # llama.cpp run.
    half: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.half else torch.float32


def floors_path(model: Path) -> Path:
    return model.with_name(model.name.removesuffix(".gguf") + ".floors.json")


def load_floors(model: Path, gm: GGUFModel | None = None) -> dict[int, int]:
    """Measured floors (`moe-calibrate`) if present, else `default_floors`."""
    p = floors_path(model)
    if p.exists():
        return {int(k): int(v) for k, v in json.loads(p.read_text())["floors"].items()}
    if gm is None:
        return {}
    c = gm.cfg
    return default_floors(c.moe_layers, c.expert_used, c.n_expert)


def build_experts(cfg: MoEDrafterConfig, gm: GGUFModel | None = None) -> OffloadedExperts:
    """The expert runtime (store, cache, policy, I/O) of `cfg`; `gm` an
    already opened `cfg.model` to share."""
    torch.set_num_threads(cfg.threads)
    if cfg.budget_mb is not None and cfg.budget_pct is not None:
        raise ValueError("give --expert-budget-mb or --expert-budget-pct, not both")
    gm = gm or GGUFModel(cfg.model)
    policy = PolicyConfig.from_name(cfg.policy, load_floors(cfg.model, gm))
    store = ExpertStore(gm, StoreConfig(StorageProfile.from_name(cfg.storage), native=policy.native,
                                        working_copies=cfg.working_copies, dtype=cfg.dtype))
    total = store.total_fp_nbytes()
    if cfg.budget_mb is not None:
        if cfg.budget_mb <= 0:
            raise ValueError(f"expert budget must be positive, got {cfg.budget_mb} MB")
        budget = int(cfg.budget_mb * 1e6)
    elif cfg.budget_pct is not None:
        if not 0 < cfg.budget_pct <= 100:
            raise ValueError(f"--expert-budget-pct must be in (0, 100], got {cfg.budget_pct}")
        budget = int(total * cfg.budget_pct / 100)
    else:
        budget = total
    return OffloadedExperts(gm, store, policy, budget)


def build_runtime(cfg: MoEDrafterConfig, base: MoETransformer | None = None
                  ) -> tuple[MoETransformer, OffloadedExperts]:
    """Model and expert runtime of `cfg`. With `base` (a model of the same
    file and dtype, its context at least cfg.max_ctx) the new model shares
    its dense weights instead of loading them again: the benchmark builds
    dozens of runtimes of one file."""
    if base is not None:
        experts = build_experts(cfg, base.gm)
        return base.sibling(experts, cfg.max_ctx), experts
    gm = GGUFModel(cfg.model)
    experts = build_experts(cfg, gm)
    return MoETransformer(gm, experts, max_ctx=cfg.max_ctx, dtype=cfg.dtype), experts


class MoEDrafter(Drafter):
    name = "moe"

    def __init__(self, cfg: MoEDrafterConfig):
        self.cfg = cfg
        self.model, self.experts = build_runtime(cfg)
        self._evals = 0
        self._tokens = 0
        self._seconds = 0.0

    @property
    def n_vocab(self) -> int:
        return self.model.cfg.n_vocab

    @property
    def n_past(self) -> int:
        return self.model.n_past

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        t0 = time.perf_counter()
        logits = self.model.forward(torch.as_tensor(list(tokens), dtype=torch.long))
        self._seconds += time.perf_counter() - t0
        self._evals += 1
        self._tokens += len(tokens)
        return logits[-1].numpy().astype(np.float32, copy=True)

    def truncate(self, n_past: int) -> None:
        self.model.truncate(n_past)

    @property
    def stall_s(self) -> float:
        return self.experts.stall_s

    def stats(self) -> dict:
        s = self.experts.summary()
        s.update({"drafter": "moe", "model": str(self.cfg.model), "storage": self.cfg.storage,
                  "evals": self._evals, "tokens": self._tokens,
                  "eval_seconds": round(self._seconds, 4)})
        return s

    def close(self) -> None:
        self.experts.close()
