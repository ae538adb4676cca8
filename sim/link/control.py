"""Live control: one Controller executes commands; a line-based control port exposes it.

Protocol on the control port: one command per line (sim.link.commands), one
JSON object per line back: {"ok": true, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

from sim.link.commands import Command, parse_command, updated_config
from sim.link.config import ConfigError, LinkConfig
from sim.link.proxy import LinkSim
from sim.link.report import dumps


class Controller:
    def __init__(self, sim: LinkSim, profiles: dict[str, LinkConfig]):
        self.sim = sim
        self.profiles = profiles

    def execute(self, cmd: Command) -> dict:
        sim = self.sim
        try:
            if cmd.verb in ("profile", "set"):
                sim.apply(updated_config(sim.config, cmd, self.profiles))
            elif cmd.verb == "outage":
                sim.outage(cmd.seconds, cmd.mode)
            elif cmd.verb == "restore":
                sim.restore()
        except ConfigError as e:
            return {"ok": False, "command": str(cmd), "error": str(e)}
        if cmd.verb != "status":
            print(f"link-sim: t={sim.clock() - sim.started:.3f}s {cmd}", file=sys.stderr, flush=True)
        out = {"ok": True, "command": str(cmd), "link_down": sim.clock() < sim.down_until, "conditions": sim.config.to_json()}
        if cmd.verb == "status":
            out["report"] = sim.final_report()
        return out

    def execute_text(self, text: str) -> dict:
        try:
            cmd = parse_command(text)
        except ConfigError as e:
            return {"ok": False, "error": str(e)}
        return self.execute(cmd)


async def serve_control(controller: Controller, host: str, port: int) -> asyncio.base_events.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                text = line.decode("utf-8", "replace").strip()
                if not text:
                    continue
                writer.write((dumps(controller.execute_text(text)) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


def send_command(host: str, port: int, text: str, timeout: float = 5.0) -> dict:
    """Blocking client for the control port (used by `link-sim ctl`, tests and benches)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(text.strip().encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                break
            buf += part
    if not buf:
        raise ConnectionError(f"control port {host}:{port} closed without a reply")
    return json.loads(buf)
