"""The MoE drafter held to a modelled device: compute priced by the device, expert reads
by the expert store, and a draft step split into the two.

A fake clock drives `Hold` so that nothing here depends on this machine's speed; the
end-to-end test runs a tiny random MoE through the real verifier and asserts only
bounds a loaded machine cannot break.
"""
from __future__ import annotations

import pytest

from bench import spec, spec_moe
from edge.model_files import shipped_gguf
from edge.moe.drafter import MoEDrafter, MoEDrafterConfig
from edge.moe.gguf_writer import MoESpec, random_moe, write_moe
from sim.latency import DEVICES, TARGETS, Hold, LatencyProfile
from tests.conftest import PROMPTS
from tests.test_speculative_greedy import assert_equal_to_reference, generate

DEVICE = LatencyProfile("test", 0.020, 0.005, "test")


class Clock:
    def __init__(self):
        self.t, self.slept, self.stalled = 0.0, [], 0.0

    def monotonic(self):
        return self.t

    def sleep(self, s):
        self.slept.append(s)
        self.t += s


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr("sim.latency.time.monotonic", c.monotonic)
    monkeypatch.setattr("sim.latency.time.sleep", c.sleep)
    return c


def test_a_stall_is_waited_on_top_of_the_modelled_compute_and_kept_out_of_real(clock):
    with Hold(DEVICE, 1, stall=lambda: clock.stalled) as h:
        clock.t += 0.015            # 10 ms computing, 5 ms waiting on a read
        clock.stalled += 0.005
    assert h.stall_s == pytest.approx(0.005)
    assert h.real_s == pytest.approx(0.010)
    assert h.modelled_s == pytest.approx(0.025)
    assert clock.t == pytest.approx(0.025 + 0.005)      # the device's compute, then the storage's wait


def test_compute_slower_than_the_device_is_not_stretched_and_shows_in_real(clock):
    with Hold(DEVICE, 1, stall=lambda: clock.stalled) as h:
        clock.t += 0.050
        clock.stalled += 0.010
    assert h.real_s == pytest.approx(0.040) and h.real_s > h.modelled_s
    assert clock.slept == [] and clock.t == pytest.approx(0.050)


def test_without_a_stall_clock_hold_is_unchanged(clock):
    with Hold(DEVICE, 2) as h:
        clock.t += 0.010
    assert h.stall_s == 0.0 and h.real_s == pytest.approx(0.010)
    assert clock.t == pytest.approx(0.030)


def test_the_moe_device_prices_the_test_beds_active_weights():
    d = DEVICES[spec_moe.DEVICE]
    # 0.23 GB of fp16 weights per token at 8.5 GB/s, the source says so
    assert d.forward_s(1) == pytest.approx(0.229 / 8.5 + d.b_s, rel=0.05)
    assert "114M" in d.source and "Raspberry Pi 5" in d.source


def test_limiting_term_names_what_would_make_it_pay():
    target, rtt = TARGETS["qwen3-32b-a100"], 0.05
    assert spec_moe.limiting_term(0.9, 0.010, 0.0, rtt, target) is None      # a fast, good drafter pays
    assert spec_moe.limiting_term(0.9, 0.010, 1.0, rtt, target) == "stall"
    assert spec_moe.limiting_term(0.9, 1.0, 0.010, rtt, target) == "compute"
    assert spec_moe.limiting_term(0.9, 0.5, 0.5, rtt, target) == "compute+stall"
    assert spec_moe.limiting_term(0.05, 0.010, 0.0, rtt, target) == "acceptance"
    be = spec_moe.breakeven_acceptance(0.030, rtt, target)
    assert be is not None and 0 < be < 1
    assert spec_moe.limiting_term(be + 0.02, 0.030, 0.0, rtt, target) is None
    assert spec_moe.limiting_term(max(0.0, be - 0.05), 0.030, 0.0, rtt, target) == "acceptance"
    assert spec_moe.breakeven_acceptance(5.0, rtt, target) is None


def test_moe_cells_run_only_against_emulated_targets_in_their_modes():
    cells = list(spec.plan_cells(False, ["picospec-wan"], spec.TARGETS, drafters=["draft-l29", "moe-25-sd"]))
    moe = [c for c in cells if c[3] == "moe-25-sd"]
    assert moe and all(t.startswith("emulated:") for t, *_ in moe)
    assert {c[2] for c in moe} == set(spec_moe.MODES) and all(c[4] == "off" for c in moe)
    assert any(c[3] == "draft-l29" and c[0] == "smollm2-135m" for c in cells)


