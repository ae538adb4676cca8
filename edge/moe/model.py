"""The MoE transformer in torch, following llama.cpp's math for each layout.

Legend: T = new tokens, S = cached + new positions, D = d_model,
H = query heads, G = kv heads, R = H / G, hd = head dim, E = experts,
A = chosen experts, F = expert width.

Only the non-expert weights live here. Expert FFNs are computed by an
`Experts` object (all-resident reference, or the DyMoE runtime with its
cache, storage model and prefetcher), which sees the routing decision and
its gate weights, and may be told in advance what the next layer will need.

Decoding one token is memory-bound and dispatch-bound on a small CPU, so
the layout is chosen for few, large torch calls (profiled on the 30-layer
test bed: ~40 % of a token was Python and op dispatch, the rest reading
weights): q, k and v are one matrix; an expert's gate and up are one
(2F, D) matrix; rope tables are computed once per model; grouped-query
attention runs as G batched matmuls over views of the cache instead of
repeating keys and values per head; the output head is kept transposed
(D, V), the layout MKL's single-row product reads fastest (measured 1.6x
over (V, D) for the 113 MB head).
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


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(F, D), (F, D) -> (2F, D): one product gives both halves."""
    return torch.cat([gate, up]).contiguous()


# Rows from which a half-weight product is cheaper done in float32 on an
# upcast copy of the weights: this CPU's half kernel is a matrix-vector
# loop, linear in rows (measured for a 384x576 expert matrix: 1 row 35 us
# half / 52 us upcast, 4 rows 99 / 93, 32 rows 760 / 194).
HALF_MAX_ROWS = 3


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (T, in) @ w (out, in).T; the result in x's dtype (float32).
    Half weights halve the bytes a memory-bound product streams (measured
    on this 2-core CPU: 2.7x faster single-token products for expert- and
    attention-sized matrices). A few rows run in half, activations rounded
    at the product's input and output as llama.cpp does for F16 weights;
    more rows (prompts) run in float32 on an upcast copy. The residual
    stream stays float32."""
    if w.dtype is x.dtype:
        return F.linear(x, w)
    if x.shape[0] > HALF_MAX_ROWS:
        return F.linear(x, w.to(x.dtype))
    return F.linear(x.to(w.dtype), w).to(x.dtype)


def compute_copy(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w in `dtype` if that holds every value exactly (an F16 file's weights,
    or records on float16 grids), else unchanged: half never changes a weight."""
    if dtype is w.dtype:
        return w
    h = w.to(dtype)
    return h if torch.equal(h.to(w.dtype), w) else w


def expert_out(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, scale) -> torch.Tensor:
    """scale * down(silu(gate x) * up x) for x (T, D); scale a float or (T, 1).
    The gate weight scales the (T, F) activation, not the (T, D) output:
    the same product, one op fewer per expert."""
    h = linear(x, gate_up)                                            # (T, 2F)
    f = down.shape[1]
    a = F.silu(h[:, :f]).mul_(h[:, f:]).mul_(scale)
    return linear(a, down)                                            # (T, D)


def add_experts(out: torch.Tensor, x: torch.Tensor, sel: torch.Tensor, w: torch.Tensor,
                weights_of) -> None:
    """out (T, D) += sum_a w[t,a] * expert(sel[t,a])(x[t]); weights_of(e) ->
    (gate_up, down). One token: a plain loop over its chosen experts. A
    batch: each expert runs once on its tokens."""
    gw = token_gates(sel, w)
    experts = sel[0].tolist() if gw is not None else sel.unique().tolist()
    add_in_order(out, sel, {e: expert_part(x, sel, w, e, *weights_of(e), gw) for e in experts})


def token_gates(sel: torch.Tensor, w: torch.Tensor) -> dict | None:
    """One token: expert -> gate weight, read from the tensors once."""
    return dict(zip(sel[0].tolist(), w[0].tolist())) if sel.shape[0] == 1 else None


def expert_part(x: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, e: int,
                gate_up: torch.Tensor, down: torch.Tensor, gw: dict | None):
    """Expert e's weighted output for the tokens that chose it: (rows, (n, D)).
    gw: `token_gates` for one token (None for a batch)."""
    if gw is not None:
        return None, expert_out(x, gate_up, down, gw[e])
    rows, slot = (sel == e).nonzero(as_tuple=True)
    return rows, expert_out(x[rows], gate_up, down, w[rows, slot, None])


