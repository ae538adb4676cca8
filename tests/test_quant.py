"""Group quantisation against a plain float reference."""
import pytest
import torch

from kernels import quant


def reference_roundtrip(w: torch.Tensor, bits: int, group: int, rounds: int) -> torch.Tensor:
    """Straightforward per-group loop: min-max start, then `rounds` of
    least-squares (scale, min) for fixed codes, keeping the best candidate
    after fp16 rounding. What quantize+dequantize must equal."""
    out = torch.empty_like(w)
    levels = 2 ** bits - 1
    h = lambda v: torch.tensor(float(v)).half().float()
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            g = w[r, c0:c0 + group]
            s, m = h(max(float((g.max() - g.min()) / levels), 1e-8)), h(g.min())
            code = lambda s, m: torch.clamp(torch.round((g - m) / s), 0, levels)
            best = code(s, m) * s + m
            for _ in range(rounds):
                q = code(s, m)
                if float(q.var()) > 0:
                    qc, gc = q - q.mean(), g - g.mean()
                    s = h(max(float((qc * gc).sum() / (qc * qc).sum()), 1e-8))
                    m = h(g.mean() - s * q.mean())
                else:
                    m = h(g.mean() - s * q.mean())
                cand = code(s, m) * s + m
                if (cand - g).pow(2).sum() < (best - g).pow(2).sum():
                    best = cand
            out[r, c0:c0 + group] = best
    return out


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rounds", [0, 4])
def test_roundtrip_matches_reference(bits, group, rounds):
    torch.manual_seed(bits * 100 + group)
    w = torch.randn(6, 128)
    q = quant.quantize(w, bits, group, rounds=rounds)
    torch.testing.assert_close(quant.dequantize(q), reference_roundtrip(w, bits, group, rounds),
                               rtol=0, atol=1e-4)
    assert q.codes.shape == (6, 128 * bits // 8)
    assert q.nbytes == quant.packed_nbytes(6, 128, bits, group)


@pytest.mark.parametrize("bits,max_rel", [(8, 0.01), (4, 0.08), (2, 0.34)])
def test_error_shrinks_with_bits(bits, max_rel):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    err = (quant.dequantize(quant.quantize(w, bits)) - w).norm() / w.norm()
    assert err < max_rel


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_refinement_never_makes_a_group_worse(bits):
    torch.manual_seed(3)
    w = torch.randn(32, 256) * torch.rand(32, 1) * 3
    w[0, 5] = 40.0                                   # an outlier group
    per_group = lambda q: (quant.dequantize(q) - w).pow(2).reshape(32, -1, 32).sum(-1)
    plain, refined = per_group(quant.quantize(w, bits, rounds=0)), per_group(quant.quantize(w, bits))
    assert (refined <= plain + 1e-9).all()
    assert refined.sum() < plain.sum() or bits == 8


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


def test_values_already_on_a_4_bit_grid_are_kept():
    # Weights dequantised from a Q4_1-like source (what SmolLM2's FFNs are)
    # must survive int4 requantisation with the same group.
    torch.manual_seed(4)
    d, m = torch.rand(8, 4, 1) * 0.1 + 0.01, torch.randn(8, 4, 1)
    codes = torch.randint(0, 16, (8, 4, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    w = (codes * d.half().float() + m.half().float()).reshape(8, 128)
    err = (quant.dequantize(quant.quantize(w, 4)) - w).abs().max()
    assert err < 1e-3 * w.abs().max()


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of group"):
        quant.quantize(torch.randn(2, 33), 4)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(2, 32), 3)
