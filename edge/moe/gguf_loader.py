"""Read MoE GGUFs in llama.cpp's layouts, memory-mapped.

Supported: `llama` with `ffn_gate_inp` + `ffn_{gate,up,down}_exps` (Mixtral
style; layers without a router are dense), `qwen3moe` and `olmoe`. Expert
tensors stay in the mmap: `expert_raw` hands out zero-copy views so the
expert store can charge a storage model for reading them.

The math of each layout is llama.cpp's, not the original framework's, so
our logits can be checked against llama.cpp on the same file:
- llama: NORM rope (adjacent pairs; HF converters permute Q/K rows for it),
  softmax over all experts, top-k, renormalise over the chosen k.
- qwen3moe: NEOX rope (halves), per-head RMSNorm on q and k, renormalised.
- olmoe: NEOX rope, RMSNorm on the full q and k vectors, *not* renormalised.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import gguf
from gguf.quants import dequantize

ARCHS = ("llama", "qwen3moe", "olmoe")

# Our own metadata (llama.cpp ignores unknown keys).
KEY_ROUTER_SCALE = "tandem.moe.router_scale"   # router logits were multiplied by this
KEY_SOURCE = "tandem.moe.source"


class GGUFError(ValueError):
    """A GGUF we cannot run: corrupt, truncated, unknown layout."""


@dataclass
class MoEConfig:
    arch: str
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_vocab: int
    n_expert: int
    n_ff_exp: int
    expert_used: list[int]        # per layer (llama.cpp allows an array)
    rms_eps: float
    rope_base: float
    n_ctx_train: int
    router_scale: float = 1.0     # importance = softmax(logits / router_scale)
    moe_layers: list[int] = field(default_factory=list)
    rope_neox: bool = False
    qk_norm: str = "none"         # none | head | full
    norm_topk: bool = True
    weights_scale: float = 1.0

    def __post_init__(self):
        # llama.cpp selects top-k with layer 0's count in every layer and
        # aggregates the first expert_used[il] of that sorted list.
        self.k_graph = self.expert_used[0] if self.expert_used else 0


def _scalar(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise GGUFError(f"missing metadata key {key!r}")
        return default
    return f.contents()


class GGUFModel:
    """An opened MoE GGUF: config, dense tensors on demand, expert views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no such model file: {self.path}")
        size = self.path.stat().st_size
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # the reader raises many kinds on garbage
            raise GGUFError(f"{self.path}: not a readable GGUF file "
                            f"(corrupt or truncated?): {exc}") from exc
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(f"{self.path}: truncated: tensor {t.name} ends at byte "
                                f"{t.data_offset + t.n_bytes}, file has {size}")
        self.cfg = self._read_config()
        self._check_tensors()

    # ---- metadata -------------------------------------------------------
    def _read_config(self) -> MoEConfig:
        r = self.reader
        arch = str(_scalar(r, "general.architecture"))
        if arch not in ARCHS:
            raise GGUFError(f"{self.path}: unknown architecture {arch!r}; "
                            f"the MoE runtime supports {', '.join(ARCHS)}")
        a = arch
        n_expert = int(_scalar(r, f"{a}.expert_count", 0))
        if n_expert <= 0:
            raise GGUFError(f"{self.path}: {arch} file without experts "
                            f"({a}.expert_count missing or 0): not a MoE model")
        n_layer = int(_scalar(r, f"{a}.block_count"))
        used = _scalar(r, f"{a}.expert_used_count")
        used = [int(u) for u in used] if isinstance(used, list) else [int(used)] * n_layer
        d = int(_scalar(r, f"{a}.embedding_length"))
        n_head = int(_scalar(r, f"{a}.attention.head_count"))
        head_dim = int(_scalar(r, f"{a}.attention.key_length", d // n_head))
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise GGUFError(f"{self.path}: missing tensor token_embd.weight")
        moe_layers = [i for i in range(n_layer) if f"blk.{i}.ffn_gate_inp.weight" in self.tensors]
        probe = self.tensors.get(f"blk.{moe_layers[0]}.ffn_up_exps.weight") if moe_layers else None
        if probe is None:
            raise GGUFError(f"{self.path}: no layer has ffn_gate_inp + ffn_up_exps tensors")
        if arch != "llama" and len(moe_layers) != n_layer:
            raise GGUFError(f"{self.path}: {arch} needs experts in every layer")
        return MoEConfig(
            arch=arch, n_layer=n_layer, d_model=d, n_head=n_head,
            n_kv_head=int(_scalar(r, f"{a}.attention.head_count_kv", n_head)),
            head_dim=head_dim, n_vocab=int(emb.shape[1]), n_expert=n_expert,
            n_ff_exp=int(probe.shape[1]), expert_used=used,
            rms_eps=float(_scalar(r, f"{a}.attention.layer_norm_rms_epsilon")),
            rope_base=float(_scalar(r, f"{a}.rope.freq_base", 10000.0)),
            n_ctx_train=int(_scalar(r, f"{a}.context_length", 2048)),
            router_scale=float(_scalar(r, KEY_ROUTER_SCALE, 1.0)),
            moe_layers=moe_layers,
            rope_neox=arch in ("qwen3moe", "olmoe"),
            qk_norm={"llama": "none", "qwen3moe": "head", "olmoe": "full"}[arch],
            norm_topk=arch != "olmoe",
            weights_scale=float(_scalar(r, f"{a}.expert_weights_scale", 1.0)) if arch != "llama" else 1.0,
        )

    def _check_tensors(self) -> None:
        c = self.cfg
        need = ["output_norm.weight"]
        for i in range(c.n_layer):
            p = f"blk.{i}."
            need += [p + n for n in ("attn_norm.weight", "attn_q.weight", "attn_k.weight",
                                     "attn_v.weight", "attn_output.weight", "ffn_norm.weight")]
            if i in c.moe_layers:
                need += [p + n for n in ("ffn_gate_inp.weight", "ffn_gate_exps.weight",
                                         "ffn_up_exps.weight", "ffn_down_exps.weight")]
            else:
                need += [p + n for n in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")]
            if c.qk_norm != "none":
                need += [p + "attn_q_norm.weight", p + "attn_k_norm.weight"]
        missing = [n for n in need if n not in self.tensors]
        if missing:
            raise GGUFError(f"{self.path}: {c.arch} layout is missing {len(missing)} tensors, "
                            f"e.g. {missing[:3]}")
        for i in c.moe_layers:
            for kind in ("gate", "up", "down"):
                t = self.tensors[f"blk.{i}.ffn_{kind}_exps.weight"]
                if int(t.shape[-1]) != c.n_expert:
                    raise GGUFError(f"{self.path}: {t.name} has {t.shape[-1]} experts, "
                                    f"metadata says {c.n_expert}")

    def meta(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    # ---- tensors --------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def dense(self, name: str) -> np.ndarray:
        """A whole tensor dequantised to float32, numpy order (rows, cols)."""
        t = self.tensors[name]
        return _to_f32(t.data, t.tensor_type)

    def expert_raw(self, layer: int, kind: str, e: int) -> tuple[np.ndarray, object]:
        """Zero-copy view of one expert's matrix in the mmap, plus its GGML type.

        kind: gate | up (n_ff, d) or down (d, n_ff), i.e. torch Linear layout."""
        t = self.tensors[f"blk.{layer}.ffn_{kind}_exps.weight"]
        return t.data[e], t.tensor_type

    def expert_nbytes(self, layer: int) -> int:
        """On-file bytes of one expert (gate + up + down)."""
        return sum(self.tensors[f"blk.{layer}.ffn_{k}_exps.weight"].n_bytes
                   for k in ("gate", "up", "down")) // self.cfg.n_expert

    def close(self) -> None:
        # GGUFReader holds a numpy memmap; dropping references unmaps it.
        self.tensors = {}
        self.reader = None


def _to_f32(data: np.ndarray, ttype) -> np.ndarray:
    if ttype == gguf.GGMLQuantizationType.F32:
        return np.asarray(data, dtype=np.float32)
    return np.asarray(dequantize(data, ttype), dtype=np.float32)


def expert_to_f32(raw: np.ndarray, ttype) -> np.ndarray:
    return _to_f32(raw, ttype)
