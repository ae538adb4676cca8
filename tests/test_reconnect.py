"""Backoff, the background probe, and the compressed prefix: pure pieces of the fault path."""
from __future__ import annotations

import random
import threading

import pytest
import zstandard

from edge.reconnect import Backoff, Reconnector
from edge.stats import GenStats
from kernels import packing
from proto.prompt_zstd import compress_prompt, decompress_prompt, plain_size, prompt_fields


def test_backoff_doubles_to_the_cap_with_jitter_below_each_step():
    b = Backoff(base_s=0.5, max_s=4.0, jitter=0.5, rng=random.Random(1))
    steps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for step in steps:
        d = b.next_delay()
        assert step * 0.5 <= d <= step
    b.reset()
    assert b.next_delay() <= 0.5
    spread = {round(Backoff(rng=random.Random(i)).next_delay(), 6) for i in range(20)}
    assert len(spread) > 10, "edges that lost the same verifier must not come back in step"


def test_backoff_honours_the_servers_retry_after_and_never_comes_earlier():
    b = Backoff(base_s=0.1, max_s=1.0, jitter=0.5, rng=random.Random(2))
    for _ in range(10):
        assert 3.0 <= b.next_delay(at_least_s=3.0) <= 4.5
    with pytest.raises(ValueError):
        Backoff(base_s=0)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_reconnector_probes_only_when_due_and_in_the_background():
    clock = FakeClock()
    answers = [False, True]
    gate = threading.Event()
    calls = []

    def probe():
        calls.append(clock.t)
        gate.wait(10)
        return answers.pop(0)

    r = Reconnector(probe, Backoff(base_s=1.0, max_s=8.0, jitter=0.0), clock)
    r.lost()
    assert not r.ready() and calls == [], "the first probe waits one backoff step"
    clock.t = 1.0
    assert not r.ready()                          # starts the probe, does not wait for it
    assert not r.ready()                          # one probe at a time
    gate.set()
    _wait(lambda: r.probes == 1)
    assert calls == [1.0] and not r.ready()       # failed: next due 2 s later
    clock.t = 2.5
    assert not r.ready() and len(calls) == 1
    clock.t = 3.0
    r.ready()
    _wait(lambda: r.probes == 2)
    assert r.ready() and calls == [1.0, 3.0]


def _wait(cond, timeout=10.0):
    import time
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end
        time.sleep(0.005)


def test_segments_merge_runs_and_appear_in_the_json():
    s = GenStats(mode="picospec")
    for mode, n in [("picospec", 3), ("picospec", 2), ("edge-only", 1), ("edge-only", 4), ("picospec", 7),
                    ("cloud-only", 0)]:
        s.note_segment(mode, n)
    assert s.segments == [{"mode": "picospec", "tokens": 5}, {"mode": "edge-only", "tokens": 5},
                          {"mode": "picospec", "tokens": 7}]
    assert s.as_dict()["segments"] == s.segments


# -- the compressed prefix --------------------------------------------------------------------

def test_prefix_round_trip_and_only_when_smaller():
    tokens = [1, 2, 3, 17, 28, 49151, 300, 300, 300] * 40
    data = compress_prompt(tokens, 2)
    assert decompress_prompt(data, 2, 10_000) == tokens
    f = prompt_fields(tokens, 2)
    assert "prompt_zstd" in f and len(f["prompt_zstd"]) < plain_size(tokens)
    assert prompt_fields(tokens, 2, allow_zstd=False) == {"prompt": tokens}
    rnd = random.Random(0)
    short = [rnd.randrange(128) for _ in range(12)]
    assert prompt_fields(short, 2) == {"prompt": short}, "12 one-byte varints beat any zstd frame: sent plain"


def test_decompression_is_bounded_and_strict():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (64 << 20))   # 64 MB of zeros
    assert len(bomb) < 4096
    with pytest.raises(ValueError, match="expands past 2048 tokens"):
        decompress_prompt(bomb, 2, 2048)
    good = compress_prompt(list(range(100)), 2)
    with pytest.raises(ValueError, match="truncated"):
        decompress_prompt(good[:-4], 2, 2048)
    with pytest.raises(ValueError, match="not valid zstd"):
        decompress_prompt(b"definitely not zstd", 2, 2048)
    with pytest.raises(ValueError, match="after its zstd frame"):
        decompress_prompt(good + good, 2, 2048)
    odd = zstandard.ZstdCompressor().compress(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="whole number"):
        decompress_prompt(odd, 2, 2048)
    with pytest.raises(ValueError):
        decompress_prompt(b"", 2, 2048)
    assert packing.unpack_tokens(b"", 2) == []