def add_in_order(out: torch.Tensor, sel: torch.Tensor, parts: dict) -> None:
    """Sum experts' parts into out in one fixed order (one token: the
    router's; a batch: expert id), whatever order they were computed in:
    float sums depend on order, and a one-ulp difference is enough to flip
    a near-tie in a later router, so an offloaded run must add exactly as
    the all-resident reference does to be comparable with it."""
    if sel.shape[0] == 1:
        for e in sel[0].tolist():
            out.add_(parts[e][1])
        return
    for e in sorted(parts):
        rows, part = parts[e]
        out.index_add_(0, rows, part)       # rows are distinct: a token picks an expert once


class ResidentExperts(Experts):
    """Every expert dequantised to float32 in memory: the quality reference."""

    def __init__(self, gm: GGUFModel | None = None, dtype: torch.dtype = torch.float32):
        self.gate_up: dict[int, torch.Tensor] = {}          # layer -> (E, 2F, D)
        self.down: dict[int, torch.Tensor] = {}             # layer -> (E, D, F)
        self.dtype = dtype
        if gm is None:
            return
        from edge.moe.gguf_loader import expert_to_f32
        for layer in gm.cfg.moe_layers:
            w = [[torch.from_numpy(expert_to_f32(*gm.expert_raw(layer, k, e)).copy())
                  for k in ("gate", "up", "down")] for e in range(gm.cfg.n_expert)]
            self.set_layer(layer, w)

    def set_layer(self, layer: int, weights: list) -> None:
        """weights[e] = (gate, up, down) float32 of each expert of `layer`."""
        self.gate_up[layer] = compute_copy(torch.stack([fuse_gate_up(g, u) for g, u, _ in weights]), self.dtype)
        self.down[layer] = compute_copy(torch.stack([d for _, _, d in weights]).contiguous(), self.dtype)

    def copy(self) -> "ResidentExperts":
        """Shares every layer's tensors; `set_layer` on the copy replaces one."""
        c = ResidentExperts(dtype=self.dtype)
        c.gate_up, c.down = dict(self.gate_up), dict(self.down)
        return c

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) of one expert (views)."""
        gu = self.gate_up[layer][e]
        f = gu.shape[0] // 2
        return gu[:f], gu[f:], self.down[layer][e]

    def ffn(self, layer, x, sel, w, imp):
        gu, dn = self.gate_up[layer], self.down[layer]
        out = torch.zeros_like(x)
        add_experts(out, x, sel, w, lambda e: (gu[e], dn[e]))
        return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_tables(n_pos: int, hd: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n_pos, hd/2) float32, angles computed in float64."""
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def rope(x: torch.Tensor, pos: torch.Tensor, base: float, neox: bool) -> torch.Tensor:
    """Reference rope. x (T, heads, hd). NORM rotates adjacent pairs (2i, 2i+1);
    NEOX rotates (i, i + hd/2): llama.cpp's two rope types."""
    hd = x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = (pos.to(torch.float64)[:, None] * inv[None, :])            # (T, hd/2)
    cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
    if neox:
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _neox_order(n_heads: int, hd: int) -> torch.Tensor:
    """Row permutation taking each head's dims (0, 1, 2, 3, ...) to
    (0, 2, 4, ..., 1, 3, 5, ...): NORM rope on the original rows equals
    NEOX rope on the permuted ones, and q.k is unchanged when q and k are
    permuted alike."""
    per = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    return (torch.arange(n_heads)[:, None] * hd + per[None, :]).flatten()


class Layer:
    def __init__(self, gm: GGUFModel, i: int, dtype: torch.dtype = torch.float32):
        c, t = gm.cfg, (lambda n: torch.from_numpy(gm.dense(f"blk.{i}.{n}.weight").copy()))
        self.attn_norm, self.ffn_norm = t("attn_norm"), t("ffn_norm")
        wq, wk, wv = t("attn_q"), t("attn_k"), t("attn_v")
        if not c.rope_neox and c.qk_norm == "none":
            wq = wq[_neox_order(c.n_head, c.head_dim)]
            wk = wk[_neox_order(c.n_kv_head, c.head_dim)]
        self.wqkv = compute_copy(torch.cat([wq, wk, wv]).contiguous(), dtype)   # ((H + 2G) hd, D)
        self.wo = compute_copy(t("attn_output"), dtype)
        self.q_norm = t("attn_q_norm") if c.qk_norm != "none" else None
        self.k_norm = t("attn_k_norm") if c.qk_norm != "none" else None
        self.moe = i in c.moe_layers
        if self.moe:
            self.router = t("ffn_gate_inp")                               # (E, D)
        else:
            self.gate_up = compute_copy(fuse_gate_up(t("ffn_gate"), t("ffn_up")), dtype)
            self.down = compute_copy(t("ffn_down"), dtype)


