"""Our torch MoE runtime against llama.cpp on tiny random-weight MoE GGUFs.

Each layout is written with `gguf` by the test itself and run by both
llama.cpp and our loader; logits must match over >= 512 positions.
"""
import numpy as np
import pytest
import torch

from edge.model_files import shipped_gguf
from edge.moe.gguf_loader import GGUFError, GGUFModel
from edge.moe.gguf_writer import MoESpec, random_moe, write_moe
from edge.moe.model import MoETransformer


N_VOCAB = 49152   # the files carry SmolLM2's tokenizer so llama.cpp can load them
N_POS = 520

LAYOUTS = {
    # Mixtral-style llama; layer 0 routes to every expert (per-layer count).
    "llama": MoESpec("llama", 3, 64, 4, 2, 16, 8, 32, [8, 2, 2]),
    "llama-uniform": MoESpec("llama", 2, 64, 4, 2, 16, 4, 32, [2, 2]),
    "qwen3moe": MoESpec("qwen3moe", 2, 64, 4, 2, 24, 8, 32, [2, 2]),
    "olmoe": MoESpec("olmoe", 2, 64, 4, 4, 16, 8, 32, [2, 2]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_moe")
    return {name: write_moe(d / f"{name}.gguf", spec, random_moe(spec, N_VOCAB, seed=i),
                            shipped_gguf())
            for i, (name, spec) in enumerate(LAYOUTS.items())}


def llama_cpp_logits(path, tokens):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=1024, logits_all=True,
                          flash_attn=True, verbose=False, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(tokens)
    out = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return out


# The Mixtral-style llama layout (what moeify writes) is checked by default;
# the other layouts take ~20 s each and run with `-m slow`.
@pytest.mark.parametrize("layout", [l if l == "llama" else pytest.param(l, marks=pytest.mark.slow)
                                    for l in LAYOUTS])
def test_logits_match_llama_cpp(files, layout):
    torch.manual_seed(0)
    tokens = torch.randint(0, N_VOCAB, (N_POS,)).tolist()
    ref = llama_cpp_logits(files[layout], tokens)
    model = MoETransformer(GGUFModel(files[layout]), max_ctx=1024)
    ours = model.forward(torch.tensor(tokens)).numpy()
    per_pos = np.abs(ours - ref).max(-1)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{layout}: {N_POS} positions, max |diff| {per_pos.max():.2e}, "
          f"median {np.median(per_pos):.2e}, top-1 agreement {top1:.4f}")
    # A routing near-tie can flip one expert in one layer and move a few
    # positions; everything else must agree to float32 noise.
    assert top1 >= 0.99
    assert np.median(per_pos) < 1e-2
    assert (per_pos < 0.05).mean() >= 0.95


def test_incremental_equals_batch_and_rollback(files):
    gm = GGUFModel(files["qwen3moe"])
    m = MoETransformer(gm, max_ctx=64)
    toks = torch.randint(0, N_VOCAB, (24,))
    full = m.forward(toks)
    m.truncate(10)
    step = torch.cat([m.forward(toks[i:i + 1]) for i in range(10, 24)])
    torch.testing.assert_close(step, full[10:], atol=1e-4, rtol=1e-4)
    m.truncate(5)
    other = m.forward(torch.tensor([1, 2, 3]))
    fresh = MoETransformer(gm, max_ctx=64)
    ref = fresh.forward(torch.cat([toks[:5], torch.tensor([1, 2, 3])]))
    torch.testing.assert_close(other, ref[5:], atol=1e-4, rtol=1e-4)
    assert m.n_past == 8


def test_context_overflow_and_bad_tokens(files):
    m = MoETransformer(GGUFModel(files["olmoe"]), max_ctx=8)
    with pytest.raises(ValueError, match="context overflow"):
        m.forward(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        m.forward(torch.tensor([N_VOCAB]))


def test_truncated_file_is_rejected(files, tmp_path):
    data = files["llama"].read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[:len(data) - 100_000])
    with pytest.raises(GGUFError, match="truncated|corrupt"):
        GGUFModel(bad)


def test_corrupt_file_is_rejected(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        GGUFModel(bad)


def test_unknown_architecture_and_dense_file_are_rejected(tmp_path):
    with pytest.raises(GGUFError, match="not a MoE"):
        GGUFModel(shipped_gguf())           # dense llama: no experts
    spec = MoESpec("llama", 1, 64, 4, 2, 16, 4, 32, [2])
    path = write_moe(tmp_path / "x.gguf", spec, random_moe(spec, N_VOCAB), shipped_gguf())
    raw = path.read_bytes().replace(b"llama", b"zzzzz", 1)
    (tmp_path / "y.gguf").write_bytes(raw)
    with pytest.raises(GGUFError, match="unknown architecture"):
        GGUFModel(tmp_path / "y.gguf")
