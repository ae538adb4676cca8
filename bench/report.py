"""Writing benchmark results: JSON rows, a Markdown table, a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_json(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def markdown_table(rows: list[dict], columns: list[str], floats: int = 2) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{floats}f}"
        return "-" if v is None else str(v)
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows])


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# -- `tandem-bench report`: every suite's results on one page ------------------
REPORT_DOC = """`tandem-bench report`: gathers bench/results/*.json into one Markdown page
(bench/results/report.md) with a table per result set and each suite's PNG plot
(drawn here with matplotlib when the suite wrote none); `--readme README.md`
also refreshes the headline figures between the README's report markers."""
README_BEGIN, README_END = "<!-- tandem-bench report: begin -->", "<!-- tandem-bench report: end -->"
METRICS = ("speedup", "tokens_per_s", "tpot_s", "ttft_s", "top1_agreement", "up_mbit", "rtt_ms", "slowdown_pct",
           "acceptance_rate")


def add_args(ap) -> None:
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the suites' JSON (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="the page to write (default: RESULTS/report.md)")
    ap.add_argument("--readme", type=Path, help="also refresh the headline figures in this README")


def tables_of(data, name: str) -> list[tuple[str, list[dict]]]:
    """(title, rows) for every list of objects in a suite's JSON, however it is shaped."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return [(name, data)]
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            out += tables_of(value, f"{name}: {key}" if key != "rows" else name)
    return out


def scalars_of(data) -> dict:
    """Top-level scalar facts (a suite's `meta`), for the page's notes."""
    if not isinstance(data, dict):
        return {}
    meta = data.get("meta", data)
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and not isinstance(v, dict)}


def scalar_columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and (v is None or isinstance(v, (str, int, float, bool))):
                cols.append(k)
    return cols


def plot_rows(title: str, rows: list[dict], path: Path) -> Path | None:
    """A bar chart of a table's first well-known metric, one bar per row."""
    cols = scalar_columns(rows)
    metric = next((m for m in METRICS if m in cols), None)
    if metric is None:
        return None
    labels = [" ".join(str(r[c]) for c in cols if isinstance(r.get(c), str) and c != metric)[:40] for r in rows]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [r.get(metric) or 0 for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel(metric)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def headlines(results: dict[str, object]) -> list[str]:
    """One line per suite that has results: the figures worth a README."""
    lines = []
    for suite, fn in (("spec", _spec_headline), ("capacity", _capacity_headline), ("moe", _moe_headline),
                      ("link", _link_headline), ("serve", _serve_headline)):
        if suite in results:
            try:
                line = fn(results[suite])
            except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration):
                line = None       # a suite whose format changed: its table is still on the page
            if line:
                lines.append(f"- **{suite}**: {line}")
    return lines


def _spec_headline(data) -> str | None:
    rows = data if isinstance(data, list) else data["rows"]
    spec = [r for r in rows if str(r["mode"]).startswith("picospec") and r.get("speedup")]
    emu = [r for r in spec if r.get("emulated")]
    real = [r for r in spec if not r.get("emulated")]
    parts = []
    if emu:
        b = max(emu, key=lambda r: r["speedup"])
        parts.append(f"PicoSpec {b['speedup']:.2f}x cloud-only ({b['tokens_per_s']:.1f} tok/s) on {b['profile']} "
                     f"against {b['target']} with drafter {b['drafter']} (acceptance {b['acceptance_rate']}; "
                     f"latency emulated)")
    if real:
        b = max(real, key=lambda r: r["speedup"])
        parts.append(f"{b['speedup']:.2f}x with the real SmolLM2-135M target on this CPU ({b['profile']}, "
                     f"{b['drafter']})")
    return "; ".join(parts) or None


def _capacity_headline(data) -> str | None:
    parts = [f"{target.split(':', 1)[-1]}: " + ", ".join(f"{mode} {v['10']}" for mode, v in modes.items())
             for target, modes in data["capacity"].items()]
    if not parts:
        return None
    return ("sessions one emulated GPU verifier carries with every session's p10 >= 10 tok/s: " + "; ".join(parts)
            + " (emulated targets; on a CPU box a figure measures the machine where real_over_modelled > 1)")


def _moe_headline(data) -> str | None:
    rows = data["rows"] if isinstance(data, dict) else data
    get = lambda p: next(r for r in rows if r["policy"] == p and r["budget_pct"] == 25 and r["storage"] == "sd-card")
    d, l = get("dymoe"), get("lru-fp")
    return (f"DyMoE at a 25 % expert budget on an SD card: TPOT {l['tpot_s'] / d['tpot_s']:.1f}x and TTFT "
            f"{l['ttft_s'] / d['ttft_s']:.1f}x faster than on-demand LRU, top-1 agreement {d['top1_agreement']:.3f} "
            f"(storage modelled)")


def _link_headline(data) -> str | None:
    rows = data["profiles"]
    rate = max(abs(r[f"{d}_mbit"] / r[f"{d}_cfg_mbit"] - 1) for r in rows for d in ("up", "down")
               if not r.get("trace"))
    rtt = max(abs(r["rtt_ms"] - r["rtt_cfg_ms"]) for r in rows)
    return f"link-sim delivers every profile's rate within {rate * 100:.1f} % and its RTT within {rtt:.1f} ms"


def _serve_headline(data) -> str | None:
    rows = data["rows"] if isinstance(data, dict) else data
    by = {r["case"]: r for r in rows}
    base, gone, hung = by["broker up"], by["broker killed"], by.get("broker hung")
    line = (f"`edge-agent serve` with MQTT telemetry: {base['tokens_per_s']:.1f} tok/s with the broker up, "
            f"{gone['tokens_per_s']:.1f} ({gone['slowdown_pct']:+.1f} %) with it killed")
    if hung:
        line += f", {hung['tokens_per_s']:.1f} ({hung['slowdown_pct']:+.1f} %) with it hung"
    return line + " (real SmolLM2-135M target over picospec-wan, real latency)"


def build_report(results_dir: Path) -> tuple[str, list[str]]:
    """(Markdown page, headline lines) for every JSON in results_dir."""
    results: dict[str, object] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"[report] skipping {path}: {e}")
    heads = headlines(results)
    md = ["# tandem benchmark report", "",
          "Gathered by `tandem-bench report` from " + ", ".join(f"`{s}.json`" for s in results) + ". "
          "Every figure says whether its latency was real or emulated; the machine is a shared 2-core CPU.", ""]
    if heads:
        md += ["## Headlines", ""] + heads + [""]
    for suite, data in results.items():
        md += [f"## {suite}", ""]
        notes = scalars_of(data)
        if notes:
            md += [", ".join(f"{k}: {v}" for k, v in notes.items()), ""]
        own_plot = results_dir / f"{suite}.png"
        for i, (title, rows) in enumerate(tables_of(data, suite)):
            if title != suite:
                md += [f"### {title}", ""]
            md += [markdown_table(rows, scalar_columns(rows), floats=3), ""]
            if not own_plot.exists():
                png = plot_rows(title, rows, results_dir / f"report-{suite}-{i}.png")
                if png:
                    md += [f"![{title}]({png.name})", ""]
        if own_plot.exists():
            md += [f"![{suite}]({own_plot.name})", ""]
    return "\n".join(md) + "\n", heads


def update_readme(readme: Path, heads: list[str], page: Path) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no '{README_BEGIN}' ... '{README_END}' block to fill")
    try:
        link = page.resolve().relative_to(readme.resolve().parent)
    except ValueError:
        link = page
    block = [README_BEGIN, f"Latest headline figures (`tandem-bench report`; full page: [{link}]({link})):", ""]
    block += heads or ["- (no benchmark results yet: run `make bench`)"]
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + "\n".join(block) + "\n" + README_END + tail)


def run(args) -> int:
    if not args.results.is_dir() or not any(args.results.glob("*.json")):
        print(f"tandem-bench report: no results in {args.results} (run `make bench` first)")
        return 1
    page, heads = build_report(args.results)
    out = args.out or args.results / "report.md"
    out.write_text(page)
    print(f"[report] wrote {out}")
    for h in heads:
        print(h)
    if args.readme:
        update_readme(args.readme, heads, out)
        print(f"[report] refreshed the headline figures in {args.readme}")
    return 0
