"""Carving: with every expert on at gate weight 1, the MoE is its dense source."""
import gguf
import numpy as np
import pytest
import torch

from edge.model_files import shipped_gguf
from edge.moe.gguf_loader import GGUFModel
from edge.moe.gguf_writer import copy_tokenizer, write_moe
from edge.moe.model import MoETransformer
from edge.moe.moeify import Dense, MoeifyConfig, _to_gguf, dense_logits, fit_rows, moeify


D, NFF, LAYERS, VOCAB = 64, 256, 2, 49152


def write_dense(path):
    rng = np.random.default_rng(7)
    m = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
    w = gguf.GGUFWriter(path, "llama")
    for k, v in {"block_count": LAYERS, "context_length": 512, "embedding_length": D,
                 "feed_forward_length": NFF, "attention.head_count": 4,
                 "attention.head_count_kv": 2, "rope.dimension_count": 16}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    copy_tokenizer(w, shipped_gguf())
    w.add_tensor("token_embd.weight", m(VOCAB, D) * 4)
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    for i in range(LAYERS):
        p = f"blk.{i}."
        for n, s in {"attn_q": (D, D), "attn_k": (32, D), "attn_v": (32, D), "attn_output": (D, D),
                     "ffn_gate": (NFF, D), "ffn_up": (NFF, D), "ffn_down": (D, NFF)}.items():
            w.add_tensor(p + n + ".weight", m(*s))
        w.add_tensor(p + "attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(D, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def test_all_experts_on_equals_dense(tmp_path):
    dense_path, moe_path = tmp_path / "dense.gguf", tmp_path / "moe.gguf"
    write_dense(dense_path)
    src = Dense(dense_path)
    cfg = MoeifyConfig(n_expert=4, top_k=4, dense_layers=tuple(range(LAYERS)), dtype="f32")
    spec, tensors = _to_gguf(src, {}, cfg, print)
    write_moe(moe_path, spec, tensors, dense_path, dtype=np.float32)
    torch.manual_seed(0)
    toks = torch.randint(0, VOCAB, (40,))
    moe = MoETransformer(GGUFModel(moe_path), max_ctx=64).forward(toks)
    ref = dense_logits(src, toks.tolist())
    torch.testing.assert_close(moe, ref, atol=1e-4, rtol=1e-4)
    # llama.cpp runs both files and agrees that they are the same model.
    llama_cpp = pytest.importorskip("llama_cpp")
    outs = []
    for p in (dense_path, moe_path):
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=64, logits_all=True, flash_attn=True,
                              verbose=False, n_threads=1)
        llm.eval(toks.tolist())
        outs.append(np.array(llm.scores[:40]))
        llm.close()
    assert np.abs(outs[0] - outs[1]).max() < 1e-2
    assert np.abs(outs[1] - moe.numpy()).max() < 5e-2


def test_shared_prefix_is_fitted_once():
    # Three chat-like texts sharing a 3-token system prefix: its rows are kept
    # in the first text only; every other token is fitted.
    texts = [[1, 2, 3, 10, 11], [1, 2, 3, 20], [1, 2, 3, 30, 31, 32]]
    assert fit_rows(texts).tolist() == [0, 1, 2, 3, 4, 8, 12, 13, 14]
    # Nothing shared: every row.
    assert fit_rows([[5, 6], [7, 8]]).tolist() == [0, 1, 2, 3]


def test_moeify_is_deterministic_and_beats_carving_alone(tmp_path):
    """Two builds from the same texts write the same file (fixed seeds), and the
    fitted MoE is closer to its dense source on those texts than a carving unfitted."""
    dense_path = tmp_path / "dense.gguf"
    write_dense(dense_path)
    gen = torch.Generator().manual_seed(3)
    texts = [[1, 2, 3] + torch.randint(0, VOCAB, (60,), generator=gen).tolist() for _ in range(6)]
    cfg = MoeifyConfig(n_expert=4, top_k=2, dense_layers=(0,), dtype="f32", cluster_tokens=200,
                       router_steps=20)
    paths = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for p in paths:
        moeify(dense_path, p, texts, cfg, log=lambda *_: None)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    # Against the same layer split into contiguous experts, zero router (top-k by
    # index), the source's down-projections: carving alone, nothing fitted.
    src = Dense(dense_path)
    spec, tensors = _to_gguf(src, {}, cfg, lambda *_: None)
    write_moe(tmp_path / "unfitted.gguf", spec, tensors, dense_path, dtype=np.float32)
    err = {}
    for name in ("a", "unfitted"):
        m = MoETransformer(GGUFModel(tmp_path / f"{name}.gguf"), max_ctx=64)
        err[name] = 0.0
        for s in texts:
            m.truncate(0)
            err[name] += (m.forward(torch.tensor(s)) - dense_logits(src, s)).norm().item()
    assert err["a"] < 0.5 * err["unfitted"], err


def test_fitting_prompts_are_not_the_ones_acceptance_is_measured_on():
    from bench.datasets import BUILTIN
    from edge.moe.calib_text import CALIB_PROMPTS, DISTIL_PROMPTS, HELDOUT_PROMPTS
    from tests.conftest import PROMPTS
    fitted = {p.lower() for p in CALIB_PROMPTS + DISTIL_PROMPTS}
    for name, judged in (("builtin", BUILTIN), ("tests", PROMPTS), ("held-out", HELDOUT_PROMPTS)):
        assert not fitted & {p.lower() for p in judged}, name
