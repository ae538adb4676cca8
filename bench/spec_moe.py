"""The MoE-drafter rows of `tandem-bench spec`: the design card's own configuration.

The DyMoE drafter (edge/moe) at a 25 % or 50 % expert budget, its experts read
from modelled UFS or SD-card flash, drafting for an emulated target. Its compute
is held to the `pi5-moe` device (sim/latency.py: the test bed's 114M active
parameters on a Raspberry Pi 5-class board); its expert reads stay modelled by
the expert store, and each draft step is split into the two (sim.latency.Hold's
stall clock).

Per cell it runs `sync` (always speculating: it measures acceptance and the
step) and `picospec-Q` (adaptive: what a user gets; the planner speculates or
streams). `limited_by` then names the term that keeps speculation from paying,
from the planner's own rate model (kernels/speculation_rate) fed with what the
sync row measured: `stall`, `compute` or `acceptance` where fixing that term
alone (no storage wait; no compute; acceptance raised to GOOD_ACCEPTANCE, the
dense drafter's) would make it pay (>= PAYS x cloud-only; the biggest gain
where several would); `compute+stall` where only a free draft step would;
else `acceptance`. `breakeven_acceptance`: the acceptance that would pay with the
measured step; `predicted_speedup` the model's own figure. All three are predictions from
measured inputs, not measurements. A picospec row the model says pays but that measured slower
than cloud-only takes the sync row's `limited_by` (the model prices the steady state, not what
each session's start costs). `planner_right` judges the decision: streaming is right unless
always speculating gained; speculating is right if it lost no more than 5 % to cloud-only and
missed no gain sync found.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge.planner import Planner
from sim.latency import DEVICES

DEVICE = "pi5-moe"
# "Pays": predicted at least this much faster than cloud-only. With the verifier leading, the
# model never falls far below cloud-only even at acceptance 0 (it decodes on its own meanwhile).
PAYS = 1.05
# What "fixing acceptance" means: a drafter as good as the dense draft-l29 (0.77-0.89 per position
# in this bench at T=0.7).
GOOD_ACCEPTANCE = 0.8
MODES = ("sync", "picospec-Q")     # the modes MoE drafters run (tree off: chains)


@dataclass(frozen=True)
class MoESetting:
    budget_pct: float
    storage: str


DRAFTERS = {
    "moe-25-ufs": MoESetting(25, "ufs"),
    "moe-25-sd": MoESetting(25, "sd-card"),
    "moe-50-ufs": MoESetting(50, "ufs"),
    "moe-50-sd": MoESetting(50, "sd-card"),
}


def is_moe(drafter: str | None) -> bool:
    return drafter in DRAFTERS


def model_path() -> Path:
    from edge.moe.cli import default_model
    return Path(default_model())


def missing() -> str | None:
    """Why MoE rows cannot run here, or None."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (pip install '.[moe]')"
    if not model_path().exists():
        return f"{model_path()} is missing (make models-moe)"
    return None


def build(name: str):
    from edge.moe.drafter import MoEDrafter, MoEDrafterConfig
    s = DRAFTERS[name]
    return MoEDrafter(MoEDrafterConfig(model=model_path(), policy="dymoe", budget_pct=s.budget_pct,
                                       storage=s.storage))


def _rate(a: float, t_draft: float, rtt: float, target, pipelined: bool) -> tuple[float, float]:
    """(predicted speculative tokens/s at the planner's best block and window, cloud-only tokens/s)."""
    p = Planner(pipelined, t_draft, rtt, target.a_s, target.b_s, target.forward_s(1), prior_accept=a,
                lead=pipelined)
    plan = p.plan()
    return plan.spec_rate, plan.cloud_rate