def test_judge_fills_the_terms_from_the_sync_row():
    base = dict(dataset="mtbench", profile="picospec-wan", target="emulated:qwen3-32b-a100", drafter="moe-25-sd",
                draft_steps=10, draft_compute_modelled_s=0.029, draft_compute_real_s=0.020, draft_stall_s=0.5,
                acceptance_rate=0.9)
    rows = [dict(base, mode="sync", speedup=0.4),
            dict(base, mode="picospec-Q", speedup=0.93, draft_steps=0, speculated=False)]
    spec_moe.judge(rows)
    assert rows[0]["limited_by"] == "stall" and rows[0]["planner_right"] is None
    assert rows[1]["limited_by"] == "stall"          # from the sync row's step: picospec streamed
    assert rows[1]["planner_right"] is True          # streaming was right; the probe's cost shows in speedup
    rows = [dict(base, mode="sync", speedup=1.5), dict(base, mode="picospec-Q", speedup=1.0, speculated=False)]
    spec_moe.judge(rows)
    assert rows[1]["planner_right"] is False         # streamed where always speculating gained 1.5x
    rows = [dict(base, mode="sync", speedup=0.4), dict(base, mode="picospec-Q", speedup=0.9, speculated=True)]
    spec_moe.judge(rows)
    assert rows[1]["planner_right"] is False         # speculated and lost 10 %


SPEC = MoESpec("llama", 3, 64, 4, 2, 16, 8, 64, [2, 2, 2])


def test_an_emulated_moe_drafter_splits_its_steps_and_stays_exact(cloud, tokenizer, reference, tmp_path):
    path = write_moe(tmp_path / "tiny.gguf", SPEC, random_moe(SPEC, tokenizer.n_vocab, seed=5), shipped_gguf())
    drafter = MoEDrafter(MoEDrafterConfig(model=path, policy="dymoe", budget_pct=50, storage="sd-card"))
    device = DEVICES[spec_moe.DEVICE]
    try:
        prompt = tokenizer.encode(PROMPTS[0])
        ref, gaps = reference.greedy(prompt, 16)
        stall0 = drafter.stall_s
        c = generate(cloud.address, drafter, tokenizer, prompt, mode="sync", gamma=3, adaptive=False,
                     max_tokens=16, stop_at_eos=False, emulate_device=spec_moe.DEVICE)
        assert_equal_to_reference(c.tokens, ref, gaps, "emulated tiny moe")
        s = c.stats
        assert s.draft_steps > 0
        assert s.draft_modelled_s >= s.draft_steps * device.forward_s(1) - 1e-9
        assert 0.0 <= s.draft_stall_s <= drafter.stall_s - stall0 + 1e-9   # steps' waits, within the drafter's
        assert s.as_dict()["draft_stall_s"] == round(s.draft_stall_s, 4)
    finally:
        drafter.close()


def test_rows_on_fewer_prompts_compare_with_cloud_only_on_those_prompts():
    key = dict(dataset="mtbench", profile="picospec-wan", target="emulated:qwen3-32b-a100")
    rows = [dict(key, mode="cloud-only", prompts=4, tokens_per_s=10.0, tokens_per_s_first_prompts={"2": 8.0}),
            dict(key, mode="sync", prompts=4, tokens_per_s=15.0),
            dict(key, mode="picospec-Q", prompts=2, tokens_per_s=12.0),
            dict(key, mode="sync", prompts=3, tokens_per_s=12.0)]
    spec.add_speedups(rows)
    assert [r["speedup"] for r in rows] == [1.0, 1.5, 1.5, None]    # no cloud-only figure over 3 prompts


def test_a_row_predicted_to_pay_that_measured_slower_names_the_sync_rows_term():
    base = dict(dataset="mtbench", profile="picospec-wan", target="emulated:qwen3-32b-a100", drafter="moe-50-sd",
                draft_steps=10, draft_compute_modelled_s=0.029, draft_compute_real_s=0.035, draft_stall_s=0.0,
                acceptance_rate=0.6)
    rows = [dict(base, mode="sync", speedup=0.5), dict(base, mode="picospec-Q", speedup=0.88, speculated=True)]
    spec_moe.judge(rows)
    sync, pico = rows
    assert sync["limited_by"] == "compute" and sync["predicted_speedup"] < 1
    assert pico["predicted_speedup"] > 1.05                     # the model says the pipeline pays ...
    assert pico["limited_by"] == "compute" and pico["planner_right"] is False   # ... it measured not to
