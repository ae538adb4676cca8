"""The MoE transformer in torch, following llama.cpp's math for each layout.

Legend: T = new tokens, S = cached + new positions, D = d_model,
H = query heads, G = kv heads, hd = head dim, E = experts, A = chosen experts.

Only the non-expert weights live here. Expert FFNs are computed by an
`Experts` object (all-resident reference, or the DyMoE runtime with its
cache, storage model and prefetcher), which sees the routing decision and
its gate weights, and may be told in advance what the next layer will need.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from edge.moe.gguf_loader import GGUFModel, MoEConfig
from edge.moe.kv_cache import KVCache, KVCacheConfig


class Experts(ABC):
    """Computes the routed expert FFN of one layer."""

    @abstractmethod
    def ffn(self, layer: int, x: torch.Tensor, sel: torch.Tensor, w: torch.Tensor,
            imp: torch.Tensor) -> torch.Tensor:
        """x (T, D) normed input; sel (T, A) expert ids; w (T, A) gate weights
        used in the sum; imp (T, A) importance (true softmax over the chosen).
        Returns sum_a w[t,a] * expert_sel[t,a](x[t]), (T, D)."""

    def hint(self, layer: int, sel: torch.Tensor, imp: torch.Tensor) -> None:
        """Predicted routing of `layer` (look-ahead); default: ignore."""

    def wants_hints(self) -> bool:
        return False

    def hint_depth(self, tokens: int) -> int:
        """How many layers ahead to hint in a pass of `tokens` tokens."""
        return 1 if self.wants_hints() else 0


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


class ResidentExperts(Experts):
    """Every expert dequantised to float32 in memory: the quality reference."""

    def __init__(self, gm: GGUFModel):
        from edge.moe.gguf_loader import expert_to_f32
        self.w = {}
        for layer in gm.cfg.moe_layers:
            for e in range(gm.cfg.n_expert):
                self.w[layer, e] = tuple(torch.from_numpy(expert_to_f32(*gm.expert_raw(layer, k, e)).copy())
                                         for k in ("gate", "up", "down"))

    def ffn(self, layer, x, sel, w, imp):
        out = torch.zeros_like(x)
        for e in sel.unique().tolist():
            rows, slot = (sel == e).nonzero(as_tuple=True)
            out[rows] += swiglu(x[rows], *self.w[layer, e]) * w[rows, slot, None]
        return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, pos: torch.Tensor, base: float, neox: bool) -> torch.Tensor:
    """x (T, heads, hd). NORM rotates adjacent pairs (2i, 2i+1); NEOX rotates
    (i, i + hd/2): llama.cpp's two rope types."""
    hd = x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = (pos.to(torch.float64)[:, None] * inv[None, :])            # (T, hd/2)
    cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
    if neox:
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class Layer:
    def __init__(self, gm: GGUFModel, i: int):
        c, t = gm.cfg, (lambda n: torch.from_numpy(gm.dense(f"blk.{i}.{n}.weight").copy()))
        self.attn_norm, self.ffn_norm = t("attn_norm"), t("ffn_norm")
        self.wq, self.wk, self.wv, self.wo = t("attn_q"), t("attn_k"), t("attn_v"), t("attn_output")
        self.q_norm = t("attn_q_norm") if c.qk_norm != "none" else None
        self.k_norm = t("attn_k_norm") if c.qk_norm != "none" else None
        self.moe = i in c.moe_layers
        if self.moe:
            self.router = t("ffn_gate_inp")                               # (E, D)
        else:
            self.gate, self.up, self.down = t("ffn_gate"), t("ffn_up"), t("ffn_down")


