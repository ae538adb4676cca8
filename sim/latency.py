"""Modelled compute latency of targets and edge devices.

A 135M target on a CPU is far cheaper than the 32B-70B targets of real
deployments, so daemons can *emulate* a bigger model's timing: they compute the
real tokens with the real model and hold each forward pass until the modelled
time t(n) = a + b*n has passed (n = tokens in the pass). Everything that uses a
profile labels its output "emulated".
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyProfile:
    name: str
    a_s: float      # fixed cost of one forward pass (weights streamed once: memory-bound)
    b_s: float      # added cost per token in the pass
    source: str

    def forward_s(self, n_tokens: int) -> float:
        return self.a_s + self.b_s * max(1, n_tokens)


# Targets: fitted so that t(1) matches the autoregressive rates the PicoSpec
# paper reports for cloud-only decoding on one A100; b is the small per-token
# cost of verifying a block in a memory-bound pass (a few % of a per token).
TARGETS = {
    p.name: p for p in [
        LatencyProfile("qwen3-32b-a100", 0.0700, 0.0019,
                       "Qwen3-32B on one A100: 13.9 tok/s autoregressive (PicoSpec paper)"),
        LatencyProfile("llama-70b-a100", 0.1420, 0.0029,
                       "Llama-70B on one A100: 6.9 tok/s autoregressive (PicoSpec paper)"),
    ]
}

# Edge devices drafting with a ~0.6B-1B model.
DEVICES = {
    p.name: p for p in [
        LatencyProfile("jetson-orin", 0.0120, 0.0008,
                       "Qwen3-0.6B-class draft on Jetson AGX Orin: ~78 tok/s decode (assumed: 1.2 GB fp16 weights, 204 GB/s)"),
        LatencyProfile("jetson-orin-1b", 0.0330, 0.0015,
                       "Llama-1B-class draft on Jetson AGX Orin: ~29 tok/s decode (assumed)"),
    ]
}


CUSTOM = "custom:"


def lookup(table: dict[str, LatencyProfile], name: str, what: str) -> LatencyProfile:
    """A named profile, or one given inline as `custom:A+B` (seconds per pass and
    per token: t(n) = A + B*n), for a device or target that has no profile yet."""
    if name.startswith(CUSTOM):
        try:
            a, b = (float(x) for x in name[len(CUSTOM):].split("+"))
        except ValueError:
            raise ValueError(f"custom {what} profile must read custom:A+B (seconds), got {name!r}") from None
        if a < 0 or b < 0 or a + b <= 0:
            raise ValueError(f"custom {what} profile needs A, B >= 0 and A + B > 0, got {name!r}")
        return LatencyProfile(name, a, b, f"custom: t(n) = {a} + {b}*n s")
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} profile {name!r}; known: {', '.join(sorted(table))}, "
                         f"or {CUSTOM}A+B") from None


class Hold:
    """Stretches a real computation to its modelled duration.

        with Hold(profile, n_tokens):
            real_forward()
    returns only once max(real time, modelled time) has passed. With no profile
    it does nothing, so callers need no branches.
    """

    def __init__(self, profile: LatencyProfile | None, n_tokens: int):
        self.profile, self.n = profile, n_tokens

    def __enter__(self):
        self.t0 = time.monotonic()
        # when the modelled computation ends (0 without a profile): work that runs beside the
        # hold, such as using a pass's results, can answer no earlier than this
        self.ends_at = self.t0 + self.profile.forward_s(self.n) if self.profile is not None else 0.0
        return self

    def __exit__(self, *exc):
        if self.profile is not None and exc[0] is None:
            left = self.ends_at - time.monotonic()
            if left > 0:
                time.sleep(left)
        return False
