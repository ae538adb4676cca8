"""`tandem-bench fleet`: how many GPUs a fleet of edge devices needs, cloud-only against picospec.

A discrete-event model (sim/fleet.py, SimPy) of D edge devices behind a
least-sessions balancer in front of R verifier replicas, priced by the same cost
model an emulated verifier holds its passes to (sim/costmodel.py) and batched by
the verifier's scheduling rule. Devices come in a mix of links, draft devices
and workloads (acceptance); `docs/fleet.md` lists every default with its source.

For each target and speed objective (SLO: p10 per-session tokens/s), it finds
the most sessions one replica carries while the p10 session still meets the SLO
(replicas share nothing, so a thousand devices of the mix are simulated on
replicas of n sessions each, doubling then bisecting on n), sizes the fleet at
R = ceil(D / that), then simulates all D devices on R replicas in one run and
reports its p10, p50, aggregate tokens/s, GPUs and cost per million tokens at
--gpu-price-per-hour. Where that full run misses the SLO (the search's runs are
samples), it takes 5 % fewer sessions per replica and runs again, up to 3 times.

`--validate` instead replays each row of a `tandem-bench capacity` run (its
target, link, mode, N and measured acceptance) through the model and reports
measured against simulated aggregate tokens/s and p10.

Figures are simulated, not measured: the model's assumptions are in docs/fleet.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.report import RESULTS, markdown_table, write_json
from common.procs import ROOT

DEVICES = 10_000
VALIDATE_SEEDS = 5          # --validate: model runs averaged per measured row
SLOS = [10.0, 20.0]
TARGETS = ["qwen3-32b-a100"]
# USD per GPU-hour. ASSUMED: typical 2025 on-demand prices of specialist GPU clouds for one
# A100-80GB SXM (~1.3-2.5) and one H100 SXM (~2-3.5); hyperscalers charge more, reserved
# capacity less. Pass --gpu-price-per-hour for your own.
GPU_PRICE_PER_HOUR = {"a100-80gb": 2.0, "h100-sxm": 3.0}
COLUMNS = ["target", "mode", "slo_tokens_per_s", "sessions_per_replica", "replicas", "gpus", "p10_tokens_per_s",
           "p50_tokens_per_s", "aggregate_tokens_per_s", "picospec_share", "tokens_per_pass", "utilisation",
           "usd_per_million_tokens", "meets_slo", "sim_cpu_s"]
VALIDATION_COLUMNS = ["target", "profile", "dataset", "mode", "n_sessions", "protocol", "acceptance_rate",
                      "measured_tokens_per_s", "simulated_tokens_per_s", "error_tokens_per_s_pct",
                      "measured_p10", "simulated_p10", "error_p10_pct"]


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--devices", type=int, default=DEVICES, help="edge devices in the fleet (default: %(default)s)")
    ap.add_argument("--slo", type=float, nargs="+", default=SLOS,
                    help="speed objectives: p10 per-session tokens/s (default: %(default)s)")
    ap.add_argument("--targets", nargs="+", default=TARGETS,
                    help="target profiles of sim/latency.py TARGETS (default: %(default)s)")
    ap.add_argument("--gpu-price-per-hour", type=float,
                    help="USD per GPU-hour (default, ASSUMED on-demand prices: "
                         + ", ".join(f"{g} {p:.2f}" for g, p in GPU_PRICE_PER_HOUR.items()) + ")")
    ap.add_argument("--links", metavar="NAME=SHARE,...",
                    help="link mix instead of the default (profiles of sim/link_profiles.toml with a fixed rate), "
                         "e.g. wifi=0.5,lte=0.5")
    ap.add_argument("--device-mix", metavar="NAME=SHARE,...",
                    help="draft-device mix instead of the default (sim/latency.py DEVICES), e.g. jetson-orin=1")
    ap.add_argument("--window", type=float, default=20.0, help="seconds of model time measured (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds of model time before the window (default: %(default)s)")
    ap.add_argument("--sample", type=int, default=1000,
                    help="devices each sizing try simulates, on replicas of the size tried (default: %(default)s; "
                         "fewer is faster and less faithful to the fleet's slow tail)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the acceptance draws and start phases")
    ap.add_argument("--seeds", type=int, default=VALIDATE_SEEDS,
                    help="--validate: simulate each row this many times (seeds --seed, --seed + 1, ...) and "
                         "compare the mean (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="1,000 devices, a 10 s window")
    ap.add_argument("--json", type=Path, help=f"output JSON (default: {RESULTS / 'fleet.json'}, with --validate "
                                               f"{RESULTS / 'fleet-validation.json'})")
    ap.add_argument("--validate", action="store_true",
                    help="simulate each row of a capacity run and compare with what it measured")
    ap.add_argument("--capacity-json", type=Path, default=RESULTS / "capacity.json",
                    help="capacity results for --validate; made with `tandem-bench capacity --quick` when "
                         "missing (default: %(default)s)")


def run(args) -> int:
    if args.validate:
        args.json = args.json or RESULTS / "fleet-validation.json"
        return run_validate(args)
    args.json = args.json or RESULTS / "fleet.json"
    from sim import fleet as F
    from sim import latency
    t_start = time.monotonic()
    devices = 1000 if args.quick and args.devices == DEVICES else args.devices
    window = 10.0 if args.quick and args.window == 20.0 else args.window
    sim = dict(warmup_s=args.warmup, window_s=window, seed=args.seed)
    from sim.link.profiles import load_profiles
    try:
        mix = {"links": F.parse_mix(args.links, {n for n, p in load_profiles().items() if not p.up.trace},
                                    "link") if args.links else F.LINK_MIX,
               "devices": F.parse_mix(args.device_mix, latency.DEVICES, "device") if args.device_mix
               else F.DEVICE_MIX}
    except ValueError as e:
        print(f"tandem-bench fleet: {e}", file=sys.stderr)
        return 2

    def devices_of(n: int):
        return F.population(n, devices=mix["devices"], links=mix["links"])
    rows = []
    for name in args.targets:
        target = latency.lookup(latency.TARGETS, name, "target")
        deployment = getattr(target, "deployment", None)
        if deployment is None:
            print(f"tandem-bench fleet: {name} is a linear profile with no GPU behind it; "
                  f"use a roofline one ({', '.join(n for n in latency.TARGETS if 'linear' not in n)})",
                  file=sys.stderr)
            return 2
        gpu, gpus = deployment.gpu.name, deployment.gpus
        price = args.gpu_price_per_hour if args.gpu_price_per_hour is not None else GPU_PRICE_PER_HOUR[gpu]
        for mode in F.MODES:
            tried: dict[int, object] = {}         # n -> Result: the SLOs share their simulations

            def one_replica(n: int):
                if n not in tried:
                    tried[n] = F.replica_sample(n, target, mode, args.sample, devices_of, **sim)
                    r = tried[n]
                    print(f"[fleet {name} {mode}] {r.replicas} replicas of {n} sessions: p10 {r.p10:.1f} tok/s, "
                          f"p50 {r.p50:.1f}  ({r.cpu_s:.2f}s CPU)  [{time.monotonic() - t_start:.0f}s]", flush=True)
                return tried[n]

            for slo in args.slo:
                per = F.max_sessions_per_replica(slo, one_replica)
                row = {"target": name, "gpu": gpu, "gpus_per_replica": gpus, "gpu_price_per_hour": price,
                       "mode": mode, "slo_tokens_per_s": slo, "devices": devices, "sessions_per_replica": per,
                       "window_s": window, "simulated": True}
                if per == 0:
                    alone = one_replica(1)
                    row.update(replicas=None, gpus=None, meets_slo=False,
                               note=f"alone on an idle replica, the p10 session gets {alone.p10:.1f} tok/s")
                    print(f"[fleet {name} {mode} SLO {slo:g}] unreachable: {row['note']}", flush=True)
                    rows.append(row)
                    continue
                for attempt in range(4):
                    R = F.replicas_needed(devices, per)
                    print(f"[fleet {name} {mode} SLO {slo:g}] {per} sessions per replica -> {R} replicas; "
                          f"simulating all {devices} devices ...", flush=True)
                    r = F.simulate(devices_of(devices), R, target, mode, F.Admission(max_sessions=per), **sim)
                    print(f"[fleet {name} {mode} SLO {slo:g}] {devices} devices on {R} replicas: p10 {r.p10:.1f} "
                          f"tok/s, p50 {r.p50:.1f}, aggregate {r.aggregate_tokens_per_s:.0f} tok/s, "
                          f"{r.cpu_s:.1f}s CPU  [{time.monotonic() - t_start:.0f}s]", flush=True)
                    if r.p10 >= slo or per == 1 or attempt == 3:
                        break
                    per -= max(1, per // 20)
                row["sessions_per_replica"] = per
                row.update(replicas=R, gpus=R * gpus, admitted=r.admitted, refused=r.refused,
                           p10_tokens_per_s=r.p10, p50_tokens_per_s=r.p50,
                           aggregate_tokens_per_s=r.aggregate_tokens_per_s,
                           picospec_share=r.picospec_sessions / r.admitted if r.admitted else None,
                           tokens_per_pass=r.tokens_per_pass, utilisation=r.utilisation,
                           usd_per_million_tokens=F.cost_per_million_tokens(R, gpus, price,
                                                                            r.aggregate_tokens_per_s),
                           meets_slo=r.p10 >= slo and r.refused == 0, sim_cpu_s=round(r.cpu_s, 2))
                rows.append(row)
    meta = {"devices": devices, "sizing_sample": args.sample, "window_s": window, "warmup_s": args.warmup, "seed": args.seed,
            "balancer": "least sessions", "max_batch_tokens": F.MAX_BATCH_TOKENS,
            "gpu_price_source": "ASSUMED on-demand USD per GPU-hour (bench/fleet.py GPU_PRICE_PER_HOUR)"
                                if args.gpu_price_per_hour is None else "--gpu-price-per-hour",
            "model": "sim/fleet.py (SimPy), simulated: see docs/fleet.md",
            "seconds": round(time.monotonic() - t_start, 1)}
    write_json({"meta": meta, "rows": rows, "mix": F.default_table(devices=mix["devices"], links=mix["links"])}, args.json)
    md = [f"# tandem-bench fleet (simulated)\n\n{devices} devices; p10/p50: per-session tokens/s over a "
          f"{window:g} s window; USD per million tokens at the GPU price per hour in the JSON.\n",
          markdown_table(rows, COLUMNS, floats=2)]
    args.json.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[1:]))
    print(f"[fleet] wrote {args.json} (+ .md) in {time.monotonic() - t_start:.0f}s")
    return 0


# -- --validate -----------------------------------------------------------------------------
def run_capacity(path: Path) -> subprocess.CompletedProcess:
    """`tandem-bench capacity --quick --json PATH` as a subprocess (minutes: it runs the daemons)."""
    return subprocess.run([sys.executable, "-m", "bench.cli", "capacity", "--quick", "--json", str(path)],
                          cwd=ROOT, capture_output=True, text=True)


class NoCapacity(Exception):
    pass


def capacity_results(path: Path, make=None) -> dict:
    """A capacity run's JSON ({"rows": [...], "capacity": {...}}), made by `make(path)` when missing."""
    make = make or run_capacity
    if not path.is_file():
        print(f"[fleet] no capacity results at {path}: running `tandem-bench capacity --quick` "
              f"(it runs the daemons: minutes) ...", flush=True)
        out = make(path)
        if out.returncode != 0 or not path.is_file():
            why = (out.stderr or out.stdout or "").strip().splitlines()
            raise NoCapacity(f"no capacity results at {path}, and `tandem-bench capacity --quick` could not make "
                             f"them (exit {out.returncode}: {why[-1] if why else 'no output'}). Run "
                             f"`tandem-bench capacity --json {path}` first, or pass --capacity-json FILE.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NoCapacity(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise NoCapacity(f"{path} has no `rows` list: is it a `tandem-bench capacity` result?")
    return data


def pct(sim: float, measured: float | None) -> float | None:
    return 100.0 * (sim - measured) / measured if measured else None


STREAMED = "fell back to streaming"


def measured_plan(dev, target):
    """What the run's edge did, as far as the model can follow it: streaming for a session the
    run saw fall back to it, else the model's planner's pick (at idle prices, as the fleet's
    sizing plans). The block length and window a real session *ended* on say little about what
    it ran with (its planner moves them every verdict: at 4 sessions it began at 5 x 3 and ended
    at 2 x 7), and simulating them put the model further off (worst picospec row 26 % against
    19 % with the planner's pick, 64-token runs)."""
    from sim import fleet as F
    if dev.workload == STREAMED:
        return F.Plan("cloud-only", 0, 0, 0.0)
    return F.plan(dev, target)


def run_prompts(capacity: dict) -> dict[str, list[int]]:
    """Prompt lengths, per dataset, of the sessions of a capacity run whose rows predate
    `session_prompt_tokens`: session i ran prompt i of `datasets.load(name, k)`, k the largest
    N of the run (bench/capacity.py), tokenized as the run did. {} where that cannot be done."""
    from bench import datasets
    from edge.llama_model import Tokenizer
    from edge.model_files import shipped_gguf
    rows = capacity["rows"]
    k = max(int(r.get("n_sessions") or 0) for r in rows)
    try:
        tok = Tokenizer(shipped_gguf())
        return {name: [len(tok.encode(p.text, raw=p.raw)) for p in datasets.load(name, k)]
                for name in {r.get("dataset") for r in rows} if name in datasets.DATASETS}
    except Exception as e:  # noqa: BLE001 - then the steady state stands in
        print(f"[fleet] no prompt lengths for the run's sessions ({e}): rows without them are simulated in "
              f"steady state", file=sys.stderr)
        return {}


def requests_of(row: dict, n: int, prompts) -> "object | None":
    """The run's requests for a row (sim/fleet.py `Requests`): its sessions' prompt lengths and
    tokens, or None where the run did not record them and they cannot be recomputed."""
    from sim import fleet as F
    tokens = row.get("tokens_per_session")
    lengths = row.get("session_prompt_tokens")
    if not tokens:
        return None
    if not lengths or len(lengths) != n:
        known = prompts().get(row.get("dataset")) or []
        if not known:
            return None
        lengths = [known[i % len(known)] for i in range(n)]
    return F.Requests(tuple(int(x) for x in lengths), int(tokens))


def validate(capacity: dict, warmup_s: float = 3.0, window_s: float = 20.0, seed: int = 0,
             seeds: int = VALIDATE_SEEDS) -> tuple[list, list]:
    """(validation rows, skipped rows with why) for each measured row of a capacity run.

    A row that says how long its sessions were (`tokens_per_session`) is simulated as the run
    was made: each session one request, its prompt prefilled first (`session_prompt_tokens`, or
    recomputed for older runs: `run_prompts`), rates as the bench measures them (protocol
    "requests"). Otherwise the steady state stands in (protocol "steady").

    The model's figure is its mean over `seeds` runs (seed, seed + 1, ...): one run of a few
    64-token requests is one draw of where the rejections fall, and the model predicts their
    expectation (one seed alone moved a single session's rate by up to 15 %)."""
    from sim import fleet as F
    from sim import latency
    out, skipped = [], []
    prompts = functools.cache(lambda: run_prompts(capacity))
    for row in capacity["rows"]:
        target_name = str(row.get("target", "")).removeprefix("emulated:")
        mode = "picospec" if str(row.get("mode", "")).startswith("picospec") else row.get("mode")
        why = None
        if target_name not in latency.TARGETS:
            why = f"target {row.get('target')!r} has no cost-model profile (a real target's speed is this machine's)"
        elif mode not in F.MODES:
            why = f"mode {row.get('mode')!r} is not modelled"
        elif mode == "picospec" and row.get("acceptance_rate") is None:
            why = "no measured acceptance"
        if why:
            skipped.append({**{k: row.get(k) for k in ("target", "profile", "mode", "n_sessions")}, "why": why})
            continue
        link = F.Link.named(row["profile"])
        step = latency.lookup(latency.DEVICES, row.get("device", "jetson-orin"), "device").forward_s(1)
        n = int(row["n_sessions"])
        mean = float(row.get("acceptance_rate") or 0.0)
        # each session's measured acceptance where the run has it (its prompt's), else the cell's
        per = [a if a is not None else mean for a in row.get("session_acceptance") or []]
        accepts = per if len(per) == n else [mean] * n
        # an edge whose planner switched to streaming during the run streams in the model too: the
        # model plans once, at idle prices, and would keep it speculating
        fell = row.get("session_fallbacks") or [None] * n
        requests = requests_of(row, n, prompts)
        # where each session's drafts were accepted, position by position, where the run has it:
        # the model then meets the run's rejections where they fell, not a draw of them
        paths = row.get("session_accept_path") or []
        if len(paths) != n or requests is None:
            paths = [None] * n
        devs = [F.Device(link, step, a, row.get("device", "jetson-orin"),
                         STREAMED if f == "cloud-only" else str(row.get("dataset")), path=p)
                for a, f, p in zip(accepts, fell, paths)]
        runs = [F.simulate(devs, 1, latency.TARGETS[target_name], mode, warmup_s=warmup_s, window_s=window_s,
                           seed=seed + k, plan_of=measured_plan, requests=requests) for k in range(max(1, seeds))]
        simulated = sum(r.aggregate_tokens_per_s for r in runs) / len(runs)
        simulated_p10 = sum(r.p10 for r in runs) / len(runs)
        # the model's aggregate is steady state: compare with the streams' sum where the run has it
        # (the wall-time aggregate includes every session's prompt prefill and first-token wait)
        measured = row.get("aggregate_stream_tokens_per_s", row.get("aggregate_tokens_per_s"))
        measured_p10 = row.get("session_tokens_per_s_p10")
        out.append({"target": row.get("target"), "gpu": row.get("gpu"), "profile": row["profile"],
                    "dataset": row.get("dataset"), "mode": row.get("mode"), "n_sessions": n,
                    "protocol": "steady" if requests is None else "requests",
                    "acceptance_rate": row.get("acceptance_rate"),
                    "measured_tokens_per_s": measured, "simulated_tokens_per_s": simulated,
                    "measured_wall_tokens_per_s": row.get("aggregate_tokens_per_s"),
                    "error_tokens_per_s_pct": pct(simulated, measured),
                    "measured_p10": measured_p10, "simulated_p10": simulated_p10,
                    "error_p10_pct": pct(simulated_p10, measured_p10), "seeds": len(runs)})
    return out, skipped


def run_validate(args, make=None) -> int:
    t_start = time.monotonic()
    try:
        capacity = capacity_results(args.capacity_json, make)
    except NoCapacity as e:
        print(f"tandem-bench fleet --validate: {e}", file=sys.stderr)
        return 2
    rows, skipped = validate(capacity, args.warmup, args.window, args.seed, args.seeds)
    errors = [abs(r["error_tokens_per_s_pct"]) for r in rows if r["error_tokens_per_s_pct"] is not None]
    write_json({"validation": rows, "skipped": skipped,
                "meta": {"capacity_json": str(args.capacity_json), "window_s": args.window, "seeds": args.seeds,
                         "mean_abs_error_tokens_per_s_pct": sum(errors) / len(errors) if errors else None,
                         "seconds": round(time.monotonic() - t_start, 1)}}, args.json)
    print(markdown_table(rows, VALIDATION_COLUMNS, floats=2))
    for s in skipped:
        print(f"[fleet] skipped {s['target']} {s['profile']} {s['mode']} N={s['n_sessions']}: {s['why']}")
    print(f"[fleet] wrote {args.json}: {len(rows)} rows validated, {len(skipped)} skipped")
    return 0
