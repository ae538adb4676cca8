"""`tandem-bench capacity`: the capacity rule on made-up rows, and a tiny real run
(a real emulated verifier, link-sim and load generator) whose JSON must agree with it."""
import json

import pytest

from bench.capacity import capacity, capacity_cells, gpus_of, ramp, ramp_capacity
from bench.cli import main
from bench.report import build_report, headlines


def row(n, p10, mode="picospec", dataset="mtbench", profile="picospec-wan", target="emulated:qwen3-32b-a100",
        failed=0, agg=None, gpus=1):
    return {"target": target, "dataset": dataset, "profile": profile, "mode": mode, "n_sessions": n,
            "session_tokens_per_s_p10": p10, "failed": failed, "gpus": gpus,
            "aggregate_tokens_per_s": agg if agg is not None else n * p10, "loadgen_kept_up": True}


@pytest.mark.parametrize("p10s, slo, expected", [
    ([25, 22, 18, 9], 10, 4),          # breaks at the fourth N
    ([25, 22, 18, 9], 20, 2),
    ([9, 25, 25, 25], 10, 0),          # N = 1 misses: nothing carried
    ([25, 9, 25, 25], 10, 1),          # a later recovery does not count: every smaller N must hold
    ([10, 10, 10, 10], 10, 8),         # exactly at the SLO holds
])
def test_capacity_is_the_largest_n_whose_ramp_holds(p10s, slo, expected):
    rows = [row(n, p) for n, p in zip([1, 2, 4, 8], p10s)]
    assert ramp_capacity(rows, slo)[0] == expected
    assert capacity(rows, [slo]) == {"emulated:qwen3-32b-a100": {"picospec": {f"{slo:g}": expected}}}


def test_a_failed_session_breaks_the_ramp():
    rows = [row(1, 30), row(2, 30), row(4, 30, failed=1), row(8, 30)]
    assert ramp_capacity(rows, 10)[0] == 2


def test_headline_is_the_smallest_over_datasets_and_profiles_and_goodput_is_per_gpu():
    t70 = "emulated:llama-70b-a100"
    rows = ([row(n, p, target=t70, gpus=2, agg=100.0 * n) for n, p in ((1, 30), (2, 25), (4, 15))]
            + [row(n, p, target=t70, gpus=2, profile="lte") for n, p in ((1, 30), (2, 12), (4, 5))]
            + [row(n, 14, target=t70, gpus=2, mode="cloud-only") for n in (1, 2)])
    assert capacity(rows) == {t70: {"picospec": {"10": 2, "20": 1}, "cloud-only": {"10": 2, "20": 0}}}
    cells = {(c["profile"], c["mode"], c["slo_tokens_per_s"]): c for c in capacity_cells(rows)}
    wan = cells[("picospec-wan", "picospec", 10.0)]
    assert wan["capacity"] == 4 and wan["goodput_tokens_per_s_per_gpu"] == 200.0     # 400 tok/s on 2 GPUs
    assert wan["lower_bound"] and not cells[("lte", "picospec", 10.0)]["lower_bound"]
    assert cells[("picospec-wan", "cloud-only", 20.0)]["goodput_tokens_per_s_per_gpu"] is None


def test_ramp_drops_a_mode_after_its_first_miss_and_goes_on_with_the_others():
    p10 = {"cloud-only": {1: 14, 2: 9, 4: 14}, "picospec": {1: 20, 2: 18, 4: 11, 8: 6}}
    stopped = []
    rows = ramp(["cloud-only", "picospec"], [1, 2, 4, 8, 16], 10, lambda m, n: row(n, p10[m][n], mode=m),
                lambda m, n: stopped.append((m, n)))
    assert [(r["mode"], r["n_sessions"]) for r in rows] == [
        ("cloud-only", 1), ("picospec", 1), ("cloud-only", 2), ("picospec", 2), ("picospec", 4), ("picospec", 8)]
    assert stopped == [("cloud-only", 2), ("picospec", 8)]


def test_gpus_come_from_the_targets_profile():
    assert gpus_of("emulated:qwen3-32b-a100") == ("a100-80gb", 1)
    assert gpus_of("emulated:llama-70b-a100") == ("a100-80gb", 2)     # bf16 70B: two A100s


