"""An emulated target answers no earlier than its model says.

The verifier computes the real tokens on this CPU, far faster than the modelled
GPU, and holds every pass to the modelled time. Its answer must wait for that
time too: the scheduler hands rows over as soon as the real pass is done, so a
reply that went out then would make the emulated target look faster than the
hardware it models. Only a lower bound is asserted: a loaded machine can be
slower than the model, never faster.
"""
from __future__ import annotations

import time

import grpc

from common.procs import start_cloud
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from sim.latency import TARGETS

TARGET = "qwen3-32b-a100-linear"      # a pass time that does not depend on the cache


def test_streamed_tokens_arrive_no_earlier_than_the_modelled_passes(tokenizer):
    d = start_cloud("--threads", "1", "--emulate-target", TARGET)
    try:
        prompt = tokenizer.encode("Why is the sky blue?")
        n = 4
        profile = TARGETS[TARGET]
        modelled = profile.forward_s(len(prompt)) + n * profile.forward_s(1)
        with grpc.insecure_channel(d.address) as ch:
            stub = pb_grpc.VerifierStub(ch)
            t0 = time.monotonic()
            chunks = list(stub.Generate(pb.GenerateRequest(fingerprint=tokenizer.fingerprint, prompt=prompt,
                                                           max_tokens=n, ignore_eos=True), timeout=120))
            took = time.monotonic() - t0
        assert sum(len(c.tokens) for c in chunks) == n and all(c.emulated for c in chunks)
        assert took >= modelled, f"{n} tokens in {took:.3f} s, the model says at least {modelled:.3f} s"
    finally:
        d.stop()
