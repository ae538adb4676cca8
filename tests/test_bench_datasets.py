"""Real task prompts come from the installed packages' own data files."""
from __future__ import annotations

import pytest

from bench import datasets


def test_humaneval_prompts_are_code_to_complete():
    items = datasets.load("humaneval")
    assert len(items) == 164
    assert items[0].id == "HumanEval/0" and items[0].raw
    assert all("def " in p.text for p in items)


def test_mtbench_first_turns_cover_every_category():
    items = datasets.load("mtbench")
    assert len(items) == 80 and not any(p.raw for p in items)
    picked = datasets.load("mtbench", 8)
    assert len({p.id.rsplit("/", 1)[1] for p in picked}) == 8      # one per category
    assert picked == datasets.load("mtbench", 8)                      # the same subset every time


def test_builtin_is_the_suites_original_prompts():
    assert [p.text for p in datasets.load("builtin")] == datasets.BUILTIN


@pytest.mark.parametrize("name, n", [("nope", 2), ("mtbench", 0)])
def test_bad_requests_say_what_is_wrong(name, n):
    with pytest.raises(ValueError):
        datasets.load(name, n)


def test_missing_package_names_itself():
    with pytest.raises(FileNotFoundError, match="not installed"):
        datasets.data_file("no-such-distribution-xyz", "question.jsonl")
