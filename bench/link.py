"""`tandem-bench link`: configured vs delivered rate and RTT of link-sim.

For every named profile: delivered rate each way (a saturating TCP transfer
through a `link-sim` process, measured at the receiver) and the median RTT of
small pings, against what the profile configures (RTT: 2 × one-way delay + the
bare loopback RTT measured alongside). Trace profiles run in-process so the
trace's exact capacity over the measured window is known. Then a rate sweep
from 64 kbit/s to 1 Gbit/s (the promise is ±3 % up to 200 Mbit/s), and, where
network namespaces are allowed, the same sweep through the kernel's tc tbf.
Writes JSON, a Markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

from sim.link.config import LinkConfig
from sim.link.measure import LinkSimProcess, Upstream, measure_rate, measure_rtt, median
from sim.link.profiles import DEFAULT_PROFILES, load_profiles, profile_sources
from sim.link.proxy import LinkSim
from sim.link.timing import run as run_precise

SWEEP = (0.064, 0.256, 1.0, 4.0, 16.0, 64.0, 200.0, 1000.0)
PROMISED_MAX_MBIT = 200.0


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default="bench/results/link.json", metavar="PATH", help="JSON results")
    parser.add_argument("--md", default="bench/results/link.md", metavar="PATH", help="Markdown table")
    parser.add_argument("--png", default="bench/results/link.png", metavar="PATH", help="plot")
    parser.add_argument("--profiles", default=None, metavar="A,B", help="profiles to measure (default: all)")
    parser.add_argument("--profiles-file", default=str(DEFAULT_PROFILES), metavar="FILE")
    parser.add_argument("--sweep", default=",".join(f"{r:g}" for r in SWEEP), metavar="MBIT,...",
                        help="rates of the sweep, Mbit/s ('' to skip)")
    parser.add_argument("--delays", default="0,1,10,100", metavar="MS,...",
                        help="one-way delays of the RTT sweep at 50 Mbit/s, no jitter ('' to skip)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window per rate and direction")
    parser.add_argument("--pings", type=int, default=20, help="RTT pings per profile")
    parser.add_argument("--no-tbf", action="store_true", help="skip the tc tbf cross-check")
    parser.add_argument("--quick", action="store_true",
                        help="~1 minute: 1.5 s windows, 10 pings, sweep 0.064/1/16/200 Mbit/s, delays 0/10 ms, no tbf")


# -- measurements -----------------------------------------------------------


def _window(rate_mbit: float, seconds: float) -> float:
    # a 64 kbit/s link moves 8 kB/s; give slow links a longer window
    return seconds * 2 if rate_mbit < 0.5 else seconds


async def _measure_process(upstream: Upstream, uaddr, args: list[str], up_cfg: float, down_cfg: float,
                           seconds: float, pings: int, rtt_cfg_s: float | None) -> dict:
    proc = LinkSimProcess(uaddr, *args)
    try:
        out: dict = {}
        if rtt_cfg_s is not None:
            n = pings if rtt_cfg_s < 0.2 else max(5, pings // 2)
            out["rtt_ms"] = median(await measure_rtt(proc.addr, n, gap_s=0.005)) * 1000
        out["up_mbit"] = await measure_rate(proc.addr, upstream, "up", _window(up_cfg, seconds), 0.5)
        out["down_mbit"] = await measure_rate(proc.addr, upstream, "down", _window(down_cfg, seconds), 0.5)
    finally:
        out["report"] = proc.stop()
    return out


async def _measure_trace_profile(cfg: LinkConfig, seconds: float, pings: int) -> dict:
    """In-process, so the trace's capacity over exactly the measured window is known."""
    from sim.link.measure import Arrivals
    from sim.link.trace import load_trace

    upstream = Upstream()
    uaddr = await upstream.start()
    sim = LinkSim(cfg, uaddr)
    paddr = await sim.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    out: dict = {"rtt_ms": median(await measure_rtt(paddr, pings, gap_s=0.005)) * 1000}
    for d in ("up", "down"):
        cond = getattr(cfg, d)
        if not cond.trace:
            out[f"{d}_mbit"] = await measure_rate(paddr, upstream, d, seconds, 0.5)
            out[f"{d}_cfg_mbit"] = cond.rate_mbit
            continue
        trace = load_trace(cond.trace)
        reader, writer = await asyncio.open_connection(*paddr, limit=1 << 22)
        arr = Arrivals()
        if d == "down":
            writer.write(b"D")
            t0 = loop.time()
            while loop.time() < t0 + 0.5 + seconds * 2:
                arr.add(loop.time(), len(await reader.read(1 << 20)))
        else:
            n0 = len(upstream.sinks)
            writer.write(b"S")
            t0 = loop.time()
            block = b"\0" * 65536
            while loop.time() < t0 + 0.5 + seconds * 2:
                writer.write(block)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except asyncio.TimeoutError:
                    pass
            arr = upstream.sinks[n0]
        writer.transport.abort()
        a, b = t0 + 1.0, t0 + 0.5 + seconds * 2
        shaper = getattr(sim, d).shaper
        delay = cond.delay_ms / 1000
        offered = trace.capacity_bytes((a - delay - shaper.origin) * 1000, (b - delay - shaper.origin) * 1000)
        out[f"{d}_mbit"] = arr.rate_mbit(a, b)
        out[f"{d}_cfg_mbit"] = offered * 8 / (b - a) / 1e6
    out["report"] = sim.final_report()
    await sim.stop()
    await upstream.close()
    return out


