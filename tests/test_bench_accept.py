"""`tandem-bench accept` end to end on the real models: one prompt, a few positions."""
import json

from bench.cli import main


def test_accept_reports_widths_in_order_and_width_costs(tmp_path):
    out = tmp_path / "accept.json"
    assert main(["accept", "--dataset", "builtin", "--prompts", "1", "--tokens", "8", "--depth", "3",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["dataset"] == "builtin" and row["positions"] == 8
    # a wider node never accepts less, and no tree accepts less than its chain
    assert 0.0 < row["alpha_1"] <= row["alpha_2"] <= row["alpha_3"] <= 1.0
    assert 1.0 <= row["ceiling_2"] <= row["ceiling_3"]
    costs = data["meta"]
    assert costs["draft_step_1_seq_s"] > 0 and costs["draft_step_2_seqs_s"] > 0
    assert out.with_suffix(".md").read_text().startswith("# tandem-bench accept")