def test_tiny_real_run_writes_consistent_json(tmp_path):
    out = tmp_path / "capacity.json"
    n_tokens = 8
    # an SLO no running session misses, so both N of both modes run whatever the machine's speed
    assert main(["capacity", "--targets", "emulated:qwen3-32b-a100", "--datasets", "mtbench", "--profiles",
                 "picospec-wan", "--modes", "cloud-only", "picospec", "--sessions", "1", "2", "--tokens",
                 str(n_tokens), "--slo", "0.001", "0.002", "--json", str(out),
                 "--target-cache", str(tmp_path / "cache")]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"rows", "capacity", "capacity_cells", "meta"}
    assert data["meta"]["target_cache"] == str(tmp_path / "cache")
    rows = data["rows"]
    assert [(r["mode"], r["n_sessions"]) for r in rows] == [
        ("cloud-only", 1), ("picospec", 1), ("cloud-only", 2), ("picospec", 2)]
    for r in rows:
        assert (r["target"], r["gpu"], r["dataset"], r["profile"]) == (
            "emulated:qwen3-32b-a100", "a100-80gb", "mtbench", "picospec-wan")
        assert r["failed"] == 0 and r["emulated"] and r["served_sessions"] == r["n_sessions"]
        assert r["served_tokens_per_s_p10"] == pytest.approx(r["session_tokens_per_s_p10"])
        assert 0 < r["session_tokens_per_s_min"] <= r["session_tokens_per_s_p10"] <= r["session_tokens_per_s_p50"]
        # every session produced exactly its tokens, over the cell's wall time
        assert r["aggregate_tokens_per_s"] * r["wall_s"] == pytest.approx(r["n_sessions"] * n_tokens)
        assert r["tokens_per_pass"] >= 1 and r["verifier_passes_per_s"] > 0 and r["inter_token_p99_s"] >= 0
        assert r["real_over_modelled"] > 0 and 0 <= r["target_cache_hit_rate"] <= 1
        assert r["modelled_pass_s"] > 0 and r["link_up_mbit_s"] > 0 and r["link_down_mbit_s"] > 0
        assert isinstance(r["loadgen_kept_up"], bool) and r["loadgen_cpu_share"] >= 0
        if r["mode"] == "cloud-only":
            assert r["acceptance_rate"] is None
            assert r["session_accept_path"] == [None] * r["n_sessions"]
        else:
            assert 0 <= r["acceptance_rate"] <= 1
            # where each session's drafts matched its output: one mark per token
            assert all(len(p) == n_tokens and set(p) <= {"0", "1"} for p in r["session_accept_path"])
    assert data["capacity"] == json.loads(json.dumps(capacity(rows, [0.001, 0.002])))
    assert data["capacity"]["emulated:qwen3-32b-a100"]["picospec"] == {"0.001": 2, "0.002": 2}
    assert out.with_suffix(".png").stat().st_size > 1000 and "## Rows" in out.with_suffix(".md").read_text()
    page, _ = build_report(tmp_path)                  # `tandem-bench report` gathers it like any suite
    assert "## capacity" in page and "### capacity: capacity_cells" in page and "| picospec |" in page
    assert len(list((tmp_path / "cache").glob("replay-*.json"))) == 1, "the replayed work is kept for a rerun"


def test_replayed_work_is_kept_and_reused(tmp_path, monkeypatch):
    import bench.loadgen as L
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    first = L.replay_work(prompts, 3, memo_dir=tmp_path)
    monkeypatch.setattr(L, "greedy_paths", lambda *a: pytest.fail("computed again"))
    assert L.replay_work(prompts, 3, memo_dir=tmp_path) == first
    with pytest.raises(pytest.fail.Exception):       # other prompts are other work
        L.replay_work([[1, 2, 3]], 3, memo_dir=tmp_path)


def test_report_headline_names_capacity_per_target_and_mode():
    data = {"rows": [], "capacity": {"emulated:llama-70b-a100": {"cloud-only": {"10": 0, "20": 0},
                                                                 "picospec": {"10": 6, "20": 1}}}}
    (line,) = headlines({"capacity": data})
    assert "llama-70b-a100: cloud-only 0, picospec 6" in line and "emulated" in line
