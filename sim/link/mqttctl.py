"""Live control over MQTT: topic tandem/link/<name>/set, replies on tandem/link/<name>/state.

The payload is either a command line (sim.link.commands) or a JSON object of
conditions, e.g. {"profile": "3g"}, {"rate_down": 2, "delay": 40},
{"outage": 2, "mode": "reset"}, {"restore": true}. A JSON object runs as
`profile` first, then `set`, then `outage`/`restore`, so one message can say
"switch to 3g but with 80 ms delay". MQTT is optional: when no broker answers,
link-sim keeps shaping and retries quietly in the background.
"""

from __future__ import annotations

import asyncio
import json
import sys

from sim.link.config import ConfigError
from sim.link.control import Controller
from sim.link.report import dumps

RETRY_S = 5.0


def topics(name: str) -> tuple[str, str]:
    return f"tandem/link/{name}/set", f"tandem/link/{name}/state"


def payload_commands(payload: bytes) -> list[str]:
    """Command lines for one MQTT payload; raises ConfigError on a malformed one."""
    text = payload.decode("utf-8", "replace").strip()
    if not text.startswith("{"):
        return [text]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"bad JSON payload: {e}") from None
    if not isinstance(obj, dict) or not obj:
        raise ConfigError("JSON payload must be a non-empty object")
    obj = {k.replace("_", "-"): v for k, v in obj.items()}
    cmds = []
    if "profile" in obj:
        cmds.append(f"profile {obj.pop('profile')}")
    outage, mode, restore = obj.pop("outage", None), obj.pop("mode", None), obj.pop("restore", None)
    if obj:
        cmds.append("set " + " ".join(f"{k}={v}" for k, v in obj.items()))
    if outage is not None:
        cmds.append(f"outage {outage}" + (f" {mode}" if mode else ""))
    if restore:
        cmds.append("restore")
    return cmds


def handle_payload(controller: Controller, payload: bytes) -> dict:
    try:
        cmds = payload_commands(payload)
    except ConfigError as e:
        return {"ok": False, "error": str(e)}
    reply: dict = {"ok": True}
    for c in cmds:
        reply = controller.execute_text(c)
        if not reply.get("ok"):
            break
    return reply


async def mqtt_control(controller: Controller, host: str, port: int, name: str) -> None:
    import aiomqtt

    set_topic, state_topic = topics(name)
    warned = False
    while True:
        try:
            async with aiomqtt.Client(hostname=host, port=port, timeout=5) as client:
                await client.subscribe(set_topic)
                print(f"link-sim: MQTT control on {host}:{port} topic {set_topic}", file=sys.stderr, flush=True)
                warned = False
                state = {"ok": True, "conditions": controller.sim.config.to_json()}
                await client.publish(state_topic, dumps(state), retain=True)
                async for message in client.messages:
                    reply = handle_payload(controller, message.payload)
                    await client.publish(state_topic, dumps(reply), retain=True)
        except aiomqtt.MqttError as e:
            if not warned:
                print(f"link-sim: MQTT broker {host}:{port} unavailable ({e}); shaping goes on, retrying every {RETRY_S:g} s",
                      file=sys.stderr, flush=True)
                warned = True
            await asyncio.sleep(RETRY_S)
