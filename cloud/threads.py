"""How many llama.cpp threads the verifier uses, chosen from the passes it serves.

A start-up probe measures an idle machine. Once an edge, link-sim or anything else
shares the cores, the probe's answer can be badly wrong: on 2 cores the probe picked
2 threads (48 against 75 ms for an 8-token pass), and under one edge and link-sim
the same single-token passes then took 73 ms against the probe's 10 ms, because
a thread that waits at llama.cpp's barrier for a preempted peer stalls the pass.

So the choice is made again while serving, from the pass times the scheduler
already measures. Every `explore_every` passes the tuner tries another thread
count for `trial` passes and keeps it only if those passes ran faster, by
`margin`, than the current count's recent passes *of the same size* (pass time
grows with the tokens in it, so sizes are compared bucket by bucket). The trial
costs at most `trial` slower passes per `explore_every`; a count that keeps losing
is tried less and less often (the wait doubles, up to `max_wait`). The first trial of
each other count comes early (`first_trial` passes in), so that a short stream does not
end on the probe's count.

Pure bookkeeping: the caller measures and calls `Target.set_threads`.
"""
from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass, field


def candidates(cpus: int) -> tuple[int, ...]:
    """1, 2, 4 ... up to the machine's cores, and the core count itself."""
    out = {1, max(1, cpus)}
    n = 2
    while n < cpus:
        out.add(n)
        n *= 2
    return tuple(sorted(out))


def size_bucket(n_tokens: int) -> int:
    """Passes of 1, 2-3, 4-7, 8-15 ... tokens are compared with each other."""
    return max(0, int(math.log2(max(1, n_tokens))))


@dataclass
class ThreadTuner:
    candidates: tuple[int, ...]
    current: int
    explore_every: int = 128         # passes between trials of another count
    trial: int = 12                  # passes a trial runs
    margin: float = 0.05             # a trial must be this much faster to win
    history: int = 24                # recent passes kept per (threads, size)
    max_wait: int = 4096
    # The first trial of each other count comes this early: the start-up probe measured an idle
    # machine, and a short stream (64 tokens, 64 passes) would otherwise end before any trial
    # (measured: 2 threads from the probe ran a stream's passes at 23 ms, 1 thread at 15).
    first_trial: int = 16
    _recent: dict = field(default_factory=dict, repr=False)
    _since: int = 0
    _wait: dict = field(default_factory=dict, repr=False)
    _trying: int | None = None
    _ratios: list = field(default_factory=list, repr=False)
    _next: int = 0                   # round-robin over the other candidates
    switches: int = 0

    def __post_init__(self):
        if self.current not in self.candidates:
            raise ValueError(f"threads {self.current} is not among the candidates {self.candidates}")
        self._recent = collections.defaultdict(lambda: collections.deque(maxlen=self.history))
        self._wait = {c: min(self.first_trial, self.explore_every) for c in self.candidates if c != self.current}

    @property
    def active(self) -> int:
        """The thread count the next pass should run with."""
        return self._trying if self._trying is not None else self.current

    def observe(self, n_tokens: int, seconds: float) -> int:
        """Record a pass run with `active` threads; return the count for the next one."""
        b = size_bucket(n_tokens)
        if self._trying is None:
            self._recent[(self.current, b)].append(seconds)
            self._since += 1
            if self._since >= self._wait.get(self._candidate(), self.explore_every) and len(self.candidates) > 1:
                self._start_trial()
            return self.active
        base = self._recent.get((self.current, b))
        if base and len(base) >= 3:
            self._ratios.append(seconds / statistics.median(base))
        self._recent[(self._trying, b)].append(seconds)
        if len(self._ratios) >= self.trial:
            self._finish_trial()
        elif self._since > 4 * self.trial + self.explore_every:
            self._trying, self._since = None, 0  # traffic of sizes the current count has no record of
            return self.active
        self._since += 1
        return self.active

    def _candidate(self) -> int:
        others = [c for c in self.candidates if c != self.current]
        return others[self._next % len(others)] if others else self.current

    def _start_trial(self) -> None:
        self._trying, self._ratios, self._since = self._candidate(), [], 0

    def _finish_trial(self) -> None:
        tried, ratio = self._trying, statistics.median(self._ratios)
        self._trying, self._since = None, 0
        if ratio < 1.0 - self.margin:
            self._wait.pop(self.current, None)
            self.current = tried
            self.switches += 1
            self._wait.pop(tried, None)
        else:
            self._wait[tried] = min(self.max_wait, max(self.explore_every, 2 * self._wait.get(tried, self.explore_every)))
            self._next += 1
