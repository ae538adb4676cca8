"""Token ids -> client text: multi-byte characters never split, stop strings never sent."""
import pytest

from edge.serve.text import TextStream, held_back

# A toy vocabulary of byte pieces: 'é' is split across tokens 3 and 4, the
# emoji 😀 (4 bytes) across 5, 6 and 7.
PIECES = {0: b"Hel", 1: b"lo", 2: b" w", 3: b"\xc3", 4: b"\xa9", 5: b"\xf0\x9f", 6: b"\x98", 7: b"\x80", 8: b" ST",
          9: b"OP", 10: b" end", 11: b"!", 99: b""}
EOS = 99


def detok(ids):
    return b"".join(PIECES[i] for i in ids)


def stream_all(ts: TextStream, ids, step=1) -> list[str]:
    out = []
    for i in range(0, len(ids), step):
        out.append(ts.push(ids[i:i + step]))
        if ts.stopped:
            break
    out.append(ts.finish())
    return out


def test_multibyte_characters_wait_for_their_last_byte():
    ts = TextStream(detok)
    out = stream_all(ts, [0, 1, 2, 3, 4, 5, 6, 7])
    assert "".join(out) == "Hello wé😀"
    assert all("\ufffd" not in piece for piece in out)
    assert out[3] == "" and out[4] == "é"           # the first byte of é alone shows nothing
    assert out[5] == out[6] == "" and out[7] == "😀"


def test_a_stop_string_across_tokens_is_held_back_and_never_sent():
    ts = TextStream(detok, stops=[" STOP"])
    out = stream_all(ts, [0, 1, 8, 9, 10])
    assert "".join(out) == "Hello"
    assert out[2] == ""                               # " ST" could start " STOP": held back
    assert ts.finish_reason == "stop"
    assert ts.tokens == [0, 1, 8, 9]                 # tokens after the stop do not count


def test_held_back_text_that_is_not_a_stop_is_released():
    ts = TextStream(detok, stops=[" STX"])
    out = stream_all(ts, [0, 8, 9])
    assert out[1] == "" and out[2] == " STOP"
    assert ts.finish_reason is None


def test_length_end_releases_what_was_held_back():
    ts = TextStream(detok, stops=[" STOP"])
    out = stream_all(ts, [0, 1, 8])
    assert out[-1] == " ST" and "".join(out) == "Hello ST"
    assert ts.finish_reason is None


def test_earliest_of_several_stops_wins_and_batches_behave_like_single_tokens():
    for step in (1, 3, 8):
        ts = TextStream(detok, stops=["end", "lo w"])
        assert "".join(stream_all(ts, [0, 1, 2, 10], step)) == "Hel"
        assert ts.finish_reason == "stop" and ts.tokens == [0, 1, 2]


def test_end_of_sequence_stops_and_is_counted():
    ts = TextStream(detok, stops=["zzz"], eos=EOS)
    assert "".join(stream_all(ts, [0, 1, EOS, 2])) == "Hello"
    assert ts.finish_reason == "stop" and ts.tokens == [0, 1, EOS]


@pytest.mark.parametrize("text, stops, n", [
    ("abc", ["cd"], 1), ("abc", ["bcd"], 2), ("abc", ["xyz"], 0), ("abc", ["abc"], 0), ("", ["a"], 0),
    ("aab", ["abx", "bx"], 2),
])
def test_held_back(text, stops, n):
    assert held_back(text, stops) == n


def test_segments_are_cut_to_the_text_the_client_got():
    from types import SimpleNamespace
    from edge.serve.engine import segments_of
    stats = SimpleNamespace(segments=[{"mode": "picospec", "tokens": 5}, {"mode": "edge-only", "tokens": 4}],
                            edge_only_tokens=4, fallback="edge-only")
    assert segments_of(stats, 7, "picospec") == [{"mode": "picospec", "tokens": 5}, {"mode": "edge-only", "tokens": 2}]
    assert segments_of(stats, 3, "picospec") == [{"mode": "picospec", "tokens": 3}]
    # before the agent records segments: a summary from its counters
    old = SimpleNamespace(edge_only_tokens=2, fallback="edge-only")
    assert segments_of(old, 6, "picospec") == [{"mode": "picospec", "tokens": 4}, {"mode": "edge-only", "tokens": 2}]
