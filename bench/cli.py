"""tandem-bench: benchmark suites; each writes JSON, a Markdown table and a PNG plot."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from common.extras import missing_extra

SUITES = {"spec": "bench.spec", "accept": "bench.accept", "moe": "bench.moe", "link": "bench.link",
          "load": "bench.load", "capacity": "bench.capacity", "serve": "bench.serve", "fleet": "bench.fleet"}
# `tandem-bench report` gathers what the suites wrote; `all` runs it last.
REPORT = "bench.report"


def run_suite(name: str, run, args) -> int:
    """The suite's exit code; a missing optional extra is one line and exit 1, not a traceback."""
    try:
        return run(args)
    except ModuleNotFoundError as e:
        line = missing_extra(e)
        if line is None:
            raise
        print(f"tandem-bench {name}: {line}", file=sys.stderr, flush=True)
        return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tandem-bench", description=__doc__)
    sub = ap.add_subparsers(dest="suite", required=True)
    # Every suite module imports without the extras (they import torch or
    # matplotlib where they use them): a failed import here is a bug, and loud.
    for name, module in {**SUITES, "report": REPORT}.items():
        mod = importlib.import_module(module)
        doc = getattr(mod, "REPORT_DOC", mod.__doc__) or ""
        p = sub.add_parser(name, help=doc.strip().splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.set_defaults(func=mod.run)
    allp = sub.add_parser("all", help="every suite with its default outputs")
    allp.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    # A suite starts daemons (verifier, link-sim) and stops them in `finally`; a plain SIGTERM
    # would skip that and leave them running, holding the row caches' write locks.
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    if a.suite == "all":
        rc = 0
        for name, module in SUITES.items():
            mod = importlib.import_module(module)
            p = argparse.ArgumentParser()
            mod.add_args(p)
            print(f"== tandem-bench {name}", flush=True)
            rc |= run_suite(name, mod.run, p.parse_args(["--quick"] if a.quick and "--quick" in p.format_help() else []))
        from bench import report
        p = argparse.ArgumentParser()
        report.add_args(p)
        print("== tandem-bench report", flush=True)
        return rc | run_suite("report", report.run, p.parse_args([]))
    return run_suite(a.suite, a.func, a)


if __name__ == "__main__":
    sys.exit(main())
