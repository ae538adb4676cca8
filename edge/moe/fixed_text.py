"""Fixed tokens for `moe-calibrate`: the same text on every machine.

`models/moe-calib-v*.json` is written by the target on the machine that builds
the model (llama.cpp sampling and greedy decoding, whose near-ties follow
the CPU), so floors measured on it would follow the machine, not the model
file. `fixed_calib_tokens.json` freezes the target's greedy answers to four
held-out prompts (prompt and answer, SmolLM2 vocabulary) that the benchmark
does not score on: in-distribution text for a drafter of this target, and
the same ids everywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

TOKENS_FILE = Path(__file__).with_name("fixed_calib_tokens.json")


def fixed_sequences(n_vocab: int | None = None) -> list[list[int]]:
    """The frozen token sequences; checked against the model's vocabulary."""
    texts = json.loads(TOKENS_FILE.read_text())["sequences"]
    if n_vocab is not None and any(t >= n_vocab for s in texts for t in s):
        raise ValueError(f"{TOKENS_FILE.name} holds token ids beyond this model's vocabulary "
                         f"({n_vocab}): calibrate a SmolLM2-vocabulary model")
    return texts
