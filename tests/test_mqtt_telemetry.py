"""Edge telemetry on a real mosquitto: the documented schema, and a broker that dies
or hangs never stalls generation (publishing runs on its own thread and pulls
its numbers from counters, so generation has nothing to wait on)."""
import json
import queue
import socket
import time
import urllib.request

from common.procs import start_serve
from edge.telemetry import FIELDS, telemetry_topic
from tests.conftest import wait_for


class Subscriber:
    """Collects the JSON messages of one topic (paho, on its own thread)."""

    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt
        self.messages: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = lambda c, u, m: self.messages.put((json.loads(m.payload), m.retain))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def wait(self, pred=lambda m: True, timeout_s: float = 30) -> tuple[dict, bool]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                msg, retained = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if pred(msg):
                return msg, retained
        raise AssertionError("no matching MQTT message")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def complete(address: str, **body) -> dict:
    body = {"model": "tandem", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            **body}
    req = urllib.request.Request(f"http://{address}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise KeyError(name)


def test_telemetry_has_the_documented_schema(broker, wan):
    sub = Subscriber(broker.port, telemetry_topic("e1"))
    d = start_serve(wan.address, "--no-adaptive", "--mqtt", broker.url, "--id", "e1", "--telemetry-interval", "0.2")
    try:
        reply = complete(d.address)
        msg, retained = sub.wait(lambda m: m["completions_total"] >= 1)
    finally:
        sub.close()
        assert d.stop() == 0, "".join(d.stderr)
    assert set(msg) == set(FIELDS) and not retained
    assert msg["id"] == "e1" and msg["mode"] == "picospec" and msg["last_mode"] == "picospec"
    assert msg["tokens_total"] == reply["usage"]["completion_tokens"] == 16
    assert 0 <= msg["acceptance_rate"] <= 1 and msg["fallback"] is None and msg["verifier_reachable"] is True
    assert msg["link_rtt_ms"] > 40                    # picospec-wan: 50 ms
    assert msg["queue"] == {"waiting": 0, "running": 0, "capacity": 9}
    assert msg["cache_hit_rate"] is None and msg["emulated"] is False
    assert isinstance(msg["tokens_per_s"], float) and msg["interval_s"] > 0 and msg["ts"] > 1.7e9


def test_a_broker_that_dies_or_hangs_never_stalls_generation(broker):
    d = start_serve(None, "--mode", "edge-only", "--mqtt", broker.url, "--telemetry-interval", "0.1")
    try:
        addr = d.address
        wait_for(lambda: metric(addr, "tandem_telemetry_published") >= 1, what="telemetry to flow")
        want = complete(addr)["choices"][0]["text"]
        long = complete(addr, max_tokens=96)["choices"][0]["text"]
        # killed mid-run: the broker dies after the stream's first token, the stream goes on to the end
        body = json.dumps({"model": "tandem", "prompt": "Once upon a time", "max_tokens": 96, "temperature": 0,
                           "ignore_eos": True, "stream": True}).encode()
        req = urllib.request.Request(f"http://{addr}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            first = r.readline()
            broker.kill()
            events = [first] + r.read().split(b"\n\n")
        texts = [json.loads(e.strip()[6:])["choices"] for e in events if e.strip().startswith(b"data: {")]
        assert "".join(c[0]["text"] for c in texts if c) == long
        assert complete(addr)["choices"][0]["text"] == want          # and with the broker gone
        wait_for(lambda: metric(addr, "tandem_telemetry_failures") >= 1, what="the publisher to notice")
        assert metric(addr, "tandem_telemetry_connected") == 0
        # worse than gone: a "broker" that accepts connections and never answers
        with socket.create_server(("127.0.0.1", broker.port)) as hung:
            hung.listen(16)
            for _ in range(3):
                assert complete(addr)["choices"][0]["text"] == want
        broker.start()                                               # back on the same port: it reconnects
        published = metric(addr, "tandem_telemetry_published")
        wait_for(lambda: metric(addr, "tandem_telemetry_published") > published, timeout_s=30,
                 what="telemetry to resume")
        assert metric(addr, "tandem_telemetry_connected") == 1
    finally:
        assert d.stop() == 0, "".join(d.stderr)
