"""Auth and exposure: who may talk to the verifier, and when it refuses to start.

Pure helpers are tested directly; the interceptor runs in a real grpc.aio
server on loopback (health and reflection services, as the verifier serves
them), and the end-to-end refusals against the real cloud-verifier process.
"""
from __future__ import annotations

import asyncio
import json
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from cloud.auth import (AuthInterceptor, bearer_matches, bearer_value, check_exposure, is_loopback, metadata_value,
                        sanitize_log_field, server_credentials)
from cloud.startup import bind_problem, startup_error_line
from common.errors import StartupError
from common.tokens import load_token

TOKEN = "0123456789abcdef-test-token"


# -- tokens -------------------------------------------------------------------------

def test_token_sources_in_order_and_warnings(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    warnings: list[str] = []
    assert load_token(f, None, env={}, warn=warnings.append) == TOKEN          # trailing newline stripped
    assert warnings == []
    assert load_token(None, None, env={"TANDEM_TOKEN": TOKEN}, warn=warnings.append) == TOKEN
    assert load_token(None, None, env={}, warn=warnings.append) is None
    assert load_token(None, TOKEN, env={}, warn=warnings.append) == TOKEN
    assert any("ps" in w for w in warnings), "--token on the command line is visible in ps: warned"
    warnings.clear()
    assert load_token(None, None, env={"TANDEM_TOKEN": "short"}, warn=warnings.append) == "short"
    assert any("characters" in w for w in warnings)


@pytest.mark.parametrize("content,needle", [("", "empty"), ("has space inside", "visible ASCII"),
                                            ("tok\x00en", "visible ASCII"), ("jeton-é-x", "visible ASCII")])
def test_bad_tokens_are_refused(tmp_path, content, needle):
    f = tmp_path / "token"
    f.write_text(content)
    with pytest.raises(StartupError, match=needle):
        load_token(f, None, env={})


def test_token_file_problems_are_one_line(tmp_path):
    with pytest.raises(StartupError, match="cannot read --token-file"):
        load_token(tmp_path / "missing", None, env={})
    f = tmp_path / "t"
    f.write_text(TOKEN)
    with pytest.raises(StartupError, match="not both"):
        load_token(f, TOKEN, env={})


def test_bearer_comparison():
    want = bearer_value(TOKEN)
    assert bearer_matches(f"Bearer {TOKEN}", want)
    assert bearer_matches(f"Bearer {TOKEN}".encode(), want)
    for bad in (None, "", TOKEN, f"bearer {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer é"):
        assert not bearer_matches(bad, want), bad
    assert metadata_value((("a", "1"), ("authorization", "x")), "authorization") == "x"
    assert metadata_value(None, "authorization") is None


# -- exposure -------------------------------------------------------------------------

@pytest.mark.parametrize("listen,loop", [("127.0.0.1:1", True), ("127.9.9.9:1", True), ("[::1]:1", True),
                                         ("localhost:1", True), ("0.0.0.0:1", False), ("[::]:1", False),
                                         ("10.1.2.3:1", False), ("example.org:1", False), (":50051", False)])
def test_loopback_detection(listen, loop):
    assert is_loopback(listen) is loop


def test_non_loopback_without_auth_refuses_unless_insecure():
    with pytest.raises(StartupError, match="refusing to listen on 0.0.0.0:5 without authentication"):
        check_exposure("0.0.0.0:5", token=None, tls=False, client_ca=False, insecure=False)
    loud = check_exposure("0.0.0.0:5", token=None, tls=False, client_ca=False, insecure=True)
    assert loud.warnings and "INSECURE" in loud.warnings[0] and "NO authentication" in loud.warnings[0]
    cleartext = check_exposure("0.0.0.0:5", token=TOKEN, tls=False, client_ca=False, insecure=False)
    assert any("cleartext" in w for w in cleartext.warnings)
    assert check_exposure("0.0.0.0:5", token=TOKEN, tls=True, client_ca=False, insecure=False).warnings == ()
    assert check_exposure("0.0.0.0:5", token=None, tls=True, client_ca=True, insecure=False).warnings == ()
    assert check_exposure("127.0.0.1:5", token=None, tls=False, client_ca=False, insecure=False).warnings == ()
    with pytest.raises(StartupError, match="needs --tls-cert"):
        check_exposure("127.0.0.1:5", token=None, tls=False, client_ca=True, insecure=False)


def test_tls_file_problems_are_one_line(tmp_path):
    assert server_credentials(None, None) is None
    with pytest.raises(StartupError, match="both"):
        server_credentials(tmp_path / "c.pem", None)
    with pytest.raises(StartupError, match="cannot read --tls-cert"):
        server_credentials(tmp_path / "c.pem", tmp_path / "k.pem")
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(StartupError, match="not a PEM file"):
        server_credentials(tmp_path / "c.pem", tmp_path / "k.pem")


# -- logs and start-up errors ------------------------------------------------------------

def test_sanitized_log_fields_cannot_forge_lines_or_hide_text():
    assert sanitize_log_field("edge-agent") == "edge-agent"
    assert sanitize_log_field("café-東京") == "café-東京"
    forged = sanitize_log_field("x\n2026-01-01 cloud INFO session opened: client=admin")
    assert "\n" not in forged and forged.startswith("x\\x0a")
    assert sanitize_log_field("\x1b[31mred") == "\\x1b[31mred"
    assert sanitize_log_field("abc\u202edcba") == "abc\\u202edcba"          # bidi override made visible
    assert sanitize_log_field("a\\x0a") == "a\\\\x0a"                        # an escape cannot be faked
    long = sanitize_log_field("y" * 1000)
    assert len(long) < 100 and long.endswith("(+936 chars)")


def test_bind_failure_is_diagnosed(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "already in use" in bind_problem(f"127.0.0.1:{port}")
        line = startup_error_line(RuntimeError(f"Failed to bind to address 127.0.0.1:{port}"), f"127.0.0.1:{port}")
        assert line.startswith(f"cannot listen on 127.0.0.1:{port}: port {port}") and "\n" not in line
    assert bind_problem(f"127.0.0.1:{port}") is None
    assert "not an address of this host" in bind_problem("192.0.2.77:5000")
    assert startup_error_line(FileNotFoundError(2, "No such file", "/x/model.gguf")) == "file not found: /x/model.gguf"
    assert startup_error_line(StartupError("refusing\nto start")) == "refusing to start"


# -- the interceptor in a real grpc.aio server -----------------------------------------------

class AioServer:
    """Health and reflection, as the verifier serves them, behind AuthInterceptor."""

    def __init__(self, token: str):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(token, ready), daemon=True)
        self.thread.start()
        assert ready.wait(30)

    def _run(self, token, ready):
        asyncio.set_event_loop(self.loop)

        async def main():
            from grpc_health.v1.health import aio as health_aio
            self.server = grpc.aio.server(interceptors=[AuthInterceptor(token)])
            h = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(h, self.server)
            await h.set("tandem.v1.Verifier", health_pb2.HealthCheckResponse.SERVING)
            reflection.enable_server_reflection((reflection.SERVICE_NAME, "grpc.health.v1.Health"), self.server)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
            self.done = asyncio.Event()
            ready.set()
            await self.done.wait()
            await self.server.stop(0)
        self.loop.run_until_complete(main())

    def stop(self):
        self.loop.call_soon_threadsafe(self.done.set)
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture()
def aio_server():
    s = AioServer(TOKEN)
    yield s
    s.stop()


def test_interceptor_health_open_everything_else_needs_the_token(aio_server):
    with grpc.insecure_channel(f"127.0.0.1:{aio_server.port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Verifier"), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING, "load balancers probe health without credentials"
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = lambda: iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        for meta in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as e:
                list(refl.ServerReflectionInfo(ask(), metadata=meta, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, meta
            assert TOKEN not in (e.value.details() or "")
        answers = list(refl.ServerReflectionInfo(ask(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "grpc.health.v1.Health" in names


# -- the real verifier ---------------------------------------------------------------------------

import shutil
import subprocess
import sys

from common.procs import ROOT, Daemon
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc


def verifier(*args: str, env=None) -> Daemon:
    return Daemon("cloud.cli", ["--threads", "1", *args], "cloud-verifier listening on", env=env)


def verifier_fails(*args: str, env=None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "cloud.cli", "--threads", "1", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def expect_code(code, fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, (e.value.code(), e.value.details())
    assert TOKEN not in (e.value.details() or "")
    return e.value


@pytest.fixture(scope="module")
def token_verifier(tmp_path_factory):
    f = tmp_path_factory.mktemp("auth") / "token"
    f.write_text(TOKEN + "\n")
    d = verifier("--listen", "127.0.0.1:0", "--token-file", str(f))
    yield d
    d.stop()


def test_no_token_wrong_token_and_another_clients_session_are_refused(token_verifier, tokenizer):
    d = token_verifier
    good = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(d.address) as ch:
        stub = pb_grpc.VerifierStub(ch)
        req = pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=tokenizer.encode("Hello there"))
        expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: stub.Open(req, timeout=30))
        expect_code(grpc.StatusCode.UNAUTHENTICATED,
                    lambda: stub.Open(req, metadata=(("authorization", "Bearer nope"),), timeout=30))
        expect_code(grpc.StatusCode.UNAUTHENTICATED,
                    lambda: list(stub.Generate(pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=[1, 2],
                                                                  max_tokens=2), timeout=30)))
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, "health stays open for balancers"

        mine = stub.Open(req, metadata=good, timeout=30)
        n = len(req.prompt)
        draft = pb.Draft(epoch=0, start=n, tokens=b"\x1c\x00")
        for other in ((), (("tandem-session-key", "0" * len(mine.session_key or "x")),)):
            expect_code(grpc.StatusCode.PERMISSION_DENIED, lambda: list(stub.Speculate(
                iter([draft]), metadata=good + (("tandem-session", mine.session),) + other, timeout=30)))
            expect_code(grpc.StatusCode.PERMISSION_DENIED, lambda: list(stub.Generate(
                pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=list(req.prompt), max_tokens=2,
                                   session=mine.session), metadata=good + other, timeout=30)))
        own = good + (("tandem-session", mine.session), ("tandem-session-key", mine.session_key))
        verdicts = list(stub.Speculate(iter([draft]), metadata=own, timeout=60))
        assert len(verdicts) >= 1, "the opener drives its own session"
    log = "".join(d.stderr)
    assert TOKEN not in log, "the token never reaches the log"


def test_non_loopback_listen_without_auth_refuses_to_start():
    r = verifier_fails("--listen", "0.0.0.0:0", env={"TANDEM_TOKEN": ""})
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert "refusing to listen on 0.0.0.0:0 without authentication" in r.stderr and "--insecure" in r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr


def test_port_in_use_is_one_line(token_verifier):
    r = verifier_fails("--listen", token_verifier.address)
    assert r.returncode == 1
    assert f"port {token_verifier.port}" in r.stderr and "already in use" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates to test TLS with")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=tandem-test-ca",
            cwd=d)
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=tandem-{name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    return d


def test_mutual_tls_refuses_clients_without_a_certificate(pki, tokenizer):
    from edge.client import VerifierClient
    d = verifier("--listen", "127.0.0.1:0", "--tls-cert", str(pki / "server.pem"), "--tls-key",
                 str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"))
    try:
        ca = (pki / "ca.pem").read_bytes()
        anonymous = VerifierClient(d.address, tls_ca=ca, probe_timeout_s=2)
        assert not anonymous.probe(), "no client certificate: the handshake fails"
        anonymous.close()
        plain = VerifierClient(d.address, probe_timeout_s=2)
        assert not plain.probe(), "cleartext to a TLS port fails"
        plain.close()
        ok = VerifierClient(d.address, tls_ca=ca, tls_cert=(pki / "client.pem").read_bytes(),
                            tls_key=(pki / "client.key").read_bytes(), probe_timeout_s=30)
        assert ok.probe()
        reply = ok.open_result(ok.open_async(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=[1, 2, 3])))
        assert reply.session
        ok.close()
    finally:
        d.stop()


def edge_generate(*args: str, env=None) -> subprocess.CompletedProcess:
    import os
    environ = {k: v for k, v in os.environ.items() if k != "TANDEM_TOKEN"}
    return subprocess.run([sys.executable, "-m", "edge.cli", "generate", "--mode", "cloud-only", "--raw",
                           "--max-tokens", "4", "--ignore-eos", "--json", *args, "Hello"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, env={**environ, **(env or {})})


def test_edge_reads_its_token_from_a_file_or_the_environment(token_verifier, tmp_path):
    """The edge takes the token as the verifier does, so it never has to sit in `ps`."""
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    cloud = ("--cloud", token_verifier.address)
    by_file = edge_generate(*cloud, "--token-file", str(f))
    assert by_file.returncode == 0, by_file.stderr
    assert "visible" not in by_file.stderr
    by_env = edge_generate(*cloud, env={"TANDEM_TOKEN": TOKEN})
    assert by_env.returncode == 0, by_env.stderr
    tokens = [json.loads(r.stdout)["tokens"] for r in (by_file, by_env)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 4          # greedy (T=0): the same tokens either way
    none = edge_generate(*cloud)
    assert none.returncode == 3 and "UNAUTHENTICATED" in none.stderr.upper(), none.stderr
    assert TOKEN not in none.stderr
    missing = edge_generate(*cloud, "--token-file", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "cannot read --token-file" in missing.stderr, missing.stderr
    both = edge_generate(*cloud, "--token-file", str(f), "--token", TOKEN)
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
