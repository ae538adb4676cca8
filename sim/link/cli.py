"""`link-sim`: the shaping proxy, plus `link-sim ctl` (live control) and `link-sim profiles`."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from common.address import host_port, mqtt_address
from common.daemon_config import ConfigFileError, add_config_args, effective_settings, parse_args_with_config, to_toml
from sim.link.commands import SET_KEYS, Command, parse_command, updated_config
from sim.link.config import JITTER_DISTS, OUTAGE_MODES, ConfigError, LinkConfig
from sim.link.profiles import DEFAULT_PROFILE, DEFAULT_PROFILES, load_profiles, profile_sources
from sim.link.report import dumps
from sim.link.schedule import load_schedule, run_schedule
from sim.link.timing import run

_EPILOG = """\
subcommands:
  link-sim ctl HOST:PORT COMMAND...   send one command to a running link-sim's --control port
  link-sim profiles [--profiles FILE] list the named profiles and their sources
  link-sim tbf RATE_MBIT              cross-check: bulk TCP through kernel tc tbf between two
                                      network namespaces it creates (needs root; else says why)

commands (control port, --schedule files, MQTT):
  profile NAME | set KEY=VALUE ... | outage SECONDS [wait|reset] | restore | status
  set keys: """ + ", ".join(SET_KEYS) + """
  (rate in Mbit/s, delay/jitter/rto in ms, queue in KB, loss as a probability)

Output: one line 'link-sim listening on HOST:PORT' on stdout when ready; on
SIGTERM/SIGINT a final JSON report on stdout, exit 0. Errors in flags, profile,
trace or schedule files exit 2 with a message naming the file line.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="link-sim",
        description="Userspace TCP proxy that shapes the edge–cloud link in both directions "
        "(rate, delay, jitter, TCP-style loss, bottleneck buffer, outages, Mahimahi traces) "
        "and reports what it delivered.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", type=host_port, required=True, metavar="HOST:PORT",
                   help="address the edge connects to (port 0 picks a free port; the ready line shows it)")
    p.add_argument("--upstream", type=host_port, required=True, metavar="HOST:PORT",
                   help="the cloud-side server every connection is forwarded to")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help=f"named profile from the profiles file (default {DEFAULT_PROFILE}); flags below override it")
    p.add_argument("--profiles", default=str(DEFAULT_PROFILES), metavar="FILE",
                   help="profiles TOML file (default: sim/link_profiles.toml)")
    g = p.add_argument_group("conditions (override the profile)")
    g.add_argument("--rate-up", type=float, metavar="MBIT", help="edge→cloud (client→upstream) rate, Mbit/s")
    g.add_argument("--rate-down", type=float, metavar="MBIT", help="cloud→edge (upstream→client) rate, Mbit/s")
    g.add_argument("--delay-ms", type=float, metavar="MS",
                   help="one-way delay added in each direction, ms (RTT grows by twice it)")
    g.add_argument("--delay-up-ms", type=float, metavar="MS", help="one-way delay edge→cloud only")
    g.add_argument("--delay-down-ms", type=float, metavar="MS", help="one-way delay cloud→edge only")
    g.add_argument("--jitter-ms", type=float, metavar="MS",
                   help="jitter of the one-way delay (σ for normal, half-width for uniform, mean for exponential); "
                   "never reorders bytes")
    g.add_argument("--jitter-dist", choices=JITTER_DISTS, help="jitter distribution (default normal)")
    g.add_argument("--loss", type=float, metavar="P",
                   help="probability a 1448-byte segment is lost; TCP retransmits it one RTO later")
    g.add_argument("--loss-up", type=float, metavar="P", help="segment loss edge→cloud only")
    g.add_argument("--loss-down", type=float, metavar="P", help="segment loss cloud→edge only")
    g.add_argument("--queue-kb", type=float, metavar="KB",
                   help="bottleneck buffer per direction in KB (bufferbloat); senders wait when full; "
                   "0 = 100 ms at the rate, at least 32 KB")
    g.add_argument("--trace-up", metavar="FILE", help="Mahimahi trace for edge→cloud (replaces --rate-up), looped")
    g.add_argument("--trace-down", metavar="FILE", help="Mahimahi trace for cloud→edge (replaces --rate-down), looped")
    g.add_argument("--rto-ms", type=float, metavar="MS", help="retransmission timeout for lost segments (default max(200, RTT+4·jitter))")
    g.add_argument("--outage-mode", choices=OUTAGE_MODES,
                   help="during an outage bytes wait (default) or live connections are reset")
    g.add_argument("--seed", type=int, default=0, help="seed for jitter and loss draws (default 0)")
    c = p.add_argument_group("control and reports")
    c.add_argument("--schedule", metavar="FILE", help="timed commands, e.g. '10 profile 3g' / '20 outage 2'")
    c.add_argument("--control", type=host_port, metavar="HOST:PORT", help="listen for live commands (see `link-sim ctl`)")
    c.add_argument("--report-interval", type=float, default=0.0, metavar="SEC",
                   help="emit a JSON report line every SEC seconds (default 0: only the final report)")
    c.add_argument("--report-file", metavar="PATH", help="append interval reports here instead of stdout")
    c.add_argument("--mqtt", type=mqtt_address, metavar="mqtt://HOST:PORT",
                   help="MQTT broker for live control (mqtt://HOST:PORT or HOST:PORT); link-sim keeps running when it is absent")
    c.add_argument("--name", default="default", help="link name in MQTT topics tandem/link/NAME/set|state (default 'default')")
    add_config_args(p)
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    """Explicit flags as `set` settings, applied on top of the profile."""
    pairs = [
        ("rate-up", args.rate_up), ("rate-down", args.rate_down), ("delay", args.delay_ms),
        ("delay-up", args.delay_up_ms), ("delay-down", args.delay_down_ms), ("jitter", args.jitter_ms),
        ("dist", args.jitter_dist), ("loss", args.loss), ("loss-up", args.loss_up), ("loss-down", args.loss_down),
        ("queue", args.queue_kb), ("trace-up", args.trace_up), ("trace-down", args.trace_down),
        ("rto", args.rto_ms), ("outage-mode", args.outage_mode),
    ]
    return [f"{k}={v}" for k, v in pairs if v is not None]


