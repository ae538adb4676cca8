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