class MoETransformer:
    """`dtype`: the weights' compute dtype. float32 (default) follows the
    file's math to float32 noise (tests check it against llama.cpp);
    float16 holds each weight matrix whose values float16 holds exactly (an
    F16 file's, as in the SmolLM2 test bed; others stay float32) and rounds
    only the activations at each product: the drafter's fast path. Routers,
    norms, attention scores and the KV cache stay float32 either way."""

    def __init__(self, gm: GGUFModel, experts: Experts | None = None, max_ctx: int = 2048,
                 dtype: torch.dtype = torch.float32):
        torch.set_grad_enabled(False)
        self.gm = gm
        self.cfg: MoEConfig = gm.cfg
        c = self.cfg
        emb = torch.from_numpy(gm.dense("token_embd.weight").copy())     # (V, D)
        out = torch.from_numpy(gm.dense("output.weight").copy()) if gm.has("output.weight") else emb
        # float32: (D, V), the layout MKL's single-row product reads fastest;
        # half: (V, D) through `linear` (measured 3.7 ms against 5.1 for the
        # float32 (D, V) head of 113 MB).
        head = compute_copy(out, dtype)
        self._head_t = head.dtype is torch.float32
        self.output = out.T.contiguous() if self._head_t else head.contiguous()
        # A tied head serves the embedding lookups too (one row or column per token).
        self._embd = None if out is emb else emb
        self.output_norm = torch.from_numpy(gm.dense("output_norm.weight").copy())
        self.layers = [Layer(gm, i, dtype) for i in range(c.n_layer)]
        self.experts = experts if experts is not None else ResidentExperts(gm, dtype)
        self.kv = KVCache(KVCacheConfig(c.n_layer, max_ctx, c.n_kv_head, c.head_dim))
        cos, sin = rope_tables(max_ctx, c.head_dim, c.rope_base)
        # x * cos2 + swap_halves(x) * sin2 is NEOX rope in three ops.
        self._cos2 = torch.cat([cos, cos], -1)                            # (ctx, hd)
        self._sin2 = torch.cat([-sin, sin], -1)
        self.last_routing: list[torch.Tensor | None] = [None] * c.n_layer

    def sibling(self, experts: Experts, max_ctx: int | None = None) -> "MoETransformer":
        """Another model sharing this one's weights, with other experts and an
        empty cache of at most this one's context (no weights re-read)."""
        import copy
        m = copy.copy(self)
        c = self.cfg
        m.experts = experts
        m.kv = KVCache(KVCacheConfig(c.n_layer, min(max_ctx or self.kv.cfg.max_ctx, self.kv.cfg.max_ctx),
                                     c.n_kv_head, c.head_dim))
        m.last_routing = [None] * c.n_layer
        return m

    @property
    def n_past(self) -> int:
        return self.kv.n_past

    def truncate(self, n_past: int) -> None:
        self.kv.truncate(n_past)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T,) ids -> (T, D) embeddings."""
        if self._embd is not None:
            return self._embd[tokens]
        if self._head_t:
            return self.output[:, tokens].T.contiguous()
        return self.output[tokens].float()

    # ---- routing --------------------------------------------------------
    def route(self, layer: int, x: torch.Tensor):
        """x (T, D) normed. Returns sel (T, A), w (T, A), imp (T, A) as llama.cpp
        computes them: softmax over all E, top-k_graph sorted, optional
        renormalisation, then the first expert_used[layer] are summed."""
        c = self.cfg
        logits = F.linear(x, self.layers[layer].router)                 # (T, E)
        probs = logits.softmax(-1)
        p_sel, sel = probs.topk(c.k_graph, dim=-1)                        # (T, k_graph)
        if c.norm_topk:
            p_sel = p_sel / p_sel.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
        if c.weights_scale not in (0.0, 1.0):
            p_sel = p_sel * c.weights_scale
        a = c.expert_used[layer]
        if a < c.k_graph:
            sel, p_sel = sel[:, :a], p_sel[:, :a]
        # Importance ranks the chosen experts by the router's real preference,
        # undoing any scaling the file applied to make gate weights uniform.
        imp = (logits.gather(-1, sel) / c.router_scale).softmax(-1)
        return sel, p_sel, imp

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
        return self._run(self.embed(tokens), 0)

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
        cos, sin = self._cos2[start:start + T, None, :], self._sin2[start:start + T, None, :]
        # (T, S) future positions, for a batch only: one query sees everything.
        mask = (torch.arange(start + T)[None, :] > torch.arange(start, start + T)[:, None]
                if T > 1 else None)
        for i in range(first, c.n_layer):
            L = self.layers[i]
            if capture is not None:
                capture.append(h)
            h = h + self._attention(i, L, rms_norm(h, L.attn_norm, c.rms_eps), cos, sin, start, mask)
            x = rms_norm(h, L.ffn_norm, c.rms_eps)                        # (T, D)
            if L.moe:
                self._lookahead(i, h)
                sel, w, imp = self.route(i, x)
                self.last_routing[i] = sel
                h = h + self.experts.ffn(i, x, sel, w, imp)
            else:
                h = h + expert_out(x, L.gate_up, L.down, 1.0)
        self.kv.n_past = start + T
        x = rms_norm(h, self.output_norm, c.rms_eps)
        return x @ self.output if self._head_t else linear(x, self.output)   # (T, V)

    def _lookahead(self, i: int, h: torch.Tensor) -> None:
        """Predict the experts of the next layers (usually just i+1) from
        layer i's residual stream, so the fetch can overlap layer i's
        expert compute."""
        depth = self.experts.hint_depth(h.shape[0])
        for nxt in range(i + 1, min(i + 1 + depth, self.cfg.n_layer)):
            if self.layers[nxt].moe:
                x = rms_norm(h, self.layers[nxt].ffn_norm, self.cfg.rms_eps)
                sel, _, imp = self.route(nxt, x)
                self.experts.hint(nxt, sel, imp)

    def _attention(self, i: int, L: Layer, x: torch.Tensor, cos, sin, start: int, mask):
        c = self.cfg
        T, H, G, hd = x.shape[0], c.n_head, c.n_kv_head, c.head_dim
        R = H // G
        qkv = linear(x, L.wqkv)                                           # (T, (H+2G) hd)
        if c.qk_norm == "none":
            qk = qkv[:, :(H + G) * hd].view(T, H + G, hd)
        else:
            q, k = qkv[:, :H * hd], qkv[:, H * hd:(H + G) * hd]
            if c.qk_norm == "full":
                q, k = rms_norm(q, L.q_norm, c.rms_eps), rms_norm(k, L.k_norm, c.rms_eps)
            q, k = q.reshape(T, H, hd), k.reshape(T, G, hd)
            if c.qk_norm == "head":
                q, k = rms_norm(q, L.q_norm, c.rms_eps), rms_norm(k, L.k_norm, c.rms_eps)
            qk = torch.cat([q, k], 1)
        half = hd // 2
        qk = qk * cos + torch.cat([qk[..., half:], qk[..., :half]], -1) * sin   # NEOX rope
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + G) * hd:].view(T, G, hd)
        K, V = self.kv.update(i, start, k, v)                            # (G, S, hd)
        # Query heads h = g R + r share kv head g: (G, R T, hd) against (G, S, hd).
        qg = q.reshape(T, G, R, hd).permute(1, 2, 0, 3).reshape(G, R * T, hd)
        att = torch.bmm(qg, K.transpose(1, 2)).mul_(hd ** -0.5)          # (G, R T, S)
        if mask is not None:
            att = att.view(G, R, T, -1).masked_fill_(mask, float("-inf")).view(G, R * T, -1)
        o = torch.bmm(att.softmax(-1), V)                                 # (G, R T, hd)
        o = o.view(G, R, T, hd).permute(2, 0, 1, 3).reshape(T, H * hd)
        return linear(o, L.wo)                                            # (T, D)
