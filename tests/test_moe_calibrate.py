"""`moe-calibrate` gives the same floors on every run: fixed tokens, one
thread, deterministic kernels, KLs snapped to a grid before floors are chosen."""
import subprocess
import sys

import pytest
import torch

from edge.model_files import shipped_gguf
from edge.moe.fixed_text import fixed_sequences
from edge.moe.gguf_loader import GGUFModel
from edge.moe.gguf_writer import MoESpec, random_moe, write_moe
from edge.moe.sensitivity import SensitivityConfig, floors_from_budget, measure, quantise_kl

SPEC = MoESpec("llama", 3, 64, 4, 2, 16, 8, 64, [2, 2, 2])
# Another job on the box: two threads of float matmuls for as long as it takes.
LOAD = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
        "while True:\n    a = (a @ a).tanh()\n")


def test_two_calibrations_agree_one_under_load(tmp_path):
    path = GGUFModel(write_moe(tmp_path / "tiny.gguf", SPEC, random_moe(SPEC, 49152, seed=11),
                               shipped_gguf()))
    seqs = [s[:40] for s in fixed_sequences(49152)[:2]]
    cfg = SensitivityConfig(max_tokens=80, kl_budget=0.5)
    first = measure(path, seqs, cfg, log=lambda *_: None)
    threads = torch.get_num_threads()
    load = subprocess.Popen([sys.executable, "-c", LOAD])
    try:
        torch.set_num_threads(2)            # the caller's setting must not matter
        second = measure(path, seqs, cfg, log=lambda *_: None)
    finally:
        load.kill()
        load.wait()
        torch.set_num_threads(threads)
    assert second["kl_raw"] == first["kl_raw"]
    assert second["kl"] == first["kl"] and second["floors"] == first["floors"]
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def test_kl_grid_absorbs_noise_and_keeps_order():
    # A few per mille of noise lands on the same grid point...
    assert quantise_kl(0.0230) == quantise_kl(0.0231) == quantise_kl(0.0229)
    # ...the grid keeps the order of values a step apart, and tiny KLs are not free.
    assert quantise_kl(0.02) < quantise_kl(0.03) < quantise_kl(0.2)
    assert quantise_kl(0.0) == quantise_kl(1e-6) == 1e-4
    kl = {8: {1: 0.0201, 2: 0.00102}, 4: {1: 0.302, 2: 0.0099}, 2: {1: 1.01, 2: 0.499}}
    noisy = {b: {l: v * 1.001 for l, v in per.items()} for b, per in kl.items()}
    size = {16: 100, 8: 60, 4: 40, 2: 30}
    snap = lambda k: {b: {l: quantise_kl(v) for l, v in per.items()} for b, per in k.items()}
    assert (floors_from_budget(snap(kl), lambda l, b: size[b], 0.012)
            == floors_from_budget(snap(noisy), lambda l, b: size[b], 0.012) == {1: 16, 2: 4})


def test_fixed_tokens_fit_the_vocabulary():
    seqs = fixed_sequences(49152)
    assert sum(map(len, seqs)) >= 700
    with pytest.raises(ValueError, match="beyond this model's vocabulary"):
        fixed_sequences(1000)
