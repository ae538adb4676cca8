"""link-sim's MQTT control topic: payload grammar, a real mosquitto broker, and life without one."""

import asyncio
import json
import socket
import time

import pytest

from sim.link.config import ConfigError
from sim.link.measure import LinkSimProcess
from sim.link.mqttctl import payload_commands, topics
from sim.link.timing import run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "payload, cmds",
    [
        (b"profile 3g", ["profile 3g"]),
        (b'{"profile": "3g"}', ["profile 3g"]),
        (b'{"rate_down": 2, "delay": 40}', ["set rate-down=2 delay=40"]),
        (b'{"profile": "lte", "delay": 80}', ["profile lte", "set delay=80"]),
        (b'{"outage": 2, "mode": "reset"}', ["outage 2 reset"]),
        (b'{"restore": true}', ["restore"]),
    ],
)
def test_payloads_become_commands(payload, cmds):
    assert payload_commands(payload) == cmds


@pytest.mark.parametrize("payload", [b"{not json", b"{}"])
def test_bad_payloads_are_refused(payload):
    with pytest.raises(ConfigError):
        payload_commands(payload)


def test_runs_on_without_a_broker():
    """MQTT is optional: a dead broker address must not stop the link."""
    with socket.create_server(("127.0.0.1", 0)) as echo_srv:
        proc = LinkSimProcess(echo_srv.getsockname(), "--profile", "lan", "--mqtt", f"127.0.0.1:{free_port()}")
        time.sleep(0.5)
        assert proc.proc.poll() is None
        with socket.create_connection(proc.addr, timeout=5) as c:
            conn, _ = echo_srv.accept()
            c.sendall(b"still shaping")
            assert conn.recv(100) == b"still shaping"
            conn.close()
        proc.proc.send_signal(2)
        out, err = proc.proc.communicate(timeout=10)
    assert proc.proc.returncode == 0
    assert "MQTT broker" in err and "unavailable" in err
    assert json.loads(out.strip().splitlines()[-1])["final"] is True


def test_conditions_change_over_mqtt(broker):
    import aiomqtt

    with socket.create_server(("127.0.0.1", 0)) as up:
        link = LinkSimProcess(up.getsockname(), "--profile", "lan", "--mqtt", f"127.0.0.1:{broker.port}", "--name", "t1")
        set_topic, state_topic = topics("t1")

        async def main():
            async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                await client.subscribe(state_topic)
                replies = []

                async def collect():
                    async for m in client.messages:
                        replies.append(json.loads(m.payload))
                        if replies[-1].get("command", "").startswith("set"):
                            return

                task = asyncio.create_task(collect())
                # the link may still be connecting: publish until it answers
                for _ in range(50):
                    await client.publish(set_topic, json.dumps({"profile": "3g", "rate_down": 5}))
                    try:
                        await asyncio.wait_for(asyncio.shield(task), 0.3)
                        break
                    except asyncio.TimeoutError:
                        continue
                return replies

        replies = run(main())
        rep = link.stop()
    last = replies[-1]
    assert last["ok"] and last["conditions"]["profile"] == "3g"
    assert last["conditions"]["down"]["rate_mbit"] == 5 and last["conditions"]["up"]["rate_mbit"] == 0.5
    assert rep["conditions"]["down"]["rate_mbit"] == 5
