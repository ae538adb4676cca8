"""The edge's gRPC client: open sessions, stream drafts, count bytes.

Bytes are counted as the serialised message plus gRPC's 5-byte message prefix,
per direction; HTTP/2 framing below that is not included.

Every call of a session carries the same metadata (names: common/metadata.py):
    authorization       Bearer TOKEN (when the deployment has one)
    tandem-affinity     a random key chosen before Open; a balancer in front of
                        several verifiers hashes on it, so Open, Speculate and
                        Generate of one session reach the same replica
    tandem-session-key  the per-session secret Open returned (only the client
                        that opened a session can drive it)
"""
from __future__ import annotations

import queue
import secrets
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.metadata import AFFINITY_HEADER, AUTH_HEADER, RETRY_AFTER_HEADER, SESSION_HEADER, SESSION_KEY_HEADER, \
    bearer
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc

GRPC_PREFIX = 5
SERVICE = "tandem.v1.Verifier"
OPEN_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 16 << 20
# gRPC's own reconnect backoff grows to 2 minutes by default: a verifier back
# after a restart would stay unseen that long. Keep it short; the edge's
# Reconnector spaces the attempts that matter.
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 20000), ("grpc.http2.max_pings_without_data", 0),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class CloudError(RuntimeError):
    """The verifier refused or failed a request; `code` is the gRPC status,
    `retry_after_s` the wait the verifier asked for (RESOURCE_EXHAUSTED)."""

    def __init__(self, code, message: str, retry_after_s: float | None = None):
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code
        self.retry_after_s = retry_after_s


def _wrap(e: grpc.RpcError) -> CloudError:
    retry = None
    try:
        for key, value in e.trailing_metadata() or ():
            if key == RETRY_AFTER_HEADER:
                retry = max(0.0, float(value) / 1000)
    except (AttributeError, ValueError, TypeError):
        pass
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else None
    return CloudError(code, details or str(e), retry)


@dataclass
class ByteCounter:
    up: int = 0
    down: int = 0

    def sent(self, msg) -> None:
        self.up += msg.ByteSize() + GRPC_PREFIX

    def received(self, msg) -> None:
        self.down += msg.ByteSize() + GRPC_PREFIX


@dataclass(frozen=True)
class OpenCall:
    """An Open in flight and the affinity key it was sent with."""
    future: object
    affinity: str


