"""Expert store: experts stay in the GGUF (mmap) and reads cost device time.

On this machine the file sits in the page cache, so a read would be free.
A `StorageProfile` (bandwidth + per-request latency) turns each read into
the wait a phone or SBC would see: `latency + bytes / bandwidth`, served one
request at a time like a single flash queue.

Low-precision reads (int8/int4/int2) model HOBBIT-style low-bit copies kept
on flash next to the full-precision experts: they are made once when the
store opens (`prepare`) and a read charges their packed size.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edge.moe.gguf_loader import GGUFModel, expert_to_f32
from kernels import quant

FP = 16          # "full precision": whatever the file holds (F16/F32)
KINDS = ("gate", "up", "down")
PROFILES_FILE = Path(__file__).with_name("storage_profiles.json")


@dataclass(frozen=True)
class StorageProfile:
    name: str
    bandwidth_mb_s: float     # 0 = unlimited
    latency_ms: float

    def read_seconds(self, nbytes: int) -> float:
        bw = nbytes / (self.bandwidth_mb_s * 1e6) if self.bandwidth_mb_s > 0 else 0.0
        return self.latency_ms / 1e3 + bw

    @classmethod
    def from_name(cls, name: str) -> "StorageProfile":
        table = load_profiles()
        if name not in table:
            raise ValueError(f"unknown storage profile {name!r}; known: {', '.join(table)}")
        return table[name]


def load_profiles() -> dict[str, StorageProfile]:
    raw = json.loads(PROFILES_FILE.read_text())
    return {k: StorageProfile(k, float(v["bandwidth_mb_s"]), float(v["latency_ms"]))
            for k, v in raw.items() if not k.startswith("_")}


@dataclass
class ExpertWeights:
    """One expert as the compute sees it, plus what it costs to hold."""
    bits: int
    nbytes: int
    gate: torch.Tensor        # (F, D) float32 working copy
    up: torch.Tensor          # (F, D)
    down: torch.Tensor        # (D, F)


@dataclass
class StoreConfig:
    profile: StorageProfile
    group: int = 32


class ExpertStore:
    def __init__(self, gm: GGUFModel, cfg: StoreConfig):
        self.gm, self.cfg = gm, cfg
        self._flash: dict[tuple[int, int, int], tuple] = {}   # (layer, e, bits) -> QTensors
        self._device = threading.Lock()                       # one flash queue
        self.fp_nbytes = {layer: gm.expert_nbytes(layer) for layer in gm.cfg.moe_layers}

    # ---- sizes ----------------------------------------------------------
    def nbytes(self, layer: int, bits: int) -> int:
        if bits == FP:
            return self.fp_nbytes[layer]
        c = self.gm.cfg
        return (2 * quant.packed_nbytes(c.n_ff_exp, c.d_model, bits, self.cfg.group)
                + quant.packed_nbytes(c.d_model, c.n_ff_exp, bits, self.cfg.group))

    def total_fp_nbytes(self) -> int:
        return sum(self.fp_nbytes.values()) * self.gm.cfg.n_expert

    # ---- flash image ----------------------------------------------------
    def prepare(self, bits_list) -> None:
        """Build the low-bit copies for the precisions a policy may read."""
        for bits in sorted(set(bits_list) - {FP}):
            for layer in self.gm.cfg.moe_layers:
                for e in range(self.gm.cfg.n_expert):
                    self._quantised(layer, e, bits)

    def _fp32(self, layer: int, e: int) -> list[torch.Tensor]:
        return [torch.from_numpy(expert_to_f32(*self.gm.expert_raw(layer, k, e)).copy())
                for k in KINDS]

    def _quantised(self, layer: int, e: int, bits: int):
        key = (layer, e, bits)
        if key not in self._flash:
            self._flash[key] = tuple(quant.quantize(w, bits, self.cfg.group)
                                     for w in self._fp32(layer, e))
        return self._flash[key]

    # ---- reads ----------------------------------------------------------
    def read(self, layer: int, e: int, bits: int) -> tuple[ExpertWeights, float]:
        """Read one expert at `bits`, blocking for the modelled device time.
        Returns the weights and the seconds the device was busy with it."""
        nbytes = self.nbytes(layer, bits)
        with self._device:
            t0 = time.perf_counter()
            if bits == FP:
                ws = self._fp32(layer, e)
            else:
                ws = [quant.dequantize(q) for q in self._quantised(layer, e, bits)]
            # Sleep off whatever the modelled device time exceeds the real work.
            left = self.cfg.profile.read_seconds(nbytes) - (time.perf_counter() - t0)
            if left > 0:
                time.sleep(left)
            busy = time.perf_counter() - t0
        return ExpertWeights(bits, nbytes, *ws), busy

    def resident_copy(self, layer: int, e: int, bits: int) -> ExpertWeights:
        """Weights without any device charge (for warm starts and references)."""
        if bits == FP:
            ws = self._fp32(layer, e)
        else:
            ws = [quant.dequantize(q) for q in self._quantised(layer, e, bits)]
        return ExpertWeights(bits, self.nbytes(layer, bits), *ws)
