"""`tandem-bench fleet`: sizing a fleet end to end, --validate against a capacity run, a missing extra."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import fleet as bench_fleet
from bench.cli import main as bench_main
from sim import fleet as F
from sim.latency import TARGETS

ROOT = Path(__file__).resolve().parent.parent


def test_fleet_is_a_bench_suite_with_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["fleet", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--gpu-price-per-hour" in out and "--validate" in out and "--capacity-json" in out


def test_a_bad_mix_is_one_line_and_exit_2(tmp_path, capsys):
    assert bench_main(["fleet", "--links", "moon=1", "--json", str(tmp_path / "f.json")]) == 2
    assert capsys.readouterr().err.strip() == ("tandem-bench fleet: link mix: unknown link 'moon'; known: "
                                               "3g, 5g, lan, lte, picospec-wan, satellite, wifi")


def test_fleet_sizes_a_small_fleet_end_to_end(tmp_path, capsys):
    out = tmp_path / "fleet.json"
    assert bench_main(["fleet", "--devices", "60", "--slo", "10", "--window", "3", "--warmup", "1",
                       "--links", "wifi=2,lte=1", "--sample", "120", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"cloud-only", "picospec"}
    for r in rows.values():
        assert r["replicas"] == math.ceil(60 / r["sessions_per_replica"]) and r["gpus"] == r["replicas"]
        assert r["usd_per_million_tokens"] > 0 and r["admitted"] + r["refused"] == 60
    links = {r["name"]: r["share"] for r in data["mix"] if r["kind"] == "link (RTT, s)"}
    assert links == pytest.approx({"wifi": 2 / 3, "lte": 1 / 3})
    assert "| cloud-only |" in capsys.readouterr().out


CAPACITY = {
    "rows": [
        {"target": "emulated:qwen3-32b-a100", "gpu": "a100-80gb", "dataset": "humaneval", "profile": "picospec-wan",
         "mode": "cloud-only", "n_sessions": 4, "session_tokens_per_s_p50": 13.0, "session_tokens_per_s_p10": 12.8,
         "aggregate_tokens_per_s": 52.0, "acceptance_rate": None, "inter_token_p99_s": 0.09,
         "tokens_per_pass": 4.0, "real_over_modelled": 1.02},
        {"target": "emulated:qwen3-32b-a100", "gpu": "a100-80gb", "dataset": "humaneval", "profile": "picospec-wan",
         "mode": "picospec", "n_sessions": 4, "session_tokens_per_s_p50": 25.0, "session_tokens_per_s_p10": 21.0,
         "aggregate_tokens_per_s": 96.0, "acceptance_rate": 0.85, "inter_token_p99_s": 0.3,
         "tokens_per_pass": 14.0, "real_over_modelled": 1.05},
        {"target": "smollm2-135m", "gpu": None, "dataset": "humaneval", "profile": "picospec-wan",
         "mode": "cloud-only", "n_sessions": 4, "session_tokens_per_s_p50": 40.0, "session_tokens_per_s_p10": 38.0,
         "aggregate_tokens_per_s": 150.0, "acceptance_rate": None, "inter_token_p99_s": 0.05,
         "tokens_per_pass": 4.0, "real_over_modelled": None},
    ],
    "capacity": {"cloud-only": 8, "picospec": 12},
}


def validate_args(tmp_path, capacity_json):
    ap = argparse.ArgumentParser()
    bench_fleet.add_args(ap)
    return ap.parse_args(["--validate", "--capacity-json", str(capacity_json), "--json", str(tmp_path / "v.json"),
                          "--window", "10"])


def test_validate_writes_measured_beside_simulated(tmp_path):
    cap = tmp_path / "capacity.json"
    cap.write_text(json.dumps(CAPACITY))
    never = lambda path: pytest.fail("capacity exists: it must not be run")      # noqa: E731
    assert bench_fleet.run_validate(validate_args(tmp_path, cap), make=never) == 0
    data = json.loads((tmp_path / "v.json").read_text())
    rows = data["validation"]
    assert [r["mode"] for r in rows] == ["cloud-only", "picospec"]
    for r in rows:
        assert {"mode", "n_sessions", "measured_tokens_per_s", "simulated_tokens_per_s", "measured_p10",
                "simulated_p10"} <= set(r)
    cloud = rows[0]
    t4 = TARGETS["qwen3-32b-a100"].forward_s(4, 4 * F.CONTEXT0)
    assert cloud["simulated_tokens_per_s"] == pytest.approx(4 / t4, rel=0.03)
    assert cloud["measured_tokens_per_s"] == 52.0
    assert cloud["error_tokens_per_s_pct"] == pytest.approx(100 * (cloud["simulated_tokens_per_s"] - 52) / 52)
    assert rows[1]["simulated_tokens_per_s"] > cloud["simulated_tokens_per_s"]      # speculation pays here
    assert [s["target"] for s in data["skipped"]] == ["smollm2-135m"]


def test_validate_gives_each_session_its_measured_acceptance():
    """The same mean acceptance, once spread over the sessions as measured: the slow session's
    lower acceptance shows in the simulated p10, not only in the aggregate."""
    row = dict(CAPACITY["rows"][1], acceptance_rate=0.6)
    even, _ = bench_fleet.validate({"rows": [row]}, window_s=30.0)
    spread, _ = bench_fleet.validate({"rows": [dict(row, session_acceptance=[0.9, 0.9, 0.6, 0.0])]}, window_s=30.0)
    assert spread[0]["simulated_p10"] < 0.9 * even[0]["simulated_p10"]
    # a run without the per-session figures (or with a missing one) falls back on the mean
    partial, _ = bench_fleet.validate({"rows": [dict(row, session_acceptance=[None, 0.6, 0.6, 0.6])]},
                                      window_s=30.0)
    assert partial[0]["simulated_tokens_per_s"] == pytest.approx(even[0]["simulated_tokens_per_s"])


def test_validate_says_what_to_do_when_capacity_cannot_run(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    ran = []

    def failing(path):
        ran.append(path)
        return subprocess.CompletedProcess([], 2, "", "tandem-bench: error: argument suite: invalid choice: "
                                                      "'capacity'\n")
    assert bench_fleet.run_validate(validate_args(tmp_path, missing), make=failing) == 2
    assert ran == [missing]
    err = capsys.readouterr().err
    assert f"no capacity results at {missing}" in err and "invalid choice: 'capacity'" in err
    assert "--capacity-json FILE" in err and not (tmp_path / "v.json").exists()


def test_validate_rejects_a_file_that_is_not_a_capacity_run(tmp_path, capsys):
    bad = tmp_path / "capacity.json"
    bad.write_text(json.dumps([{"mode": "cloud-only"}]))
    assert bench_fleet.run_validate(validate_args(tmp_path, bad)) == 2
    assert "no `rows` list" in capsys.readouterr().err


def test_without_simpy_the_suite_names_the_extra_in_one_line():
    script = ("import sys; sys.modules['simpy'] = None\n"
              "from bench.cli import main\n"
              "sys.exit(main(['fleet', '--devices', '1', '--json', '/nonexistent/fleet.json']))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["tandem-bench fleet: this needs simpy, which is not installed: "
                                             "pip install 'tandem[bench]'"]


def test_validate_runs_the_capacity_runs_requests_where_it_can():
    """A row that says how long its sessions were is simulated as the run was made: one
    request each, prompts prefilled first. A long prompt among them slows the others' streams
    (its chunks share their passes); without the lengths the steady state stands in."""
    row = dict(CAPACITY["rows"][0], tokens_per_session=24)
    # one run: with seed 0 the long prompt is prefilled after the short ones, beside their streams
    short, _ = bench_fleet.validate({"rows": [dict(row, session_prompt_tokens=[10, 10, 10, 10])]}, seeds=1)
    mixed, _ = bench_fleet.validate({"rows": [dict(row, session_prompt_tokens=[10, 10, 10, 900])]}, seeds=1)
    assert short[0]["protocol"] == mixed[0]["protocol"] == "requests"
    assert short[0]["simulated_p10"] == pytest.approx(1 / TARGETS["qwen3-32b-a100"].forward_s(4, 4 * 20), rel=0.05)
    assert mixed[0]["simulated_p10"] < 0.95 * short[0]["simulated_p10"]
    steady, _ = bench_fleet.validate({"rows": [CAPACITY["rows"][0]]})
    assert steady[0]["protocol"] == "steady"


def test_validate_compares_the_models_mean_over_seeds():
    """The model's figure is the mean of --seeds runs, each a different draw of acceptance."""
    row = dict(CAPACITY["rows"][1], tokens_per_session=24, session_prompt_tokens=[10, 10, 10, 10])
    one = [bench_fleet.validate({"rows": [row]}, seed=k, seeds=1)[0][0] for k in range(3)]
    mean, _ = bench_fleet.validate({"rows": [row]}, seed=0, seeds=3)
    assert len({r["simulated_tokens_per_s"] for r in one}) > 1, "seeds draw differently"
    assert mean[0]["seeds"] == 3
    assert mean[0]["simulated_tokens_per_s"] == pytest.approx(sum(r["simulated_tokens_per_s"] for r in one) / 3)
    assert mean[0]["simulated_p10"] == pytest.approx(sum(r["simulated_p10"] for r in one) / 3)