def limiting_term(acceptance: float, compute_s: float, stall_s: float, rtt_s: float, target,
                  pipelined: bool = True) -> str | None:
    """None where speculation is predicted to pay with these figures; else which term keeps
    it from paying (see the module docstring)."""
    def rate(a, step):
        return _rate(a, step, rtt_s, target, pipelined)
    spec, cloud = rate(acceptance, compute_s + stall_s)
    if spec >= PAYS * cloud:
        return None
    fixes = {"stall": rate(acceptance, compute_s)[0], "compute": rate(acceptance, stall_s)[0],
             "acceptance": rate(max(acceptance, GOOD_ACCEPTANCE), compute_s + stall_s)[0]}
    term, best = max(fixes.items(), key=lambda kv: kv[1])
    if best >= PAYS * cloud:
        return term
    return "compute+stall" if rate(acceptance, 0.0)[0] >= PAYS * cloud else "acceptance"


def breakeven_acceptance(step_s: float, rtt_s: float, target, pipelined: bool = True) -> float | None:
    """The lowest acceptance at which a draft step of step_s is predicted to pay (None: none does)."""
    def pays(a):
        spec, cloud = _rate(a, step_s, rtt_s, target, pipelined)
        return spec >= PAYS * cloud
    if not pays(0.999):
        return None
    lo, hi = 0.0, 0.999
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pays(mid) else (mid, hi)
    return round(hi, 3)


def step_fields(steps: int, real_s: float, modelled_s: float, stall_s: float) -> dict:
    """A row's draft step, split: compute (this CPU's and the device's) and storage stall, per step."""
    if not steps:
        return {"draft_steps": 0}
    return {"draft_steps": steps,
            "draft_compute_real_s": round(real_s / steps, 5),
            "draft_compute_modelled_s": round(modelled_s / steps, 5),
            "draft_stall_s": round(stall_s / steps, 5)}


def device_source() -> str:
    return DEVICES[DEVICE].source


def judge(rows: list[dict]) -> None:
    """Fill the MoE rows' limited_by, breakeven_acceptance and planner_right (rows carry speedup)."""
    from sim.latency import TARGETS
    from sim.link.profiles import load_profiles
    links = load_profiles()
    for r in rows:
        if not is_moe(r["drafter"]):
            continue
        sync = next((x for x in rows if x["mode"] == "sync" and all(
            x[k] == r[k] for k in ("dataset", "profile", "target", "drafter"))), None)
        src = sync if sync is not None and sync.get("draft_steps") else r
        a, pipelined = src.get("acceptance_rate"), r["mode"] != "sync"
        target = TARGETS.get(r["target"].split(":", 1)[-1])
        r["limited_by"] = r["breakeven_acceptance"] = None
        if a is not None and src.get("draft_steps") and target is not None and r["profile"] in links:
            # the step as the device took it: its modelled compute, or this CPU's where that was slower
            compute = max(src["draft_compute_modelled_s"], src["draft_compute_real_s"])
            rtt = links[r["profile"]].rtt_ms / 1e3
            r["limited_by"] = limiting_term(a, compute, src["draft_stall_s"], rtt, target, pipelined)
            r["breakeven_acceptance"] = breakeven_acceptance(compute + src["draft_stall_s"], rtt, target, pipelined)
            spec, cloud = _rate(a, compute + src["draft_stall_s"], rtt, target, pipelined)
            r["predicted_speedup"] = round(spec / cloud, 3)
            if r["limited_by"] is None and (r.get("speedup") or 0) < 1 and sync is not None:
                # predicted to pay, measured not to: the model leaves out what each session's start
                # costs; what keeps the drafter from paying is then what stops always-speculating
                r["limited_by"] = sync.get("limited_by")
        r["planner_right"] = None
        if r["mode"] != "sync" and r.get("speedup") is not None:
            # The decision is judged, not the first contact's probe (a streamed row still paid one
            # drafter prefill to learn that speculation would not pay). Streaming is right unless
            # always speculating (sync) gained; speculating is right if it lost no more than 5 % to
            # cloud-only and missed no gain sync found.
            gain = sync is not None and (sync.get("speedup") or 0) > 1.05
            if not r.get("speculated"):
                r["planner_right"] = not gain
            else:
                missed = gain and r["speedup"] < 0.95 * sync["speedup"]
                r["planner_right"] = r["speedup"] >= 0.95 and not missed
