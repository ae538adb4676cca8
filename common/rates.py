"""How fast a session's tokens came, as a reader of its stream sees it: measured by the
benches (bench/loadgen.py) and simulated by the fleet model (sim/fleet.py) the same way."""
from __future__ import annotations

from typing import Sequence


def stream_rate(stamps: Sequence[float]) -> float | None:
    """A session's tokens/s once its stream has started, from one arrival time per token: the
    tokens after the first arrival over the time from it to the last (a verdict delivers
    several tokens at one instant). None when everything arrived at once."""
    later = sum(t > stamps[0] for t in stamps) if stamps else 0
    return later / (stamps[-1] - stamps[0]) if later else None
