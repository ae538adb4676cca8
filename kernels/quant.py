"""Group quantisation of weight matrices to int8 / int4 / int2.

Asymmetric min/scale per group of `group` consecutive input columns, codes
packed little-end-first into uint8 (int4: 2 per byte, int2: 4 per byte).
Scales and minima are float16, as a device kernel would keep them. Pure math:
no I/O, no caching; callers decide when to dequantise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4, 2)


@dataclass(frozen=True)
class QTensor:
    """A (rows, cols) matrix stored as packed codes plus per-group scale/min."""
    bits: int
    group: int
    shape: tuple[int, int]
    codes: torch.Tensor   # (rows, cols * bits / 8) uint8
    scale: torch.Tensor   # (rows, cols / group) float16
    minv: torch.Tensor    # (rows, cols / group) float16

    @property
    def nbytes(self) -> int:
        return (self.codes.numel() * self.codes.element_size()
                + self.scale.numel() * 2 + self.minv.numel() * 2)


def packed_nbytes(rows: int, cols: int, bits: int, group: int = 32) -> int:
    """Bytes `quantize` would produce, without doing it (for budgeting)."""
    _check(bits, cols, group)
    return rows * cols * bits // 8 + 2 * 2 * rows * (cols // group)


def _check(bits: int, cols: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if cols % group:
        raise ValueError(f"{cols} columns are not a multiple of group size {group}")
    if (group * bits) % 8:
        raise ValueError(f"group {group} at {bits} bits does not fill whole bytes")


def quantize(w: torch.Tensor, bits: int, group: int = 32) -> QTensor:
    rows, cols = w.shape
    _check(bits, cols, group)
    g = w.detach().to(torch.float32).reshape(rows, cols // group, group)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    # Round scale/min to fp16 *before* coding, so the codes are chosen for
    # the parameters the dequantiser will actually see.
    scale = ((hi - lo) / levels).clamp_min(1e-8).to(torch.float16)
    minv = lo.to(torch.float16)
    q = torch.round((g - minv.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    q = q.reshape(rows, cols)
    per_byte = 8 // bits
    if per_byte > 1:
        q = q.reshape(rows, cols // per_byte, per_byte)
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
        q = (q << shifts).sum(dim=-1, dtype=torch.int32).to(torch.uint8)
    return QTensor(bits, group, (rows, cols), q.contiguous(),
                   scale.squeeze(-1).contiguous(), minv.squeeze(-1).contiguous())


def unpack(q: QTensor) -> torch.Tensor:
    """Integer codes, (rows, cols) uint8."""
    rows, cols = q.shape
    per_byte = 8 // q.bits
    if per_byte == 1:
        return q.codes
    shifts = torch.arange(per_byte, dtype=torch.uint8) * q.bits
    mask = (1 << q.bits) - 1
    return ((q.codes.unsqueeze(-1) >> shifts) & mask).reshape(rows, cols)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    codes = unpack(q).reshape(rows, cols // q.group, q.group).to(dtype)
    w = codes * q.scale.to(dtype).unsqueeze(-1) + q.minv.to(dtype).unsqueeze(-1)
    return w.reshape(rows, cols)


def matmul(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x (..., cols) @ W.T -> (..., rows), W being the quantised matrix."""
    return x @ dequantize(q, x.dtype).T
