"""The edge's gRPC client: open sessions, stream drafts, count bytes.

Bytes are counted as the serialised message plus gRPC's 5-byte message prefix,
per direction; HTTP/2 framing below that is not included.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import grpc

from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc

GRPC_PREFIX = 5


class CloudError(RuntimeError):
    """The verifier refused or failed a request; `code` is the gRPC status."""

    def __init__(self, code, message: str):
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code


def _wrap(e: grpc.RpcError) -> CloudError:
    return CloudError(e.code(), e.details() or str(e))


@dataclass
class ByteCounter:
    up: int = 0
    down: int = 0

    def sent(self, msg) -> None:
        self.up += msg.ByteSize() + GRPC_PREFIX

    def received(self, msg) -> None:
        self.down += msg.ByteSize() + GRPC_PREFIX


class VerifierClient:
    def __init__(self, target: str, token: str | None = None, tls_ca: bytes | None = None,
                 connect_timeout_s: float = 10.0):
        opts = [("grpc.keepalive_time_ms", 20000), ("grpc.http2.max_pings_without_data", 0)]
        if tls_ca is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca), opts)
        else:
            self.channel = grpc.insecure_channel(target, opts)
        self.stub = pb_grpc.VerifierStub(self.channel)
        self.meta = (("authorization", f"Bearer {token}"),) if token else ()
        self.target = target
        self.connect_timeout_s = connect_timeout_s
        self.bytes = ByteCounter()
        self.keys: dict[str, str] = {}   # session -> the secret the verifier gave its opener

    def wait_ready(self) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.connect_timeout_s)
        except grpc.FutureTimeoutError:
            raise CloudError(grpc.StatusCode.UNAVAILABLE,
                             f"cannot reach the verifier at {self.target} within {self.connect_timeout_s:.0f} s") from None

    def open_async(self, req: pb.OpenRequest):
        self.bytes.sent(req)
        return self.stub.Open.future(req, metadata=self.meta, timeout=60)

    def open_result(self, fut) -> pb.OpenReply:
        try:
            reply = fut.result()
        except grpc.RpcError as e:
            raise _wrap(e) from None
        self.bytes.received(reply)
        self.keys[reply.session] = reply.session_key
        return reply

    def session_meta(self, session: str) -> tuple:
        return self.meta + (("tandem-session", session), ("tandem-session-key", self.keys.get(session, "")))

    def speculate(self, session: str) -> "DraftStream":
        return DraftStream(self, session)

    def generate(self, req: pb.GenerateRequest):
        """Yields generated token ids as the verifier streams them."""
        self.bytes.sent(req)
        try:
            meta = self.session_meta(req.session) if req.session else self.meta
            for chunk in self.stub.Generate(req, metadata=meta):
                self.bytes.received(chunk)
                yield from chunk.tokens
                if chunk.done:
                    return
        except grpc.RpcError as e:
            raise _wrap(e) from None

    def close(self) -> None:
        self.channel.close()


class DraftStream:
    """One Speculate stream: `send` drafts, `recv` verdicts (a reader thread
    keeps verdicts flowing while the edge drafts)."""

    _END = object()

    def __init__(self, client: VerifierClient, session: str):
        self.client = client
        self._out: queue.Queue = queue.Queue()
        self._in: queue.Queue = queue.Queue()
        self._calls = client.stub.Speculate(iter(self._out.get, self._END), metadata=client.session_meta(session))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for verdict in self._calls:
                self.client.bytes.received(verdict)
                self._in.put(verdict)
            self._in.put(CloudError(grpc.StatusCode.UNAVAILABLE, "verifier closed the stream"))
        except grpc.RpcError as e:
            self._in.put(_wrap(e))

    def send(self, draft: pb.Draft) -> None:
        self.client.bytes.sent(draft)
        self._out.put(draft)

    def recv(self, timeout: float | None = None) -> pb.Verdict | None:
        """Next verdict; None if none arrives within `timeout` (0: poll)."""
        try:
            item = self._in.get(timeout=timeout) if timeout != 0 else self._in.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, CloudError):
            self._in.put(item)  # sticky: every later call sees the failure too
            raise item
        return item

    def close(self) -> None:
        self._out.put(self._END)
        self._calls.cancel()
