"""A fleet you can simulate: D edge devices, R verifier replicas, one discrete-event model.

What the load bench measures on one verifier (`tandem-bench load`), this model
extrapolates to a fleet: how many GPU replicas keep every edge session above a
speed objective, cloud-only against picospec, and what a million tokens costs.
It is a SimPy model of the same pieces the daemons are made of, priced by the
same cost model the emulated verifier holds its passes to:

    device ──(uplink: RTT/2 + bytes/rate)──▶ balancer ──▶ replica queue
       ▲                                    (least        │ one pass batches every queued
       │                                     sessions,    │ step under the token budget,
       └──(downlink: RTT/2 + bytes/rate)── admission)     │ one step per session (its queued
                                                          │ blocks merged), oldest first;
                                                          ▼ t = target.forward_s(n, K)

Legend: D devices, R replicas, S sessions on a replica, g = drafted tokens per
block (gamma), W = blocks in flight (window), a = per-position acceptance,
t_d = one draft step, t(n, K) = a pass of n tokens over K tokens of KV cache.

Sessions
--------
* cloud-only: the verifier streams; each pass decodes one token per session
  and the session's next step is queued at once. The link only delays when a
  token shows up (a constant offset), not the rate, so it is left out.
* picospec: the edge drafts a block of g tokens (g·t_d), sends it and goes on
  drafting the next one while the first is on the wire or being verified, up
  to W blocks in flight. The verifier draws how many drafted tokens it accepts
  (each position with probability a, until the first rejection). A rejection
  yields the accepted tokens plus the correction, bumps the epoch on the
  verifier at once (queued blocks of the old epoch are dropped, as the real
  verifier drops them) and on the edge when the verdict arrives: the edge then
  throws away what it was drafting and restarts with a short block
  (`FIRST_BLOCK`), carrying the correction for the verifier to evaluate. A
  fully accepted block yields g tokens: the target's token after it is what
  the next block's first draft is checked against. Only when no block follows
  (the edge was waiting, nothing else in flight) does it yield the bonus too,
  g + 1. So a block that stands alone yields on average
  E = (1 - a^(g+1)) / (1 - a), the planner's E_bonus(g); one in a pipeline
  E - a^g.
* The edge's planner (edge/planner.py) picks g and W per device from the
  session's draft step, RTT, acceptance and the verifier's idle pass time, and
  streams cloud-only where no (g, W) is predicted at least as fast as that:
  `plan()` prices (g, W) with the planner's own formula (kernels/speculation_rate.py).
* cloud lead (the edge's default, `lead=True`): after a rejection the verifier
  decodes on alone, one token a pass, until the edge's next block arrives, as
  cloud/session.py leads while it awaits the edge's new branch. Each lead token
  is committed, and matches the branch's draft there with probability a: a
  match lets the branch's block skip that position, a mismatch kills the
  branch (its blocks are dropped, the edge restarts once the token reaches it,
  and the lead goes on). The planner's formula counts every led token as a
  gain, so it prices a lead higher than this model runs it.

Requests (`Requests`, what `tandem-bench fleet --validate` runs): the capacity
bench's protocol instead of the steady state. Every device sends one request at
once; its prompt is prefilled first (the scheduler's rule: decodes first, one
chunk's room kept for prompts, prompts filling what is left of the budget, a
64-token chunk each a pass), the prefill's last pass gives its first token, and
the session ends after its last one. A session's rate is its stream's, as the bench measures it.

What the steady state leaves out, on purpose: prompt prefill (sessions are in steady state:
every device generating all the time, the peak-hour case), link jitter, loss
and outages, draft trees, and the planner relearning under
load (it plans once, at idle prices). Each is a conservative or neutral
simplification for capacity except the last, which can overrate picospec on a
heavily loaded replica.
"""
from __future__ import annotations

import functools
import gc
import heapq
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import simpy

from common.rates import stream_rate
from kernels import speculation_rate
from sim import latency
from sim.admission import Demand, predict
from sim.link.profiles import load_profiles

