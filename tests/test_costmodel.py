"""The roofline cost model of a target's batched pass, and the profiles built on it."""
from __future__ import annotations

import pytest

from sim import costmodel as cm
from sim.latency import (DEFAULT_BLOCK, LatencyProfile, RooflineProfile, TARGETS, Hold, default_kv_tokens,
                         lookup)

A100, H100 = cm.GPUS["a100-80gb"], cm.GPUS["h100-sxm"]
ROOFLINE = [p for p in TARGETS.values() if isinstance(p, RooflineProfile)]


def test_model_specs_give_the_published_parameter_counts():
    # Model cards: Qwen3-32B 32.8B, Llama-3.1-70B 70.6B, Llama-3.1-8B 8.0B, Llama-2-7B 6.7B, Llama-2-70B 69.0B.
    for name, billions in [("qwen3-32b", 32.8), ("llama-3.1-70b", 70.6), ("llama-3.1-8b", 8.0),
                           ("llama-2-7b", 6.7), ("llama-2-13b", 13.0), ("llama-2-70b", 69.0)]:
        assert cm.MODELS[name].params / 1e9 == pytest.approx(billions, abs=0.05), name
    assert cm.MODELS["qwen3-32b"].kv_bytes_per_token() == 2 * 64 * 8 * 128 * 2      # 256 KiB


def test_fit_reproduces_the_paper_rates_at_one_token():
    assert 1 / TARGETS["qwen3-32b-a100"].forward_s(1, cm.PAPER_CONTEXT) == pytest.approx(13.9, rel=1e-6)
    assert 1 / TARGETS["llama-70b-a100"].forward_s(1, cm.PAPER_CONTEXT) == pytest.approx(6.9, rel=1e-6)
    # and without kv_tokens, one token is priced at the paper's context
    assert default_kv_tokens(1) == cm.PAPER_CONTEXT
    assert 1 / TARGETS["qwen3-32b-a100"].forward_s(1) == pytest.approx(13.9, rel=1e-6)


def test_fitted_efficiencies_are_physically_plausible():
    for st in (cm.PICOSPEC, cm.SERVING):
        assert 0.3 < st.eta_bw < 0.95 and 0.4 < st.eta_flop < 0.95 and 0 <= st.layer_s < 1e-3, st
    assert 0 < cm.SERVING.allreduce_s < 100e-6
    # the paper's stack streams weights well below a serving engine, and pays far more per layer
    assert cm.PICOSPEC.eta_bw < cm.SERVING.eta_bw and cm.PICOSPEC.layer_s > 5 * cm.SERVING.layer_s


def test_bf16_is_the_precision_the_paper_rates_imply():
    """13.9 tok/s streaming bf16 Qwen3-32B needs ~44 % of an A100-80GB's bandwidth even with no
    other cost: plausible for an eager stack. int8 or int4 weights would need 22 % or 11 %."""
    streamed = cm.MODELS["qwen3-32b"].streamed_params
    for bytes_per_weight, lo, hi in [(2, 0.40, 0.50), (1, 0.20, 0.25), (0.5, 0.10, 0.125)]:
        assert lo < streamed * bytes_per_weight * 13.9 / A100.hbm_bytes_s < hi
    assert streamed * 2 > 40 * cm.GiB            # and bf16 does not fit an A100-40GB


def test_time_is_monotone_in_tokens_and_kv():
    for p in ROOFLINE:
        d = p.deployment
        for k in (0, 512, 8192, 65536):
            ts = [d.pass_s(n, k) for n in (1, 2, 8, 32, 128, 256, 1024, 4096)]
            assert all(a < b for a, b in zip(ts, ts[1:])), (p.name, k)
        for n in (1, 64, 512):
            ts = [d.pass_s(n, k) for k in (0, 512, 4096, 32768, 262144)]
            assert all(a < b for a, b in zip(ts, ts[1:])), (p.name, n)
        ts = [p.forward_s(n) for n in range(1, 300)]
        assert all(a <= b for a, b in zip(ts, ts[1:])), p.name


