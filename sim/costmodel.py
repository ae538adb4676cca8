"""Roofline cost of one batched forward pass of a big target on datacenter GPUs.

The emulated verifier holds each batched pass to a modelled time. How that time
grows with the tokens in the pass decides how many edge sessions one verifier
serves, so it is modelled here from the hardware and the model, not guessed:

    t(n, K) = L·o                                         fixed cost: per-layer launches
            + [W·w/BW' + 2·P·n/F']   (/TP)                weight GEMMs
            + max(K·kv/BW', 4·L·Hq·d·K·q/F')  (/TP)       attention over the KV cache
            + L·2·(α + n·h·2·2(TP−1)/TP / NVL)  if TP > 1 all-reduces
            + (PP−1)·(α + n·h·2 / NVL)            if PP > 1 stage hand-offs

for a pass of n tokens whose sequences hold K tokens of KV cache in all (q:
queries per sequence, 1 unless told; see `Deployment.terms`). BW' = HBM bandwidth × η_bw and
F' = dense tensor FLOP/s × η_flop are the effective rates; P the parameters
streamed per pass (all but the input embedding), w bytes per weight, kv the KV
bytes per token, L layers, Hq·d the query width, h the hidden size.

Why a sum for the weight GEMMs rather than the textbook max(memory, compute)
----------------------------------------------------------------------------
A roofline takes, per kernel, the max of its memory time and its compute time;
that assumes loads and tensor-core math overlap perfectly. Attention in decode
reads each sequence's KV once and does ~Hq/Hkv FLOP per byte (8 for the models
here, far under the GPUs' ~150-300 FLOP/byte ridge), so it is memory-bound and
its max is its memory term. For the weight GEMMs this module sums the two
terms: a GEMM with n in the tens to hundreds of rows overlaps loads and MMAs
poorly, and the sum fits the published measurements cited below better than the
max (see `tests/test_costmodel.py::test_sum_form_fits_published_better_than_max`:
over the batched points below the sum's mean error is 6 %, the max's 8 %; the
max under-predicts lmdeploy's 70B TP4 batch-64 step by 19-22 % and its
128-token prefill of llama2-7b 2.5x, the sum by 27 %). The sum never exceeds
2x the max, agrees with it
far from the ridge (n=1: memory; n=2048: compute), and gives verification a
small positive per-token cost instead of zero, which the edge's planner needs.
The knee, where compute time equals weight-streaming time, is still the
roofline's ridge: n* = (F'/BW') · w / 2 tokens (`Deployment.knee_tokens`).

Fitted parameters
-----------------
Two software stacks, each fitted the same way: two published single-sequence
decode rates on two models of different size give the effective bandwidth
(slope of time against streamed bytes) and the per-layer fixed cost (intercept).

* `PICOSPEC`: the stack behind the PicoSpec paper's cloud-only rates
  (arXiv 2603.19133, "PicoSpec: A Pipelined Collaborative Speculative Decoding
  Framework for Efficient Edge-Cloud LLM Inference"): 13.9 tok/s for Qwen3-32B
  and 6.9 tok/s for Llama-70B on A100. The paper's hardware details beyond
  "A100" were not available to us; we assume A100-80GB SXM (2.039 TB/s), bf16
  weights, and a context of 512 tokens (KV reads at 512 tokens are 0.2 % of the
  pass, so the assumption hardly matters).
  - Precision: bf16 Qwen3-32B streams 63.98 GB per token; 13.9 tok/s is
    0.89 TB/s = 44 % of 2.039 TB/s with no fixed cost at all, typical of an
    eager PyTorch / HF-transformers stack (40-55 %), not of a serving engine
    (the same model under TensorRT-LLM or vLLM runs ~75-80 %, ~24 tok/s). int8
    would need 22 % and int4 11 % of peak, implausibly low; and bf16 64 GB
    does not fit an A100-40GB. So: bf16 on A100-80GB.
  - Parallelism: bf16 Llama-70B (141 GB) needs two 80 GB GPUs. 6.9/13.9 = 0.50
    is close to the ratio of bytes streamed, 63.98/139.0 = 0.46, which is what
    a *layer-split* deployment gives (HF `device_map="auto"`: the two GPUs run
    their layers one after the other, so a pass streams all 139 GB at one GPU's
    bandwidth). Tensor parallel over two GPUs would halve the bytes per GPU and
    run ~1.7x faster at the same efficiency (11.7 tok/s), far from 6.9. So
    the 70B profiles are 2 x GPU, PP = 2, no micro-batching.
  - Fit (Qwen3-32B: 64 layers, 63.98 GB; Llama-3.1-70B: 80 layers, 139.0 GB,
    plus KV at 512 tokens and the small GEMM term): η_bw = 0.529 (1.08 TB/s),
    o = 0.192 ms per layer (12.3 ms per 32B pass, 15.3 ms per 70B pass).
    η_flop cannot be fitted from decode rates (they are memory-bound); the
    GEMMs are cuBLAS in any PyTorch stack, so it takes the serving stack's.
* `SERVING`: a tuned engine (lmdeploy TurboMind v0.1, similar to
  TensorRT-LLM / vLLM), used for the cross-check only. Fitted to lmdeploy's
  A100-80G batch-1 per-token latencies for llama2-7b (9 ms) and llama2-13b
  (17 ms): η_bw = 0.790, o = 0.022 ms per layer; all-reduce latency α = 36 µs
  from its llama2-70b TP4 batch-1 latency (29 ms); η_flop = 0.774 from its
  2048-token prefill of llama2-13b (0.242 s first-token latency).
  The fits run at import (`_serving_fit`, `_paper_fit`) from the figures, so
  the constants cannot drift from their sources.

Cross-check of the batch curve (published batched decode)
---------------------------------------------------------
1. lmdeploy, "Benchmark on A100 (FP16)", docs/en/benchmark/a100_fp16.md
   (https://github.com/InternLM/lmdeploy/blob/main/docs/en/benchmark/a100_fp16.md),
   lmdeploy v0.1.0a1, A100-80G, fp16, static batches, 50th-percentile
   per-token latency (the "50%(s)" column):
     llama2-7b  TP1, prompt 1,   output 128:  batch 1/16/32/64 -> 9/10/11/12 ms
     llama2-7b  TP1, prompt 128, output 2048: batch 1/16/32/64 -> 10/15/21/30 ms
     llama2-70b TP4, prompt 1,   output 128:  batch 1/16/32/64 -> 29/30/32/37 ms
     llama2-70b TP4, prompt 128, output 2048: batch 1/16/32/64 -> 31/33/36/43 ms
   and first-token latency (one prefill pass of the prompt), llama2-7b TP1:
   prompt 2048 -> 0.139 s; llama2-70b TP4: prompt 2048 -> 0.402 s.
2. TensorRT-LLM v0.6.1 "Performance of TensorRT-LLM", docs/source/performance.md
   (https://github.com/NVIDIA/TensorRT-LLM/blob/release/0.6.1/docs/source/performance.md),
   static-batch throughput, output 2048 after a 128-token prompt (prefill is
   <1 % of the run, so step time = batch / throughput):
     A100 FP16, LLaMA 7B, TP1, batch 60:  1,928 out tok/s    -> 31.1 ms/step
     H100 FP8,  LLaMA 7B, TP1, batch 112: 6,818 out tok/s/GPU -> 16.4 ms/step
3. InferenceBench "Recipe: concurrency sweep"
   (https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/), vLLM
   0.21.0, Llama-3.1-8B-Instruct fp16 on one H100-80GB-HBM3, median TPOT:
     concurrency 1 -> 6.48 ms, concurrency 4 -> 6.59 ms
   (its concurrency-16 and -64 TPOTs, 10.9 and 46.9 ms, include prefills of
   arriving requests and client limits, so they are not used).
The test predicts each figure with the `SERVING` stack, fitted at batch 1 only,
and requires every point within ±30 %. The context for a point is the prompt
plus half the output. Errors (model vs measured), batch 16/32/64:
  llama2-7b  p1/o128   +1.4 / +3.2 / +14.8 %
  llama2-7b  p128/o2048 +5.3 / +8.0 / +21.5 %
  llama2-70b p1/o128   +4.6 / +6.0 / +5.4 %
  llama2-70b p128/o2048 -2.2 / -0.9 / -1.1 %
  TensorRT-LLM A100 7B b60 +11.6 %, H100 fp8 7B b112 +3.5 %; vLLM H100 8B c1/c4 -0.8 / -0.9 %.
The systematic gap is on the 7B at batch 64 and 60: Llama-2-7B has full
multi-head attention (32 KV heads, 512 KiB of KV per token, 38 GB read per step
at batch 64 with 1152 tokens each), and the engines read KV at a higher fraction
of peak than the weight GEMMs the efficiency was fitted on; the model prices
large KV reads a little high (conservative for capacity). The GQA models the
profiles use read 4x less KV per token.

No published batched-decode measurement of Qwen3-32B on these GPUs was found;
the cross-check covers the 7B/8B and 70B sizes, whose structure the 32B shares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

GB = 1e9
GiB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_bytes_s: float          # peak HBM bandwidth
    bf16_flops: float           # dense bf16/fp16 tensor FLOP/s (no sparsity)
    fp8_flops: float | None     # dense fp8 tensor FLOP/s, None where there is none
    memory_bytes: float
    nvlink_bytes_s: float       # per GPU, one direction
    source: str

    def flops(self, weight_bytes: float) -> float:
        if weight_bytes < 2 and self.fp8_flops:
            return self.fp8_flops
        return self.bf16_flops


GPUS = {g.name: g for g in [
    GPU("a100-80gb", 2.039e12, 312e12, None, 80 * GiB, 300e9,
        "NVIDIA A100 Tensor Core GPU datasheet, SXM4 80GB: HBM2e 2,039 GB/s, 312 TFLOPS bf16 dense, "
        "NVLink 600 GB/s (both directions)"),
    GPU("h100-sxm", 3.35e12, 989e12, 1979e12, 80 * GiB, 450e9,
        "NVIDIA H100 Tensor Core GPU datasheet, SXM5 80GB: HBM3 3.35 TB/s, 989 TFLOPS bf16 dense, "
        "1,979 TFLOPS fp8 dense, NVLink 900 GB/s (both directions)"),
]}


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int                    # SwiGLU intermediate size (three matrices)
    vocab: int
    tied: bool                  # input embedding shared with the LM head
    source: str

    @property
    def layer_params(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return 2 * q + kv + 3 * self.hidden * self.ffn     # q, o, k+v, gate/up/down

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden
        return self.layers * self.layer_params + emb * (1 if self.tied else 2)

    @property
    def streamed_params(self) -> int:
        """Read every pass: all layers and the LM head; the input embedding is only gathered."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    def kv_bytes_per_token(self, kv_bytes: float = 2) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_bytes


