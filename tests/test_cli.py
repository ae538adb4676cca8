"""The commands a user types: edge-agent and cloud-verifier as subprocesses."""
from __future__ import annotations

import json
import subprocess
import sys

from common.procs import ROOT, start_cloud

REQUIRED_STATS = {"drafted", "accepted", "acceptance_rate", "tokens_per_s", "ttft_s", "bytes_up", "bytes_down"}


def edge_agent(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_json_lines_for_n_sampled_completions_reproducible_by_seed(cloud):
    args = ["generate", "--cloud", cloud.address, "--json", "--n", "2", "--temperature", "0.8", "--top-k", "8",
            "--max-tokens", "12", "--seed", "3", "--no-adaptive", "--no-cloud-lead", "--gamma", "3", "--window", "2", "--ignore-eos",
            "Name a colour."]
    r = edge_agent(*args)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 2
    for obj in lines:
        assert {"text", "tokens", "mode", "stats"} <= set(obj)
        assert REQUIRED_STATS <= set(obj["stats"])
        assert obj["mode"] == "picospec" and len(obj["tokens"]) == 12
        assert obj["stats"]["bytes_up"] > 0 and obj["stats"]["bytes_down"] > 0
    assert lines[0]["tokens"] != lines[1]["tokens"], "completion i uses its own random stream"
    again = edge_agent(*args)
    assert [json.loads(x)["tokens"] for x in again.stdout.strip().splitlines()] == [o["tokens"] for o in lines], \
        "with mode, gamma and window fixed and no lead tokens, a seed fixes the output: decisions are keyed by (seed, position)"


def test_raw_prompt_and_cloud_only_streams_text(cloud):
    r = edge_agent("generate", "--cloud", cloud.address, "--mode", "cloud-only", "--raw", "--max-tokens", "8",
                   "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the text is streamed to stdout"
    assert "[cloud-only]" in r.stderr and "tok/s" in r.stderr


def test_unreachable_cloud_is_a_clear_error():
    r = edge_agent("generate", "--cloud", "127.0.0.1:9", "--mode", "cloud-only", "--max-tokens", "4", "hi",
                   timeout=120)
    assert r.returncode != 0
    assert "cannot reach the verifier" in r.stderr


def test_bad_flag_values_are_refused_before_any_work():
    r = edge_agent("generate", "--mode", "cloud-only", "--max-tokens", "0", "hi")
    assert r.returncode == 2 and "max_tokens" in r.stderr


def test_verifier_drains_and_exits_zero_on_sigterm():
    d = start_cloud("--max-sessions", "2")
    assert d.stop() == 0
    assert any("stopped" in line for line in d.stderr)
