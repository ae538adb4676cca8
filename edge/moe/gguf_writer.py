"""Write MoE GGUFs in llama.cpp's layouts (for moeify and for tests).

Weights are given in torch Linear layout (out, in); experts stacked as
(E, out, in), which is exactly the numpy order of llama.cpp's
`{in, out, E}` tensors.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edge.moe.gguf_loader import KEY_ROUTER_SCALE

TOKENIZER_PREFIX = "tokenizer."


@dataclass
class MoESpec:
    """Hyper-parameters of a file to write."""
    arch: str                      # llama | qwen3moe | olmoe
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_expert: int
    n_ff_exp: int
    expert_used: list[int]
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    n_ctx_train: int = 2048
    router_scale: float = 1.0
    extra: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source: str) -> tuple:
    # Parsing a 49k-token vocabulary takes seconds; tests write many files.
    r = gguf.GGUFReader(source)
    out = []
    for key, f in r.fields.items():
        if key.startswith(TOKENIZER_PREFIX):
            vtype = f.types[0]
            sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            out.append((key, f.contents(), vtype, sub))
    return tuple(out)


def copy_tokenizer(writer: gguf.GGUFWriter, source: str | os.PathLike) -> int:
    """Copy every tokenizer.* key of `source` (so llama.cpp can load the
    file and both sides agree on token ids). Returns the vocab size."""
    n_vocab = 0
    for key, val, vtype, sub in _tokenizer_fields(str(source)):
        writer.add_key_value(key, val, vtype, sub)
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(val)
    return n_vocab


def write_moe(path: str | os.PathLike, spec: MoESpec, tensors: dict[str, np.ndarray],
              tokenizer_from: str | os.PathLike, dtype=np.float32) -> Path:
    """tensors: llama.cpp names -> arrays in numpy order. Norm vectors and
    routers stay float32 (llama.cpp wants F32 norms; routers are tiny)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    a = spec.arch
    w = gguf.GGUFWriter(tmp, a)
    w.add_string("general.name", spec.extra.get("name", f"tandem {a} moe"))
    w.add_uint32(f"{a}.block_count", spec.n_layer)
    w.add_uint32(f"{a}.context_length", spec.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", spec.d_model)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.n_kv_head)
    w.add_uint32(f"{a}.attention.key_length", spec.head_dim)
    w.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    w.add_uint32(f"{a}.rope.dimension_count", spec.head_dim)
    w.add_float32(f"{a}.rope.freq_base", spec.rope_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", spec.rms_eps)
    w.add_uint32(f"{a}.expert_count", spec.n_expert)
    if len(set(spec.expert_used)) == 1:
        w.add_uint32(f"{a}.expert_used_count", spec.expert_used[0])
    else:
        w.add_key_value(f"{a}.expert_used_count", [int(u) for u in spec.expert_used],
                        gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    if a in ("llama", "olmoe"):   # these read the expert width from feed_forward_length
        w.add_uint32(f"{a}.feed_forward_length", spec.n_ff_exp)
    else:
        w.add_uint32(f"{a}.feed_forward_length", spec.n_ff_exp * spec.n_expert)
        w.add_uint32(f"{a}.expert_feed_forward_length", spec.n_ff_exp)
    w.add_float32(KEY_ROUTER_SCALE, spec.router_scale)
    for k, v in spec.extra.items():
        if k.startswith("tandem."):
            w.add_string(k, str(v))
    n_vocab = copy_tokenizer(w, tokenizer_from)
    if tensors["token_embd.weight"].shape[0] != n_vocab:
        raise ValueError(f"embedding has {tensors['token_embd.weight'].shape[0]} rows, "
                         f"tokenizer has {n_vocab} tokens")
    w.add_uint32(f"{a}.vocab_size", n_vocab)
    for name, arr in tensors.items():
        keep_f32 = arr.ndim == 1 or name.endswith("ffn_gate_inp.weight")
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32 if keep_f32 else dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def random_moe(spec: MoESpec, n_vocab: int, seed: int = 0, dense_layers=()) -> dict[str, np.ndarray]:
    """Random weights of a given layout, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    d, hd, E, f = spec.d_model, spec.head_dim, spec.n_expert, spec.n_ff_exp

    def mat(*shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": mat(n_vocab, d, fan_in=1) * 0.5,
         "output_norm.weight": norm(d), "output.weight": mat(n_vocab, d, fan_in=d)}
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(d)
        t[p + "attn_q.weight"] = mat(spec.n_head * hd, d, fan_in=d)
        t[p + "attn_k.weight"] = mat(spec.n_kv_head * hd, d, fan_in=d)
        t[p + "attn_v.weight"] = mat(spec.n_kv_head * hd, d, fan_in=d)
        t[p + "attn_output.weight"] = mat(d, spec.n_head * hd, fan_in=spec.n_head * hd)
        t[p + "ffn_norm.weight"] = norm(d)
        if spec.arch == "qwen3moe":
            t[p + "attn_q_norm.weight"], t[p + "attn_k_norm.weight"] = norm(hd), norm(hd)
        if spec.arch == "olmoe":
            t[p + "attn_q_norm.weight"] = norm(spec.n_head * hd)
            t[p + "attn_k_norm.weight"] = norm(spec.n_kv_head * hd)
        if i in dense_layers:
            t[p + "ffn_gate.weight"] = mat(f * E, d, fan_in=d)
            t[p + "ffn_up.weight"] = mat(f * E, d, fan_in=d)
            t[p + "ffn_down.weight"] = mat(d, f * E, fan_in=f * E)
        else:
            t[p + "ffn_gate_inp.weight"] = mat(E, d, fan_in=d) * 3
            t[p + "ffn_gate_exps.weight"] = mat(E, f, d, fan_in=d)
            t[p + "ffn_up_exps.weight"] = mat(E, f, d, fan_in=d)
            t[p + "ffn_down_exps.weight"] = mat(E, d, f, fan_in=f)
    return t