class MoETransformer:
    def __init__(self, gm: GGUFModel, experts: Experts | None = None, max_ctx: int = 2048):
        torch.set_grad_enabled(False)
        self.cfg: MoEConfig = gm.cfg
        c = self.cfg
        self.tok_embd = torch.from_numpy(gm.dense("token_embd.weight").copy())  # (V, D)
        self.output = (torch.from_numpy(gm.dense("output.weight").copy())
                       if gm.has("output.weight") else self.tok_embd)
        self.output_norm = torch.from_numpy(gm.dense("output_norm.weight").copy())
        self.layers = [Layer(gm, i) for i in range(c.n_layer)]
        self.experts = experts if experts is not None else ResidentExperts(gm)
        self.kv = KVCache(KVCacheConfig(c.n_layer, max_ctx, c.n_kv_head, c.head_dim))
        self.last_routing: list[torch.Tensor | None] = [None] * c.n_layer

    @property
    def n_past(self) -> int:
        return self.kv.n_past

    def truncate(self, n_past: int) -> None:
        self.kv.truncate(n_past)

    # ---- routing --------------------------------------------------------
    def route(self, layer: int, x: torch.Tensor):
        """x (T, D) normed. Returns sel (T, A), w (T, A), imp (T, A) as llama.cpp
        computes them: softmax over all E, top-k_graph sorted, optional
        renormalisation, then the first expert_used[layer] are summed."""
        c = self.cfg
        logits = x @ self.layers[layer].router.T                          # (T, E)
        probs = logits.softmax(-1)
        p_sel, sel = probs.topk(c.k_graph, dim=-1)                        # (T, k_graph)
        if c.norm_topk:
            p_sel = p_sel / p_sel.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
        if c.weights_scale not in (0.0, 1.0):
            p_sel = p_sel * c.weights_scale
        a = c.expert_used[layer]
        sel, w = sel[:, :a], p_sel[:, :a]
        # Importance ranks the chosen experts by the router's real preference,
        # undoing any scaling the file applied to make gate weights uniform.
        imp = (logits.gather(-1, sel) / c.router_scale).softmax(-1)
        return sel, w, imp

    # ---- forward --------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (T,) appended at positions n_past..; returns logits (T, V)."""
        c = self.cfg
        T = tokens.shape[0]
        if T == 0:
            raise ValueError("forward() needs at least one token")
        if int(tokens.max()) >= c.n_vocab or int(tokens.min()) < 0:
            raise ValueError(f"token id out of range for vocab {c.n_vocab}")
        self.kv.check_room(T)
        return self._run(self.tok_embd[tokens], 0)

    def forward_from(self, layer: int, h: torch.Tensor, capture: list | None = None) -> torch.Tensor:
        """Run layers `layer`.. on h (T, D), the residual stream entering
        `layer` (e.g. captured from an earlier pass of the same tokens), at
        positions n_past..; returns logits (T, V). Attention in a layer only
        reads that layer's cache, so on a fresh model this equals `forward`
        of the same tokens from `layer` on. Used by the sensitivity probe."""
        self.kv.check_room(h.shape[0])
        return self._run(h, layer, capture)

    def _run(self, h: torch.Tensor, first: int, capture: list | None = None) -> torch.Tensor:
        c = self.cfg
        T = h.shape[0]
        start = self.kv.n_past
        pos = torch.arange(start, start + T)
        for i, L in enumerate(self.layers):
            if i < first:
                continue
            if capture is not None:
                capture.append(h)
            h = h + self._attention(i, L, rms_norm(h, L.attn_norm, c.rms_eps), pos, start)
            x = rms_norm(h, L.ffn_norm, c.rms_eps)                        # (T, D)
            if L.moe:
                self._lookahead(i, h)
                sel, w, imp = self.route(i, x)
                self.last_routing[i] = sel
                h = h + self.experts.ffn(i, x, sel, w, imp)
            else:
                h = h + swiglu(x, L.gate, L.up, L.down)
        self.kv.n_past = start + T
        return rms_norm(h, self.output_norm, c.rms_eps) @ self.output.T  # (T, V)

    def _lookahead(self, i: int, h: torch.Tensor) -> None:
        """Predict the experts of the next layers (usually just i+1) from
        layer i's residual stream, so the fetch can overlap layer i's
        expert compute."""
        for nxt in range(i + 1, min(i + 1 + self.experts.hint_depth(h.shape[0]), self.cfg.n_layer)):
            if self.layers[nxt].moe:
                x = rms_norm(h, self.layers[nxt].ffn_norm, self.cfg.rms_eps)
                sel, _, imp = self.route(nxt, x)
                self.experts.hint(nxt, sel, imp)

    def _attention(self, i: int, L: Layer, x: torch.Tensor, pos: torch.Tensor, start: int):
        c = self.cfg
        T, H, G, hd = x.shape[0], c.n_head, c.n_kv_head, c.head_dim
        q, k, v = x @ L.wq.T, x @ L.wk.T, x @ L.wv.T                      # (T, H*hd), (T, G*hd)
        if c.qk_norm == "full":
            q, k = rms_norm(q, L.q_norm, c.rms_eps), rms_norm(k, L.k_norm, c.rms_eps)
        q, k, v = q.view(T, H, hd), k.view(T, G, hd), v.view(T, G, hd)
        if c.qk_norm == "head":
            q, k = rms_norm(q, L.q_norm, c.rms_eps), rms_norm(k, L.k_norm, c.rms_eps)
        q, k = rope(q, pos, c.rope_base, c.rope_neox), rope(k, pos, c.rope_base, c.rope_neox)
        K, V = self.kv.update(i, start, k, v)                            # (S, G, hd)
        S = K.shape[0]
        rep = H // G
        K = K.repeat_interleave(rep, dim=1).transpose(0, 1)               # (H, S, hd)
        V = V.repeat_interleave(rep, dim=1).transpose(0, 1)
        mask = torch.arange(S)[None, :] > pos[:, None]                    # (T, S) future
        # Plain softmax attention: for one query SDPA's CPU path was 10x slower.
        att = (q.transpose(0, 1) @ K.transpose(1, 2)) * hd ** -0.5        # (H, T, S)
        o = att.masked_fill(mask, float("-inf")).softmax(-1) @ V          # (H, T, hd)
        return o.transpose(0, 1).reshape(T, H * hd) @ L.wo.T             # (T, D)