MODELS = {m.name: m for m in [
    Model("qwen3-32b", 64, 5120, 64, 8, 128, 25600, 151936, False,
          "Qwen/Qwen3-32B config.json (32.8B parameters)"),
    Model("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256, False,
          "meta-llama/Llama-3.1-70B config.json (70.6B parameters)"),
    Model("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256, False,
          "meta-llama/Llama-3.1-8B config.json (8.0B parameters)"),
    # For the cross-check against published measurements only.
    Model("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, False, "meta-llama/Llama-2-7b-hf config.json"),
    Model("llama-2-13b", 40, 5120, 40, 40, 128, 13824, 32000, False, "meta-llama/Llama-2-13b-hf config.json"),
    Model("llama-2-70b", 80, 8192, 64, 8, 128, 28672, 32000, False, "meta-llama/Llama-2-70b-hf config.json"),
]}


@dataclass(frozen=True)
class Stack:
    """How well a software stack uses the hardware (fitted; see the module docstring)."""
    name: str
    eta_bw: float               # fraction of peak HBM bandwidth reached streaming weights and KV
    eta_flop: float             # fraction of peak tensor FLOP/s reached by the GEMMs
    layer_s: float              # fixed cost per layer per pass (kernel launches, framework)
    allreduce_s: float          # latency of one small all-reduce / stage hand-off
    source: str


@dataclass(frozen=True)
class Deployment:
    model: Model
    gpu: GPU
    stack: Stack
    tp: int = 1                 # tensor-parallel degree (weights and KV heads split, all-reduce per layer)
    pp: int = 1                 # pipeline stages run one after another (no micro-batching)
    weight_bytes: float = 2     # 2: bf16, 1: fp8/int8
    kv_bytes: float = 2
    notes: str = field(default="", compare=False)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def terms(self, n_tokens: int, kv_tokens: int, seqs: int | None = None) -> dict[str, float]:
        """Each term of a pass's modelled time, seconds. seqs: sequences in the pass
        (default: one query per sequence, n), which sets attention FLOPs only."""
        m, g, s = self.model, self.gpu, self.stack
        n = max(1, n_tokens)
        k = max(0, kv_tokens)
        q_per_seq = n / max(1, seqs if seqs else n)
        bw = g.hbm_bytes_s * s.eta_bw
        fl = g.flops(self.weight_bytes) * s.eta_flop
        w_s = m.streamed_params * self.weight_bytes / self.tp / bw
        gemm_s = 2 * m.streamed_params * n / self.tp / fl
        kv_s = k * m.kv_bytes_per_token(self.kv_bytes) / self.tp / bw
        attn_fl_s = 4 * m.layers * m.heads * m.head_dim * k * q_per_seq / self.tp / fl
        comm = 0.0
        if self.tp > 1:
            msg = n * m.hidden * 2 * 2 * (self.tp - 1) / self.tp
            comm += 2 * m.layers * (s.allreduce_s + msg / g.nvlink_bytes_s)
        if self.pp > 1:
            comm += (self.pp - 1) * (s.allreduce_s + n * m.hidden * 2 / g.nvlink_bytes_s)
        return {"fixed": m.layers * s.layer_s, "weights": w_s, "gemm": gemm_s,
                "attention": max(kv_s, attn_fl_s), "comm": comm}

    def pass_s(self, n_tokens: int, kv_tokens: int, seqs: int | None = None, overlap: bool = False) -> float:
        """Modelled seconds for one pass. overlap=True takes the textbook max(weights, GEMM
        compute) instead of their sum (kept for comparison; see the module docstring)."""
        t = self.terms(n_tokens, kv_tokens, seqs)
        if overlap:
            return t["fixed"] + max(t["weights"], t["gemm"]) + t["attention"] + t["comm"]
        return sum(t.values())

    def knee_tokens(self) -> float:
        """Tokens per pass where GEMM compute time equals weight-streaming time (the ridge)."""
        g, s = self.gpu, self.stack
        return (g.flops(self.weight_bytes) * s.eta_flop) / (g.hbm_bytes_s * s.eta_bw) * self.weight_bytes / 2

    def kv_capacity_tokens(self, usable: float = 0.9) -> int:
        """KV tokens that fit beside the weights in `usable` of the GPUs' memory."""
        free = usable * self.gpu.memory_bytes * self.gpus - self.model.params * self.weight_bytes
        return max(0, int(free / self.model.kv_bytes_per_token(self.kv_bytes)))


def fit_bw_and_layer(points: list[tuple["Deployment", int, int, float]]) -> tuple[float, float]:
    """(η_bw, seconds per layer) that make two passes last their measured times.

    points: two (deployment, n_tokens, kv_tokens, seconds). Every other term of a
    pass (GEMM compute, communication) is taken from each deployment's stack as
    it stands; the memory terms scale as 1/η_bw and the fixed cost as layers."""
    rows = []
    for d, n, k, t in points:
        probe = Deployment(d.model, d.gpu, Stack("probe", 1.0, d.stack.eta_flop, 0.0, d.stack.allreduce_s, ""),
                           d.tp, d.pp, d.weight_bytes, d.kv_bytes)
        terms = probe.terms(n, k, seqs=1)
        mem = terms["weights"] + terms["attention"]         # memory-bound at n = 1
        rows.append((mem, d.model.layers, t - terms["gemm"] - terms["comm"]))
    (m1, l1, r1), (m2, l2, r2) = rows
    det = m1 * l2 - m2 * l1
    x = (r1 * l2 - r2 * l1) / det                           # = 1/η_bw
    o = (m1 * r2 - m2 * r1) / det
    return 1 / x, o


PAPER_CONTEXT = 512             # tokens of context assumed behind the paper's rates
PAPER_RATES = {"qwen3-32b": 13.9, "llama-3.1-70b": 6.9}    # tok/s, cloud-only, A100 (PicoSpec)

# lmdeploy v0.1.0a1 on A100-80G, fp16 (docs/en/benchmark/a100_fp16.md): batch-1 p50 per-token
# latency with prompt 1 and output 128 (mean context 65), and the 2048-token prefill of llama2-13b.
LMDEPLOY_B1_S = {"llama-2-7b": 0.009, "llama-2-13b": 0.017, "llama-2-70b": 0.029}
LMDEPLOY_13B_PREFILL_2048_S = 0.242
LMDEPLOY_B1_CONTEXT = 65


def _serving_fit() -> Stack:
    a100, m7, m13, m70 = GPUS["a100-80gb"], MODELS["llama-2-7b"], MODELS["llama-2-13b"], MODELS["llama-2-70b"]
    st = Stack("serving", 0.8, 0.7, 0.0, 0.0, "")
    for _ in range(5):          # the three fits touch each other only slightly; a few rounds settle them
        eta, o = fit_bw_and_layer([(Deployment(m, a100, st), 1, LMDEPLOY_B1_CONTEXT, LMDEPLOY_B1_S[m.name])
                                   for m in (m7, m13)])
        st = Stack("serving", eta, st.eta_flop, o, st.allreduce_s, "")
        # Prefill: one causal pass of 2048 tokens, compute-bound; solve its GEMM + attention FLOPs for η_flop.
        d = Deployment(m13, a100, Stack("probe", eta, 1.0, o, 0.0, ""))
        terms = d.terms(2048, 2048 // 2, seqs=1)            # causal: on average half the prompt is attended
        compute_at_peak = terms["gemm"] + 4 * m13.layers * m13.heads * m13.head_dim * 1024 * 2048 / a100.bf16_flops
        eta_flop = compute_at_peak / (LMDEPLOY_13B_PREFILL_2048_S - terms["fixed"] - terms["weights"])
        st = Stack("serving", eta, eta_flop, o, st.allreduce_s, "")
        # All-reduce latency: what the 70B TP4 batch-1 step leaves over its 2·80 all-reduces.
        d = Deployment(m70, a100, Stack("probe", eta, eta_flop, o, 0.0, ""), tp=4)
        alpha = (LMDEPLOY_B1_S["llama-2-70b"] - d.pass_s(1, LMDEPLOY_B1_CONTEXT, seqs=1)) / (2 * m70.layers)
        st = Stack("serving", eta, eta_flop, o, alpha, "")
    return Stack("serving", st.eta_bw, st.eta_flop, st.layer_s, st.allreduce_s,
                 "lmdeploy TurboMind v0.1 on A100-80G fp16, fitted at batch 1 and one prefill (module docstring)")


def _paper_fit(serving: Stack) -> Stack:
    a100 = GPUS["a100-80gb"]
    st = Stack("picospec", 0.5, serving.eta_flop, 0.0, serving.allreduce_s, "")
    q = Deployment(MODELS["qwen3-32b"], a100, st)
    ll = Deployment(MODELS["llama-3.1-70b"], a100, st, pp=2)
    eta, o = fit_bw_and_layer([(q, 1, PAPER_CONTEXT, 1 / PAPER_RATES["qwen3-32b"]),
                               (ll, 1, PAPER_CONTEXT, 1 / PAPER_RATES["llama-3.1-70b"])])
    return Stack("picospec", eta, serving.eta_flop, o, serving.allreduce_s,
                 "fitted to the PicoSpec paper's cloud-only rates on A100 (module docstring); "
                 "η_flop and all-reduce latency from the serving fit")


SERVING = _serving_fit()
PICOSPEC = _paper_fit(SERVING)


KV_BUDGET_TOKENS = 16 * 1024    # working KV a verifier needs at least: 16 sessions x 1k tokens
USABLE = 0.9                    # of a GPU's memory; the rest: activations, CUDA context, fragmentation


def gpus_needed(model: Model, gpu: GPU, weight_bytes: float = 2, kv_bytes: float = 2,
                kv_budget_tokens: int = KV_BUDGET_TOKENS) -> int:
    """Fewest GPUs (a power of two) whose memory holds the weights plus the working KV budget."""
    need = model.params * weight_bytes + kv_budget_tokens * model.kv_bytes_per_token(kv_bytes)
    n = max(1, math.ceil(need / (USABLE * gpu.memory_bytes)))
    return 1 << (n - 1).bit_length()
