"""`tandem-bench report`: every suite's JSON on one Markdown page, plots, README headlines."""
import json

import pytest

from bench.report import README_BEGIN, README_END, build_report, update_readme

SPEC = [
    {"profile": "picospec-wan", "mode": "cloud-only", "target": "emulated:qwen3-32b-a100", "drafter": "none",
     "tokens_per_s": 12.0, "speedup": 1.0, "acceptance_rate": None, "emulated": True},
    {"profile": "picospec-wan", "mode": "picospec-Q", "target": "emulated:qwen3-32b-a100", "drafter": "draft-l29",
     "tokens_per_s": 24.6, "speedup": 2.05, "acceptance_rate": 0.71, "emulated": True},
    {"profile": "picospec-wan", "mode": "picospec-P", "target": "smollm2-135m", "drafter": "draft-l29",
     "tokens_per_s": 30.0, "speedup": 0.9, "acceptance_rate": 0.74, "emulated": False},
]
MOE = {"meta": {"model": "m.gguf", "decode_tokens": 32, "floors": [4, 4]},
       "rows": [{"policy": "dymoe", "budget_pct": 25, "storage": "sd-card", "ttft_s": 1.0, "tpot_s": 0.1,
                 "top1_agreement": 0.95},
                {"policy": "lru-fp", "budget_pct": 25, "storage": "sd-card", "ttft_s": 4.0, "tpot_s": 0.5,
                 "top1_agreement": 1.0}]}
LINK = {"profiles": [{"profile": "lte", "trace": False, "up_cfg_mbit": 5, "up_mbit": 4.9, "down_cfg_mbit": 20,
                      "down_mbit": 20.2, "rtt_cfg_ms": 70, "rtt_ms": 70.4}],
        "sweep": [{"rate_mbit": 1, "up_mbit": 1.0, "down_mbit": 0.99}]}


@pytest.fixture
def results(tmp_path):
    for name, data in (("spec", SPEC), ("moe", MOE), ("link", LINK)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "spec.png").write_bytes(b"\x89PNG")      # a suite that drew its own plot
    (tmp_path / "broken.json").write_text("{nope")
    return tmp_path


def test_one_page_with_tables_plots_and_headlines(results):
    page, heads = build_report(results)
    for title in ("## spec", "## moe", "## link", "### link: profiles", "### link: sweep"):
        assert title in page
    assert "| picospec-Q |" in page and "| dymoe |" in page and "decode_tokens: 32" in page
    assert "![spec](spec.png)" in page and not (results / "report-spec-0.png").exists()
    assert (results / "report-moe-0.png").stat().st_size > 1000          # drawn here: moe wrote none
    assert "![link: profiles](report-link-0.png)" in page
    text = "\n".join(heads)
    assert "2.05x cloud-only" in text and "emulated" in text and "0.90x with the real" in text
    assert "TPOT 5.0x and TTFT 4.0x" in text
    assert "within 2.0 %" in text and "within 0.4 ms" in text
    assert "broken" not in page


def test_readme_block_is_replaced(tmp_path, results):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_BEGIN}\nold figures\n{README_END}\nafter\n")
    _, heads = build_report(results)
    update_readme(readme, heads, results / "report.md")
    text = readme.read_text()
    assert "old figures" not in text and "before" in text and "after" in text and "2.05x" in text
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    with pytest.raises(ValueError):
        update_readme(tmp_path / "spec.json", heads, results / "report.md")
