"""Expert store: experts stay in the GGUF (mmap) and reads cost device time.

On this machine the file sits in the page cache, so a read would be free.
A `StorageProfile` (bandwidth + per-request latency) turns each read into
the wait a phone or SBC would see: `latency + bytes / bandwidth`, served one
request at a time like a single flash queue.

Low-precision reads (int8/int4/int2) model HOBBIT-style low-bit copies kept
on flash next to the full-precision experts: one file per precision beside
the model (`<model>.q{bits}g{group}.bin`), written once (by `moe-calibrate`,
or by the first run that needs it) and memory-mapped after that. A read
charges the packed size of the precision it reads, codes plus fp16 scales
and minima, which is also what the copy occupies in the cache.

With `native`, each matrix is read at the lowest precision that reproduces
it (relative error <= LOSSLESS_REL_ERR for every expert of that layer), if
that is below the precision asked for: a tier is a ceiling, not a cost. A
model carved from a 4-bit source (SmolLM2 Q4_1: gate/up, and layer 0's
down) keeps those matrices on an int4 grid with fp16 scale/min per 32,
exactly our int4 format, so its full-precision expert costs ~0.36 MB on
flash instead of 0.66 MB, and its "int8" expert is *more* accurate than
before, because an int8 grid does not contain the int4 one (measured on the
test bed: gate/up at int8 flip routing, agreement 0.93; at int4 0.997). The
table is measured once per model and kept beside it (`.native-g32.json`).
Baselines keep reading the file as llama.cpp would (native off).

Each tier's records are laid out layer by layer, so experts adjacent in a
layer's flash order are one contiguous extent: `read_run` reads them as one
request (one latency, then each expert arrives when its bytes have
streamed). Only DyMoE's I/O queue asks for runs; the baselines read one
expert per request. The order is expert id unless `set_order` gives
another: DyMoE writes each layer's records by descending residency prior
(weight norms, no data), so the experts its warm start leaves on flash are
one extent per layer (that order is modelled here: the images on disk stay
in id order, which only matters for which reads count as adjacent).
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from edge.moe.bits import FP
from edge.moe.gguf_loader import GGUFModel, expert_to_f32
from edge.moe.model import fuse_gate_up
from kernels import grid, quant

KINDS = ("gate", "up", "down")
PROFILES_FILE = Path(__file__).with_name("storage_profiles.json")
_MAGIC = b"TNDQ"
_HEADER = struct.Struct("<4sIIIIQQ")    # magic, version, bits, group, rounds, model size, mtime
# Well below int8's error on generic weights (~4e-3 at group 32) and above
# the fp16 rounding of values already on a coarser grid (~2e-4). Matrices
# whose grid is recovered exactly (`kernels.grid`) have error 0.
LOSSLESS_REL_ERR = 1e-3
IMAGE_VERSION = 2     # 2: matrices on an exact float16 grid keep that grid


def flash_copy(w: torch.Tensor, bits: int, group: int) -> quant.QTensor:
    """The low-bit record of one matrix: its own grid where it has one (a
    Q4_1-derived matrix at int4 is then stored bit-exact), else fitted."""
    return grid.exact_grid(w, bits, group) or quant.quantize(w, bits, group)


def working_copy(q: quant.QTensor) -> torch.Tensor:
    """float32 compute copy of a record, rounded through float16 as the file's
    own values were (exact for an exact grid, within ~5e-4 of the fit else)."""
    return grid.dequantize_f16(q)


@dataclass(frozen=True)
class StorageProfile:
    name: str
    bandwidth_mb_s: float     # 0 = unlimited
    latency_ms: float

    def read_seconds(self, nbytes: int) -> float:
        return self.latency_ms / 1e3 + self.transfer_seconds(nbytes)

    def transfer_seconds(self, nbytes: int) -> float:
        return nbytes / (self.bandwidth_mb_s * 1e6) if self.bandwidth_mb_s > 0 else 0.0

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


def _rel_err(w: torch.Tensor, bits: int, group: int) -> float:
    return float((working_copy(flash_copy(w, bits, group)) - w).norm() / w.norm().clamp_min(1e-30))


class ExpertWeights:
    """One expert as the compute sees it, plus what it costs to hold:
    float32 working copies, gate and up fused into one (2F, D) matrix."""

    __slots__ = ("bits", "nbytes", "gate_up", "down")

    def __init__(self, bits: int, nbytes: int, gate: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor):
        self.bits, self.nbytes = bits, nbytes
        self.gate_up = fuse_gate_up(gate, up)       # (2F, D)
        self.down = down                            # (D, F)

    @classmethod
    def fused(cls, bits: int, nbytes: int, gate_up: torch.Tensor, down: torch.Tensor):
        w = cls.__new__(cls)
        w.bits, w.nbytes, w.gate_up, w.down = bits, nbytes, gate_up, down
        return w

    @property
    def gate(self) -> torch.Tensor:
        return self.gate_up[:self.gate_up.shape[0] // 2]

    @property
    def up(self) -> torch.Tensor:
        return self.gate_up[self.gate_up.shape[0] // 2:]


@dataclass
class StoreConfig:
    profile: StorageProfile
    group: int = 32
    native: bool = False      # read matrices at their lossless precision when lower
    # Float32 working copies already made, shared by stores of one model
    # (the benchmark's cells): unpacking low-bit codes is this CPU stand-in's
    # cost, not the device's (a fused low-bit kernel reads the codes as
    # they are), and on a loaded box it overran the modelled read time.
    # The modelled device time is charged either way. None: none kept.
    working_copies: dict | None = None
    # Working copies' dtype, where it holds a record exactly (see `_make_weights`):
    # low-bit records are rounded through float16 (`working_copy`) and an
    # F16 file's own values are float16, so half streams half the bytes.
    dtype: torch.dtype = torch.float32


class ExpertStore:
    def __init__(self, gm: GGUFModel, cfg: StoreConfig):
        self.gm, self.cfg = gm, cfg
        self._images: dict[int, np.memmap] = {}                 # bits -> low-bit flash image
        self._device = threading.Lock()                       # one flash queue
        self.fp_nbytes = {layer: gm.expert_nbytes(layer) for layer in gm.cfg.moe_layers}
        self._native: dict[tuple[int, str], int] | None = None
        self._slot: dict[int, dict[int, int]] = {}               # layer -> expert -> flash slot

    def set_order(self, order: dict[int, list[int]]) -> None:
        """Flash order of each layer's expert records (default: by id)."""
        self._slot = {l: {e: i for i, e in enumerate(es)} for l, es in order.items()}

    def slot(self, layer: int, e: int) -> int:
        return self._slot[layer][e] if layer in self._slot else e

    # ---- sizes ----------------------------------------------------------
    def matrix_bits(self, layer: int, kind: str, bits: int) -> int:
        """Precision one matrix is actually read at for an expert at `bits`."""
        if not self.cfg.native:
            return bits
        return min(bits, self.native()[layer, kind])

    def nbytes(self, layer: int, bits: int) -> int:
        if bits == FP and not self.cfg.native:
            return self.fp_nbytes[layer]
        c = self.gm.cfg
        total = 0
        for kind, (rows, cols) in zip(KINDS, self._layout(bits)):
            b = self.matrix_bits(layer, kind, bits)
            total += (self.gm.tensors[f"blk.{layer}.ffn_{kind}_exps.weight"].n_bytes // c.n_expert
                      if b == FP else quant.packed_nbytes(rows, cols, b, self.cfg.group))
        return total

    def total_fp_nbytes(self) -> int:
        return sum(self.fp_nbytes.values()) * self.gm.cfg.n_expert

    # ---- flash image ----------------------------------------------------
    def image_path(self, bits: int) -> Path:
        p = self.gm.path
        return p.with_name(f"{p.name.removesuffix('.gguf')}.q{bits}g{self.cfg.group}.bin")

    def native(self) -> dict[tuple[int, str], int]:
        """(layer, kind) -> lowest bits reproducing every expert's matrix, FP if none."""
        if self._native is None:
            self._native = self._load_native()
        return self._native

    def _load_native(self) -> dict[tuple[int, str], int]:
        p, st = self.gm.path, self.gm.path.stat()
        path = p.with_name(f"{p.name.removesuffix('.gguf')}.native-g{self.cfg.group}.json")
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "group": self.cfg.group,
               "rounds": quant.REFINE_ROUNDS, "tol": LOSSLESS_REL_ERR, "version": IMAGE_VERSION}
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return {(int(l), k): b for l, per in saved["native"].items() for k, b in per.items()}
        c, native = self.gm.cfg, {}
        for layer in c.moe_layers:
            ws = [self._fp32(layer, e) for e in range(c.n_expert)]
            for i, kind in enumerate(KINDS):
                native[layer, kind] = FP
                for bits in quant.BITS[::-1]:           # 2, 4, 8: the first that holds wins
                    if all(_rel_err(w[i], bits, self.cfg.group) <= LOSSLESS_REL_ERR for w in ws):
                        native[layer, kind] = bits
                        break
        per: dict[str, dict[str, int]] = {}
        for (l, k), b in native.items():
            per.setdefault(str(l), {})[k] = b
        path.write_text(json.dumps({"key": key, "native": per}, indent=1))
        return native

    def prepare(self, bits_list, log=None) -> None:
        """Open (or build once and write) the low-bit images a policy reads."""
        c = self.gm.cfg
        bits_list = {self.matrix_bits(l, k, b) for b in bits_list for l in c.moe_layers for k in KINDS}
        for bits in sorted(set(bits_list) - {FP}):
            if bits not in self._images:
                self._images[bits] = self._open_image(bits, log)

    def _layout(self, bits: int) -> list[tuple[int, int]]:
        """(rows, cols) of gate, up, down of one expert."""
        c = self.gm.cfg
        return [(c.n_ff_exp, c.d_model), (c.n_ff_exp, c.d_model), (c.d_model, c.n_ff_exp)]

    def _fingerprint(self, bits: int) -> bytes:
        st = self.gm.path.stat()
        return _HEADER.pack(_MAGIC, IMAGE_VERSION, bits, self.cfg.group, quant.REFINE_ROUNDS,
                            st.st_size, st.st_mtime_ns)

    def _open_image(self, bits: int, log):
        path, head = self.image_path(bits), self._fingerprint(bits)
        c = self.gm.cfg
        per_expert = self._image_nbytes(bits)
        size = _HEADER.size + per_expert * c.n_expert * len(c.moe_layers)
        ok = path.exists() and path.stat().st_size == size
        if ok:
            with open(path, "rb") as f:
                ok = f.read(_HEADER.size) == head
        if not ok:
            t0 = time.perf_counter()
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(head)
                for layer in c.moe_layers:
                    for e in range(c.n_expert):
                        for w in self._fp32(layer, e):
                            q = flash_copy(w, bits, self.cfg.group)
                            for t in (q.codes, q.scale, q.minv):
                                f.write(t.contiguous().numpy().tobytes())
            os.replace(tmp, path)
            if log:
                log(f"[moe] wrote int{bits} expert image {path.name} "
                    f"({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
        return np.memmap(path, dtype=np.uint8, mode="r", offset=_HEADER.size)

    def _image_nbytes(self, bits: int) -> int:
        """One expert's record in the int`bits` image: all three matrices at `bits`."""
        return sum(quant.packed_nbytes(r, c, bits, self.cfg.group) for r, c in self._layout(bits))

    def _fp32(self, layer: int, e: int) -> list[torch.Tensor]:
        return [torch.from_numpy(expert_to_f32(*self.gm.expert_raw(layer, k, e)).copy())
                for k in KINDS]

    def _quantised(self, layer: int, e: int, bits: int):
        if bits not in self._images:
            self.prepare([bits])
        img, c, g = self._images[bits], self.gm.cfg, self.cfg.group
        per_expert = self._image_nbytes(bits)
        off = (c.moe_layers.index(layer) * c.n_expert + e) * per_expert
        raw = torch.from_numpy(np.array(img[off:off + per_expert]))   # one copy = the read
        out, o = [], 0
        for rows, cols in self._layout(bits):
            n_codes, n_par = rows * cols * bits // 8, rows * (cols // g) * 2
            codes = raw[o:o + n_codes].view(rows, cols * bits // 8)
            scale = raw[o + n_codes:o + n_codes + n_par].view(torch.float16).view(rows, cols // g)
            minv = raw[o + n_codes + n_par:o + n_codes + 2 * n_par].view(torch.float16).view(rows, cols // g)
            out.append(quant.QTensor(bits, g, (rows, cols), codes, scale, minv))
            o += n_codes + 2 * n_par
        return out

    # ---- reads ----------------------------------------------------------
    def read(self, layer: int, e: int, bits: int) -> tuple[ExpertWeights, float]:
        """Read one expert at `bits`, blocking for the modelled device time.
        Returns the weights and the seconds the device was busy with it."""
        run = self.read_run(layer, [e], bits)
        try:
            return next(run)
        finally:
            run.close()

    def read_run(self, layer: int, experts: list[int], bits: int):
        """Read experts adjacent in flash order of one layer at `bits` as one request: one
        latency, then each expert's bytes. Yields (weights, seconds the
        device spent on it) as each arrives; the device is held until the
        run is exhausted or closed."""
        if any(self.slot(layer, b) != self.slot(layer, a) + 1 for a, b in zip(experts, experts[1:])):
            raise ValueError(f"experts {experts} of layer {layer} are not one contiguous extent")
        prof, nbytes = self.cfg.profile, self.nbytes(layer, bits)
        with self._device:
            t0 = last = time.perf_counter()
            due = prof.latency_ms / 1e3
            for e in experts:
                ws = self._weights(layer, e, bits)
                # Sleep off whatever the modelled device time exceeds the real work.
                due += prof.transfer_seconds(nbytes)
                left = due - (time.perf_counter() - t0)
                if left > 0:
                    time.sleep(left)
                now = time.perf_counter()
                busy, last = now - last, now
                yield ExpertWeights.fused(bits, nbytes, *ws), busy

    def _weights(self, layer: int, e: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) working copies of one expert at `bits` (`StoreConfig.dtype`)."""
        memo = self.cfg.working_copies
        if memo is None:
            return self._make_weights(layer, e, bits)
        key = (str(self.gm.path), self.cfg.group, layer, e,
               tuple(self.matrix_bits(layer, k, bits) for k in KINDS), self.cfg.dtype)
        if key not in memo:
            memo[key] = self._make_weights(layer, e, bits)
        return memo[key]

    def _make_weights(self, layer: int, e: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Every read makes these when no copies are shared (the drafter), so
        # whether `dtype` holds a matrix exactly is known from its kind, not
        # compared: low-bit records are rounded through float16 by
        # `working_copy`, and an F16 file's values are float16 values; other
        # full-precision types stay float32.
        half = self.cfg.dtype is torch.float16
        out, records = [], {}
        for i, kind in enumerate(KINDS):
            b = self.matrix_bits(layer, kind, bits)
            if b == FP:
                raw, ttype = self.gm.expert_raw(layer, kind, e)
                if ttype == gguf.GGMLQuantizationType.F16:
                    # The file's own float16 values: no float32 detour when computing in half.
                    w = torch.from_numpy(np.array(raw))
                    out.append(w if half else w.to(self.cfg.dtype))
                else:
                    out.append(torch.from_numpy(expert_to_f32(raw, ttype).copy()))
            else:
                if b not in records:                    # one read of the expert's record per precision
                    records[b] = self._quantised(layer, e, b)
                q = records[b][i]
                # float16(code * scale + min), as `working_copy` rounds it.
                out.append(quant.dequantize(q).to(torch.float16) if half
                           else working_copy(q).to(self.cfg.dtype))
        return fuse_gate_up(out[0], out[1]), out[2].contiguous()


    def resident_copy(self, layer: int, e: int, bits: int) -> ExpertWeights:
        """Weights without any device charge (for warm starts and references)."""
        return ExpertWeights.fused(bits, self.nbytes(layer, bits), *self._weights(layer, e, bits))