MODES = ("cloud-only", "picospec")
MAX_BATCH_TOKENS = 256      # cloud-verifier --max-batch-tokens default (docs/architecture.md)
FIRST_BLOCK = 3             # edge/picospec.py: the first block after a break
CONTEXT0 = latency.DEFAULT_CONTEXT  # tokens of context a session holds when it starts (the paper's 512)
MAX_GAMMA, MAX_WINDOW = 16, 8       # the planner's defaults
MAX_DRAFT = 32              # cloud-verifier --max-draft default: the most drafts one pass verifies for a session
# Bytes on the wire (docs/wire-protocol.md): a block is a Draft message with 4-byte packed
# token ids (vocab > 65,536) and, at T > 0 with codec P, one byte of q(x) per token; about
# 30 bytes of HTTP/2 + gRPC framing and protobuf fields around it. A verdict is the 30 bytes
# plus a token. Assumed from the message layout, not measured; at the mix's rates they cost
# microseconds to milliseconds, far under the round trips.
BLOCK_BYTES, TOKEN_BYTES, VERDICT_BYTES = 30, 5, 34
PROMPT_CHUNK = 64           # cloud/scheduler.py: a prompt's chunk, and the room a waiting one keeps in a pass (2 x 32)
REQUEST_HORIZON_S = 3600.0  # Requests: model time a run may take at most


@dataclass(frozen=True)
class Share:
    """One entry of a mix: `name` takes `weight` of the fleet; `value` where the entry carries one."""
    name: str
    weight: float
    source: str
    value: float | None = None


# -- the default distributions, each with where it comes from -----------------------------
# Per-position acceptance of the default drafter (draft-l29 for SmolLM2-135M, standing for a
# 0.6B -> 32B pair): one workload per benchmark that measured it.
WORKLOADS = (
    Share("humaneval", 1 / 3, "tandem-bench accept: alpha_1 0.904, HumanEval, 384 positions, T=0.7 "
          "(docs/measurements.md, Draft trees)", 0.904),
    Share("mtbench", 1 / 3, "tandem-bench accept: alpha_1 0.813, MT-bench first turns, 384 positions, T=0.7 "
          "(docs/measurements.md)", 0.813),
    Share("chat", 1 / 3, "tandem-bench spec: 0.75-0.78 per drafted position at T=0.7, the load prompts "
          "(docs/measurements.md, Models)", 0.77),
)
# Draft step times come from sim/latency.py DEVICES (t_d = a + b for one token).
DEVICE_MIX = (
    Share("jetson-orin", 0.7, "ASSUMED share; step 12.8 ms: sim/latency.py, 0.6B-class draft on Jetson AGX Orin"),
    Share("jetson-orin-1b", 0.3, "ASSUMED share; step 34.5 ms: sim/latency.py, 1B-class draft on Jetson AGX Orin"),
)
# RTT and rates come from sim/link_profiles.toml (each profile cites its source).
LINK_MIX = (
    Share("wifi", 0.30, "ASSUMED share of devices on home/office Wi-Fi (10 ms RTT)"),
    Share("5g", 0.25, "ASSUMED share on 5G (30 ms RTT)"),
    Share("lte", 0.30, "ASSUMED share on LTE (50 ms RTT)"),
    Share("picospec-wan", 0.05, "ASSUMED share on a cross-region WAN (50 ms, 10 Mbit/s)"),
    Share("3g", 0.05, "ASSUMED share on 3G (150 ms RTT)"),
    Share("satellite", 0.05, "ASSUMED share on geostationary satellite (600 ms RTT)"),
)


def default_table(workloads=WORKLOADS, devices=DEVICE_MIX, links=LINK_MIX) -> list[dict]:
    """Every distribution of the mix as rows (kind, name, share, value, source), for reports."""
    rows = [{"kind": "workload (acceptance)", "name": s.name, "share": s.weight, "value": s.value,
             "source": s.source} for s in workloads]
    rows += [{"kind": "device (draft step, s)", "name": s.name, "share": s.weight,
              "value": latency.DEVICES[s.name].forward_s(1), "source": s.source} for s in devices]
    profiles = load_profiles()
    rows += [{"kind": "link (RTT, s)", "name": s.name, "share": s.weight,
              "value": (profiles[s.name].up.delay_ms + profiles[s.name].down.delay_ms) / 1e3, "source": s.source}
             for s in links]
    return rows