class VerifierClient:
    def __init__(self, target: str, token: str | None = None, tls_ca: bytes | None = None,
                 connect_timeout_s: float = 10.0, probe_timeout_s: float = 3.0,
                 tls_cert: bytes | None = None, tls_key: bytes | None = None):
        if tls_ca is not None or tls_cert is not None:
            creds = grpc.ssl_channel_credentials(tls_ca, private_key=tls_key, certificate_chain=tls_cert)
            self.channel = grpc.secure_channel(target, creds, CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(target, CHANNEL_OPTIONS)
        self.stub = pb_grpc.VerifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.meta = ((AUTH_HEADER, bearer(token)),) if token else ()
        self.target = target
        self.connect_timeout_s, self.probe_timeout_s = connect_timeout_s, probe_timeout_s
        self.bytes = ByteCounter()
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, str]] = {}     # session -> (key, affinity)
        self.accepts_zstd = False     # learned from the last OpenReply: may prompts travel compressed?

    # -- reachability ------------------------------------------------------------
    def wait_ready(self) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise CloudError(grpc.StatusCode.UNAVAILABLE,
                             f"cannot reach the verifier at {self.target} within {self.connect_timeout_s:.0f} s") from None

    def probe(self, timeout_s: float | None = None, wait_for_ready: bool = True) -> bool:
        """Whether the verifier answers its health check as SERVING within `timeout_s`
        (default: the probe timeout; a draining verifier answers NOT_SERVING: not ready).
        Without `wait_for_ready` a channel that is not connected answers False at once
        instead of connecting first (a status page should not hang on a lost verifier)."""
        try:
            r = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE), metadata=self.meta,
                                  timeout=self.probe_timeout_s if timeout_s is None else timeout_s,
                                  wait_for_ready=wait_for_ready)
        except grpc.RpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    # -- sessions ----------------------------------------------------------------
    def session_meta(self, session: str) -> tuple:
        """Metadata for a call of `session` (an unknown or empty one gets a fresh affinity)."""
        with self._lock:
            key, affinity = self._sessions.get(session, ("", ""))
        meta = self.meta + ((AFFINITY_HEADER, affinity or secrets.token_hex(8)),)
        return meta + ((SESSION_KEY_HEADER, key),) if key else meta

    def forget(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def open_async(self, req: pb.OpenRequest, timeout_s: float = OPEN_TIMEOUT_S) -> OpenCall:
        self.bytes.sent(req)
        affinity = secrets.token_hex(8)
        fut = self.stub.Open.future(req, metadata=self.meta + ((AFFINITY_HEADER, affinity),), timeout=timeout_s)
        return OpenCall(fut, affinity)

    def open_result(self, call: OpenCall) -> pb.OpenReply:
        try:
            reply = call.future.result()
        except grpc.RpcError as e:
            raise _wrap(e) from None
        self.bytes.received(reply)
        self.accepts_zstd = reply.accepts_prompt_zstd
        with self._lock:
            self._sessions[reply.session] = (getattr(reply, "session_key", ""), call.affinity)
        return reply

    def close_session(self, session: str, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Ends `session` at the verifier, which frees its cache, and forgets its key."""
        req = pb.CloseRequest(session=session)
        self.bytes.sent(req)
        try:
            reply = self.stub.Close(req, metadata=self.session_meta(session) + ((SESSION_HEADER, session),),
                                    timeout=timeout_s)
        except grpc.RpcError as e:
            raise _wrap(e) from None
        finally:
            self.forget(session)
        self.bytes.received(reply)

    def speculate(self, session: str) -> "DraftStream":
        return DraftStream(self, session)

    def generate(self, req: pb.GenerateRequest, stall_timeout_s: float | None = None):
        """Yields generated token ids as the verifier streams them; a gap of more
        than `stall_timeout_s` between chunks ends the call (the link is down)."""
        self.bytes.sent(req)
        call = self.stub.Generate(req, metadata=self.session_meta(req.session))
        reader = _Reader(call, self.bytes)
        try:
            while True:
                chunk = reader.get(stall_timeout_s)
                if chunk is None:
                    raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     f"no token from the verifier for {stall_timeout_s:.0f} s")
                yield from chunk.tokens
                if chunk.done:
                    return
        finally:
            call.cancel()
            if req.session:
                self.forget(req.session)

    def close(self) -> None:
        self.channel.close()


class _Reader:
    """Reads a response stream on a thread so the consumer can wait with a
    timeout; the first error is sticky."""

    def __init__(self, call, counter: ByteCounter):
        self._call, self._counter = call, counter
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    ended = False       # the verifier ended the stream (as against an error)

    def _run(self) -> None:
        try:
            for msg in self._call:
                self._counter.received(msg)
                self._q.put(msg)
            self.ended = True
            self._q.put(CloudError(grpc.StatusCode.UNAVAILABLE, "verifier closed the stream"))
        except grpc.RpcError as e:
            self._q.put(_wrap(e))

    def get(self, timeout: float | None):
        """Next message; None if none within `timeout` (0: poll)."""
        try:
            item = self._q.get(timeout=timeout) if timeout != 0 else self._q.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, CloudError):
            self._q.put(item)
            raise item
        return item


class DraftStream:
    """One Speculate stream: `send` drafts, `recv` verdicts (a reader thread
    keeps verdicts flowing while the edge drafts)."""

    _END = object()

    def __init__(self, client: VerifierClient, session: str):
        self.client, self.session = client, session
        self._out: queue.Queue = queue.Queue()
        self._calls = client.stub.Speculate(iter(self._out.get, self._END),
                                            metadata=client.session_meta(session) + ((SESSION_HEADER, session),))
        self._reader = _Reader(self._calls, client.bytes)

    def send(self, draft: pb.Draft) -> None:
        self.client.bytes.sent(draft)
        self._out.put(draft)

    def recv(self, timeout: float | None = None) -> pb.Verdict | None:
        """Next verdict; None if none arrives within `timeout` (0: poll)."""
        return self._reader.get(timeout)

    def hand_over(self, timeout_s: float) -> bool:
        """End the stream but keep the session, to stream the rest of the request from it
        (`Generate` with its id): True once the verifier has ended the stream within
        `timeout_s`, the session then idle with its cache. Verdicts still on the way are
        dropped: a stream taking over starts from what this edge committed."""
        self.send(pb.Draft(handover=True))
        self._out.put(self._END)
        deadline = time.monotonic() + timeout_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                if self._reader.get(left) is None:
                    break
        except CloudError as e:
            return e.code == grpc.StatusCode.UNAVAILABLE and self._reader.ended
        return False

    def close(self) -> None:
        self._out.put(self._END)
        self._calls.cancel()
        self.client.forget(self.session)
