"""tandem-bench load: what a real-target row keeps of the bare loop, bracketed before and after."""
from __future__ import annotations

import pytest

from bench.load import add_shares


def test_share_of_bare_is_against_the_mean_of_both_bare_runs_and_only_for_real_targets():
    rows = [{"target": "smollm2-135m", "n_sessions": 8, "aggregate_stream_tokens_per_s": 90.0},
            {"target": "smollm2-135m", "n_sessions": 1, "aggregate_stream_tokens_per_s": 60.0},
            {"target": "smollm2-135m", "n_sessions": 4, "aggregate_stream_tokens_per_s": 80.0},
            {"target": "emulated:qwen3-32b-a100", "n_sessions": 8, "aggregate_stream_tokens_per_s": 100.0}]
    before = {1: {"tokens_per_s": 80.0}, 8: {"tokens_per_s": 170.0}}
    after = {1: {"tokens_per_s": 70.0}, 8: {"tokens_per_s": 190.0}}
    add_shares(rows, before, after)
    assert rows[0]["bare_tokens_per_s"] == 180.0 and rows[0]["share_of_bare"] == pytest.approx(0.5)
    assert rows[1]["share_of_bare"] == pytest.approx(0.8)
    assert "share_of_bare" not in rows[2], "no bare loop of 4 sequences was run"
    assert "share_of_bare" not in rows[3], "an emulated target's speed is its model's, not the bare loop's"
