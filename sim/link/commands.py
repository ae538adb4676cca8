"""The one command grammar for live control: control port, schedule files, MQTT.

  profile NAME                 switch both directions to a named profile
  set KEY=VALUE ...            change single conditions (keys below)
  outage SECONDS [wait|reset]  take the link down now for SECONDS
  restore                      end an outage now
  status                       report conditions and counters

`set` keys, each with an optional -up / -down suffix (none = both directions):
  rate (Mbit/s; leaves trace mode), delay (ms, one way), jitter (ms),
  dist (normal|uniform|exponential), loss (segment loss probability),
  queue (KB of bottleneck buffer, 0 = auto), trace (Mahimahi file or 'none');
  and without suffix: rto (ms, 0 = auto), outage-mode (wait|reset).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from sim.link.config import OUTAGE_MODES, ConfigError, Direction, LinkConfig
from sim.link.trace import load_trace

VERBS = ("profile", "set", "outage", "restore", "status")
_FIELDS = {
    "rate": "rate_mbit",
    "delay": "delay_ms",
    "jitter": "jitter_ms",
    "dist": "jitter_dist",
    "loss": "loss",
    "queue": "queue_kbyte",
    "trace": "trace",
}
SET_KEYS = tuple(f"{k}{s}" for k in _FIELDS for s in ("", "-up", "-down")) + ("rto", "outage-mode")


@dataclass(frozen=True)
class Command:
    verb: str
    profile: str | None = None
    changes: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    mode: str | None = None

    def __str__(self) -> str:
        if self.verb == "profile":
            return f"profile {self.profile}"
        if self.verb == "set":
            return "set " + " ".join(f"{k}={v}" for k, v in self.changes)
        if self.verb == "outage":
            return f"outage {self.seconds:g}" + (f" {self.mode}" if self.mode else "")
        return self.verb


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected a number") from None


def parse_command(text: str) -> Command:
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:
        raise ConfigError(f"cannot split {text!r}: {e}") from None
    if not words:
        raise ConfigError("empty command")
    verb, args = words[0].lower(), words[1:]
    if verb not in VERBS:
        raise ConfigError(f"unknown command {verb!r}; expected one of {', '.join(VERBS)}")
    if verb == "profile":
        if len(args) != 1:
            raise ConfigError("usage: profile NAME")
        return Command("profile", profile=args[0])
    if verb == "set":
        if not args:
            raise ConfigError("usage: set KEY=VALUE ...")
        changes = []
        for a in args:
            key, eq, value = a.partition("=")
            if not eq or key not in SET_KEYS:
                raise ConfigError(f"bad setting {a!r}; keys: {', '.join(SET_KEYS)}")
            changes.append((key, value))
        return Command("set", changes=tuple(changes))
    if verb == "outage":
        if not 1 <= len(args) <= 2:
            raise ConfigError("usage: outage SECONDS [wait|reset]")
        seconds = _number("outage", args[0])
        if not 0 < seconds <= 86_400:
            raise ConfigError(f"outage of {seconds:g} s out of range (0, 86400]")
        mode = args[1] if len(args) == 2 else None
        if mode is not None and mode not in OUTAGE_MODES:
            raise ConfigError(f"outage mode {mode!r} unknown; choose wait or reset")
        return Command("outage", seconds=seconds, mode=mode)
    if args:
        raise ConfigError(f"{verb} takes no arguments")
    return Command(verb)


def updated_config(config: LinkConfig, cmd: Command, profiles: dict[str, LinkConfig]) -> LinkConfig:
    """The configuration after a `profile` or `set` command; raises ConfigError on bad values."""
    if cmd.verb == "profile":
        if cmd.profile not in profiles:
            raise ConfigError(f"unknown profile {cmd.profile!r}; known: {', '.join(sorted(profiles))}")
        p = profiles[cmd.profile]
        return config.replace(up=p.up, down=p.down, profile=cmd.profile)
    if cmd.verb != "set":
        return config
    dirs = {"up": {}, "down": {}}
    top: dict = {}
    for key, value in cmd.changes:
        if key == "rto":
            top["rto_ms"] = _number(key, value)
            continue
        if key == "outage-mode":
            top["outage_mode"] = value
            continue
        base, _, side = key.partition("-")
        field = _FIELDS[base]
        if field in ("jitter_dist",):
            parsed: object = value
        elif field == "trace":
            if value.lower() == "none":
                parsed = None
            else:
                parsed = str(Path(value).resolve())
                load_trace(parsed)  # fail now, with the trace's own line, not mid-run
        else:
            parsed = _number(key, value)
        for d in ((side,) if side else ("up", "down")):
            dirs[d][field] = parsed
            if field == "rate_mbit":
                dirs[d]["trace"] = None  # an explicit rate leaves trace mode
    up: Direction = config.up.replace(**dirs["up"])
    down: Direction = config.down.replace(**dirs["down"])
    return config.replace(up=up, down=down, **top)
