"""What one completion did: counters the CLI prints and the benchmark reads."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenStats:
    mode: str
    emulated: bool = False
    drafted: int = 0              # draft tokens sent up
    verified: int = 0             # of those, tested by the verifier (up to and including a rejection)
    accepted: int = 0
    leads: int = 0                # tokens the verifier decoded alone while no block was queued
    lead_checks: int = 0          # leads at a position the edge had drafted
    lead_hits: int = 0            # ... that equalled the draft (its branch lives on)
    blocks: int = 0
    rejections: int = 0
    tail_requests: int = 0        # codec P: times the edge ran out of tail draws
    tokens: int = 0
    ttft_s: float = 0.0
    wall_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    fallback: str | None = None   # why the edge left speculation, if it did
    edge_only_tokens: int = 0     # generated without the cloud (its model, not the target's)
    gamma: int = 0
    window: int = 0
    codec: str = ""
    drafter: dict = field(default_factory=dict)
    tree: dict = field(default_factory=dict)   # draft trees: passes, siblings sent/taken, shapes (edge/picospec.py)
    # Which model decided which tokens, in order: [{"mode": "picospec", "tokens": 40},
    # {"mode": "edge-only", "tokens": 16}, ...]; only edge-only parts are not the target's.
    segments: list = field(default_factory=list)
    reconnects: int = 0           # sessions re-opened after the verifier was lost
    resume_bytes: int = 0         # prefix bytes those re-opens sent (zstd where it was smaller) ...
    resume_bytes_plain: int = 0   # ... and what the plain token ids would have taken
    busy_retries: int = 0         # times the verifier was full (RESOURCE_EXHAUSTED) and the edge waited
    # emulated draft steps: the drafter's real compute against the device's modelled time; where
    # real exceeds modelled, the figures measure this machine, not the device (docs/emulation.md)
    draft_steps: int = 0
    draft_real_s: float = 0.0
    draft_modelled_s: float = 0.0
    draft_stall_s: float = 0.0    # ... and the storage waits inside them (the MoE drafter's expert reads)

    def note_draft_step(self, hold) -> None:
        """Count one draft step held by an emulated device (sim.latency.Hold); others are not modelled."""
        if hold.profile is not None:
            self.draft_steps += 1
            self.draft_real_s += hold.real_s
            self.draft_modelled_s += hold.modelled_s
            self.draft_stall_s += hold.stall_s

    @property
    def draft_real_over_modelled(self) -> float | None:
        return self.draft_real_s / self.draft_modelled_s if self.draft_modelled_s else None

    def note_segment(self, mode: str, n: int) -> None:
        if n <= 0:
            return
        if self.segments and self.segments[-1]["mode"] == mode:
            self.segments[-1]["tokens"] += n
        else:
            self.segments.append({"mode": mode, "tokens": n})

    @property
    def acceptance_rate(self) -> float:
        """Per-position acceptance: accepted / tested. Drafts after a rejection
        (or in blocks dropped as stale) are never tested, so accepted/drafted
        would shrink with the block length instead of measuring the drafter."""
        return self.accepted / self.verified if self.verified else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = {"drafted": self.drafted, "verified": self.verified, "accepted": self.accepted, "leads": self.leads, "lead_hits": self.lead_hits, "lead_checks": self.lead_checks,
             "acceptance_rate": round(self.acceptance_rate, 4),
             "tokens_per_s": round(self.tokens_per_s, 3), "ttft_s": round(self.ttft_s, 4),
             "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
             "blocks": self.blocks, "rejections": self.rejections, "tail_requests": self.tail_requests,
             "gamma": self.gamma, "window": self.window, "codec": self.codec,
             "emulated": self.emulated, "fallback": self.fallback, "edge_only_tokens": self.edge_only_tokens,
             "wall_s": round(self.wall_s, 4), "segments": [dict(x) for x in self.segments],
             "reconnects": self.reconnects, "resume_bytes": self.resume_bytes,
             "resume_bytes_plain": self.resume_bytes_plain, "busy_retries": self.busy_retries}
        if self.draft_steps:
            d.update(draft_steps=self.draft_steps, draft_real_s=round(self.draft_real_s, 4),
                     draft_modelled_s=round(self.draft_modelled_s, 4), draft_stall_s=round(self.draft_stall_s, 4),
                     draft_real_over_modelled=round(self.draft_real_over_modelled, 3))
        if self.drafter:
            d["drafter_stats"] = self.drafter
        return d