def test_validate_replays_each_sessions_accept_path():
    """Rows that carry where each session's drafts were accepted are simulated with those
    outcomes: one session whose drafts all fail runs slower than the same session whose drafts
    all pass, at the same mean acceptance for the row."""
    row = dict(CAPACITY["rows"][1], tokens_per_session=24, session_prompt_tokens=[10, 10, 10, 10],
               session_acceptance=[0.5] * 4)
    hit, miss = "1" * 40, "1" + "0" * 39
    good, _ = bench_fleet.validate({"rows": [dict(row, session_accept_path=[hit] * 4)]}, seeds=1)
    bad, _ = bench_fleet.validate({"rows": [dict(row, session_accept_path=[hit, hit, hit, miss])]}, seeds=1)
    assert bad[0]["simulated_p10"] < 0.8 * good[0]["simulated_p10"]
    assert bad[0]["simulated_tokens_per_s"] < good[0]["simulated_tokens_per_s"]


def test_validate_recomputes_an_older_runs_prompt_lengths():
    """Rows from before session_prompt_tokens: session i ran prompt i of the dataset as loaded
    for the run's largest N, tokenized as the run did."""
    from bench import datasets
    from edge.llama_model import Tokenizer
    from edge.model_files import shipped_gguf
    row = dict(CAPACITY["rows"][0], dataset="mtbench", tokens_per_session=8)
    lengths = bench_fleet.run_prompts({"rows": [row]})["mtbench"]
    tok = Tokenizer(shipped_gguf())
    assert lengths == [len(tok.encode(p.text, raw=p.raw)) for p in datasets.load("mtbench", 4)]
    rows, _ = bench_fleet.validate({"rows": [row]})
    assert rows[0]["protocol"] == "requests"