async def _bench(args: argparse.Namespace) -> dict:
    profiles = load_profiles(args.profiles_file)
    sources = profile_sources(args.profiles_file)
    names = args.profiles.split(",") if args.profiles else list(profiles)
    unknown = [n for n in names if n not in profiles]
    if unknown:
        raise SystemExit(f"unknown profile(s): {', '.join(unknown)}")
    upstream = Upstream()
    uaddr = await upstream.start()
    base_rtt_ms = median(await measure_rtt(uaddr, 50, gap_s=0.002)) * 1000
    print(f"[link] bare loopback RTT {base_rtt_ms:.3f} ms", flush=True)
    rows = []
    for name in names:
        cfg = profiles[name]
        t = time.monotonic()
        if cfg.up.trace or cfg.down.trace:
            m = await _measure_trace_profile(cfg, args.seconds, args.pings)
            up_cfg, down_cfg = m["up_cfg_mbit"], m["down_cfg_mbit"]
        else:
            up_cfg, down_cfg = cfg.up.rate_mbit, cfg.down.rate_mbit
            # Loss off: with loss the receiver sees RTO-long holds (640 ms on satellite), so
            # a few-second window swings by ±RTO/window and says nothing about pacing.
            m = await _measure_process(upstream, uaddr, ["--profile", name, "--profiles", args.profiles_file, "--loss", "0"],
                                       up_cfg, down_cfg, args.seconds, args.pings, cfg.rtt_ms / 1000)
        row = {
            "profile": name,
            "source": sources.get(name, ""),
            "trace": bool(cfg.up.trace or cfg.down.trace),
            "up_cfg_mbit": up_cfg, "up_mbit": m["up_mbit"],
            "down_cfg_mbit": down_cfg, "down_mbit": m["down_mbit"],
            "rtt_cfg_ms": cfg.rtt_ms + base_rtt_ms, "rtt_ms": m["rtt_ms"],
            "jitter_ms": max(cfg.up.jitter_ms, cfg.down.jitter_ms),
            "loss": max(cfg.up.loss, cfg.down.loss),
            "lost_segments": m["report"]["up"]["lost_segments"] + m["report"]["down"]["lost_segments"],
        }
        rows.append(row)
        print(f"[link] {name:13s} up {row['up_mbit']:9.3f}/{up_cfg:<9.3f} down {row['down_mbit']:9.3f}/{down_cfg:<9.3f} "
              f"RTT {row['rtt_ms']:8.2f}/{row['rtt_cfg_ms']:.2f} ms  ({time.monotonic() - t:.0f} s)", flush=True)
    sweep = []
    rates = [float(r) for r in args.sweep.split(",") if r.strip()]
    for rate in rates:
        m = await _measure_process(upstream, uaddr, ["--rate-up", str(rate), "--rate-down", str(rate), "--delay-ms", "0",
                                                     "--jitter-ms", "0", "--loss", "0"],
                                   rate, rate, args.seconds, args.pings, None)
        sweep.append({"rate_mbit": rate, "up_mbit": m["up_mbit"], "down_mbit": m["down_mbit"]})
        print(f"[link] sweep {rate:8.3f} Mbit/s: up {m['up_mbit']:9.3f}  down {m['down_mbit']:9.3f}", flush=True)
    delays = []
    for d in [float(x) for x in args.delays.split(",") if x.strip()]:
        proc = LinkSimProcess(uaddr, "--rate-up", "50", "--rate-down", "50", "--delay-ms", str(d), "--jitter-ms", "0", "--loss", "0")
        n = max(5, args.pings // 3)
        try:
            rtts, bases = [], []
            for _ in range(3):  # alternate with bare pings so bursts of load hit both alike
                bases += await measure_rtt(uaddr, n, gap_s=0.005)
                rtts += await measure_rtt(proc.addr, n, gap_s=0.005)
        finally:
            proc.stop()
        base = median(bases) * 1000
        delays.append({"delay_ms": d, "base_rtt_ms": base, "rtt_cfg_ms": 2 * d + base, "rtt_ms": median(rtts) * 1000,
                       "rtt_min_ms": min(rtts) * 1000, "rtt_max_ms": max(rtts) * 1000})
        print(f"[link] delay {d:6.1f} ms: RTT {delays[-1]['rtt_ms']:.3f} ms (configured + base {2 * d + base:.3f})", flush=True)
    await upstream.close()
    tbf = _tbf_sweep(rates, args)
    return {
        "suite": "link",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "base_rtt_ms": base_rtt_ms,
        "seconds_per_measurement": args.seconds,
        "profiles": rows,
        "sweep": sweep,
        "delays": delays,
        "tbf": tbf,
    }


def _tbf_sweep(rates: list[float], args: argparse.Namespace) -> dict:
    if args.no_tbf:
        return {"skipped": "--no-tbf"}
    from sim.link.netns import WIRE_EFFICIENCY, measure_tbf_rate, tbf_unavailable_reason

    reason = tbf_unavailable_reason()
    if reason:
        print(f"[link] tc tbf cross-check skipped: {reason}", flush=True)
        return {"skipped": reason}
    points = []
    for rate in rates:
        try:
            got = measure_tbf_rate(rate, seconds=_window(rate, args.seconds))
        except Exception as e:  # a single failed point should not sink the whole bench
            points.append({"rate_mbit": rate, "error": str(e)})
            continue
        points.append({"rate_mbit": rate, "tbf_mbit": got, "tbf_payload_expected_mbit": rate * WIRE_EFFICIENCY})
        print(f"[link] tbf   {rate:8.3f} Mbit/s: {got:9.3f} (payload at line rate: {rate * WIRE_EFFICIENCY:.3f})", flush=True)
    return {"wire_efficiency": WIRE_EFFICIENCY, "points": points}


# -- outputs ------------------------------------------------------------------


def _err(got: float, want: float) -> str:
    return f"{(got / want - 1) * 100:+.2f} %"


def markdown(res: dict) -> str:
    lines = [
        "# link-sim: configured vs delivered",
        "",
        f"Loopback, link-sim as its own process; rates are TCP payload measured at the receiver over "
        f"{res['seconds_per_measurement']:g} s windows (twice that below 0.5 Mbit/s); RTT is the median of "
        f"1-byte pings; configured RTT = 2 × one-way delay + bare loopback RTT ({res['base_rtt_ms']:.3f} ms). "
        "Measured with the profile's loss turned off (column `loss` is what the profile sets): with loss the "
        "stream waits one RTO behind each retransmission, so a few-second window swings by ±RTO/window. "
        "Trace rows: configured = the trace's capacity over the same window.",
        "",
        "| profile | up configured | up delivered | err | down configured | down delivered | err | RTT configured | RTT measured | err | jitter | loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["profiles"]:
        lines.append(
            f"| {r['profile']}{' (trace)' if r['trace'] else ''} | {r['up_cfg_mbit']:.3f} | {r['up_mbit']:.3f} | {_err(r['up_mbit'], r['up_cfg_mbit'])} "
            f"| {r['down_cfg_mbit']:.3f} | {r['down_mbit']:.3f} | {_err(r['down_mbit'], r['down_cfg_mbit'])} "
            f"| {r['rtt_cfg_ms']:.2f} ms | {r['rtt_ms']:.2f} ms | {r['rtt_ms'] - r['rtt_cfg_ms']:+.2f} ms "
            f"| {r['jitter_ms']:g} ms | {r['loss']:g} |"
        )
    lines += ["", "Rates in Mbit/s. With jitter the median RTT of a few pings is noisy (its standard error is about "
              "jitter / √pings); in trace mode a ping waits for "
              "the next delivery opportunity, as in Mahimahi; `lan` at 1 Gbit/s is beyond the promised range and "
              "limited by CPU on a shared 2-core machine.", ""]
    if res["delays"]:
        lines += [
            "## RTT sweep (50 Mbit/s, no jitter; promise: ±1 ms of 2 × delay + bare loopback RTT)",
            "",
            "| one-way delay | RTT configured (+ base) | RTT median | err | min | max |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for d in res["delays"]:
            lines.append(f"| {d['delay_ms']:g} ms | {d['rtt_cfg_ms']:.3f} ms | {d['rtt_ms']:.3f} ms | {d['rtt_ms'] - d['rtt_cfg_ms']:+.3f} ms "
                         f"| {d['rtt_min_ms']:.3f} ms | {d['rtt_max_ms']:.3f} ms |")
        lines.append("")
    if res["sweep"]:
        tbf = {p["rate_mbit"]: p for p in res["tbf"].get("points", [])}
        lines += [
            f"## Rate sweep (no delay; promise: ±3 % up to {PROMISED_MAX_MBIT:g} Mbit/s)",
            "",
            "| configured Mbit/s | up delivered | err | down delivered | err | tc tbf delivered | tbf expected (payload) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in res["sweep"]:
            t = tbf.get(s["rate_mbit"], {})
            tcol = f"{t['tbf_mbit']:.3f} | {t['tbf_payload_expected_mbit']:.3f}" if "tbf_mbit" in t else "– | –"
            lines.append(
                f"| {s['rate_mbit']:g} | {s['up_mbit']:.3f} | {_err(s['up_mbit'], s['rate_mbit'])} "
                f"| {s['down_mbit']:.3f} | {_err(s['down_mbit'], s['rate_mbit'])} | {tcol} |"
            )
        if "skipped" in res["tbf"]:
            lines += ["", f"tc tbf cross-check skipped: {res['tbf']['skipped']}"]
        else:
            lines += ["", "tbf meters whole Ethernet frames, link-sim meters payload: at line rate tbf should deliver "
                      f"{res['tbf']['wire_efficiency']:.4f} × the configured rate as payload."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    if res["sweep"]:
        xs = [s["rate_mbit"] for s in res["sweep"]]
        ax.plot(xs, [s["up_mbit"] / s["rate_mbit"] for s in res["sweep"]], "o-", label="link-sim up")
        ax.plot(xs, [s["down_mbit"] / s["rate_mbit"] for s in res["sweep"]], "s-", label="link-sim down")
        pts = [p for p in res["tbf"].get("points", []) if "tbf_mbit" in p]
        if pts:
            ax.plot([p["rate_mbit"] for p in pts], [p["tbf_mbit"] / p["tbf_payload_expected_mbit"] for p in pts],
                    "^--", label="tc tbf (payload-normalised)")
        ax.axhspan(0.97, 1.03, color="green", alpha=0.1, label="±3 %")
        ax.axvline(PROMISED_MAX_MBIT, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("configured rate (Mbit/s)")
        ax.set_ylabel("delivered / configured")
        ax.set_title("Rate sweep")
        ax.legend(fontsize=8)
    ax = axes[1]
    rows = res["profiles"]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["up_mbit"] / r["up_cfg_mbit"] for r in rows], 0.4, label="up delivered/configured")
    ax.bar([i + 0.2 for i in x], [r["down_mbit"] / r["down_cfg_mbit"] for r in rows], 0.4, label="down delivered/configured")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0.8, 1.1)
    ax.set_xticks(list(x), [r["profile"] for r in rows], rotation=30, fontsize=8)
    ax.set_ylabel("rate ratio")
    ax2 = ax.twinx()
    ax2.plot(list(x), [r["rtt_ms"] - r["rtt_cfg_ms"] for r in rows], "kD", label="RTT error (ms)")
    ax2.axhspan(-1, 1, color="orange", alpha=0.08)
    ax2.set_ylim(-5, 5)
    ax2.set_ylabel("RTT measured − configured (ms)")
    ax.set_title("Profiles")
    ax.legend(loc="lower left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.seconds, args.pings, args.no_tbf = 1.5, 10, True
        args.sweep, args.delays = "0.064,1,16,200", "0,10"
    res = run_precise(_bench(args))
    for p in (args.json, args.md, args.png):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    md = markdown(res)
    Path(args.md).write_text(md)
    plot(res, Path(args.png))
    print(md)
    print(f"[link] wrote {args.json}, {args.md}, {args.png}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="tandem-bench link", description=__doc__.splitlines()[0])
    add_args(p)
    raise SystemExit(run(p.parse_args()))