def parse_mix(text: str, known, what: str) -> tuple[Share, ...]:
    """`name=share,name=share,...` as a mix, shares normalised to sum to 1; every name must be
    in `known`. For command lines that replace a default mix."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, share = part.partition("=")
        try:
            w = float(share) if eq else 1.0
        except ValueError:
            raise ValueError(f"{what} mix: {part!r} is not NAME=SHARE") from None
        if name not in known:
            raise ValueError(f"{what} mix: unknown {what} {name!r}; known: {', '.join(sorted(known))}")
        if w <= 0:
            raise ValueError(f"{what} mix: the share of {name!r} must be > 0")
        out.append((name, w))
    if not out:
        raise ValueError(f"{what} mix is empty")
    total = sum(w for _, w in out)
    return tuple(Share(n, w / total, f"given on the command line ({text})") for n, w in out)


@dataclass(frozen=True)
class Link:
    name: str
    up_delay_s: float
    down_delay_s: float
    up_bytes_s: float
    down_bytes_s: float

    @classmethod
    def named(cls, name: str, profiles: dict | None = None) -> "Link":
        p = (profiles or load_profiles())[name]
        if p.up.trace or p.down.trace:
            raise ValueError(f"link profile {name!r} replays a trace; the fleet model needs a fixed rate")
        return cls(name, p.up.delay_ms / 1e3, p.down.delay_ms / 1e3, p.up.rate_mbit * 1e6 / 8,
                   p.down.rate_mbit * 1e6 / 8)

    @property
    def rtt_s(self) -> float:
        return self.up_delay_s + self.down_delay_s

    def up_s(self, n_bytes: int) -> float:
        return self.up_delay_s + n_bytes / self.up_bytes_s

    def down_s(self, n_bytes: int) -> float:
        return self.down_delay_s + n_bytes / self.down_bytes_s


@dataclass(frozen=True)
class Device:
    """One edge device: its link, its draft step and its drafter's acceptance on its workload."""
    link: Link
    t_draft_s: float
    accept: float
    device: str = "custom"
    workload: str = "custom"
    # Requests: at each output position, "1" where the drafter's token there is the target's
    # (what a measured run's session met, `session_accept_path`); positions past it, or
    # without it, are accepted with probability `accept`
    path: str | None = None


def population(n: int, workloads=WORKLOADS, devices=DEVICE_MIX, links=LINK_MIX,
               profiles: dict | None = None) -> list[Device]:
    """n devices whose mix follows the shares as closely as n allows (largest remainder over
    every link x device x workload cell), interleaved so that any prefix, and any replica the
    balancer fills in turn, holds close to the same mix. Deterministic: no random draws."""
    profiles = profiles or load_profiles()
    cells = [(lk, dv, wl, lk.weight * dv.weight * wl.weight) for lk in links for dv in devices for wl in workloads]
    total = sum(c[3] for c in cells)
    exact = [n * c[3] / total for c in cells]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(cells)), key=lambda i: counts[i] - exact[i])[:n - sum(counts)]:
        counts[i] += 1
    # Interleave: cell i's k-th device sits at (k + 0.5) / count_i of the way through.
    placed = sorted(((k + 0.5) / c, i) for i, c in enumerate(counts) for k in range(c))
    link_of = {lk.name: Link.named(lk.name, profiles) for lk in links}
    out = []
    for _, i in placed:
        lk, dv, wl, _ = cells[i]
        out.append(Device(link_of[lk.name], latency.DEVICES[dv.name].forward_s(1), wl.value, dv.name, wl.name))
    return out


# -- the planner's choice -----------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    mode: str           # picospec, or cloud-only where speculation does not pay
    gamma: int
    window: int
    predicted_tokens_per_s: float


def plan(dev: Device, target, context: int = CONTEXT0, lead: bool = True) -> Plan:
    """The edge planner's pick at idle prices (edge/planner.py `rate`, without trees):

        stop-and-wait (W = 1)  E_bonus(g) / cycle,          cycle = g·t_d + rtt + t_v(g)
        pipelined              (E(g) + led) / (c + (1 - a^g)·(cycle - c)),   c = max(g·t_d, t_v(g), cycle / W)

    (led: the tokens a leading verifier decodes during the refill after a rejection) against
    cloud-only streaming at 1 / t(1); cloud-only when no (g, W) is at least as fast."""
    cloud = 1.0 / target.forward_s(1, context)
    best = Plan("cloud-only", 0, 0, cloud)
    for g in range(1, MAX_GAMMA + 1):
        tv = target.forward_s(g + 1, context)
        for w in speculation_rate.windows(g, dev.t_draft_s, dev.link.rtt_s, tv, MAX_WINDOW):
            r = speculation_rate.rate(dev.accept, g, w, dev.t_draft_s, dev.link.rtt_s, tv,
                                      lead_token_s=1.0 / cloud if lead else None)
            if r > best.predicted_tokens_per_s:
                best = Plan("picospec", g, w, r)
    return best


