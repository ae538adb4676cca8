"""One clear line for every way the verifier can fail to start.

gRPC reports a failed bind as "Failed to bind to address ..." whatever the
cause; `bind_problem` finds the cause by trying the same address with a plain
socket, so the user reads "port 50051 is already in use", not a traceback.
"""
from __future__ import annotations

import errno
import socket

from cloud.auth import split_listen
from common.errors import StartupError


def bind_problem(listen: str) -> str | None:
    """Why HOST:PORT cannot be listened on, or None if a plain socket can bind it."""
    try:
        host, port = split_listen(listen)
    except StartupError as e:
        return str(e)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host!r}: {e.strerror}"
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC does: TIME_WAIT is no conflict
            try:
                s.bind(addr)
            except OSError as e:
                return _bind_errno(e, host, port)
    return None


def _bind_errno(e: OSError, host: str, port: int) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"port {port} on {host or '*'} is already in use (another verifier or service is listening there)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this host"
    if e.errno == errno.EACCES:
        return f"no permission to listen on port {port} (ports below 1024 need root)"
    return f"cannot bind {host}:{port}: {e.strerror or e}"


def startup_error_line(exc: BaseException, listen: str | None = None) -> str:
    """The one line to print (after 'cloud-verifier: ') for a start-up failure."""
    if isinstance(exc, StartupError):
        text = str(exc)
    elif isinstance(exc, RuntimeError) and "bind" in str(exc).lower() and listen:
        text = f"cannot listen on {listen}: {bind_problem(listen) or str(exc)}"
    elif isinstance(exc, FileNotFoundError):
        text = f"file not found: {exc.filename or exc}"
    elif isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
    elif isinstance(exc, (ValueError, RuntimeError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__
