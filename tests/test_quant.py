"""Group quantisation against a plain float reference."""
import pytest
import torch

from kernels import quant


def reference_roundtrip(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Straightforward per-group loop: what quantize+dequantize must equal."""
    out = torch.empty_like(w)
    levels = 2 ** bits - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            g = w[r, c0:c0 + group]
            lo, hi = g.min(), g.max()
            scale = torch.tensor(float((hi - lo) / levels)).clamp_min(1e-8).half().float()
            mn = lo.half().float()
            codes = torch.clamp(torch.round((g - mn) / scale), 0, levels)
            out[r, c0:c0 + group] = codes * scale + mn
    return out


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [32, 64])
def test_roundtrip_matches_reference(bits, group):
    torch.manual_seed(bits * 100 + group)
    w = torch.randn(6, 128)
    q = quant.quantize(w, bits, group)
    torch.testing.assert_close(quant.dequantize(q), reference_roundtrip(w, bits, group),
                               rtol=0, atol=1e-5)
    assert q.codes.shape == (6, 128 * bits // 8)
    assert q.nbytes == quant.packed_nbytes(6, 128, bits, group)


@pytest.mark.parametrize("bits,max_rel", [(8, 0.01), (4, 0.12), (2, 0.6)])
def test_error_shrinks_with_bits(bits, max_rel):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    err = (quant.dequantize(quant.quantize(w, bits)) - w).norm() / w.norm()
    assert err < max_rel


def test_unpack_recovers_codes():
    torch.manual_seed(1)
    w = torch.randn(3, 64)
    q = quant.quantize(w, 2, 32)
    codes = quant.unpack(q)
    assert codes.max() <= 3
    assert codes.dtype == torch.uint8 and codes.shape == (3, 64)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_matmul_equals_dequantised_float(bits):
    torch.manual_seed(2)
    w, x = torch.randn(48, 96), torch.randn(5, 96)
    q = quant.quantize(w, bits)
    torch.testing.assert_close(quant.matmul(x, q), x @ quant.dequantize(q).T)


def test_constant_group_is_exact():
    w = torch.full((2, 32), 0.75)
    torch.testing.assert_close(quant.dequantize(quant.quantize(w, 2)), w, atol=1e-3, rtol=0)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of group"):
        quant.quantize(torch.randn(2, 33), 4)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(2, 32), 3)
