"""Config files, shared by the three daemons.

Every daemon (edge-agent, cloud-verifier, link-sim) takes `--config FILE.toml`
beside its flags. The file holds the same settings as the flags, one key per
long flag (`max-sessions = 4` or `max_sessions = 4`); a flag given on the
command line wins over the file, and the file wins over the flag's default.
`--print-config` prints the effective settings as TOML (a file that gives
them back) and exits. The mechanism is argparse's own: the file's values
become the parser's defaults, so types, choices and flags' precedence are the
same whether a setting comes from the command line or the file.

Addresses (HOST:PORT, mqtt://) are common/address.py's.
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import tomli_w

# Settings that are about reading the configuration, never part of it.
NOT_SETTINGS = {"help", "config", "print_config", "func", "command"}
# Never printed by --print-config (the output ends up in logs and bug reports).
SECRETS = {"token", "password"}


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def add_config_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", type=Path, metavar="FILE.toml",
                    help="read settings from a TOML file: one key per long flag (e.g. max-tokens = 64); "
                         "flags given on the command line win")
    ap.add_argument("--print-config", action="store_true",
                    help="print the effective settings (file + flags) as TOML and exit")


def config_path(argv: list[str]) -> Path | None:
    """The --config FILE in argv, if any (read before the real parse)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    return known.config


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigFileError(f"{path}: {e}") from None
    return data


def settings_actions(ap: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every optional flag that is a setting."""
    return {a.dest: a for a in ap._actions
            if a.option_strings and a.dest not in NOT_SETTINGS and a.dest != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}


def _check_value(path: Path, key: str, action: argparse.Action, value):
    """The value argparse would hold for this flag, or a ConfigFileError naming the key."""
    where = f"{path}: {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, (dict, list)) and action.nargs in (None, "?"):
        raise ConfigFileError(f"{where} must be a single value, got {value!r}")
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or isinstance(v, dict):
            raise ConfigFileError(f"{where}: {v!r} is not a valid value")
        if action.type is None:
            v = v if isinstance(v, str) else str(v)
        else:
            try:
                # argparse's own converter, fed the text a user would type
                v = action.type(v if isinstance(v, str) else str(v))
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                raise ConfigFileError(f"{where}: {v!r} is not a valid value ({e})") from None
        if action.choices is not None and v not in action.choices:
            raise ConfigFileError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(v)
    return out if isinstance(value, list) else out[0]


def apply_config_file(ap: argparse.ArgumentParser, path: Path) -> dict:
    """Make the file's settings `ap`'s defaults; returns them. Unknown keys and
    wrong types are errors that name the key (a typo must not pass silently)."""
    data = load_toml(path)
    actions = settings_actions(ap)
    values = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            known = ", ".join(sorted(k.replace("_", "-") for k in actions))
            raise ConfigFileError(f"{path}: unknown setting {key!r}; known settings: {known}")
        values[dest] = _check_value(path, key, action, value)
        action.required = False   # the file gives it: the flag is no longer needed
    ap.set_defaults(**values)
    return values


def parse_args_with_config(ap: argparse.ArgumentParser, argv: list[str] | None,
                           target: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse argv with `--config FILE` applied to `target` (default `ap`, or the
    subcommand's parser) first. Raises ConfigFileError."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    path = config_path(argv)
    if path is not None:
        apply_config_file(target or ap, path)
    return ap.parse_args(argv)


def effective_settings(ap: argparse.ArgumentParser, ns: argparse.Namespace) -> dict:
    """The settings `ns` holds for the flags of `ap`, by flag name."""
    out = {}
    for dest in settings_actions(ap):
        if hasattr(ns, dest):
            out[dest.replace("_", "-")] = getattr(ns, dest)
    return out


def to_toml(settings: dict, header: str = "") -> str:
    """TOML for `settings`; a setting without a value (None) is a comment."""
    plain, unset = {}, []
    for k, v in settings.items():
        if v is None:
            unset.append(f"# {k} = (not set)")
        elif k in SECRETS:
            unset.append(f"# {k} = (set; not printed)")
        elif isinstance(v, Path):
            plain[k] = str(v)
        elif isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int):
            plain[k] = f"{v[0]}:{v[1]}"      # a parsed HOST:PORT flag, written as it is typed
        elif isinstance(v, (tuple, list)):
            plain[k] = [str(x) if isinstance(x, Path) else x for x in v]
        else:
            plain[k] = v
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    text = tomli_w.dumps(plain)
    return "\n".join(lines + [text.rstrip("\n")] + unset) + "\n"

