"""A property-based fuzz of every RPC against the real verifier, while
well-behaved sessions run beside it.

Each case is one call or stream: malformed, oversized, out-of-range and
replayed messages, wrong epochs and sessions, missing metadata, zstd bombs,
and abrupt disconnects (a stream cancelled after a few messages). Properties:
the verifier never crashes (health answers after every case), every refused
call ends with a precise client-error status and a message (never UNKNOWN,
INTERNAL or a hang), and the concurrent well-behaved sessions' outputs equal
the target's greedy output. `make test` runs a few hundred cases; the slow
suite 2 000.
"""
from __future__ import annotations

import collections
import threading
import time

import grpc
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.metadata import SESSION_HEADER, SESSION_KEY_HEADER
from edge.agent import Agent
from edge.client import VerifierClient
from edge.config import GenConfig
from kernels import packing
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from tests.conftest import PROMPTS, first_divergence

FAST_CASES = 300
SLOW_CASES = 2000
CALL_TIMEOUT_S = 60.0
VOCAB = 49152
WIDTH = 2
# A refused call must say why with one of these; anything else is a server bug.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                 grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}

# -- strategies -------------------------------------------------------------------------------

token_ids = st.one_of(st.integers(0, 200), st.integers(0, VOCAB - 1),
                      st.sampled_from([VOCAB, VOCAB + 1, 2 ** 31, 2 ** 32 - 1]))
prompts = st.one_of(st.lists(st.integers(1, 2000), min_size=1, max_size=24),
                    st.lists(token_ids, min_size=0, max_size=12),
                    st.integers(2049, 5000).map(lambda n: [28] * n))             # past n_ctx
floats = st.one_of(st.floats(-2, 3), st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1e30]))
valid_samplings = st.builds(pb.Sampling, temperature=st.sampled_from([0.0, 0.7, 1.0]), top_k=st.integers(0, 50),
                            top_p=st.sampled_from([0.0, 0.9, 1.0]), seed=st.integers(0, 2 ** 64 - 1))
any_samplings = st.builds(pb.Sampling, temperature=floats, top_k=st.integers(0, 2 ** 32 - 1), top_p=floats,
                          seed=st.integers(0, 2 ** 64 - 1))
samplings = st.one_of(valid_samplings, valid_samplings, any_samplings)    # most calls get past sampling checks
texts = st.text(max_size=40) | st.sampled_from(["edge\n2026 cloud INFO forged", "\x1b[31m", "x" * 5000])


def zstd_payloads(fingerprint_ok: bool = True):
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x01\x00" * (8 << 20))
    good = zstandard.ZstdCompressor().compress(packing.pack_tokens([1, 28, 30, 40], WIDTH))
    return st.sampled_from([b"", bomb, good, good[:-3], good + b"junk", b"\x28\xb5\x2f\xfd garbage"]) | st.binary(max_size=64)


def mostly(good, bad: list, share: int = 8):
    """`good` in `share` of 10 draws, else one of `bad`."""
    return st.integers(0, 9).map(lambda i: good if i < share else bad[i % len(bad)])


