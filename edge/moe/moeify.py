"""Turn the shipped dense SmolLM2 into a Mixtral-style MoE GGUF.

What worked (docs/dymoe.md, "The test bed"), in the order applied per layer:
1. carve: balanced k-means of the FFN's neurons on binary "in this token's
   top 25 % |activation|" markers -> E equal experts;
2. route: a linear router trained to pick the k experts that most reduce
   this token's FFN output error;
3. refit: ridge regression of all down-projections at once, routing fixed,
   tokens weighted by inverse residual-stream energy;
layers fitted in order on the MoE's *own* inputs against the dense output
plus the error accumulated so far. Layer 0 (by far the most fragile) stays
exactly dense: it is written as E experts that are all always on.

Gate weight 1 in llama.cpp's layout: llama.cpp multiplies each chosen
expert by its renormalised softmax weight. We scale the router by a tiny
`router_scale` so every weight is 1/E to ~1e-3, and scale down-projections
by E; the true router logits (for importance) are logits / router_scale.
The per-layer expert count [E, k, k, ...] makes llama.cpp sort all E and
sum the first k of each layer (layer 0: all E).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import gguf

from edge.moe.gguf_loader import KEY_SOURCE, _to_f32
from edge.moe.gguf_writer import MoESpec, write_moe
from edge.moe.model import rms_norm, rope


@dataclass
class MoeifyConfig:
    n_expert: int = 8
    top_k: int = 6
    marker_quantile: float = 0.75      # "top 25 % activation" markers
    kmeans_iters: int = 8
    cluster_tokens: int = 3000
    router_steps: int = 150
    ridge: float = 1e-2                # relative to the mean diagonal of the Gram matrix
    dense_layers: tuple[int, ...] = (0,)
    router_spread: float = 1e-3        # max logit spread llama.cpp sees after scaling
    dtype: str = "f16"
    seed: int = 0
    dedupe_prefix: bool = True         # fit the texts' shared prefix once (fit_rows)


# ---------------------------------------------------------------------------
# dense source
class Dense:
    """Dequantised dense llama weights and a full-sequence forward."""

    def __init__(self, path: Path):
        r = gguf.GGUFReader(path)
        if r.fields["general.architecture"].contents() != "llama":
            raise ValueError(f"{path}: moeify needs a dense llama-arch GGUF")
        self.t = {t.name: torch.from_numpy(_to_f32(t.data, t.tensor_type).copy()) for t in r.tensors}
        f = lambda k: r.fields[f"llama.{k}"].contents()
        self.n_layer, self.d = int(f("block_count")), int(f("embedding_length"))
        self.n_head, self.n_kv = int(f("attention.head_count")), int(f("attention.head_count_kv"))
        self.hd = self.d // self.n_head
        self.eps = float(f("attention.layer_norm_rms_epsilon"))
        self.base = float(f("rope.freq_base"))
        self.n_ctx = int(f("context_length"))
        self.n_ff = int(f("feed_forward_length"))
        if any(f"blk.{i}.ffn_gate_inp.weight" in self.t for i in range(self.n_layer)):
            raise ValueError(f"{path} is already a MoE")

    def w(self, i: int, name: str) -> torch.Tensor:
        return self.t[f"blk.{i}.{name}.weight"]

    def attn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h (T, D) residual of one sequence -> attention output (T, D)."""
        T, H, G, hd = h.shape[0], self.n_head, self.n_kv, self.hd
        x = rms_norm(h, self.w(i, "attn_norm"), self.eps)
        pos = torch.arange(T)
        q = rope((x @ self.w(i, "attn_q").T).view(T, H, hd), pos, self.base, False)
        k = rope((x @ self.w(i, "attn_k").T).view(T, G, hd), pos, self.base, False)
        v = (x @ self.w(i, "attn_v").T).view(T, G, hd)
        k, v = (t.repeat_interleave(H // G, dim=1).transpose(0, 1) for t in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True)
        return o.transpose(0, 1).reshape(T, H * hd) @ self.w(i, "attn_output").T

    def ffn_act(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x @ self.w(i, "ffn_gate").T) * (x @ self.w(i, "ffn_up").T)   # (N, F)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.t.get("output.weight", self.t["token_embd.weight"])
        return rms_norm(h, self.t["output_norm.weight"], self.eps) @ out.T


def _attn_all(src: Dense, i: int, h: torch.Tensor, lens: list[int]) -> torch.Tensor:
    outs, o = [], 0
    for n in lens:
        outs.append(src.attn(i, h[o:o + n]))
        o += n
    return torch.cat(outs)


def dense_residuals(src: Dense, texts: list[list[int]]) -> list[torch.Tensor]:
    """Residual stream before every layer and after the last, (N, D) each."""
    lens = [len(s) for s in texts]
    h = src.t["token_embd.weight"][torch.tensor([t for s in texts for t in s])]
    hs = [h]
    for i in range(src.n_layer):
        mid = h + _attn_all(src, i, h, lens)
        x = rms_norm(mid, src.w(i, "ffn_norm"), src.eps)
        h = mid + src.ffn_act(i, x) @ src.w(i, "ffn_down").T
        hs.append(h)
    return hs


# ---------------------------------------------------------------------------
# per-layer fitting
def balanced_kmeans(feat: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """feat (F, M) -> cluster id per row, exactly F/k rows per cluster."""
    n = feat.shape[0]
    cap = n // k
    feat = F.normalize(feat, dim=1)
    cent = feat[torch.randperm(n, generator=gen)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = feat @ F.normalize(cent, dim=1).T                          # (F, k)
        order = sim.flatten().argsort(descending=True)
        # Greedy by similarity in plain Python lists (tensor indexing per
        # element was ~1 s per layer).
        got, fill = [-1] * n, [0] * k
        for idx in order.tolist():
            j, c = divmod(idx, k)
            if got[j] < 0 and fill[c] < cap:
                got[j] = c
                fill[c] += 1
        assign = torch.tensor(got)
        cent = torch.stack([feat[assign == c].mean(0) for c in range(k)])
    return assign


def train_router(x: torch.Tensor, gain: torch.Tensor, k: int, steps: int) -> torch.Tensor:
    """Linear router (E, D) whose top-k matches the k experts with the largest
    error reduction `gain` (N, E) for each token."""
    target = torch.zeros_like(gain).scatter_(1, gain.topk(k, dim=1).indices, 1.0)
    # Start from the least-squares fit of the gains, then sharpen with BCE on the labels.
    xs = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
    g = (gain - gain.mean(1, keepdim=True)) / (gain.std(1, keepdim=True) + 1e-6)
    w0 = torch.linalg.lstsq(xs.double(), g.double()).solution.float()[:-1]  # (D, E)
    with torch.enable_grad():
        W = w0.T.clone().requires_grad_(True)                              # (E, D)
        opt = torch.optim.Adam([W], lr=3e-3)
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(x @ W.T, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach()


def refit_down(a: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, wt: torch.Tensor,
               down: torch.Tensor, ridge: float) -> torch.Tensor:
    """All experts' down-projections at once: minimise
    sum_t wt_t |target_t - (a_t * mask_t) @ D.T|^2 + lam |D - down|^2."""
    # Products in float32 (4x cheaper than float64 on CPU), solve in float64;
    # the ridge keeps the system well conditioned.
    A = a * mask                                                         # (N, F)
    Aw = A * wt[:, None]
    G = (Aw.T @ A).double()                                              # (F, F)
    lam = ridge * G.diagonal().mean()
    rhs = (Aw.T @ target).double() + lam * down.T.double()               # (F, D)
    G.diagonal().add_(lam)
    return torch.linalg.solve(G, rhs).T.float()                          # (D, F)


@dataclass
class LayerFit:
    order: torch.Tensor        # neuron ids, expert-major: expert e = order[e*f:(e+1)*f]
    router: torch.Tensor       # (E, D), true logits
    down: torch.Tensor         # (D, F) refit, original neuron order
    spread: float              # largest max-min router logit gap seen


def fit_layer(src: Dense, i: int, x: torch.Tensor, target: torch.Tensor, wt: torch.Tensor,
              cfg: MoeifyConfig, gen: torch.Generator, rows: torch.Tensor | None = None
              ) -> tuple[LayerFit, torch.Tensor]:
    """Fit one layer on the tokens `rows` (default all); the MoE FFN's output for every token."""
    E, k = cfg.n_expert, cfg.top_k
    x_all, a_all = x, src.ffn_act(i, x)                                  # (N, F)
    if rows is not None:
        x, target, wt, a = x[rows], target[rows], wt[rows], a_all[rows]
    else:
        a = a_all
    n_ff = a.shape[1]
    f = n_ff // E
    sub = torch.randperm(a.shape[0], generator=gen)[:cfg.cluster_tokens]
    mag = a[sub].abs()
    markers = (mag >= mag.quantile(cfg.marker_quantile, dim=1, keepdim=True)).float()
    assign = balanced_kmeans(markers.T, E, cfg.kmeans_iters, gen)
    order = torch.cat([(assign == e).nonzero().flatten() for e in range(E)])
    down = src.w(i, "ffn_down")                                          # (D, F)
    y = torch.stack([a[:, order[e * f:(e + 1) * f]] @ down[:, order[e * f:(e + 1) * f]].T
                     for e in range(E)], 1)                             # (N, E, D)
    gain = 2 * torch.einsum("nd,ned->ne", target, y) - y.pow(2).sum(-1)  # (N, E)
    router = train_router(x, gain, k, cfg.router_steps)
    logits = x @ router.T                                                # (N, E)
    sel = logits.topk(k, dim=1).indices                                  # (N, k)
    mask = torch.zeros(a.shape[0], E).scatter_(1, sel, 1.0)[:, assign]   # (N, F)
    new_down = refit_down(a, mask, target, wt, down, cfg.ridge)
    spread = (logits.max(1).values - logits.min(1).values).max().item()
    sel = (x_all @ router.T).topk(k, dim=1).indices
    mask = torch.zeros(a_all.shape[0], E).scatter_(1, sel, 1.0)[:, assign]
    return LayerFit(order, router, new_down, spread), (a_all * mask) @ new_down.T


def fit_rows(texts: list[list[int]]) -> torch.Tensor:
    """Row ids of the concatenated texts to fit on: every token once. Chat-formatted
    texts share a prefix (the system prompt), whose residuals are the same in every
    text; fitted once, it would otherwise weigh as many times as there are texts."""
    first = texts[0]
    shared = min((next((j for j, (a, b) in enumerate(zip(first, s)) if a != b), min(len(first), len(s)))
                  for s in texts[1:]), default=0)
    keep, o = [], 0
    for n, s in enumerate(texts):
        keep.append(torch.arange(o + (shared if n else 0), o + len(s)))
        o += len(s)
    return torch.cat(keep)


# ---------------------------------------------------------------------------
def moeify(source: Path, out: Path, texts: list[list[int]], cfg: MoeifyConfig, log=print) -> dict:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    src = Dense(source)
    E, k = cfg.n_expert, cfg.top_k
    if src.n_ff % E or (src.n_ff // E) % 32:
        raise ValueError(f"FFN width {src.n_ff} does not split into {E} experts "
                         f"of a multiple of 32 neurons")
    if not 1 <= k <= E:
        raise ValueError(f"top-k {k} must be between 1 and {E}")
    n_tok = sum(map(len, texts))
    log(f"[moeify] dense source {source.name}: {src.n_layer} layers, FFN {src.n_ff} "
        f"-> {E} experts x {src.n_ff // E} neurons, top-{k}; {n_tok} calibration tokens")
    hs = dense_residuals(src, texts)
    log(f"[moeify] dense pass done ({time.time() - t0:.0f}s)")
    lens = [len(s) for s in texts]
    rows = fit_rows(texts) if cfg.dedupe_prefix else None
    h = hs[0]
    fits: dict[int, LayerFit] = {}
    for i in range(src.n_layer):
        mid = h + _attn_all(src, i, h, lens)
        x = rms_norm(mid, src.w(i, "ffn_norm"), src.eps)
        if i in cfg.dense_layers:
            h = mid + src.ffn_act(i, x) @ src.w(i, "ffn_down").T
            log(f"[moeify] layer {i:2d}: kept dense (all {E} experts always on)")
            continue
        target = hs[i + 1] - mid        # dense FFN output + error accumulated so far
        wt = 1.0 / mid.pow(2).sum(-1)
        wt = wt / wt.mean()
        fits[i], ffn_out = fit_layer(src, i, x, target, wt, cfg, gen, rows)
        h = mid + ffn_out
        rel = ((hs[i + 1] - h).norm() / hs[i + 1].norm()).item()
        log(f"[moeify] layer {i:2d}: carved, routed, refit; residual error {rel:.3f} "
            f"({time.time() - t0:.0f}s)")
    spec, tensors = _to_gguf(src, fits, cfg, log)
    write_moe(out, spec, tensors, source, dtype=np.float16 if cfg.dtype == "f16" else np.float32)
    log(f"[moeify] wrote {out} ({out.stat().st_size / 1e6:.0f} MB) in {time.time() - t0:.0f}s")
    return {"seconds": time.time() - t0, "path": str(out)}


def _to_gguf(src: Dense, fits: dict[int, LayerFit], cfg: MoeifyConfig, log):
    E, k = cfg.n_expert, cfg.top_k
    f = src.n_ff // E
    # One global scale: the largest router's logit spread lands at router_spread.
    spread = max((fit.spread for fit in fits.values()), default=1.0)
    scale = cfg.router_spread / (2 * spread)       # margin for unseen inputs
    used = [E if i in cfg.dense_layers else k for i in range(src.n_layer)]
    if used[0] != E and any(u == E for u in used):
        raise ValueError("dense layers are only expressible when layer 0 is one of them")
    k_graph = used[0]
    t = {"token_embd.weight": src.t["token_embd.weight"].numpy(),
         "output_norm.weight": src.t["output_norm.weight"].numpy()}
    if "output.weight" in src.t:
        t["output.weight"] = src.t["output.weight"].numpy()
    for i in range(src.n_layer):
        p = f"blk.{i}."
        for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"):
            t[p + n + ".weight"] = src.w(i, n).numpy()
        gate, up = src.w(i, "ffn_gate"), src.w(i, "ffn_up")
        if i in fits:
            fit = fits[i]
            order, down, router = fit.order, fit.down, fit.router * scale
        else:
            order, down, router = torch.arange(src.n_ff), src.w(i, "ffn_down"), torch.zeros(E, src.d)
        idx = order.view(E, f)
        t[p + "ffn_gate_inp.weight"] = router.numpy()
        t[p + "ffn_gate_exps.weight"] = gate[idx].numpy()                     # (E, f, D)
        t[p + "ffn_up_exps.weight"] = up[idx].numpy()
        # llama.cpp weighs each expert by ~1/k_graph: pre-multiply (a power of two: exact).
        t[p + "ffn_down_exps.weight"] = (down[:, idx].permute(1, 0, 2) * k_graph).contiguous().numpy()
    spec = MoESpec("llama", src.n_layer, src.d, src.n_head, src.n_kv, src.hd, E, f, used,
                   rms_eps=src.eps, rope_base=src.base, n_ctx_train=src.n_ctx,
                   router_scale=scale,
                   extra={"name": f"SmolLM2-135M MoE {E}x top-{k} (tandem test bed)",
                          KEY_SOURCE: "moeify of the shipped SmolLM2-135M-Instruct"})
    return spec, t


def dense_logits(src: Dense, tokens: list[int]) -> torch.Tensor:
    """Dense fp32 logits (T, V) of one sequence, the reference for top-1."""
    return src.logits(dense_residuals(src, [tokens])[-1])