# -- admission ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Admission:
    """What a replica admits (see `admits`). max_sessions: `cloud-verifier --max-sessions`.
    slo_tokens_per_s: admit only while the cost model predicts each session still gets this
    rate with one more session, aiming at it times 1 + slo_headroom as the verifier does
    (`--slo-headroom`); step_tokens / yield_tokens: tokens a session puts in a pass and
    gets out of it (1 / 1 for cloud-only streaming)."""
    max_sessions: int | None = None
    slo_tokens_per_s: float | None = None
    slo_headroom: float = 0.1
    target: object = None
    step_tokens: float = 1.0
    yield_tokens: float = 1.0
    context: int = CONTEXT0


def admits(sessions: int, S: Admission) -> bool:
    """Whether a replica holding `sessions` sessions admits one more under policy S.

    Two predicates, both must hold:
    * capacity: sessions + 1 <= S.max_sessions (when set), the verifier's --max-sessions;
    * speed objective (when S.slo_tokens_per_s is set): with n = sessions + 1 sessions each
      putting S.step_tokens into every pass and getting S.yield_tokens out of it, a pass costs
      t(n·step, n·context) and each session gets yield / t(...) tokens/s; admit while that is
      >= the objective times 1 + headroom. For cloud-only sessions (1 / 1) this is
      1 / t(n) >= SLO (1 + headroom).
    The prediction is the verifier's own (`sim.admission.predict`, behind
    `cloud-verifier --slo-tokens-per-s`), for n sessions of the same demand."""
    n = sessions + 1
    if S.max_sessions is not None and n > S.max_sessions:
        return False
    if S.slo_tokens_per_s is not None:
        one = Demand(tau=S.yield_tokens, tokens=S.step_tokens, kv=S.context)
        if predict(S.target, [one] * n).min_rate < S.slo_tokens_per_s * (1 + S.slo_headroom):
            return False
    return True


# -- the discrete-event model ---------------------------------------------------------------
@dataclass(frozen=True)
class Requests:
    """The capacity bench's protocol (bench/loadgen.py `run_sessions`): device i sends one
    request at time 0 with a prompt of prompt_tokens[i] tokens and gets `tokens` tokens."""
    prompt_tokens: tuple[int, ...]
    tokens: int

    def __post_init__(self):
        if self.tokens < 1 or any(p < 1 for p in self.prompt_tokens):
            raise ValueError("a request needs a prompt of at least one token and at least one token out")


@dataclass(slots=True)
class Step:
    """One session's work for one pass: n tokens to evaluate, drafted of them to judge."""
    session: "Session"
    n: int
    drafted: int = 0
    epoch: int = 0
    lead: bool = False               # a lead token: the verifier decoding on alone after a rejection
    prefill: bool = False            # a chunk of the session's prompt


@dataclass(slots=True)
class Session:
    dev: Device
    plan: Plan
    replica: "Replica"
    rng: random.Random
    context: int = CONTEXT0
    tokens: int = 0                  # committed within the measured window
    epoch_cloud: int = 0
    epoch_edge: int = 0
    in_flight: int = 0
    restart: bool = True             # the next block is the first after a break (a short one)
    carry: bool = False              # the next block carries a correction or bonus token
    idle: bool = True                # the edge is not drafting: its window is full (or not started)
    draft_id: int = 0                # the block being drafted; a rejection starts another
    leading: bool = False            # the verifier leads until the edge's next block arrives
    overlap: int = 0                 # lead tokens the edge's next drafts must match (decided ahead of them)
    decided: int = 0                 # output positions the verifier has decided (a path's index)
    prefill_left: int = 0            # Requests: prompt tokens still to prefill
    goal: int | None = None          # Requests: tokens the request asks for ...
    generated: int = 0               # ... generated so far
    stamps: list | None = None       # ... the time each token arrived
    done: bool = False