def resolve_config(args: argparse.Namespace, profiles: dict[str, LinkConfig]) -> LinkConfig:
    name = args.profile or DEFAULT_PROFILE
    config = updated_config(LinkConfig(seed=args.seed), Command("profile", profile=name), profiles)
    settings = _overrides(args)
    if settings:
        config = updated_config(config, parse_command("set " + " ".join(settings)), profiles)
    return config


async def _serve(args: argparse.Namespace, config: LinkConfig, profiles: dict[str, LinkConfig], schedule) -> int:
    from sim.link.control import Controller, serve_control
    from sim.link.proxy import LinkSim

    loop = asyncio.get_running_loop()
    sim = LinkSim(config, args.upstream)
    controller = Controller(sim, profiles)
    host, port = await sim.start(*args.listen)
    tasks: list[asyncio.Task] = []
    control_server = None
    if args.control:
        control_server = await serve_control(controller, *args.control)
        ch, cp = control_server.sockets[0].getsockname()[:2]
        print(f"link-sim control on {ch}:{cp}", file=sys.stderr, flush=True)
    if schedule:
        tasks.append(asyncio.create_task(run_schedule(schedule, sim.started, sim.clock, controller.execute)))
    if args.report_interval > 0:
        tasks.append(asyncio.create_task(_report_loop(sim, args.report_interval, args.report_file)))
    if args.mqtt:
        from sim.link.mqttctl import mqtt_control

        tasks.append(asyncio.create_task(mqtt_control(controller, *args.mqtt, args.name)))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"link-sim listening on {host}:{port}", flush=True)
    await stop.wait()
    final = sim.final_report()
    for t in tasks:
        t.cancel()
    if control_server is not None:
        control_server.close()
    await sim.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(dumps(final), flush=True)
    return 0


async def _report_loop(sim, every: float, path: str | None) -> None:
    out = open(path, "a") if path else sys.stdout
    try:
        while True:
            await asyncio.sleep(every)
            out.write(dumps(sim.interval_report()) + "\n")
            out.flush()
    finally:
        if path:
            out.close()


def _ctl(argv: list[str]) -> int:
    from sim.link.control import send_command

    p = argparse.ArgumentParser(prog="link-sim ctl", description="Send one command to a running link-sim's control port.")
    p.add_argument("control", type=host_port, metavar="HOST:PORT")
    p.add_argument("command", nargs=argparse.REMAINDER, help="e.g. profile 3g | set rate-down=2 | outage 2 reset | status")
    args = p.parse_args(argv)
    if not args.command:
        p.error("missing command")
    try:
        reply = send_command(*args.control, " ".join(args.command))
    except OSError as e:
        print(f"link-sim ctl: cannot reach {args.control[0]}:{args.control[1]}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=1))
    return 0 if reply.get("ok") else 1


def _list_profiles(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="link-sim profiles", description="List the named link profiles.")
    p.add_argument("--profiles", default=str(DEFAULT_PROFILES), metavar="FILE")
    args = p.parse_args(argv)
    try:
        profiles = load_profiles(args.profiles)
    except ConfigError as e:
        print(f"link-sim: error: {e}", file=sys.stderr)
        return 2
    sources = profile_sources(args.profiles)
    for name, cfg in profiles.items():
        up = f"trace {Path(cfg.up.trace).name}" if cfg.up.trace else f"{cfg.up.rate_mbit:g} Mbit/s"
        down = f"trace {Path(cfg.down.trace).name}" if cfg.down.trace else f"{cfg.down.rate_mbit:g} Mbit/s"
        print(f"{name:14s} up {up:>16s}  down {down:>16s}  RTT {cfg.rtt_ms:g} ms  — {sources[name]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ctl":
        return _ctl(argv[1:])
    if argv and argv[0] == "profiles":
        return _list_profiles(argv[1:])
    if argv and argv[0] == "tbf":
        from sim.link import netns

        if len(argv) != 2:
            print("usage: link-sim tbf RATE_MBIT", file=sys.stderr)
            return 2
        return netns.main(["measure", argv[1]])
    parser = build_parser()
    try:
        args = parse_args_with_config(parser, argv)
    except ConfigFileError as e:
        print(f"link-sim: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(effective_settings(parser, args), "link-sim: effective configuration"), end="")
        return 0
    try:
        profiles = load_profiles(args.profiles)
        config = resolve_config(args, profiles)
        schedule = load_schedule(args.schedule, config, profiles) if args.schedule else []
    except ConfigError as e:
        print(f"link-sim: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(_serve(args, config, profiles, schedule))
    except OSError as e:
        print(f"link-sim: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
