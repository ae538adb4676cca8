"""`tandem-bench moe`: whether a DyMoE mechanism earns its place, from its ablation row."""
from bench.moe import _verdicts


def _row(policy, tpot, ttft, agree, n=3):
    return {"policy": policy, "budget_pct": 25, "storage": "sd-card", "tpot_s": tpot[1], "ttft_s": ttft[1],
            "tpot_range_s": [tpot[0], tpot[2]], "ttft_range_s": [ttft[0], ttft[2]],
            "top1_agreement": agree, "agreement_texts": n}


def test_a_mechanism_earns_its_place_only_beyond_the_spread():
    d = _row("dymoe", (0.20, 0.21, 0.22), (0.50, 0.55, 0.60), 0.97, n=8)
    d["top1_agreement_ablation_texts"] = 0.96
    rows = [d,
            _row("dymoe-no-evict", (0.23, 0.24, 0.25), (0.55, 0.56, 0.70), 0.96),      # TPOT apart
            _row("dymoe-no-prior", (0.19, 0.21, 0.23), (0.45, 0.55, 0.65), 0.96),      # overlaps
            _row("dymoe-no-importance", (0.20, 0.21, 0.22), (0.50, 0.55, 0.60), 0.95),  # 0.01 of 200: 2 positions
            _row("dymoe-no-batch", (0.15, 0.16, 0.17), (0.50, 0.55, 0.60), 0.96),      # faster without
            # Off by default: the row has it on, dymoe is the ablation.
            _row("dymoe-with-prefetch", (0.20, 0.21, 0.22), (0.30, 0.31, 0.32), 0.96)]
    _verdicts(rows, {3: 200})
    by = {r["policy"]: r for r in rows[1:]}
    assert by["dymoe-no-evict"]["earns_place"] and "TPOT" in by["dymoe-no-evict"]["verdict"]
    assert not by["dymoe-no-prior"]["earns_place"] and "spread" in by["dymoe-no-prior"]["verdict"]
    assert by["dymoe-no-importance"]["verdict"] == "earns its place: agreement"
    assert not by["dymoe-no-batch"]["earns_place"] and "without it faster, TPOT" in by["dymoe-no-batch"]["verdict"]
    assert by["dymoe-with-prefetch"]["earns_place"] and by["dymoe-with-prefetch"]["mechanism"] == "prefetch"
    assert by["dymoe-with-prefetch"]["verdict"] == "earns its place: TTFT"
    assert "verdict" not in d
