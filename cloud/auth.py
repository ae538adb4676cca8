"""Who may talk to the verifier, and over what: bearer tokens, TLS, and the
rule that a verifier reachable from other hosts never runs open by accident.

    token      one shared secret per deployment, from --token-file or $TANDEM_TOKEN
               (--token still works but is visible to every user in `ps`); every RPC
               carries `authorization: Bearer TOKEN`, compared in constant time and
               never logged
    TLS        --tls-cert/--tls-key; with --tls-client-ca the handshake also demands
               a client certificate signed by that CA (mutual TLS)
    exposure   listening on anything but loopback needs a token or mutual TLS, or an
               explicit --insecure, which is announced loudly
    sessions   the verifier binds each session to a secret it returns from Open
               (`tandem-session-key`), so a client holding the deployment token still
               cannot drive a session another client opened

The standard health check (`grpc.health.v1.Health`) stays open: load balancers
such as HAProxy probe it without credentials, and it tells nothing but
SERVING / NOT_SERVING. Everything else, reflection included, needs the token.

Everything here is a pure helper or the interceptor; cloud/cli.py and
cloud/server.py wire them in.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.address import split_host_port
from common.errors import StartupError
from common.metadata import AUTH_HEADER, bearer
from common.tokens import TOKEN_ENV

# Methods a client may call without credentials (see the module docstring).
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
LOG_FIELD_MAX = 64        # characters of a client-supplied string kept in a log line


# -- checking the token (common/tokens.py reads it) ----------------------------

def bearer_matches(value: str | bytes | None, expected: bytes) -> bool:
    """Whether an `authorization` metadata value is `Bearer <token>`, compared in
    constant time (hmac.compare_digest) so timing does not leak the token."""
    if value is None:
        return False
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            return False
    return hmac.compare_digest(value, expected)


def bearer_value(token: str) -> bytes:
    return bearer(token).encode("ascii")


def metadata_value(metadata, key: str):
    """The first value of `key` in invocation metadata (a sequence of pairs or
    _Metadatum), or None."""
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else item
        if k == key:
            return v
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but the health check must carry the bearer token; others end
    with UNAUTHENTICATED before the servicer sees them."""

    def __init__(self, token: str, open_methods: frozenset[str] = OPEN_METHODS):
        self._expected = bearer_value(token)
        self._open = open_methods

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in self._open:
            return handler
        if bearer_matches(metadata_value(details.invocation_metadata, AUTH_HEADER), self._expected):
            return handler
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call (a shape
    mismatch would make the client see a protocol error, not the status)."""
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong bearer token (metadata 'authorization: Bearer TOKEN')")

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


# -- exposure -----------------------------------------------------------------

def split_listen(listen: str) -> tuple[str, int]:
    """--listen's (host, port); a StartupError that names the flag otherwise."""
    try:
        return split_host_port(listen)
    except ValueError:
        raise StartupError(f"--listen expects HOST:PORT, got {listen!r}") from None


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT can only be reached from this host. Names other than
    `localhost` count as exposed: what they resolve to can change."""
    host, _ = split_listen(listen)
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Exposure:
    """What the start-up check concluded: lines to print loudly (warnings)."""
    warnings: tuple[str, ...] = ()


def check_exposure(listen: str, token: str | None, tls: bool, client_ca: bool, insecure: bool) -> Exposure:
    """Refuses (StartupError) a non-loopback listen without authentication unless
    --insecure; returns the warnings to print at start."""
    if client_ca and not tls:
        raise StartupError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    authenticated = token is not None or client_ca
    if is_loopback(listen):
        return Exposure()
    if not authenticated and not insecure:
        raise StartupError(
            f"refusing to listen on {listen} without authentication: anyone who can reach it could use the "
            f"target model. Give --token-file FILE (or ${TOKEN_ENV}) and --tls-cert/--tls-key, or "
            "--tls-client-ca for mutual TLS; or --insecure to serve openly on purpose")
    warnings = []
    if not authenticated:
        warnings.append(f"INSECURE: serving on {listen} with NO authentication (--insecure): "
                        "anyone who can reach this port can use the verifier")
    if token is not None and not tls:
        warnings.append(f"INSECURE: the bearer token travels in cleartext on {listen}: add --tls-cert/--tls-key")
    return Exposure(tuple(warnings))


# -- TLS ------------------------------------------------------------------------

def _read_pem(path: Path, flag: str, marker: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise StartupError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    if marker not in data:
        raise StartupError(f"{flag} {path} is not a PEM file (no '{marker.decode()}' block)")
    return data


def server_credentials(cert: Path | None, key: Path | None,
                       client_ca: Path | None = None) -> grpc.ServerCredentials | None:
    """TLS server credentials (None without --tls-cert); with `client_ca`, mutual
    TLS: the handshake refuses clients without a certificate from that CA."""
    if (cert is None) != (key is None):
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    if cert is None:
        if client_ca is not None:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    chain = _read_pem(cert, "--tls-cert", b"-----BEGIN CERTIFICATE-----")
    private = _read_pem(key, "--tls-key", b"PRIVATE KEY-----")
    ca = _read_pem(client_ca, "--tls-client-ca", b"-----BEGIN CERTIFICATE-----") if client_ca else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)


# -- logs -------------------------------------------------------------------------

def sanitize_log_field(value: object, limit: int = LOG_FIELD_MAX) -> str:
    """A client-supplied string made safe for a one-line log: control and
    invisible formatting characters (newlines, ANSI escapes, bidi overrides) are
    escaped, so a client cannot forge log lines or hide text, and long values are
    cut. Printable text, non-ASCII letters included, passes unchanged."""
    text = value if isinstance(value, str) else str(value)
    out = []
    for ch in text[:limit]:
        if ch.isprintable() and ch != "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    if len(text) > limit:
        out.append(f"...(+{len(text) - limit} chars)")
    return "".join(out)
