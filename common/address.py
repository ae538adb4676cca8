"""HOST:PORT as the daemons' flags take it, parsed in one place.

A host may be a name, an IPv4 address or a bracketed IPv6 address (`[::1]:50051`);
the port is decimal, 0 to 65535 (0: pick a free port where a daemon listens).
"""
from __future__ import annotations

import argparse

DEFAULT_HOST = "127.0.0.1"     # what an empty host (`:8080`) means for a flag
MQTT_PORT = 1883               # the broker's port when an --mqtt address gives none


def split_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port), IPv6 brackets dropped; the host may be empty.
    ValueError for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdecimal() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    """The address as a client dials it: an IPv6 host goes back in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_port(text: str) -> tuple[str, int]:
    """argparse type for a HOST:PORT flag; an empty host is 127.0.0.1."""
    try:
        host, port = split_host_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return host or DEFAULT_HOST, port


def mqtt_address(text: str) -> tuple[str, int]:
    """`mqtt://HOST:PORT`, `HOST:PORT` or `HOST` (port 1883) -> (host, port)."""
    rest = text
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme != "mqtt":
            raise argparse.ArgumentTypeError(f"only mqtt:// brokers are supported, got {text!r}")
    rest = rest.rstrip("/")
    if ":" not in rest:
        rest = f"{rest}:{MQTT_PORT}"
    try:
        host, port = split_host_port(rest)
    except ValueError:
        host, port = "", 0
    if not host or port == 0:        # a broker is dialled: it needs a host and a real port
        raise argparse.ArgumentTypeError(f"expected mqtt://HOST:PORT, got {text!r}")
    return host, port


def mqtt_url(text: str) -> str:
    """argparse type for --mqtt: `mqtt://HOST:PORT`, `HOST:PORT` or `HOST`
    (port 1883), normalised to `mqtt://HOST:PORT`."""
    host, port = mqtt_address(text)
    return f"mqtt://{host}:{port}"
