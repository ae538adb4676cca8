"""Recover the exact low-bit grid a float16 matrix came from.

A matrix dequantised from an asymmetric group format (e.g. GGUF Q4_1:
value = d * code + m with float16 d and m, computed in float32, then stored
as float16) is held exactly by `kernels.quant`'s format at the same bits,
but only with the *original* (d, m): a fitted scale lands a few float16
ulps away and the reconstruction is off by ~1e-3 relative, which a chaotic
MoE router turns into flipped tokens. The group's minimum has code 0, so m
is that minimum; d is within a few ulps of (max - min) / levels. Each
candidate is tried and kept only if float16(code * d + m) reproduces every
value of the group bit for bit. Pure math, no I/O.
"""
from __future__ import annotations

import torch

from kernels.quant import QTensor, _check

ULPS = 4        # float16 ulps searched on each side of (max - min) / levels


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = q.shape
    per_byte = 8 // bits
    if per_byte == 1:
        return q.contiguous()
    q = q.reshape(rows, cols // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (q << shifts).sum(dim=-1, dtype=torch.int32).to(torch.uint8).contiguous()


def _f16_neighbours(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (float16, positive) moved k ulps (k may be negative), kept positive."""
    bits = x.view(torch.int16).to(torch.int32) + k
    return bits.clamp(1, 0x7BFF).to(torch.int16).view(torch.float16)


def exact_grid(w: torch.Tensor, bits: int, group: int = 32) -> QTensor | None:
    """QTensor whose float16-rounded dequantisation equals `w` exactly, or
    None when some group of `w` lies on no float16 (scale, min) grid."""
    rows, cols = w.shape
    _check(bits, cols, group)
    w16 = w.detach().to(torch.float16)
    if not torch.equal(w16.float(), w.detach().float()):
        return None                                     # not float16 values at all
    g = w16.float().reshape(rows, cols // group, group)
    levels = (1 << bits) - 1
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    minv = lo.to(torch.float16)
    base = ((hi - lo) / levels).to(torch.float16)
    base = torch.where(base > 0, base, torch.full_like(base, 2 ** -24))
    scale = torch.zeros_like(base)
    codes = torch.zeros_like(g)
    found = torch.zeros(lo.shape, dtype=torch.bool)
    for k in sorted(range(-ULPS, ULPS + 1), key=abs):
        s = _f16_neighbours(base, k)
        q = torch.round((g - minv.float()) / s.float()).clamp_(0, levels)
        ok = ((q * s.float() + minv.float()).to(torch.float16).float() == g).all(-1, keepdim=True)
        new = ok & ~found
        scale = torch.where(new, s, scale)
        codes = torch.where(new, q, codes)
        found |= ok
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    q = _pack(codes.to(torch.uint8).reshape(rows, cols), bits)
    return QTensor(bits, group, (rows, cols), q, scale.squeeze(-1).contiguous(),
                   minv.squeeze(-1).contiguous())


def dequantize_f16(q: QTensor) -> torch.Tensor:
    """float32 of float16(code * scale + min): the reconstruction `exact_grid` checks."""
    from kernels.quant import dequantize
    return dequantize(q).to(torch.float16).float()
