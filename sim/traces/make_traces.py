"""Generate the small Mahimahi traces in this folder (deterministic; rerun to reproduce).

    python -m sim.traces.make_traces [OUT_DIR]

Mahimahi format: one line per 1500-byte delivery opportunity, the millisecond
at which it happens; the file loops with the period of its last line.

Model: the link's capacity follows a log-normal AR(1) process in 100 ms steps,
the usual first-order description of cellular throughput (variation on ~1 s
time scales, heavy upper tail, deep but short dips). Each trace is rescaled so
its mean equals the target exactly, which makes its capacity a documented
number the accuracy tests can hold the simulator to.

Parameters, per trace (mean Mbit/s, coefficient of variation, correlation time):
  lte-down / lte-up  9 / 3 Mbit/s, CV 0.6, 1 s. Means near Opensignal's 2023
      4G medians for download/upload share (≈ 3:1); CV and time scale in the
      range of the Verizon/AT&T LTE traces of Winstein et al., "Stochastic
      Forecasts Achieve High Throughput and Low Delay over Cellular Networks"
      (NSDI 2013), which vary between ~0 and ~20 Mbit/s within seconds.
  3g-down            1.5 Mbit/s, CV 0.5, 2 s: HSPA-era downlink medians
      (~1–2 Mbit/s, e.g. Opensignal's 3G figures 2014–2016).
Period 20 s each, to keep the files small (≈ 130 KB in all).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

PACKET_BITS = 1500 * 8
STEP_MS = 100

TRACES = {
    # name: (mean Mbit/s, coefficient of variation, correlation time s, seed)
    "lte-down": (9.0, 0.6, 1.0, 11),
    "lte-up": (3.0, 0.6, 1.0, 12),
    "3g-down": (1.5, 0.5, 2.0, 13),
}
PERIOD_S = 20


def rate_series(mean_mbit: float, cv: float, tau_s: float, seed: int, period_s: int) -> list[float]:
    """Capacity per 100 ms step, Mbit/s; sample mean exactly mean_mbit."""
    rng = random.Random(seed)
    sigma = math.sqrt(math.log(1 + cv * cv))  # log-normal σ giving this CV
    rho = math.exp(-STEP_MS / 1000 / tau_s)
    x = rng.gauss(0, sigma)
    vals = []
    for _ in range(period_s * 1000 // STEP_MS):
        vals.append(math.exp(x))
        x = rho * x + math.sqrt(1 - rho * rho) * rng.gauss(0, sigma)
    scale = mean_mbit / (sum(vals) / len(vals))
    return [v * scale for v in vals]


def opportunities(rates_mbit: list[float]) -> list[int]:
    """Millisecond timestamps of 1500-byte opportunities for a piecewise-constant rate."""
    out: list[int] = []
    credit = 0.0
    for ms in range(1, len(rates_mbit) * STEP_MS + 1):
        credit += rates_mbit[(ms - 1) // STEP_MS] * 1e6 / 1000  # bits this ms
        while credit >= PACKET_BITS:
            credit -= PACKET_BITS
            out.append(ms)
    period = len(rates_mbit) * STEP_MS
    if not out or out[-1] != period:
        out.append(period)  # the last line sets the loop period
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (mean, cv, tau, seed) in TRACES.items():
        times = opportunities(rate_series(mean, cv, tau, seed, PERIOD_S))
        (out_dir / f"{name}.mahi").write_text("".join(f"{t}\n" for t in times))
        cap = len(times) * PACKET_BITS / PERIOD_S / 1e6
        print(f"{name}.mahi: {len(times)} opportunities, {cap:.3f} Mbit/s over {PERIOD_S} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
