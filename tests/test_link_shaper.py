"""Pacing math of link-sim with a fake clock: exact, no sockets."""

import pytest

from sim.link.config import TRACE_PACKET
from sim.link.shaper import RateShaper, TraceShaper, chunk_bytes
from sim.link.trace import parse_trace


def drain(shaper, sizes, now=0.0, lateness=0.0):
    """A backlogged queue drained by a task that wakes `lateness` s after each departure."""
    departs = []
    for n in sizes:
        d = shaper.reserve(n, arrival=0.0, now=now)
        departs.append(d)
        now = max(now, d) + lateness
    return departs


def test_rate_paces_backlog_exactly():
    s = RateShaper(8.0)  # 1 MB/s
    departs = drain(s, [1000] * 1000)
    assert departs[-1] == pytest.approx(1.0)
    assert departs[0] == pytest.approx(0.001)


def test_late_drainer_loses_no_capacity():
    # a drainer waking 3 ms late each time would deliver ~25 % less if it paced from "now"
    s = RateShaper(8.0)
    departs = drain(s, [10_000] * 100, lateness=0.003)
    assert departs[-1] == pytest.approx(1.0)


def test_default_lag_recovery_covers_a_long_stall():
    s = RateShaper(8.0)
    s.reserve(1000, arrival=0.0, now=0.0)
    # descheduled for 200 ms with bytes waiting: the link loses nothing
    assert s.reserve(1000, arrival=0.0, now=0.201) == pytest.approx(0.002)


def test_lag_recovery_is_bounded():
    s = RateShaper(8.0, max_lag_s=0.05)
    s.reserve(1000, arrival=0.0, now=0.0)
    # event loop stalled for 2 s while bytes waited: only 50 ms of credit comes back
    d = s.reserve(100_000, arrival=0.0, now=2.0)
    assert d == pytest.approx(2.0 - 0.05 + 0.1)


def test_idle_link_earns_no_credit():
    s = RateShaper(8.0)
    s.reserve(1000, arrival=0.0, now=0.0)
    d = s.reserve(1000, arrival=5.0, now=5.0)
    assert d == pytest.approx(5.001)


def test_hold_until_blocks_departures():
    s = RateShaper(8.0)
    s.hold_until(3.0)
    assert s.reserve(1000, arrival=0.0, now=0.5) == pytest.approx(3.001)


@pytest.mark.parametrize("rate", [0.032, 0.064, 1.0, 200.0, 1000.0])
def test_chunks_are_about_5ms_and_bounded(rate):
    c = chunk_bytes(rate)
    assert 64 <= c <= 256 * 1024
    if 0.2 <= rate <= 400:
        assert c * 8 / (rate * 1e6) == pytest.approx(0.005, rel=0.01)


TRACE = parse_trace("0\n0\n5\n10\n", "t")  # period 10 ms, 4 opportunities per loop


def test_trace_backlog_uses_every_opportunity():
    s = TraceShaper(TRACE, origin=100.0)
    departs = drain(s, [TRACE_PACKET] * 8, now=100.0)
    assert [round((d - 100.0) * 1000, 6) for d in departs] == [0, 0, 5, 10, 10, 10, 15, 20]


def test_trace_capacity_over_many_loops():
    s = TraceShaper(TRACE, origin=0.0)
    total = 400 * 1000  # 4 opportunities per 10 ms = 600 kB/s
    departs = drain(s, [1000] * 400)
    assert departs[-1] == pytest.approx(total / (4 * TRACE_PACKET / 0.010), abs=0.0101)


def test_trace_opportunities_pass_while_idle():
    s = TraceShaper(TRACE, origin=0.0)
    # nothing queued until 7 ms: the opportunities at 0 and 5 ms are lost
    assert s.reserve(TRACE_PACKET, arrival=0.007, now=0.007) == pytest.approx(0.010)


def test_partial_packet_shares_an_opportunity():
    s = TraceShaper(TRACE, origin=0.0)
    assert s.reserve(700, arrival=0.0, now=0.0) == 0.0
    assert s.reserve(700, arrival=0.0, now=0.0) == 0.0  # 1400 bytes fit in the first packet
    assert s.reserve(700, arrival=0.0, now=0.0) == 0.0  # spills into the second one at 0 ms
    assert s.reserve(1500, arrival=0.0, now=0.0) == pytest.approx(0.005)


def test_trace_capacity_bytes_loops():
    assert TRACE.capacity_bytes(0, 10) == 3 * TRACE_PACKET  # 0, 0, 5 (10 belongs to [10, 20))
    assert TRACE.capacity_bytes(0, 1000) == 399 * TRACE_PACKET  # the one at 1000 ms is not before 1000
    assert TRACE.mean_mbit == pytest.approx(4 * 1500 * 8 / 0.010 / 1e6)
