"""Config files for every daemon: file + flags (flags win), --print-config shows the result."""
import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.address import mqtt_address
from common.daemon_config import ConfigFileError, add_config_args, apply_config_file, effective_settings, \
    parse_args_with_config, to_toml

ROOT = Path(__file__).resolve().parent.parent


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--mode", choices=("a", "b"), default="a")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--path", type=Path)
    ap.add_argument("--token")
    add_config_args(ap)
    return ap


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_file_beats_defaults_and_flags_beat_the_file(tmp_path):
    f = write(tmp_path, 'listen = "0.0.0.0:1"\nrate = 2\ncount = 3\nmode = "b"\nquiet = true\npath = "/x"\n')
    a = parse_args_with_config(parser(), ["--config", str(f), "--count", "7"])
    assert (a.listen, a.rate, a.count, a.mode, a.quiet, a.path) == ("0.0.0.0:1", 2.0, 7, "b", True, Path("/x"))
    assert isinstance(a.rate, float)


def test_a_required_flag_may_come_from_the_file(tmp_path):
    a = parse_args_with_config(parser(), ["--config", str(write(tmp_path, 'listen = "h:1"\n'))])
    assert a.listen == "h:1"
    with pytest.raises(SystemExit):
        parse_args_with_config(parser(), [])


@pytest.mark.parametrize("text, message", [
    ("cuont = 3\n", "unknown setting 'cuont'"),
    ('count = "many"\n', "count: 'many' is not a valid value"),
    ('mode = "c"\n', "'c' is not one of a, b"),
    ('quiet = "yes"\n', "quiet must be true or false"),
    ("count = [1, 2]\n", "count must be a single value"),
    ("count = \n", "not valid TOML"),
])
def test_bad_files_name_the_setting(tmp_path, text, message):
    with pytest.raises(ConfigFileError) as e:
        apply_config_file(parser(), write(tmp_path, text))
    assert message in str(e.value) and "c.toml" in str(e.value)


def test_a_missing_file_is_an_error():
    with pytest.raises(ConfigFileError, match="not found"):
        apply_config_file(parser(), Path("/no/such.toml"))


def test_print_config_round_trips_and_hides_secrets(tmp_path):
    ap = parser()
    a = parse_args_with_config(ap, ["--listen", "h:1", "--count", "4", "--token", "s3cret"])
    text = to_toml(effective_settings(ap, a), "header")
    assert "s3cret" not in text and "# token = (set; not printed)" in text and "# path = (not set)" in text
    data = tomllib.loads(text)
    assert data == {"listen": "h:1", "rate": 10.0, "count": 4, "mode": "a", "quiet": False}
    b = parse_args_with_config(parser(), ["--config", str(write(tmp_path, text))])
    assert (b.listen, b.count, b.rate) == ("h:1", 4, 10.0)


@pytest.mark.parametrize("text, want", [("mqtt://h:1884", ("h", 1884)), ("h:1", ("h", 1)), ("h", ("h", 1883)),
                                        ("mqtt://[::1]:9", ("::1", 9))])
def test_mqtt_addresses(text, want):
    assert mqtt_address(text) == want


@pytest.mark.parametrize("text", ["http://h:1", "h:x", "h:70000", "mqtt://:1"])
def test_bad_mqtt_addresses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        mqtt_address(text)


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_edge_agent_serve(tmp_path):
    f = write(tmp_path, 'cloud = "10.0.0.1:50051"\nqueue-size = 3\nmode = "sync"\nmqtt = "broker:1884"\n'
                        'telemetry-interval = 2\nno-cloud-lead = true\n')
    r = run("edge.cli", "serve", "--config", str(f), "--queue-size", "5", "--print-config")
    assert r.returncode == 0, r.stderr
    got = tomllib.loads(r.stdout)
    assert (got["cloud"], got["queue-size"], got["mode"], got["mqtt"], got["telemetry-interval"],
            got["no-cloud-lead"], got["http"]) == ("10.0.0.1:50051", 5, "sync", "mqtt://broker:1884", 2.0, True,
                                                  "127.0.0.1:8080")
    bad = run("edge.cli", "serve", "--config", str(write(tmp_path, "queue_sise = 1\n")))
    assert bad.returncode == 2 and "unknown setting 'queue_sise'" in bad.stderr and "Traceback" not in bad.stderr


def test_cloud_verifier(tmp_path):
    f = write(tmp_path, 'max-sessions = 3\nthreads = 1\nemulate-target = "qwen3-32b-a100"\nmqtt = "mqtt://b:1"\n'
                        'token = "secret"\n')
    r = run("cloud.cli", "--config", str(f), "--threads", "2", "--print-config")
    assert r.returncode == 0, r.stderr
    got = tomllib.loads(r.stdout)
    assert (got["max-sessions"], got["threads"], got["emulate-target"], got["mqtt"]) == \
        (3, 2, "qwen3-32b-a100", "mqtt://b:1")
    assert "secret" not in r.stdout


def test_link_sim(tmp_path):
    f = write(tmp_path, 'listen = "127.0.0.1:0"\nupstream = "127.0.0.1:9"\nprofile = "lte"\ndelay-ms = 30\n'
                        'mqtt = "mqtt://127.0.0.1:1884"\n')
    r = run("sim.link.cli", "--config", str(f), "--delay-ms", "45", "--print-config")
    assert r.returncode == 0, r.stderr
    got = tomllib.loads(r.stdout)
    assert (got["listen"], got["upstream"], got["profile"], got["delay-ms"], got["mqtt"]) == \
        ("127.0.0.1:0", "127.0.0.1:9", "lte", 45.0, "127.0.0.1:1884")
    again = run("sim.link.cli", "--config", str(write(tmp_path, r.stdout)), "--print-config")
    assert again.returncode == 0 and again.stdout == r.stdout


def test_serve_help_explains_every_flag():
    from edge.serve.daemon import add_serve_args
    r = run("edge.cli", "serve", "--help")
    assert r.returncode == 0
    ap = argparse.ArgumentParser()
    add_serve_args(ap)
    for action in ap._actions:
        for opt in action.option_strings:
            assert opt in r.stdout
        assert action.help, action.option_strings
    for opt in ("--cloud", "--mode", "--codec", "--draft-model", "--gamma", "--emulate-device"):   # generate's
        assert opt in r.stdout
    for word in ("/v1/chat/completions", "/healthz", "/metrics", "include_usage", "tandem/edge/ID/telemetry"):
        assert word in r.stdout
