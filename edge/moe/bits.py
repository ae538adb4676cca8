"""The precision tier that means "as the file holds it"; the others are plain bit
counts (8, 4, 2). Kept apart from store.py, which needs torch, so the CLI can
list the MoE drafter's flags and policies on an install without it."""
from __future__ import annotations

FP = 16          # "full precision": whatever the file holds (F16/F32)
