"""tandem-bench: benchmark suites; each writes JSON, a Markdown table and a PNG plot."""
from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {"spec": "bench.spec", "accept": "bench.accept", "moe": "bench.moe", "link": "bench.link",
          "load": "bench.load", "serve": "bench.serve"}
# `tandem-bench report` gathers what the suites wrote; `all` runs it last.
REPORT = "bench.report"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tandem-bench", description=__doc__)
    sub = ap.add_subparsers(dest="suite", required=True)
    for name, module in {**SUITES, "report": REPORT}.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        doc = getattr(mod, "REPORT_DOC", mod.__doc__) or ""
        p = sub.add_parser(name, help=doc.strip().splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.set_defaults(func=mod.run)
    allp = sub.add_parser("all", help="every suite with its default outputs")
    allp.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.suite == "all":
        rc = 0
        for name, module in SUITES.items():
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            p = argparse.ArgumentParser()
            mod.add_args(p)
            print(f"== tandem-bench {name}", flush=True)
            rc |= mod.run(p.parse_args(["--quick"] if a.quick and "--quick" in p.format_help() else []))
        from bench import report
        p = argparse.ArgumentParser()
        report.add_args(p)
        print("== tandem-bench report", flush=True)
        return rc | report.run(p.parse_args([]))
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