def test_knee_lands_on_the_ridge_derived_from_the_specs():
    for p in ROOFLINE:
        d = p.deployment
        g, st = d.gpu, d.stack
        # ridge: 2·P·n / F' = P·w / BW'  ->  n* = (F'/BW')·w/2
        ridge = (g.bf16_flops * st.eta_flop) / (g.hbm_bytes_s * st.eta_bw) * d.weight_bytes / 2
        assert d.knee_tokens() == pytest.approx(ridge)
        n = round(ridge)
        at = d.terms(n, 0)
        assert at["gemm"] == pytest.approx(at["weights"], rel=0.01)
        below, above = d.terms(n // 4, 0), d.terms(4 * n, 0)
        assert below["weights"] > 3 * below["gemm"] and above["gemm"] > 3 * above["weights"]
        # In the max (perfect-overlap) form the knee is the kink: flat below, slope 2P/F' above.
        flat = d.pass_s(n // 2, 0, overlap=True) - d.pass_s(1, 0, overlap=True)
        steep = d.pass_s(4 * n, 0, overlap=True) - d.pass_s(2 * n, 0, overlap=True)
        slope = 2 * d.model.streamed_params / d.tp / (g.bf16_flops * st.eta_flop)
        assert flat < 0.05 * d.pass_s(1, 0) and steep == pytest.approx(2 * n * slope, rel=0.02)
    # H100's ridge sits further out than A100's: more FLOP/s per byte/s
    assert TARGETS["qwen3-32b-h100"].deployment.knee_tokens() > TARGETS["qwen3-32b-a100"].deployment.knee_tokens()


def test_parallelism_is_chosen_where_a_model_does_not_fit():
    for g in (A100, H100):
        assert cm.gpus_needed(cm.MODELS["llama-3.1-8b"], g) == 1
        assert cm.gpus_needed(cm.MODELS["qwen3-32b"], g) == 1
        assert cm.gpus_needed(cm.MODELS["llama-3.1-70b"], g) == 2        # 141 GB of bf16 weights
        assert cm.gpus_needed(cm.MODELS["llama-3.1-70b"], g, weight_bytes=1) == 1
    m = cm.MODELS["qwen3-32b"]
    assert cm.gpus_needed(m, A100, kv_budget_tokens=100_000) == 2        # a large KV budget spills it
    for name, gpus in [("qwen3-32b-a100", 1), ("llama-70b-a100", 2), ("llama-70b-h100", 2), ("llama-8b-h100", 1)]:
        d = TARGETS[name].deployment
        assert d.gpus == gpus and d.kv_capacity_tokens() >= cm.KV_BUDGET_TOKENS, name
    # Split two ways, a 70B pass streams 70 GB per GPU: tensor parallel halves the weights term.
    ll = cm.MODELS["llama-3.1-70b"]
    pp, tp = cm.Deployment(ll, A100, cm.SERVING, pp=2), cm.Deployment(ll, A100, cm.SERVING, tp=2)
    assert tp.terms(1, 512)["weights"] == pytest.approx(pp.terms(1, 512)["weights"] / 2)
    assert tp.pass_s(1, 512) < 0.6 * pp.pass_s(1, 512)


def test_lookup_finds_every_profile_and_the_linear_ones_keep_their_numbers():
    for name in TARGETS:
        assert lookup(TARGETS, name, "target") is TARGETS[name]
    for name in ("qwen3-32b-a100", "llama-70b-a100", "qwen3-32b-h100", "llama-70b-h100",
                 "llama-8b-a100", "llama-8b-h100"):
        assert isinstance(TARGETS[name], RooflineProfile)
    old = {"qwen3-32b-a100-linear": (0.0700, 0.0019), "llama-70b-a100-linear": (0.1420, 0.0029)}
    for name, (a, b) in old.items():
        p = TARGETS[name]
        assert isinstance(p, LatencyProfile) and (p.a_s, p.b_s) == (a, b)
        assert p.forward_s(10) == pytest.approx(a + 10 * b) and p.forward_s(10, kv_tokens=99999) == p.forward_s(10)
    with pytest.raises(ValueError, match="unknown target"):
        lookup(TARGETS, "gpt-5-b200", "target")


def test_custom_profiles_still_work():
    p = lookup(TARGETS, "custom:0.05+0.002", "target")
    assert (p.a_s, p.b_s) == (0.05, 0.002) and p.forward_s(4) == pytest.approx(0.058)
    with pytest.raises(ValueError):
        lookup(TARGETS, "custom:0.05", "target")


def test_roofline_profiles_linearise_for_the_planner():
    for p in ROOFLINE:
        assert p.a_s > 0 and p.b_s > 0, p.name
        assert p.a_s + p.b_s == pytest.approx(p.forward_s(1))
        assert p.a_s + DEFAULT_BLOCK * p.b_s == pytest.approx(p.forward_s(DEFAULT_BLOCK))
        assert p.b_s < 0.02 * p.a_s, p.name           # below the knee a token costs little


def test_hold_prices_a_roofline_profile(monkeypatch):
    slept = []
    monkeypatch.setattr("sim.latency.time.sleep", slept.append)
    p = TARGETS["qwen3-32b-a100"]
    with Hold(p, 8):
        pass
    assert slept and slept[0] == pytest.approx(p.forward_s(8), abs=0.005)
    with Hold(p, 8, kv_tokens=8 * 4096):                 # eight sessions of 4k tokens each
        pass
    assert slept[1] == pytest.approx(p.forward_s(8, 8 * 4096), abs=0.005) and slept[1] > slept[0]
    with Hold(TARGETS["qwen3-32b-a100-linear"], 8, kv_tokens=8 * 4096):
        pass
    assert slept[2] == pytest.approx(TARGETS["qwen3-32b-a100-linear"].forward_s(8), abs=0.005)


# --- cross-check against published batched decode (cited in sim/costmodel.py) -------------------

L7, L13, L70, L8 = (cm.MODELS[n] for n in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b"))


def published():
    """(label, deployment, batch, context per sequence, measured seconds per decode step)."""
    s = cm.SERVING
    d7, d70 = cm.Deployment(L7, A100, s), cm.Deployment(L70, A100, s, tp=4)
    rows = []
    # lmdeploy v0.1.0a1, A100-80G fp16, p50 per-token latency; context = prompt + half the output.
    for d, label, ctx, ms in [(d7, "lmdeploy llama2-7b p1/o128", 1 + 64, (9, 10, 11, 12)),
                              (d7, "lmdeploy llama2-7b p128/o2048", 128 + 1024, (10, 15, 21, 30)),
                              (d70, "lmdeploy llama2-70b tp4 p1/o128", 1 + 64, (29, 30, 32, 37)),
                              (d70, "lmdeploy llama2-70b tp4 p128/o2048", 128 + 1024, (31, 33, 36, 43))]:
        rows += [(label, d, b, ctx, t / 1e3) for b, t in zip((1, 16, 32, 64), ms)]
    # TensorRT-LLM v0.6.1 performance table, 128 in / 2048 out: step = batch / throughput.
    rows.append(("trt-llm A100 fp16 llama-7b", d7, 60, 128 + 1024, 60 / 1928))
    rows.append(("trt-llm H100 fp8 llama-7b", cm.Deployment(L7, H100, s, weight_bytes=1, kv_bytes=1),
                 112, 128 + 1024, 112 / 6818))
    # InferenceBench vLLM 0.21.0, H100 fp16 Llama-3.1-8B, median TPOT (prompt lengths short; 300 assumed).
    d8 = cm.Deployment(L8, H100, s)
    rows += [("vllm H100 llama-3.1-8b", d8, 1, 300, 6.48e-3), ("vllm H100 llama-3.1-8b", d8, 4, 300, 6.59e-3)]
    return rows


def test_batch_curve_matches_published_batched_decode_within_30_percent():
    batched = 0
    for label, d, b, ctx, t in published():
        got = d.pass_s(b, b * ctx)
        assert got == pytest.approx(t, rel=0.30), (label, b, got, t)
        if b > 1:
            batched += 1
    assert batched >= 12


def test_batch_growth_is_predicted_not_just_the_fixed_cost():
    """Fitted at batch 1 only, the model must also get how much a batch adds: lmdeploy's
    70B TP4 step grows 29 -> 43 ms from batch 1 to 64 at 1152 tokens of context."""
    for label, d, b, ctx, t in published():
        if label.startswith("lmdeploy") and b == 64:
            t1 = next(r[4] for r in published() if r[0] == label and r[2] == 1)
            growth, model = t - t1, d.pass_s(64, 64 * ctx) - d.pass_s(1, ctx)
            assert model == pytest.approx(growth, abs=0.5 * growth + 0.002), (label, model, growth)


def test_sum_form_fits_published_better_than_max():
    def err(overlap):
        rows = [r for r in published() if r[2] > 1]
        return sum(abs(d.pass_s(b, b * ctx, overlap=overlap) / t - 1) for _, d, b, ctx, t in rows) / len(rows)
    assert err(False) < err(True)
    # and the 2048-token prefill (one compute-bound pass; lmdeploy first-token latency) within 15 %
    for d, t in [(cm.Deployment(L7, A100, cm.SERVING), 0.139), (cm.Deployment(L70, A100, cm.SERVING, tp=4), 0.402)]:
        assert d.pass_s(2048, 1024, seqs=1) == pytest.approx(t, rel=0.15)


def test_serving_fit_is_what_the_cited_batch_one_figures_give():
    for m in (L7, L13):
        d = cm.Deployment(m, A100, cm.SERVING)
        assert d.pass_s(1, cm.LMDEPLOY_B1_CONTEXT, seqs=1) == pytest.approx(cm.LMDEPLOY_B1_S[m.name], rel=0.01)
    d = cm.Deployment(L70, A100, cm.SERVING, tp=4)
    assert d.pass_s(1, cm.LMDEPLOY_B1_CONTEXT, seqs=1) == pytest.approx(0.029, rel=0.01)