@st.composite
def open_calls(draw, fingerprint):
    req = pb.OpenRequest(fingerprint=draw(mostly(fingerprint, ["", "0" * 16, "é" * 3])),
                         sampling=draw(samplings), codec=draw(st.integers(0, 5)), client=draw(texts),
                         lead=draw(st.booleans()), max_tokens=draw(st.integers(0, 2 ** 32 - 1)),
                         ignore_eos=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        req.prompt_zstd = draw(zstd_payloads())
    else:
        req.prompt.extend(draw(prompts))
    return ("open", req)


@st.composite
def drafts(draw, n_prompt: int):
    ids = draw(st.lists(token_ids, min_size=0, max_size=40))
    tokens = (packing.pack_tokens(ids, WIDTH) if all(t < 2 ** 16 for t in ids) and draw(st.booleans())
              else draw(st.binary(max_size=90)))
    return pb.Draft(epoch=draw(st.sampled_from([0, 0, 0, 1, 2, 7, 2 ** 32 - 1])),
                    start=draw(st.sampled_from([n_prompt, n_prompt, n_prompt + 1, n_prompt - 1, 0, 2 ** 32 - 1])),
                    tokens=tokens, fixed=draw(st.sampled_from([0, 0, 1, 2, 99])),
                    q=draw(st.binary(max_size=8)) if draw(st.booleans()) else b"",
                    q_sparse=draw(st.lists(st.binary(max_size=12), max_size=3)),
                    want_bonus=draw(st.booleans()), more_tail=draw(st.integers(0, 6)) == 0)


@st.composite
def speculate_calls(draw):
    prompt = draw(st.lists(st.integers(1, 2000), min_size=1, max_size=16))
    n = len(prompt)
    good = pb.Draft(epoch=0, start=n, tokens=packing.pack_tokens([28, 29], WIDTH))
    plan = draw(st.lists(st.one_of(drafts(n), st.just(good)), min_size=0, max_size=6))
    if draw(st.booleans()) and plan:
        plan = plan + [plan[0]]                                   # a replay
    return ("speculate", {
        "prompt": prompt, "codec": draw(st.integers(0, 1)),
        "temperature": draw(st.sampled_from([0.0, 0.8])),
        "lead": draw(st.booleans()), "drafts": plan,
        "session": draw(st.sampled_from(["own", "own", "own", "none", "bogus", "closed"])),
        "key": draw(st.sampled_from(["own", "own", "own", "none", "wrong"])),
        "read": draw(st.integers(0, 4)),                          # responses read before hanging up
    })


@st.composite
def generate_calls(draw, fingerprint):
    req = pb.GenerateRequest(fingerprint=draw(mostly(fingerprint, ["nope"])),
                             sampling=draw(samplings), max_tokens=draw(st.integers(0, 2 ** 32 - 1)),
                             ignore_eos=draw(st.booleans()), client=draw(texts),
                             session=draw(st.sampled_from(["", "", "deadbeef0000", "x" * 300])))
    if draw(st.integers(0, 4)) == 0:
        req.prompt_zstd = draw(zstd_payloads())
    else:
        req.prompt.extend(draw(prompts))
    return ("generate", req, draw(st.integers(0, 3)))


def any_call(fingerprint):
    return st.one_of(open_calls(fingerprint), speculate_calls(), generate_calls(fingerprint),
                     st.builds(lambda s: ("close", pb.CloseRequest(session=s)), texts))


# -- running one case ---------------------------------------------------------------------------

class Fuzzer:
    def __init__(self, address: str, fingerprint: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.VerifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.fingerprint = fingerprint
        self.codes: collections.Counter = collections.Counter()
        self.examples: dict = {}                  # (rpc, status) -> one message, for the report

    def close(self):
        self.channel.close()

    def run(self, call) -> None:
        kind = call[0]
        try:
            if kind == "open":
                reply = self.stub.Open(call[1], timeout=CALL_TIMEOUT_S)
                self._close(reply)
            elif kind == "generate":
                _, req, read = call
                stream = self.stub.Generate(req, timeout=CALL_TIMEOUT_S)
                for i, _ in enumerate(stream):
                    if i + 1 >= read:
                        stream.cancel()                           # hang up mid-stream
                        break
            elif kind == "close":
                self.stub.Close(call[1], timeout=CALL_TIMEOUT_S)
            else:
                self._speculate(call[1])
            self.codes[(kind, "OK")] += 1
        except grpc.RpcError as e:
            code = e.code()
            self.codes[(kind, code.name)] += 1
            self.examples.setdefault((kind, code.name), (e.details() or "")[:120])
            if code == grpc.StatusCode.CANCELLED and "cancel" in (e.details() or "").lower():
                return                                            # our own hang-up
            assert code in CLIENT_ERRORS, f"{kind}: {code.name} {e.details()!r} for {call!r:.600}"
            assert e.details(), f"{kind}: {code.name} without a message"
        self.assert_alive()

    def _speculate(self, c: dict) -> None:
        reply = self.stub.Open(pb.OpenRequest(fingerprint=self.fingerprint, prompt=c["prompt"], codec=c["codec"],
                                              sampling=pb.Sampling(temperature=c["temperature"]), lead=c["lead"],
                                              max_tokens=8), timeout=CALL_TIMEOUT_S)
        sid = {"own": reply.session, "none": None, "bogus": "0123456789ab", "closed": reply.session}[c["session"]]
        if c["session"] == "closed":
            self._close(reply)
        meta = []
        if sid is not None:
            meta.append((SESSION_HEADER, sid))
        key = getattr(reply, "session_key", "")
        if c["key"] == "own" and key:
            meta.append((SESSION_KEY_HEADER, key))
        elif c["key"] == "wrong":
            meta.append((SESSION_KEY_HEADER, "not-the-key"))
        try:
            stream = self.stub.Speculate(iter(c["drafts"]), metadata=meta, timeout=CALL_TIMEOUT_S)
            for i, _ in enumerate(stream):
                if i + 1 >= c["read"] and c["read"]:
                    stream.cancel()
                    break
        finally:
            self._close(reply)

    def _close(self, reply) -> None:
        meta = ((SESSION_KEY_HEADER, reply.session_key),) if getattr(reply, "session_key", "") else ()
        try:
            self.stub.Close(pb.CloseRequest(session=reply.session), metadata=meta, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            assert e.code() in CLIENT_ERRORS, f"Close: {e.code().name} {e.details()}"

    def assert_alive(self) -> None:
        r = self.health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Verifier"), timeout=CALL_TIMEOUT_S)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


class GoodSessions:
    """Well-behaved edges in a thread: picospec and cloud-only completions whose
    output must stay the target's greedy output while the fuzz runs."""

    def __init__(self, address, drafter, tokenizer, reference, n_tokens: int = 24):
        self.address, self.drafter, self.tokenizer = address, drafter, tokenizer
        self.jobs = []
        for k, mode in enumerate(["picospec", "cloud-only", "picospec", "sync"]):
            prompt = tokenizer.encode(PROMPTS[10 + k])
            self.jobs.append((mode, prompt, reference.greedy(prompt, n_tokens)))
        self.n = n_tokens
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        client = VerifierClient(self.address)
        agent = Agent(client, self.drafter, self.tokenizer.fingerprint, self.tokenizer.n_vocab, self.tokenizer.eos)
        try:
            while not self.stop.is_set():
                for mode, prompt, (ref, gaps) in self.jobs:
                    cfg = GenConfig(mode=mode, gamma=3, window=2 if mode == "picospec" else None, adaptive=False,
                                    max_tokens=self.n, stop_at_eos=False, require_cloud=True)
                    try:
                        c = agent.generate(prompt, cfg)
                    except Exception as e:              # noqa: BLE001 - any failure is the finding
                        self.failures.append(f"{mode}: {e}")
                        continue
                    i = first_divergence(c.tokens, ref)
                    if i is not None and gaps[i] >= 1e-3:
                        self.failures.append(f"{mode}: diverged from the target at token {i}")
                    self.done += 1
        finally:
            client.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(300)


def fuzz(cloud, drafter, tokenizer, reference, cases: int) -> None:
    fz = Fuzzer(cloud.address, tokenizer.fingerprint)
    t0 = time.monotonic()
    try:
        with GoodSessions(cloud.address, drafter, tokenizer, reference) as good:
            @settings(max_examples=cases, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(call=any_call(tokenizer.fingerprint))
            def one(call):
                fz.run(call)

            one()
            wait_until = time.monotonic() + 300
            while good.done < len(good.jobs) and time.monotonic() < wait_until and not good.failures:
                time.sleep(0.1)                         # at least one full round of good sessions
        total = sum(fz.codes.values())
        print(f"fuzz: {total} cases in {time.monotonic() - t0:.0f} s; good completions {good.done}; "
              f"statuses {dict(sorted(fz.codes.items()))}")
        for k, msg in sorted(fz.examples.items()):
            print(f"  {k[0]} {k[1]}: {msg}")
        assert not good.failures, good.failures
        assert good.done >= len(good.jobs)
        assert total >= cases
        fz.assert_alive()
    finally:
        fz.close()


def test_fuzz_every_rpc_while_good_sessions_run(cloud, drafter, tokenizer, reference):
    fuzz(cloud, drafter, tokenizer, reference, FAST_CASES)


@pytest.mark.slow
def test_fuzz_2000_cases(cloud, drafter, tokenizer, reference):
    fuzz(cloud, drafter, tokenizer, reference, SLOW_CASES)


# -- named cases beside the fuzz ----------------------------------------------------------------

def test_zstd_bomb_is_invalid_argument_and_a_compressed_prompt_equals_the_plain_one(cloud, tokenizer):
    from proto.prompt_zstd import compress_prompt
    fz = Fuzzer(cloud.address, tokenizer.fingerprint)
    try:
        bomb = zstandard.ZstdCompressor(level=19).compress(b"\x1c\x00" * (32 << 20))   # 64 MB of token 28
        assert len(bomb) < 8192
        for rpc in (fz.stub.Open, lambda r, **kw: list(fz.stub.Generate(r, **kw))):
            req = (pb.OpenRequest if rpc is fz.stub.Open else pb.GenerateRequest)(
                fingerprint=tokenizer.fingerprint, prompt_zstd=bomb, max_tokens=2)
            with pytest.raises(grpc.RpcError) as e:
                rpc(req, timeout=CALL_TIMEOUT_S)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expands past" in e.value.details()
        prompt = tokenizer.encode(PROMPTS[7])
        plain = pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=prompt, max_tokens=8)
        packed = pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt_zstd=compress_prompt(prompt, WIDTH),
                                    max_tokens=8)
        run = lambda r: [t for c in fz.stub.Generate(r, timeout=CALL_TIMEOUT_S) for t in c.tokens]
        assert run(packed) == run(plain)
        reply = fz.stub.Open(pb.OpenRequest(fingerprint=tokenizer.fingerprint, prompt=prompt), timeout=CALL_TIMEOUT_S)
        assert reply.accepts_prompt_zstd
        fz._close(reply)
        fz.assert_alive()
    finally:
        fz.close()
