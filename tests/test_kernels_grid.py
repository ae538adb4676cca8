"""Exact grid recovery against a slow per-group reference."""
import torch

from kernels import grid, quant


def q41_like(rows, cols, group=32, seed=0):
    """A matrix as a Q4_1 GGUF dequantises it: float16(d * code + m),
    computed in float32, d and m float16, the group minimum at code 0."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(rows, cols // group, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(rows, cols // group, 1, generator=g) * 0.1).half().float()
    codes = torch.randint(0, 16, (rows, cols // group, group), generator=g).float()
    codes[..., 0] = 0
    codes[..., 1] = 15
    return (codes * d + m).half().float().reshape(rows, cols)


def slow_exact(w, bits, group):
    """Per group: try every float16 scale near (max - min) / levels with min
    = the group minimum; True if one reproduces the group bit for bit."""
    levels = 2 ** bits - 1
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            gr = w[r, c0:c0 + group]
            m = gr.min().half()
            base = ((gr.max() - gr.min()) / levels).half()
            ok = False
            for k in range(-grid.ULPS, grid.ULPS + 1):
                s = torch.tensor(max(int(base.view(torch.int16)) + k, 1), dtype=torch.int16).view(torch.float16)
                q = torch.round((gr - m.float()) / s.float()).clamp(0, levels)
                if torch.equal((q * s.float() + m.float()).half().float(), gr):
                    ok = True
                    break
            if not ok:
                return False
    return True


def test_q41_matrix_is_recovered_bit_for_bit():
    w = q41_like(24, 128)
    q = grid.exact_grid(w, 4, 32)
    assert q is not None and slow_exact(w, 4, 32)
    assert torch.equal(grid.dequantize_f16(q), w)
    # The fitted quantiser is close but not exact: what exact_grid exists for.
    assert not torch.equal(quant.dequantize(quant.quantize(w, 4, 32)).half().float(), w)
    assert q.nbytes == quant.packed_nbytes(24, 128, 4, 32)


def test_generic_weights_have_no_exact_grid():
    w = torch.randn(8, 64).half().float()
    assert grid.exact_grid(w, 4, 32) is None and not slow_exact(w, 4, 32)
    assert grid.exact_grid(torch.randn(8, 64), 4, 32) is None          # not even float16


def test_constant_group_and_int2():
    w = q41_like(4, 64)
    w[0, :32] = 0.25
    assert torch.equal(grid.dequantize_f16(grid.exact_grid(w, 4, 32)), w)
    c = torch.randint(0, 4, (4, 64)).float() * 0.125 - 0.5
    assert torch.equal(grid.dequantize_f16(grid.exact_grid(c, 2, 32)), c)
