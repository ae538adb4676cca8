"""Two verifier replicas behind HAProxy (deploy/): kill the replica serving a
session mid-generation; the session finishes on the other, nothing lost.

The replica is found from its own log (the session's Open is logged where it
ran) and SIGKILLed from the edge's on_tokens callback after 24 tokens; the
callback then waits until a health check passes through the balancer again.
"""
from __future__ import annotations

import pytest

from deploy.replicas import ReplicaSet, haproxy_missing
from edge.agent import Agent
from edge.client import VerifierClient
from tests.conftest import PROMPTS, wait_for
from tests.test_faults import FAST, check_completion, free_port, spec_config

pytestmark = pytest.mark.slow


def opened_sessions(replica) -> int:
    return sum("opened" in line and "session" in line for line in list(replica.stderr))


def test_replica_killed_mid_session_finishes_on_the_other(drafter, tokenizer, reference):
    why = haproxy_missing()
    if why:
        pytest.skip(why)
    rs = ReplicaSet(2, f"127.0.0.1:{free_port()}", ("--threads", "1"))
    client = VerifierClient(rs.address)
    prompt = tokenizer.encode(PROMPTS[3])
    log: list[int] = []
    state: dict = {}

    def on_tokens(toks):
        log.extend(toks)
        if "victim" not in state and len(log) >= 24:
            serving = [r for r in rs.replicas if opened_sessions(r)]
            assert len(serving) == 1, "exactly one replica opened the session"
            victim = serving[0]
            state["victim"], state["other"] = victim, next(r for r in rs.replicas if r is not victim)
            state["other_opened_before"] = opened_sessions(state["other"])
            victim.proc.kill()
            victim.proc.wait()
            wait_for(client.probe, "a health check through the balancer after the kill")

    agent = Agent(client, drafter, tokenizer.fingerprint, tokenizer.n_vocab, tokenizer.eos, backoff=FAST)
    try:
        c = agent.generate(prompt, spec_config(128), on_tokens)
    finally:
        client.close()
        rs.stop()
    segs = check_completion(c, log, prompt, reference, 128)
    print(f"haproxy failover: segments {segs}, reconnects {c.stats.reconnects}")
    assert "victim" in state
    assert opened_sessions(state["other"]) > state["other_opened_before"], "the session re-opened on the survivor"
    assert segs[-1]["mode"] == "picospec" and c.stats.reconnects >= 1, segs
