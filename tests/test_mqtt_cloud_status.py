"""The verifier's retained MQTT status and its last will, on a real mosquitto."""
from common.procs import start_cloud
from cloud.status import status_topic
from tests.test_mqtt_telemetry import Subscriber


def test_status_is_retained_and_the_last_will_fires_on_sigkill(broker):
    topic = status_topic("v1")
    cloud = start_cloud("--threads", "1", "--mqtt", broker.url, "--id", "v1", "--status-interval", "0.2")
    try:
        live = Subscriber(broker.port, topic)
        msg, _ = live.wait(lambda m: m["state"] == "online")
        assert {"id", "state", "ts", "target", "emulated", "sessions", "max_sessions", "queue", "load"} <= set(msg)
        assert msg["id"] == "v1" and msg["sessions"] == 0 and msg["load"] == 0 and msg["max_sessions"] == 8
        late = Subscriber(broker.port, topic)          # subscribes after the fact: gets the retained status
        msg, retained = late.wait()
        assert retained and msg["state"] == "online"
        late.close()
        cloud.proc.kill()                              # SIGKILL: no goodbye, the broker speaks for it
        cloud.proc.wait()
        msg, _ = live.wait(lambda m: m["state"] == "offline")
        assert msg == {"id": "v1", "state": "offline", "reason": "connection lost"}
        live.close()
        after = Subscriber(broker.port, topic)
        msg, retained = after.wait()
        assert retained and msg["state"] == "offline"
        after.close()
    finally:
        cloud.stop()


def test_a_clean_stop_says_stopped(broker):
    topic = status_topic("v2")
    cloud = start_cloud("--threads", "1", "--mqtt", broker.url, "--id", "v2", "--status-interval", "0.2")
    sub = Subscriber(broker.port, topic)
    try:
        sub.wait(lambda m: m["state"] == "online")
        assert cloud.stop() == 0
        msg, _ = sub.wait(lambda m: m["state"] == "offline")
        assert msg["reason"] == "stopped"
    finally:
        sub.close()
        cloud.stop()
