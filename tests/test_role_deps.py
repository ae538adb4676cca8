"""Each role runs on the core install: the dense edge, the verifier and link-sim
never need the extras (torch: [moe]; matplotlib, simpy: [bench]; grpc_tools: [dev]).

The check runs in a fresh interpreter where importing an extra fails, as it
would where it is not installed: the daemons' modules must import, their --help
must work, and a command that does need an extra says which one in one line.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTRAS_ONLY = ("torch", "matplotlib", "simpy", "grpcio-tools")
# What the daemons import on their normal paths (lazily too), beside their CLIs.
CORE_MODULES = ("edge.cli", "edge.agent", "edge.baselines", "edge.client", "edge.derive", "edge.llama_model",
                "edge.telemetry", "edge.serve.daemon", "edge.serve.app", "edge.serve.engine",
                "cloud.cli", "cloud.daemon", "cloud.server", "cloud.status", "cloud.exactness",
                "sim.link.cli", "sim.link.proxy", "sim.link.timing", "sim.link.mqttctl",
                "common.daemon_config", "common.mqtt_publisher", "common.procs", "proto.prompt_zstd")
HELPS = (("edge.cli", ["--help"]), ("edge.cli", ["generate", "--help"]), ("edge.cli", ["serve", "--help"]),
         ("cloud.cli", ["--help"]), ("sim.link.cli", ["--help"]), ("sim.link.cli", ["profiles"]))

WITHOUT_EXTRAS = """
import contextlib, importlib, io, json, sys
for name in ("torch", "matplotlib", "simpy", "grpc_tools"):
    sys.modules[name] = None          # `import torch` now fails as on an install without it
out = {"imported": [], "helps": [], "moeify": None}
for module in %(modules)r:
    importlib.import_module(module)
    out["imported"].append(module)
for module, argv in %(helps)r:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            code = importlib.import_module(module).main(argv)
        except SystemExit as e:
            code = e.code
    out["helps"].append([module, argv, code, len(text.getvalue())])
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = importlib.import_module("edge.cli").main(["moeify", "--out", "/nonexistent/moe.gguf"])
out["moeify"] = [code, err.getvalue()]
out["loaded"] = sorted(m for m in ("torch", "matplotlib", "simpy", "grpc_tools") if sys.modules.get(m) is not None)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def without_extras() -> dict:
    script = WITHOUT_EXTRAS % {"modules": CORE_MODULES, "helps": HELPS}
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_daemons_import_without_the_extras(without_extras):
    assert without_extras["imported"] == list(CORE_MODULES)
    assert without_extras["loaded"] == []


def test_daemons_help_works_without_the_extras(without_extras):
    for module, argv, code, printed in without_extras["helps"]:
        assert code in (0, None), f"{module} {' '.join(argv)} exited {code}"
        assert printed > 0, f"{module} {' '.join(argv)} printed nothing"


def test_a_command_that_needs_an_extra_names_it_in_one_line(without_extras):
    code, err = without_extras["moeify"]
    assert code == 1
    assert err.strip().splitlines() == ["edge-agent moeify: this needs torch, which is not installed: "
                                        "pip install 'tandem[moe]'"]


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;(]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_core_dependencies_leave_the_extras_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = requirement_names(project["dependencies"])
    assert not core & set(EXTRAS_ONLY), f"core dependencies name {core & set(EXTRAS_ONLY)}"
    optional = set().union(*map(requirement_names, project["optional-dependencies"].values()))
    assert set(EXTRAS_ONLY) <= optional, "each extra-only package is still in some extra"


def test_installed_metadata_leaves_the_extras_out():
    try:
        requires = importlib.metadata.requires("tandem") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tandem is not installed (pip install -e .)")
    core = requirement_names([r for r in requires if "extra ==" not in r])
    assert not core & set(EXTRAS_ONLY), f"installed tandem's core requirements name {core & set(EXTRAS_ONLY)}"


def test_only_a_missing_extra_is_softened():
    from common.extras import missing_extra
    assert "tandem[bench]" in missing_extra(ModuleNotFoundError("no matplotlib", name="matplotlib.pyplot"))
    assert "tandem[bench]" in missing_extra(ModuleNotFoundError("no simpy", name="simpy"))
    assert missing_extra(ModuleNotFoundError("no edge.moe.x", name="edge.moe.x")) is None     # ours: a bug
    assert missing_extra(ModuleNotFoundError("no numpy", name="numpy")) is None               # core: broken install
    assert missing_extra(ImportError("cannot import name 'x' from 'torch'", name="torch")) is None
