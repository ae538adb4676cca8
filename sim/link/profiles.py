"""Named link profiles, all in one TOML file (sim/link_profiles.toml).

Each table is a profile; `source` says where its numbers come from. Errors name
the file and line: tomllib reports syntax errors by line, and for bad values we
find the line of the offending key ourselves.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from sim.link.config import ConfigError, Direction, LinkConfig

DEFAULT_PROFILES = Path(__file__).resolve().parent.parent / "link_profiles.toml"
DEFAULT_PROFILE = "picospec-wan"

# key -> (direction(s), Direction field)
_KEYS = {
    "rate_up_mbit": (("up",), "rate_mbit"),
    "rate_down_mbit": (("down",), "rate_mbit"),
    "delay_ms": (("up", "down"), "delay_ms"),
    "delay_up_ms": (("up",), "delay_ms"),
    "delay_down_ms": (("down",), "delay_ms"),
    "jitter_ms": (("up", "down"), "jitter_ms"),
    "jitter_up_ms": (("up",), "jitter_ms"),
    "jitter_down_ms": (("down",), "jitter_ms"),
    "jitter_dist": (("up", "down"), "jitter_dist"),
    "loss": (("up", "down"), "loss"),
    "loss_up": (("up",), "loss"),
    "loss_down": (("down",), "loss"),
    "queue_kbyte": (("up", "down"), "queue_kbyte"),
    "queue_up_kbyte": (("up",), "queue_kbyte"),
    "queue_down_kbyte": (("down",), "queue_kbyte"),
    "trace_up": (("up",), "trace"),
    "trace_down": (("down",), "trace"),
}
_STR_FIELDS = {"jitter_dist", "trace"}


def _key_line(text: str, table: str, key: str | None) -> int | None:
    """Line number of `[table]` (key None) or of `key = …` inside it."""
    current = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        m = re.match(r'^\[\s*"?([^"\]]+)"?\s*\]', line)
        if m:
            current = m.group(1).strip()
            if key is None and current == table:
                return lineno
            continue
        if current == table and key is not None and re.match(rf'^"?{re.escape(key)}"?\s*=', line):
            return lineno
    return None


def _where(path: str, text: str, table: str, key: str | None = None) -> str:
    line = _key_line(text, table, key)
    return f"{path}:{line}" if line else path


def load_profiles(path: str | Path = DEFAULT_PROFILES) -> dict[str, LinkConfig]:
    """All profiles in the file, validated; trace paths become absolute."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read profiles {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    out: dict[str, LinkConfig] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{_where(str(p), text, name, None)}: top-level key {name!r} must be a [profile] table")
        out[name] = _profile(name, table, str(p), text, p.parent)
    if not out:
        raise ConfigError(f"{p}: no profiles defined")
    return out


def _profile(name: str, table: dict, path: str, text: str, base: Path) -> LinkConfig:
    if not isinstance(table.get("source"), str) or not table["source"].strip():
        raise ConfigError(f"{_where(path, text, name)}: profile {name!r} needs a one-line `source` (where its numbers come from)")
    fields: dict[str, dict] = {"up": {}, "down": {}}
    for key, value in table.items():
        if key == "source":
            continue
        if key not in _KEYS:
            raise ConfigError(
                f"{_where(path, text, name, key)}: unknown key {key!r} in profile {name!r}; known: {', '.join(_KEYS)}"
            )
        dirs, field = _KEYS[key]
        want_str = field in _STR_FIELDS
        if want_str != isinstance(value, str) or isinstance(value, bool):
            kind = "a string" if want_str else "a number"
            raise ConfigError(f"{_where(path, text, name, key)}: {key} must be {kind}, got {value!r}")
        if field == "trace":
            value = str((base / value).resolve())
        else:
            try:
                Direction(**{field: value})  # validate this value alone, to name its line
            except ConfigError as e:
                raise ConfigError(f"{_where(path, text, name, key)}: {key}: {e}") from None
        for d in dirs:
            fields[d][field] = value
    for d in ("up", "down"):
        if "rate_mbit" not in fields[d] and "trace" not in fields[d]:
            raise ConfigError(f"{_where(path, text, name)}: profile {name!r} needs rate_{d}_mbit or trace_{d}")
    up, down = Direction(**fields["up"]), Direction(**fields["down"])
    for d, cond in (("up", up), ("down", down)):
        if cond.trace and not Path(cond.trace).is_file():
            raise ConfigError(f"{_where(path, text, name, 'trace_' + d)}: trace file {cond.trace} not found")
    return LinkConfig(up=up, down=down, profile=name)


def profile_sources(path: str | Path = DEFAULT_PROFILES) -> dict[str, str]:
    data = tomllib.loads(Path(path).read_text())
    return {name: table.get("source", "") for name, table in data.items()}
