"""Modelled compute latency of targets and edge devices.

A 135M target on a CPU is far cheaper than the 32B-70B targets of real
deployments, so daemons can *emulate* a bigger model's timing: they compute the
real tokens with the real model and hold each forward pass until the modelled
time has passed. Everything that uses a profile labels its output "emulated".

Targets are priced by the roofline cost model of `sim.costmodel` (weights
streamed once per pass, compute for the pass's tokens, KV-cache reads), fitted
to the PicoSpec paper's rates; the earlier linear profiles t(n) = a + b*n stay
selectable as `*-linear`. Edge devices remain linear.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from sim import costmodel as cm


@dataclass(frozen=True)
class LatencyProfile:
    name: str
    a_s: float      # fixed cost of one forward pass (weights streamed once: memory-bound)
    b_s: float      # added cost per token in the pass
    source: str

    def forward_s(self, n_tokens: int, kv_tokens: int | None = None) -> float:
        """kv_tokens is accepted for callers that price every profile alike, and ignored."""
        return self.a_s + self.b_s * max(1, n_tokens)


# Without kv_tokens, a roofline profile prices a pass as one session per
# DEFAULT_BLOCK tokens (a speculative block of up to 8), each holding
# DEFAULT_CONTEXT tokens of KV cache: the context assumed behind the paper's rates.
DEFAULT_CONTEXT = cm.PAPER_CONTEXT
DEFAULT_BLOCK = 8


def default_kv_tokens(n_tokens: int) -> int:
    return DEFAULT_CONTEXT * math.ceil(max(1, n_tokens) / DEFAULT_BLOCK)


@dataclass(frozen=True)
class RooflineProfile:
    """A target priced by `sim.costmodel`: t(n, K) for n tokens over K tokens of KV cache.

    a_s and b_s are its linearisation at small n (t(1) and the mean added cost per
    token up to one DEFAULT_BLOCK) for callers, such as the edge's planner, that take
    a straight line."""
    name: str
    deployment: cm.Deployment
    a_s: float
    b_s: float
    source: str

    @classmethod
    def of(cls, name: str, deployment: cm.Deployment, source: str) -> "RooflineProfile":
        t1 = deployment.pass_s(1, default_kv_tokens(1))
        tb = deployment.pass_s(DEFAULT_BLOCK, default_kv_tokens(DEFAULT_BLOCK))
        b = (tb - t1) / (DEFAULT_BLOCK - 1)
        return cls(name, deployment, t1 - b, b, source)

    def forward_s(self, n_tokens: int, kv_tokens: int | None = None) -> float:
        """Seconds for a pass of n_tokens whose sequences hold kv_tokens of KV cache in all
        (default: `default_kv_tokens(n_tokens)`)."""
        k = default_kv_tokens(n_tokens) if kv_tokens is None else kv_tokens
        return self.deployment.pass_s(n_tokens, k)


def paper_deployment(model: str, gpu: str) -> cm.Deployment:
    """A model on the fewest GPUs that hold it, run the way the PicoSpec paper's rates imply:
    layers split across GPUs where it needs several (see sim/costmodel.py)."""
    m, g = cm.MODELS[model], cm.GPUS[gpu]
    return cm.Deployment(m, g, cm.PICOSPEC, pp=cm.gpus_needed(m, g))


def _roofline(name: str, model: str, gpu: str, what: str) -> RooflineProfile:
    d = paper_deployment(model, gpu)
    where = f"one {gpu}" if d.gpus == 1 else f"{d.gpus}x {gpu}, layers split"
    return RooflineProfile.of(name, d, f"{what} bf16 on {where}: roofline, stack fitted to the PicoSpec "
                                       f"paper's A100 rates (sim/costmodel.py)")


# Targets. The roofline ones reproduce the PicoSpec paper's cloud-only rates at
# n = 1 on A100 (13.9 and 6.9 tok/s); the -linear ones are the earlier guess,
# t(1) fitted to the same rates and b a few % of a per token.
TARGETS = {
    p.name: p for p in [
        _roofline("qwen3-32b-a100", "qwen3-32b", "a100-80gb", "Qwen3-32B"),
        _roofline("llama-70b-a100", "llama-3.1-70b", "a100-80gb", "Llama-3.1-70B"),
        _roofline("llama-8b-a100", "llama-3.1-8b", "a100-80gb", "Llama-3.1-8B"),
        _roofline("qwen3-32b-h100", "qwen3-32b", "h100-sxm", "Qwen3-32B"),
        _roofline("llama-70b-h100", "llama-3.1-70b", "h100-sxm", "Llama-3.1-70B"),
        _roofline("llama-8b-h100", "llama-3.1-8b", "h100-sxm", "Llama-3.1-8B"),
        LatencyProfile("qwen3-32b-a100-linear", 0.0700, 0.0019,
                       "Qwen3-32B on one A100: 13.9 tok/s autoregressive (PicoSpec paper), linear t(n) = a + b*n"),
        LatencyProfile("llama-70b-a100-linear", 0.1420, 0.0029,
                       "Llama-70B on one A100: 6.9 tok/s autoregressive (PicoSpec paper), linear t(n) = a + b*n"),
    ]
}

# Edge devices drafting with a ~0.6B-1B model.
DEVICES = {
    p.name: p for p in [
        LatencyProfile("jetson-orin", 0.0120, 0.0008,
                       "Qwen3-0.6B-class draft on Jetson AGX Orin: ~78 tok/s decode (assumed: 1.2 GB fp16 weights, 204 GB/s)"),
        LatencyProfile("jetson-orin-1b", 0.0330, 0.0015,
                       "Llama-1B-class draft on Jetson AGX Orin: ~29 tok/s decode (assumed)"),
        # The DyMoE drafter's compute (its expert reads are the expert store's, modelled
        # apart): the SmolLM2-MoE test bed, top-6 of 8 experts, reads 0.23 GB of fp16
        # weights per token (114M active of 135M parameters; docs/dymoe.md). A Raspberry
        # Pi 5-class board (4x Cortex-A76, LPDDR4X at 17 GB/s peak) streams them at an
        # assumed 8.5 GB/s: 27 ms; prefill adds ~2 ms per token (0.23 GFLOP at an
        # assumed ~110 GFLOP/s). The board boots from an SD card or, as a phone of the
        # same class, from UFS flash: --storage picks which.
        LatencyProfile("pi5-moe", 0.0270, 0.0020,
                       "SmolLM2-MoE test bed (114M of 135M parameters active, fp16) on a Raspberry Pi 5-class "
                       "board: ~34 tok/s decode (assumed: 0.23 GB per token at 8.5 GB/s)"),
    ]
}


CUSTOM = "custom:"


def lookup(table: dict, name: str, what: str) -> "LatencyProfile | RooflineProfile":
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

        with Hold(profile, n_tokens, kv_tokens):
            real_forward()
    returns only once max(real time, modelled time) has passed. kv_tokens: the KV
    cache the pass's sequences hold in all (None: the profile's default). With no
    profile it does nothing, so callers need no branches.

    `stall`: for a computation that also waits on modelled storage (the MoE
    drafter's expert reads), a clock of the seconds it has waited so far. The
    profile then prices only the compute: the hold lasts the modelled compute
    plus the wait, real_s is the compute alone (the wait taken out) and stall_s
    the wait.

    `start`: when the modelled computation began, where that is earlier than this
    thread got going (a verifier's next pass begins when the last one ends with
    work queued; the thread that runs it may reach it a few ms later on a busy
    CPU). The hold ends the modelled time after it; real_s still counts from entry.
    """

    def __init__(self, profile: "LatencyProfile | RooflineProfile | None", n_tokens: int,
                 kv_tokens: int | None = None, stall: "Callable[[], float] | None" = None,
                 start: float | None = None):
        self.profile, self.n, self.kv, self.stall = profile, n_tokens, kv_tokens, stall
        self.start = start
        self.stall_s = 0.0

    def __enter__(self):
        self.t0 = time.monotonic()
        self._stall0 = self.stall() if self.stall is not None else 0.0
        # when the modelled computation ends (0 without a profile): work that runs beside the
        # hold, such as using a pass's results, can answer no earlier than this
        self.modelled_s = self.profile.forward_s(self.n, self.kv) if self.profile is not None else 0.0
        began = self.t0 if self.start is None else min(self.start, self.t0)
        self.ends_at = began + self.modelled_s if self.profile is not None else 0.0
        return self

    def __exit__(self, *exc):
        if self.stall is not None:
            self.stall_s = max(0.0, self.stall() - self._stall0)
            self.ends_at += self.stall_s if self.profile is not None else 0.0
        # the real computation alone, before any wait (and without the storage's)
        self.real_s = time.monotonic() - self.t0 - self.stall_s
        if self.profile is not None and exc[0] is None:
            left = self.ends_at - time.monotonic()
            if left > 0:
                time.sleep(left)
        return False
