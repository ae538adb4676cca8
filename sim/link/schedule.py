"""Schedule files: timed commands, one per line.

    # seconds since start, then a command (see sim.link.commands)
    10    profile 3g
    20    outage 2
    25.5  set rate-down=1 delay=80

Times may carry an `s` or `ms` suffix and must not go backwards. Every line is
checked when the file is loaded (against the configuration it would produce),
so a typo fails at start-up naming its line, not half an hour into a run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sim.link.commands import Command, parse_command, updated_config
from sim.link.config import ConfigError, LinkConfig


@dataclass(frozen=True)
class Step:
    at_s: float
    command: Command
    line: int


def _time(word: str) -> float:
    w = word.lower()
    scale = 1.0
    if w.endswith("ms"):
        w, scale = w[:-2], 1e-3
    elif w.endswith("s"):
        w = w[:-1]
    return float(w) * scale


def parse_schedule(text: str, path: str, base: LinkConfig, profiles: dict[str, LinkConfig]) -> list[Step]:
    steps: list[Step] = []
    config = base
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        when, _, rest = line.partition(" ")
        try:
            at = _time(when)
        except ValueError:
            raise ConfigError(f"{path}:{lineno}: expected a time in seconds first, got {when!r}") from None
        if at < 0 or at != at:
            raise ConfigError(f"{path}:{lineno}: time {when} is negative")
        if steps and at < steps[-1].at_s:
            raise ConfigError(f"{path}:{lineno}: time {when} is before the previous step ({steps[-1].at_s:g} s)")
        try:
            cmd = parse_command(rest)
            config = updated_config(config, cmd, profiles)
        except ConfigError as e:
            raise ConfigError(f"{path}:{lineno}: {e}") from None
        steps.append(Step(at, cmd, lineno))
    return steps


def load_schedule(path: str | Path, base: LinkConfig, profiles: dict[str, LinkConfig]) -> list[Step]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read schedule {p}: {e.strerror}") from None
    return parse_schedule(text, str(p), base, profiles)


async def run_schedule(steps: list[Step], started: float, clock: Callable[[], float], execute: Callable[[Command], dict]) -> None:
    for step in steps:
        delay = started + step.at_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        execute(step.command)