class Replica:
    """One verifier: a queue of steps and the scheduler's rule (cloud/scheduler.py): each pass
    takes every queued step that fits the token budget, oldest first, one per session (a
    session's blocks queued one behind the other merged into it, as cloud/inbox.py merges
    them), a block never split; steps of a stale epoch are dropped. The pass lasts target.forward_s(n, K), K
    the KV cache its sessions hold. Like the sessions, it runs on its timer's callback: a pass
    ends, its steps are answered, the next pass gathers what is queued by then."""

    def __init__(self, env: simpy.Environment, fleet: "Fleet", budget: int = MAX_BATCH_TOKENS):
        self.env, self.fleet, self.budget = env, fleet, budget
        self.queue: list[Step] = []
        self.prompts: list[Session] = []            # Requests: sessions whose prompt waits, oldest first
        self.sessions = 0
        self.busy = False
        self.passes = self.pass_tokens = 0
        self.busy_s = 0.0

    def submit(self, step: Step) -> None:
        self.queue.append(step)
        if not self.busy:
            self._next()

    def _gather(self) -> list[Step]:
        # a waiting prompt keeps one chunk's room from decodes (cloud/scheduler.py)
        chunk = max(1, min(PROMPT_CHUNK, self.budget // 2))
        reserve = chunk if self.prompts else 0
        taken, keep, room = [], [], self.budget - reserve
        merging: dict[int, int] = {}                # session -> drafts in its group (-1: closed)
        for s in self.queue:
            if s.epoch != s.session.epoch_cloud or (s.lead and not s.session.leading) or s.session.done:
                continue                            # an old epoch's block, or a lead the edge ended: dropped
            k = id(s.session)
            group = merging.get(k)
            if group is None and s.n <= room:
                taken.append(s)
                merging[k] = -1 if s.lead else s.drafted
                room -= s.n
            elif (group is not None and group >= 0 and not s.lead and s.n == s.drafted
                  and group + s.drafted <= MAX_DRAFT and s.n <= room):
                # a later block of the session, queued behind the first: verified in the same
                # pass (cloud/inbox.py `continues`: same epoch, no correction, within max draft)
                taken.append(s)
                merging[k] = group + s.drafted
                room -= s.n
            else:
                keep.append(s)
                merging[k] = -1                     # what follows waits for a later pass, in order
        self.queue = keep
        # prompts fill what the decodes left, oldest first, each at most one chunk a pass
        # (cloud/scheduler.py `_chunk`): several prompts advance side by side
        room += reserve
        for s in self.prompts:
            if room <= 0:
                break
            take = min(s.prefill_left, chunk, room)
            taken.append(Step(s, take, prefill=True))
            room -= take
        return taken

    def _next(self) -> None:
        batch = self._gather()
        self.busy = bool(batch)
        if not batch:
            return
        n = sum(s.n for s in batch)
        kv = sum(s.session.context + s.n for s in batch)
        dt = self.fleet.pass_s(n, kv)
        self.env.timeout(dt).callbacks.append(lambda _: self._done(batch, n, dt))

    def _done(self, batch: list[Step], n: int, dt: float) -> None:
        now, t_start = self.env.now, self.fleet.t_start
        if now > t_start:
            self.passes += 1
            self.pass_tokens += n
            self.busy_s += min(dt, now - t_start)   # the part inside the window
        for s in batch:
            if s.prefill:
                self._prefilled(s)
            else:
                self.fleet.on_pass(s)
        self._next()

    def _prefilled(self, step: Step) -> None:
        s = step.session
        s.prefill_left -= step.n
        s.context += step.n
        if not s.prefill_left:
            self.prompts.remove(s)
            self.fleet.started(s)


class Fleet:
    """Devices, arriving in a random order, behind a least-sessions balancer in front of R
    replicas, in one SimPy env."""

    def __init__(self, devices: list[Device], replicas: int, target, mode: str, admission: Admission,
                 warmup_s: float, window_s: float, seed: int, budget: int = MAX_BATCH_TOKENS,
                 plan_of=plan, lead: bool = True, requests: Requests | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if requests is not None and len(requests.prompt_tokens) != len(devices):
            raise ValueError(f"{len(requests.prompt_tokens)} prompts for {len(devices)} devices")
        self.env = simpy.Environment()
        self.lead = lead
        self.t_start, self.t_end = warmup_s, warmup_s + window_s
        self.replicas = [Replica(self.env, self, budget) for _ in range(replicas)]
        # Pass times repeat (a replica of few sessions sees the same n and K again and again) and
        # the cost model rebuilds every term per call: memoised, per fleet.
        self.pass_s = functools.lru_cache(maxsize=1 << 16)(target.forward_s)
        self.sessions: list[Session] = []
        self.refused = 0
        rng = np.random.default_rng(seed)
        plans: dict[Device, Plan] = {}
        heap = [(0, i) for i in range(replicas)]   # (sessions, replica): least sessions first
        # Devices arrive in a random order. In the population's own order (interleaved cells) a
        # balancer filling replicas in turn would alias with its period: some replicas would get
        # only one workload or link, a correlation no real fleet has.
        for j in rng.permutation(len(devices)):
            dev = devices[j]
            if mode == "cloud-only":
                p = Plan("cloud-only", 0, 0, 0.0)
            else:
                p = plans.get(dev) or plans.setdefault(dev, plan_of(dev, target))
            n, i = heap[0]
            if not admits(n, admission):
                self.refused += 1                   # the least-loaded replica is full: so are all
                continue
            heapq.heapreplace(heap, (n + 1, i))
            r = self.replicas[i]
            r.sessions += 1
            s = Session(dev, p, r, random.Random(int(rng.integers(2 ** 63))))
            self.sessions.append(s)
            if requests is not None:                # all at once, as the bench's sessions start
                s.context, s.prefill_left = 0, requests.prompt_tokens[j]
                s.goal, s.stamps = requests.tokens, []
                r.prompts.append(s)                 # the first pass starts once all are in
                continue
            # start at a random phase, so that sessions do not move in lockstep
            self.env.timeout(float(rng.uniform(0, 0.1))).callbacks.append(lambda _, s=s: self._start(s))
        for r in self.replicas:
            if r.prompts:
                self.env.timeout(0).callbacks.append(lambda _, r=r: r.busy or r._next())

    # A session is driven by its timers' callbacks: a rejection cancels the block being drafted
    # by its id (`draft_id`) instead of interrupting a process, and a full window simply leaves
    # the edge idle until a verdict calls `_draft` again.
    def started(self, s: Session) -> None:
        """A request's prompt is in: the pass that finished it gave the first token, which is
        not in the verifier's KV cache yet (a streamed token's next step evaluates it; a
        picospec edge's first block carries it)."""
        self._commit(s, 1)
        s.decided = 1
        if s.done:
            return
        s.carry = True
        self._start(s)

    def _start(self, s: Session) -> None:
        if s.plan.mode == "cloud-only":
            s.replica.submit(Step(s, 1))
        else:
            self._draft(s)

    # picospec: the edge drafts ahead while blocks are on the wire or verified
    def _draft(self, s: Session) -> None:
        """Start drafting the next block, unless the window is full (then a verdict restarts it)."""
        if s.done:
            return
        if s.in_flight >= s.plan.window:
            s.idle = True
            return
        s.idle = False
        g = min(s.plan.gamma, FIRST_BLOCK) if s.restart and s.plan.window > 1 else s.plan.gamma
        # a correction or bonus the verifier decided is not in its KV cache yet: the next block
        # carries it, one token more to evaluate
        fixed = 1 if s.carry else 0
        s.draft_id += 1
        self.env.timeout(g * s.dev.t_draft_s).callbacks.append(
            lambda _, k=s.draft_id: self._drafted(s, k, g, fixed))

    def _drafted(self, s: Session, draft_id: int, g: int, fixed: int) -> None:
        if draft_id != s.draft_id:
            return                                  # a rejection arrived meanwhile: this block follows it
        s.restart = s.carry = False
        s.in_flight += 1
        step = Step(s, g + fixed, g, s.epoch_edge)
        if step.epoch == s.epoch_cloud:             # else the verifier has moved on: it would drop it
            self.env.timeout(s.dev.link.up_s(BLOCK_BYTES + TOKEN_BYTES * (g + fixed))).callbacks.append(
                lambda _: self._arrive(step))
        self._draft(s)

    def _arrive(self, step: Step) -> None:
        """A block reaches the verifier; one of an epoch it has already left is dropped at once.
        The new branch's first block ends a lead. Its drafts at positions the lead already
        decided equal the lead tokens (`_led`: else its branch died and it was dropped), so only
        the drafts past the lead are verified (cloud/session.py `_overlap`)."""
        s = step.session
        if step.epoch != s.epoch_cloud:
            return
        s.leading = False
        o = min(s.overlap, step.drafted)
        if o:
            s.overlap -= o
            step.drafted -= o
            step.n = step.drafted               # the carried correction went in with the lead
            if not step.drafted:                # every draft already decided: no pass
                self.env.timeout(s.dev.link.down_s(VERDICT_BYTES)).callbacks.append(
                    lambda _: self._verdict(s, step, 0, False))
                return
        s.replica.submit(step)

    def _led(self, s: Session) -> None:
        """A lead token is decided. The edge's branch drafts that position too, and matches it
        with probability a (lead and draft race on shared keys). A match lets the branch live
        (its block skips the position); a mismatch kills it: the verifier drops the branch's
        blocks from now on, and the edge starts another once the token reaches it."""
        self._commit(s, 1)
        match = self._accepts(s)
        s.decided += 1
        if match:
            s.overlap += 1
            return
        s.epoch_cloud += 1
        s.overlap = 0
        s.leading = True                            # lead on until the new branch's first block
        dead = Step(s, 0, epoch=s.epoch_cloud - 1)
        self.env.timeout(s.dev.link.down_s(VERDICT_BYTES)).callbacks.append(
            lambda _: self._verdict(s, dead, 0, True, correction=False))

    def _lead(self, s: Session) -> None:
        if self.lead and not s.leading and not s.done:
            s.leading = True
            s.replica.submit(Step(s, 1, epoch=s.epoch_cloud, lead=True))

    def on_pass(self, step: Step) -> None:
        s = step.session
        if s.plan.mode == "cloud-only":
            self._commit(s, 1)
            if not s.done:
                s.replica.submit(Step(s, 1))
            return
        if step.lead:
            # a lead pass the edge's block arrived during still decides its token
            if step.epoch == s.epoch_cloud:
                self._led(s)
            if s.leading and not s.done:
                s.replica.submit(Step(s, 1, epoch=s.epoch_cloud, lead=True))
            return
        if step.epoch != s.epoch_cloud:
            return                                  # its branch died at a lead token during the pass
        # accepted drafts, until the first rejection: as the device's measured path has them,
        # else each with probability a
        k = 0
        while k < step.drafted and self._accepts(s, k):
            k += 1
        rejected = k < step.drafted
        s.decided += k + (1 if rejected else 0)     # the accepted drafts and the correction
        if rejected:
            s.epoch_cloud += 1                      # later blocks of this epoch are dropped
            s.overlap = 0
            self._lead(s)
        self.env.timeout(s.dev.link.down_s(VERDICT_BYTES)).callbacks.append(
            lambda _: self._verdict(s, step, k, rejected))

    def _verdict(self, s: Session, step: Step, k: int, rejected: bool, correction: bool = True) -> None:
        """The edge learns a block's fate. correction=False: its branch died at a lead token
        (already counted), so the rejection brings no token of its own."""
        if step.epoch != s.epoch_edge:
            return
        if rejected:
            self._commit(s, k + (1 if correction else 0))   # accepted + the correction
            s.epoch_edge += 1
            s.in_flight = 0
            s.restart = s.carry = True
            s.draft_id += 1                         # what it was drafting follows a rejected token
            self._draft(s)
            return
        s.in_flight -= 1
        last = s.in_flight == 0 and s.idle          # nothing follows: the verifier adds the bonus
        s.decided += 1 if last else 0
        self._commit(s, step.drafted + (1 if last else 0))
        s.carry = s.carry or last
        if s.idle:
            self._draft(s)

    @staticmethod
    def _accepts(s: Session, ahead: int = 0) -> bool:
        """Whether the edge's draft at the verifier's position + ahead is the target's token:
        where the device replays a measured session, as it was there; else a draw."""
        path, pos = s.dev.path, s.decided + ahead
        if path is not None and s.goal is not None and pos < len(path):
            return path[pos] == "1"
        return s.rng.random() < s.dev.accept

    def _commit(self, s: Session, n: int) -> None:
        if s.goal is not None:                      # a request stops at its last token
            n = min(n, s.goal - s.generated)
            if n <= 0:
                return
            s.generated += n
            s.stamps.extend([self.env.now] * n)
            s.done = s.generated >= s.goal
        s.context += n
        if self.t_start <= self.env.now <= self.t_end:
            s.tokens += n

    def run(self) -> None:
        self.env.run(until=self.t_end)


@dataclass
class Result:
    """What a simulation measured over its window."""
    mode: str
    devices: int
    replicas: int
    admitted: int
    refused: int
    window_s: float
    rates: list[float] = field(repr=False)         # tokens/s of each admitted session
    aggregate_tokens_per_s: float
    tokens_per_pass: float | None
    utilisation: float                              # share of the window the replicas were in a pass
    picospec_sessions: int                          # of the admitted: those the planner let speculate
    cpu_s: float

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.rates, q)) if self.rates else 0.0

    @property
    def p10(self) -> float:
        return self.percentile(10)

    @property
    def p50(self) -> float:
        return self.percentile(50)


def simulate(devices: list[Device], replicas: int, target, mode: str, admission: Admission | None = None,
             warmup_s: float = 3.0, window_s: float = 20.0, seed: int = 0,
             budget: int = MAX_BATCH_TOKENS, plan_of=plan, lead: bool = True,
             requests: Requests | None = None) -> Result:
    """Run the fleet for warmup_s + window_s of model time; rates over the window only.
    plan_of(device, target) -> Plan: how a picospec edge picks g and W (default: the planner's
    choice, `plan`; tests fix them). lead: the verifier leads after a rejection (the edge's
    default, `edge-agent --cloud-lead`).

    requests: the capacity bench's protocol instead (`Requests`; device i's prompt is
    requests.prompt_tokens[i]): the run lasts until every request is done, a session's rate
    is its stream's (`common.rates.stream_rate`), the aggregate their sum (the bench's
    aggregate_stream_tokens_per_s) and window_s the time the last one ended."""
    t0 = time.process_time()
    if plan_of is plan and not lead:
        plan_of = functools.partial(plan, lead=False)
    if requests is not None:
        warmup_s, window_s = 0.0, REQUEST_HORIZON_S
    f = Fleet(devices, replicas, target, mode, admission or Admission(), warmup_s, window_s, seed, budget,
              plan_of, lead, requests)
    # The run allocates millions of short-lived events and no reference cycles worth collecting;
    # the cyclic collector would rescan every live session each time it fires (~40 % of the CPU
    # time at 10,000 devices).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        f.run()
    finally:
        if was_enabled:
            gc.enable()
    passes = sum(r.passes for r in f.replicas)
    if requests is not None:
        if not all(s.done for s in f.sessions):
            raise RuntimeError(f"requests still running after {REQUEST_HORIZON_S:g} s of model time")
        window_s = max((s.stamps[-1] for s in f.sessions), default=0.0) or 1.0
        # one arrival of every token: its whole request's rate stands in, as in the bench
        rates = [stream_rate(s.stamps) or s.generated / s.stamps[-1] for s in f.sessions]
        aggregate = sum(rates)
    else:
        rates = [s.tokens / window_s for s in f.sessions]
        aggregate = sum(s.tokens for s in f.sessions) / window_s
    return Result(mode, len(devices), replicas, len(f.sessions), f.refused, window_s,
                  rates, aggregate,
                  sum(r.pass_tokens for r in f.replicas) / passes if passes else None,
                  sum(r.busy_s for r in f.replicas) / (window_s * replicas),
                  sum(s.plan.mode == "picospec" for s in f.sessions), time.process_time() - t0)


# -- sizing ---------------------------------------------------------------------------------
# Sessions a per-replica sizing run holds in all. The p10 session sits where the slow tail ends
# (with the default mix, the ~7 % streaming cloud-only on 3G and satellite, then 1B drafters on
# LTE): measured, 360 sessions put it 4 % above a 10,000-device run, 1000 within 0.5 %.
MIN_SAMPLE = 1000


def replica_sample(n: int, target, mode: str, min_sessions: int = MIN_SAMPLE, devices_of=population,
                   **sim) -> Result:
    """The fleet as seen from replicas holding n sessions each: m = ceil(min_sessions / n)
    replicas, m·n devices of the fleet's mix, one run. A single replica of a few sessions would
    hold a few devices only, and its p10 would say nothing about the fleet's slow tail (a 1B
    drafter on a satellite link); m replicas of n sessions hold the whole mix, in proportion,
    under exactly the load of one replica with n sessions."""
    m = math.ceil(min_sessions / n)
    return simulate(devices_of(m * n), m, target, mode, Admission(max_sessions=n), **sim)


def max_sessions_per_replica(slo: float, simulate_one, limit: int = 4096) -> int:
    """The most sessions one replica carries with p10 per-session speed >= slo (0: not even one).

    simulate_one(n) -> Result: one replica holding n sessions of the fleet's mix. Sessions on
    different replicas never share a pass, so a replica can be simulated alone. p10 falls as n
    grows (every session shares the passes), so the answer is found by doubling, then bisection:
    O(log n) simulations. Capped at `limit`."""
    def ok(n: int) -> bool:
        return simulate_one(n).p10 >= slo
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:                              # ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def replicas_needed(devices: int, per_replica: int) -> int | None:
    """Replicas for `devices` sessions at most `per_replica` each (None: no number suffices)."""
    return math.ceil(devices / per_replica) if per_replica > 0 else None


def cost_per_million_tokens(replicas: int, gpus_per_replica: int, gpu_price_per_hour: float,
                            tokens_per_s: float) -> float | None:
    """USD per million generated tokens: GPU-hours paid over tokens made in that hour."""
    if tokens_per_s <= 0:
        return None
    return replicas * gpus_per_replica * gpu_price_per_hour / (tokens_per_s * 3600) * 1e6
