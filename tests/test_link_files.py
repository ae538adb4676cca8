"""Profiles, traces, schedules and commands of link-sim: good files load, bad ones name their line."""

import filecmp
from pathlib import Path

import pytest

from sim.link.commands import Command, parse_command, updated_config
from sim.link.config import ConfigError, Direction, LinkConfig
from sim.link.profiles import DEFAULT_PROFILES, load_profiles
from sim.link.schedule import parse_schedule
from sim.link.trace import load_trace, parse_trace
from sim.traces import make_traces

REQUIRED = ["lan", "wifi", "5g", "lte", "3g", "satellite", "picospec-wan"]
TRACES_DIR = Path(make_traces.__file__).parent


def test_shipped_profiles_load_with_sources():
    profiles = load_profiles()
    for name in REQUIRED:
        assert name in profiles
    text = DEFAULT_PROFILES.read_text()
    assert text.count("source = ") == len(profiles)
    assert profiles["picospec-wan"].rtt_ms > 0


def test_trace_profile_points_at_shipped_traces():
    cfg = load_profiles()["lte-trace"]
    assert Path(cfg.up.trace).is_file() and Path(cfg.down.trace).is_file()


@pytest.mark.parametrize(
    "body, line, words",
    [
        ('[x]\nsource = "s"\nrate_up_mbit = 1\nrate_down_mbit = 5000\n', 4, "rate 5000"),
        ('[x]\nsource = "s"\nrate_up_mbit = 1\nrate_down_mbit = 1\nloss = 0.9\n', 5, "loss"),
        ('[x]\nsource = "s"\nrate_up_mbit = 1\nrate_down_mbit = 1\nspeed = 3\n', 5, "unknown key 'speed'"),
        ('[x]\nsource = "s"\nrate_up_mbit = "fast"\nrate_down_mbit = 1\n', 3, "must be a number"),
        ('[x]\nrate_up_mbit = 1\nrate_down_mbit = 1\n', 1, "source"),
        ('[x]\nsource = "s"\nrate_up_mbit = 1\n', 1, "rate_down_mbit or trace_down"),
        ('[x]\nsource = "s"\nrate_up_mbit = 1\nrate_down_mbit = 1\njitter_dist = "cauchy"\n', 5, "cauchy"),
        ('[x]\nsource = "s"\nrate_up_mbit = 1\ntrace_down = "nope.mahi"\n', 4, "not found"),
        ('[x]\nsource = "s"\nrate_up_mbit = = 1\n', 3, "line 3"),
    ],
)
def test_bad_profile_names_line(tmp_path, body, line, words):
    p = tmp_path / "profiles.toml"
    p.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_profiles(p)
    msg = str(e.value)
    assert words in msg
    assert f"{p}:{line}" in msg or f"line {line}" in msg


def test_trace_parses_and_loops():
    t = parse_trace("# comment\n1\n1\n2\n4\n", "t")
    assert t.times_ms == (1, 1, 2, 4) and t.period_ms == 4


@pytest.mark.parametrize(
    "body, line, words",
    [
        ("1\n2\nabc\n", 3, "integer"),
        ("1\n5\n3\n", 3, "back in time"),
        ("1\n-2\n", 2, "negative"),
        ("1.5\n", 1, "integer"),
    ],
)
def test_bad_trace_names_line(body, line, words):
    with pytest.raises(ConfigError, match=rf"tr:{line}: .*{words}"):
        parse_trace(body, "tr")


def test_empty_or_zero_period_trace_rejected():
    with pytest.raises(ConfigError, match="no delivery"):
        parse_trace("# nothing\n", "tr")
    with pytest.raises(ConfigError, match="loop period"):
        parse_trace("0\n0\n", "tr")


def test_shipped_traces_are_what_the_script_generates(tmp_path):
    make_traces.main([str(tmp_path)])
    for name in make_traces.TRACES:
        shipped = TRACES_DIR / f"{name}.mahi"
        assert filecmp.cmp(shipped, tmp_path / f"{name}.mahi", shallow=False), name
        mean = make_traces.TRACES[name][0]
        assert load_trace(shipped).mean_mbit == pytest.approx(mean, rel=0.001)


def test_shipped_traces_are_small():
    assert sum(p.stat().st_size for p in TRACES_DIR.glob("*.mahi")) < 200_000


def test_set_command_changes_only_what_it_names():
    base = LinkConfig(up=Direction(rate_mbit=5, delay_ms=10), down=Direction(rate_mbit=7, delay_ms=10))
    cfg = updated_config(base, parse_command("set rate-down=2 delay-up=30 loss=0.01 rto=300"), {})
    assert (cfg.up.rate_mbit, cfg.down.rate_mbit) == (5, 2)
    assert (cfg.up.delay_ms, cfg.down.delay_ms) == (30, 10)
    assert cfg.up.loss == cfg.down.loss == 0.01
    assert cfg.effective_rto_ms == 300


def test_profile_command_keeps_seed_and_mode():
    profiles = load_profiles()
    base = LinkConfig(seed=7, outage_mode="reset")
    cfg = updated_config(base, Command("profile", profile="3g"), profiles)
    assert cfg.up == profiles["3g"].up and cfg.seed == 7 and cfg.outage_mode == "reset"


@pytest.mark.parametrize(
    "text, words",
    [
        ("speed 3", "unknown command"),
        ("set rate-up", "bad setting"),
        ("set colour=blue", "bad setting"),
        ("set rate-up=fast", "expected a number"),
        ("set rate-up=0.001", "out of range"),
        ("outage -1", "out of range"),
        ("outage 2 maybe", "unknown"),
        ("profile", "usage"),
        ("profile atlantis", "unknown profile"),
        ("set trace-down=/nonexistent.mahi", "cannot read trace"),
    ],
)
def test_bad_commands_are_explained(text, words):
    with pytest.raises(ConfigError, match=words):
        updated_config(LinkConfig(), parse_command(text), load_profiles())


def test_schedule_parses_in_order():
    steps = parse_schedule("# t cmd\n1 profile 3g\n2.5s outage 2 reset\n3000ms restore\n", "s", LinkConfig(), load_profiles())
    assert [(s.at_s, str(s.command), s.line) for s in steps] == [
        (1.0, "profile 3g", 2),
        (2.5, "outage 2 reset", 3),
        (3.0, "restore", 4),
    ]


@pytest.mark.parametrize(
    "body, line, words",
    [
        ("1 profile 3g\nsoon outage 2\n", 2, "expected a time"),
        ("5 profile 3g\n2 profile lte\n", 2, "before the previous"),
        ("1 profile 3g\n\n3 set rate-down=99999\n", 3, "out of range"),
        ("1 profile mars\n", 1, "unknown profile"),
    ],
)
def test_bad_schedule_names_line(body, line, words):
    with pytest.raises(ConfigError, match=rf"sched:{line}: .*{words}"):
        parse_schedule(body, "sched", LinkConfig(), load_profiles())


def test_direction_validation_names_the_setting():
    with pytest.raises(ConfigError, match="rate 0.01 Mbit/s out of range"):
        Direction(rate_mbit=0.01)
    with pytest.raises(ConfigError, match="jitter distribution"):
        Direction(jitter_dist="cauchy")
    with pytest.raises(ConfigError, match="outage mode"):
        LinkConfig(outage_mode="panic")
