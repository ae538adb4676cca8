"""Predicted tokens/s of speculative decoding for a block length g and window W.

The edge's planner (edge/planner.py) chooses g and W with it from what it
measures; the fleet model (sim/fleet.py) chooses them the same way from the
benches' figures. For per-position acceptance a, draft time per token t_d,
round trip rtt and verify time t_v(g):

    cycle = g*t_d + rtt + t_v
    W = 1 (stop-and-wait)   rate = (E_bonus(g) + extra) / cycle
    W > 1 (pipelined)       rate = (E(g) + extra + led) / (c + (1 - a^g) * (cycle - c)),
                            c = max(g*t_d, t_v, cycle / W)

E(g): expected tokens kept per block (a rejection still yields the correction;
E_bonus also the bonus token after a full accept). c is the steady-state time
between verdicts (the edge drafting a block, the verifier verifying one, or the
window running dry); the second term is the refill after a rejection. `extra`:
tokens a block yields beyond its chain (draft-tree siblings). With a leading
verifier (`lead_token_s`: its time per token) the refill also yields the tokens
it decodes meanwhile, from a round trip on where it can only lead after the
edge's correction arrives (`lead_after_rtt`).
"""
from __future__ import annotations

import math

A_MAX = 0.999          # a = 1 would make the pipelined refill and E(g)'s closed form degenerate


def expected_tokens(a: float, g: int, bonus: bool) -> float:
    """Tokens a block of g drafts yields: accepted + correction, + the bonus after a full accept
    when `bonus` (a block nothing follows). With bonus: (1 - a^(g+1)) / (1 - a)."""
    if a >= 1.0:
        return g + 1.0 if bonus else float(g)
    full = (1 - a ** (g + 1)) / (1 - a)
    return full if bonus else full - a ** g


def rate(a: float, g: int, w: int, t_draft: float, rtt: float, t_verify: float, extra: float = 0.0,
         lead_token_s: float | None = None, lead_after_rtt: bool = False) -> float:
    """Predicted tokens/s (see the module docstring); `a` is clipped to [0, A_MAX]."""
    a = min(max(a, 0.0), A_MAX)
    cycle = g * t_draft + rtt + t_verify
    if w == 1:
        return (expected_tokens(a, g, bonus=True) + extra) / cycle
    c = max(g * t_draft, t_verify, cycle / w)
    refill = (1 - a ** g) * (cycle - c)
    led = 0.0
    if lead_token_s:
        led = (1 - a ** g) * max(0.0, cycle - c - (rtt if lead_after_rtt else 0.0)) / lead_token_s
    return (expected_tokens(a, g, bonus=False) + extra + led) / (c + refill)


def windows(g: int, t_draft: float, rtt: float, t_verify: float, max_window: int) -> list[int]:
    """The windows worth pricing for block length g: stop-and-wait, and the window that keeps
    the pipe full (the verifier takes every queued block in one pass, so the edge must keep
    drafting for a whole cycle ahead)."""
    full = math.ceil((g * t_draft + rtt + t_verify) / max(g * t_draft, 1e-6))
    return sorted({1, max(2, min(max_window, full))})
