"""Faults with real processes: the verifier killed and restarted, a link outage,
a verifier that is not there at start.

Timing is controlled, not slept: faults are triggered from the edge's own
on_tokens callback after N tokens, and the callback waits (with generous
deadlines) for the condition that must hold before generation goes on, for
example the restarted verifier answering its health check. Each completion is
checked against the edge's own token log (no gap, no repeat) and every
target-decided segment against the target's greedy continuation of everything
before it (edge-only segments are the draft model's and only counted).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from common.procs import ROOT, Daemon, start_cloud, start_link
from edge.agent import Agent
from edge.client import VerifierClient
from edge.config import GenConfig
from edge.reconnect import Backoff
from sim.link.control import send_command
from tests.conftest import PROMPTS, first_divergence, wait_for

TIE = 1e-3
FAST = Backoff(base_s=0.05, max_s=0.2)       # the edge re-probes at least every 0.2 s in these tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cloud_on(port: int) -> Daemon:
    return Daemon("cloud.cli", ["--listen", f"127.0.0.1:{port}", "--threads", "1"], "cloud-verifier listening on")


def check_completion(c, log: list[int], prompt: list[int], reference, n: int) -> list[dict]:
    """No gap, no repeat, target segments exact; returns the segments."""
    assert c.tokens == log, "the completion differs from what the edge streamed (a gap or a repeat)"
    assert len(c.tokens) == n
    segs = c.stats.segments
    assert sum(s["tokens"] for s in segs) == n, segs
    assert c.stats.edge_only_tokens == sum(s["tokens"] for s in segs if s["mode"] == "edge-only")
    pos = 0
    for s in segs:
        part = c.tokens[pos:pos + s["tokens"]]
        if s["mode"] != "edge-only":
            ref, gaps = reference.greedy(prompt + c.tokens[:pos], len(part))
            i = first_divergence(part, ref)
            assert i is None or gaps[i] < TIE, (
                f"{s['mode']} segment at token {pos} is not the target's greedy continuation: "
                f"diverges at +{i} (got {part[i:i + 4]}, target {ref[i:i + 4]})")
        pos += s["tokens"]
    return segs


def spec_config(n: int, lead: bool = True) -> GenConfig:
    return GenConfig(mode="picospec", gamma=4, window=2, adaptive=False, max_tokens=n, stop_at_eos=False,
                     cloud_lead=lead)


def test_verifier_sigkilled_and_restarted_on_the_same_port(drafter, tokenizer, reference):
    """SIGKILL after 24 tokens; restart once 20 more have streamed (edge-only by then)."""
    port = free_port()
    cloud = cloud_on(port)
    client = VerifierClient(f"127.0.0.1:{port}")
    prompt = tokenizer.encode(PROMPTS[2])
    log: list[int] = []
    state: dict = {"killed_at": None, "restarted": None}

    def on_tokens(toks):
        log.extend(toks)
        if state["killed_at"] is None and len(log) >= 24:
            cloud.proc.kill()
            cloud.proc.wait()
            state["killed_at"] = len(log)
        elif state["restarted"] is None and state["killed_at"] is not None and len(log) >= state["killed_at"] + 20:
            state["restarted"] = cloud_on(port)
            wait_for(client.probe, "the restarted verifier to answer on the edge's channel")

    agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos, backoff=FAST)
    try:
        c = agent.generate(prompt, spec_config(160), on_tokens)
    finally:
        client.close()
        cloud.stop()
        if state["restarted"]:
            state["restarted"].stop()
    segs = check_completion(c, log, prompt, reference, 160)
    modes = [s["mode"] for s in segs]
    print(f"sigkill: segments {segs}, reconnects {c.stats.reconnects}, "
          f"resume bytes {c.stats.resume_bytes} (plain {c.stats.resume_bytes_plain})")
    assert state["restarted"] is not None
    assert modes[0] == "picospec" and "edge-only" in modes and modes[-1] == "picospec", segs
    assert c.stats.reconnects >= 1 and c.stats.fallback == "edge-only"
    assert c.stats.resume_bytes_plain > 0


def test_five_second_link_outage_from_a_schedule(cloud, drafter, tokenizer, reference, tmp_path):
    """link-sim --schedule resets every connection for 5 s. The edge's callback
    waits for the outage to begin at token 16, and for it to end 24 tokens later,
    so the outage falls inside the generation whatever this machine's speed.
    Without cloud lead: a leading verifier would stream on while the callback
    waits, and those tokens would fill the 24."""
    sched = tmp_path / "outage.txt"
    sched.write_text("# a 5 s outage, 3 s in: live connections are reset, new ones refused\n3 outage 5 reset\n")
    link = start_link(cloud.address, "--profile", "lan", "--schedule", str(sched), "--control", "127.0.0.1:0")
    ctl = None
    client = VerifierClient(link.address)
    prompt = tokenizer.encode(PROMPTS[6])
    log: list[int] = []
    marks: dict = {}

    def link_down() -> bool:
        return send_command(*ctl, "status")["link_down"]

    def outage_began() -> bool:
        return any("outage 5" in line for line in link.stderr)

    def on_tokens(toks):
        log.extend(toks)
        if "began" not in marks and len(log) >= 16:
            wait_for(outage_began, "the scheduled outage to begin")
            marks["began"] = len(log)
        elif "ended" not in marks and "began" in marks and len(log) >= marks["began"] + 24:
            wait_for(lambda: not link_down(), "the outage to end")
            wait_for(client.probe, "the link to carry a health check again")
            marks["ended"] = len(log)

    try:
        wait_for(lambda: any("control on" in line for line in link.stderr), "link-sim's control port")
        host, port = next(line for line in link.stderr if "control on" in line).split()[-1].rsplit(":", 1)
        ctl = (host, int(port))
        agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos, backoff=FAST)
        c = agent.generate(prompt, spec_config(160, lead=False), on_tokens)
        report = send_command(*ctl, "status")["report"]
    finally:
        client.close()
        link.stop()
    segs = check_completion(c, log, prompt, reference, 160)
    modes = [s["mode"] for s in segs]
    print(f"outage: segments {segs}, reconnects {c.stats.reconnects}, link resets {report['connections']}")
    assert "edge-only" in modes and modes[-1] == "picospec", segs
    assert modes.index("edge-only") < len(modes) - 1, "speculation resumed after the edge-only part"
    assert report["connections"]["reset_by_outage"] >= 1
    assert c.stats.reconnects >= 1


def test_unreachable_at_start_serves_edge_only_then_resumes_when_the_verifier_appears(
        drafter, tokenizer, reference):
    port = free_port()
    client = VerifierClient(f"127.0.0.1:{port}")
    prompt = tokenizer.encode(PROMPTS[0])
    log: list[int] = []
    started: list[Daemon] = []

    def on_tokens(toks):
        log.extend(toks)
        if not started and len(log) >= 12:
            started.append(cloud_on(port))
            wait_for(client.probe, "the new verifier to answer")

    agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos, backoff=FAST)
    try:
        c = agent.generate(prompt, spec_config(96), on_tokens)
    finally:
        client.close()
        for d in started:
            d.stop()
    segs = check_completion(c, log, prompt, reference, 96)
    assert segs[0]["mode"] == "edge-only" and segs[-1]["mode"] == "picospec", segs
    assert c.stats.fallback == "edge-only" and c.stats.reconnects == 1


def edge_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_unreachable_at_start_is_marked_edge_only_or_an_error_with_require_cloud():
    port = free_port()
    r = edge_agent("generate", "--cloud", f"127.0.0.1:{port}", "--json", "--max-tokens", "12", "--ignore-eos",
                   "Name a colour.")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["stats"]["segments"] == [{"mode": "edge-only", "tokens": 12}]
    assert obj["stats"]["fallback"] == "edge-only" and obj["stats"]["edge_only_tokens"] == 12
    assert "unreachable at start" in r.stderr and "edge-only" in r.stderr
    r = edge_agent("generate", "--cloud", f"127.0.0.1:{port}", "--require-cloud", "--max-tokens", "12", "hi")
    assert r.returncode == 3 and "cannot reach the verifier" in r.stderr
    assert r.stderr.strip().count("\n") == 0, "one line, no traceback"


def test_require_cloud_turns_a_mid_generation_loss_into_an_error(drafter, tokenizer):
    from edge.client import CloudError
    cloud = start_cloud("--threads", "1")
    client = VerifierClient(cloud.address)

    def on_tokens(toks):
        if cloud.proc.poll() is None:
            cloud.proc.kill()
            cloud.proc.wait()

    agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos, backoff=FAST)
    cfg = spec_config(64)
    cfg.require_cloud = True
    try:
        with pytest.raises(CloudError):
            agent.generate(tokenizer.encode(PROMPTS[1]), cfg, on_tokens)
    finally:
        client.close()
        cloud.stop()


class OnLog:
    """Runs `action` once when the edge logs a message containing `needle`."""

    def __init__(self, needle: str, action):
        import logging
        self.handler = logging.Handler()
        self.handler.emit = self._emit
        self.needle, self.action, self.seen = needle, action, 0
        self.logger = logging.getLogger("tandem.edge")

    def _emit(self, record):
        if self.needle in record.getMessage():
            self.seen += 1
            if self.seen == 1:
                self.action()

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def test_full_verifier_is_retried_after_its_retry_after_then_a_clear_error(drafter, tokenizer, reference):
    """--max-sessions 1 with the one slot held: the edge waits the verifier's
    retry-after-ms (jittered upwards) and succeeds once the slot is freed (here:
    freed when the edge logs its first wait); held throughout, a clear error."""
    import grpc

    from edge.client import CloudError
    from proto import tandem_pb2 as pb
    from proto import tandem_pb2_grpc as pb_grpc
    cloud = start_cloud("--threads", "1", "--max-sessions", "1")
    ch = grpc.insecure_channel(cloud.address)
    stub = pb_grpc.VerifierStub(ch)
    prompt = tokenizer.encode(PROMPTS[4])
    hold = lambda: stub.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=[1, 2, 3]), timeout=60)

    def release(reply):
        key = getattr(reply, "session_key", "")
        stub.Close(pb.CloseRequest(session=reply.session),
                   metadata=(("tandem-session-key", key),) if key else (), timeout=60)

    client = VerifierClient(cloud.address)
    try:
        held = hold()
        agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos, busy_retries=3)
        t0 = time.monotonic()
        with OnLog("verifier full", lambda: release(held)):
            c = agent.generate(prompt, spec_config(16))
        waited = time.monotonic() - t0
        assert c.stats.busy_retries == 1 and waited >= 2.0, "waited at least the 2 s retry-after the verifier sent"
        assert c.tokens == reference.greedy(prompt, 16)[0] and c.stats.segments == [{"mode": "picospec", "tokens": 16}]

        held = hold()
        agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos, busy_retries=1)
        with pytest.raises(CloudError) as e:
            agent.generate(prompt, spec_config(16))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "still full after 1 retries" in str(e.value)
        release(held)
    finally:
        client.close()
        ch.close()
        cloud.stop()
