"""Wire packing: exact round trips (property-style over random inputs), known byte layouts, and
ValueError — never another exception — on truncated or garbage input."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.packing import (
    decode_varint,
    encode_varint,
    pack_payload,
    pack_sparse,
    pack_tokens,
    pack_u8,
    pack_u16,
    prob_to_u16,
    token_width,
    unpack_payload,
    unpack_sparse,
    unpack_tokens,
    unpack_u8,
    unpack_u16,
)
from kernels.rejection import PPayload, encode_p, snap_p
from kernels.sparse import SparseDist, quantize_dist
from tests.test_kernels_sampling import random_probs


def assert_only_value_error(fn, data: bytes):
    """Garbage must come back as a valid object or a ValueError, nothing else."""
    try:
        fn(data)
    except ValueError:
        pass


# ---------------------------------------------------------------------------------------------
# Varints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (49151, b"\xff\xff\x02"),
        (2**64 - 1, b"\xff" * 9 + b"\x01"),
    ],
)
def test_varint_known_encodings(value, encoded):
    assert encode_varint(value) == encoded
    assert decode_varint(b"zz" + encoded + b"tail", 2) == (value, 2 + len(encoded))


def test_varint_round_trips_random_values():
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**63, size=200)] + [int(v) for v in rng.integers(0, 300, size=200)]
    blob = b"".join(encode_varint(v) for v in values)
    off, out = 0, []
    while off < len(blob):
        v, off = decode_varint(blob, off)
        out.append(v)
    assert out == values


@pytest.mark.parametrize(
    "data, offset",
    [
        (b"", 0),  # nothing there
        (b"\x80", 0),  # continuation bit with no next byte
        (b"\x01\xff\xff", 1),
        (b"\x80" * 10 + b"\x01", 0),  # longer than any 64-bit value needs
        (b"\xff" * 9 + b"\x02", 0),  # 10 bytes but over 64 bits
        (b"\x01", 5),  # offset past the end
    ],
)
def test_decode_varint_rejects_bad_input(data, offset):
    with pytest.raises(ValueError):
        decode_varint(data, offset)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_encode_varint_rejects_out_of_range(value):
    with pytest.raises(ValueError):
        encode_varint(value)


# ---------------------------------------------------------------------------------------------
# Fixed-width tokens and u16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_vocab, width",
    [(1, 2), (49152, 2), (65536, 2), (65537, 3), (151936, 3), (2**24, 3), (2**24 + 1, 4), (2**32, 4)],
)
def test_token_width(n_vocab, width):
    assert token_width(n_vocab) == width


@pytest.mark.parametrize("n_vocab", [0, -3, 2**32 + 1])
def test_token_width_rejects_impossible_vocab(n_vocab):
    with pytest.raises(ValueError):
        token_width(n_vocab)


def test_pack_tokens_is_little_endian_fixed_width():
    assert pack_tokens([1, 258], 2) == b"\x01\x00\x02\x01"
    assert pack_tokens([0x010203], 3) == b"\x03\x02\x01"
    assert pack_tokens([0xFFFFFFFF], 4) == b"\xff\xff\xff\xff"
    assert pack_tokens([], 2) == b""


@pytest.mark.parametrize("width", [2, 3, 4])
def test_pack_tokens_round_trips_random_ids(width):
    rng = np.random.default_rng(width)
    for _ in range(50):
        n = int(rng.integers(0, 20))
        ids = [int(v) for v in rng.integers(0, 2 ** (8 * width), size=n)]
        data = pack_tokens(ids, width)
        assert len(data) == n * width
        assert unpack_tokens(data, width) == ids


@pytest.mark.parametrize("ids, width", [([65536], 2), ([-1], 2), ([2**24], 3), ([2**32], 4)])
def test_pack_tokens_rejects_ids_that_do_not_fit(ids, width):
    with pytest.raises(ValueError):
        pack_tokens(ids, width)


@pytest.mark.parametrize("data, width", [(b"\x01", 2), (b"\x01\x02\x03\x04", 3), (b"\x00" * 5, 4)])
def test_unpack_tokens_rejects_ragged_length(data, width):
    with pytest.raises(ValueError, match="multiple"):
        unpack_tokens(data, width)


def test_token_packing_rejects_unsupported_width():
    with pytest.raises(ValueError):
        pack_tokens([1], 5)
    with pytest.raises(ValueError):
        unpack_tokens(b"", 0)


def test_u16_round_trip_and_errors():
    values = [0, 1, 255, 256, 65535]
    assert unpack_u16(pack_u16(values)) == values
    assert pack_u16([0x1234]) == b"\x34\x12"
    with pytest.raises(ValueError):
        pack_u16([65536])
    with pytest.raises(ValueError):
        unpack_u16(b"\x00\x01\x02")


def test_u8_round_trip_and_errors():
    assert unpack_u8(pack_u8([0, 1, 255])) == [0, 1, 255]
    with pytest.raises(ValueError):
        pack_u8([256])


def test_prob_to_u16_is_the_exact_weight():
    q = SparseDist([3, 9], [1000, 64535], 65535)
    assert prob_to_u16(q, 9) == 64535 and prob_to_u16(q, 3) == 1000 and prob_to_u16(q, 4) == 0
    assert prob_to_u16(q, 9) / 65535 == q.prob(9)  # the cloud's q(x) equals the edge's
    with pytest.raises(ValueError):
        prob_to_u16(SparseDist([1], [255], 255), 1)


# ---------------------------------------------------------------------------------------------
# Sparse distributions
# ---------------------------------------------------------------------------------------------


def _random_sparse(rng: np.random.Generator) -> tuple[SparseDist, int, int]:
    bits = int(rng.choice([8, 16, 12, 1]))
    width = int(rng.choice([2, 3]))
    v = int(rng.integers(2, 3000))
    p = random_probs(rng, v, skew=float(rng.choice([0.05, 1.0])))
    top_k = None if rng.random() < 0.5 else int(rng.integers(1, 64))
    return quantize_dist(p, bits=bits, top_k=top_k), width, bits


def test_pack_sparse_round_trips_random_dists():
    rng = np.random.default_rng(1)
    for _ in range(200):
        d, width, bits = _random_sparse(rng)
        data = pack_sparse(d, width)
        assert unpack_sparse(data, width, bits) == d


def test_pack_sparse_is_tight_for_a_typical_draft_q():
    # Codec Q's q̃: 8-bit weights, top-8, ids near each other: count + ~2 bytes/id + 1 byte/weight.
    d = SparseDist([12000, 12001, 12005, 12040, 20000, 20001, 30000, 49151],
                   [100, 60, 40, 20, 15, 10, 6, 4], 255)
    data = pack_sparse(d, 2)
    assert len(data) <= 1 + 3 + 7 * 2 + 8
    assert unpack_sparse(data, 2, 8) == d
    assert pack_sparse(SparseDist([5], [255], 255), 2) == b"\x01\x05\xff"


def test_pack_sparse_rejects_what_cannot_be_encoded():
    ok = SparseDist([1, 2], [3, 4], 7)  # 7 == 2**3 - 1: encodable
    assert unpack_sparse(pack_sparse(ok, 2), 2, 3) == ok
    with pytest.raises(ValueError):
        pack_sparse(SparseDist([1, 2], [3, 3], 6), 2)  # total not 2**bits - 1
    with pytest.raises(ValueError):
        pack_sparse(SparseDist([70000], [255], 255), 2)  # id too wide


def test_unpack_sparse_rejects_every_truncation():
    rng = np.random.default_rng(2)
    for _ in range(20):
        d, width, bits = _random_sparse(rng)
        data = pack_sparse(d, width)
        for cut in range(len(data)):
            with pytest.raises(ValueError):
                unpack_sparse(data[:cut], width, bits)
        with pytest.raises(ValueError):
            unpack_sparse(data + b"\x00", width, bits)


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\x00", "no entries"),
        (b"\x02\x01\x00\x80\x7e", "weights sum to 254, not 255"),
        (b"\x02\x01\x00\xff\x00", "a zero weight"),
        (b"\xff\xff\xff\xff\x0f\x01", "a count far beyond the data"),
        (b"\x01\xff\xff\xff\x01\xff", "an id beyond 2 bytes"),
    ],
)
def test_unpack_sparse_rejects_invalid(data, why):
    with pytest.raises(ValueError):
        unpack_sparse(data, 2, 8)


def test_unpack_sparse_garbage_only_raises_value_error():
    rng = np.random.default_rng(3)
    for _ in range(500):
        data = rng.integers(0, 256, size=int(rng.integers(0, 24)), dtype=np.uint8).tobytes()
        assert_only_value_error(lambda b: unpack_sparse(b, 2, 8), data)
        assert_only_value_error(lambda b: unpack_sparse(b, 3, 16), data)


# ---------------------------------------------------------------------------------------------
# Codec-P payloads
# ---------------------------------------------------------------------------------------------


def _random_payload(rng: np.random.Generator) -> tuple[PPayload, int]:
    v = int(rng.integers(2, 2000))
    width = token_width(v)
    p = snap_p(random_probs(rng, v, zeros=int(rng.integers(0, v // 2 + 1)), skew=0.3))
    return encode_p(p, int(rng.integers(1, 70)), int(rng.integers(0, 6)), rng), width


def test_pack_payload_round_trips_random_payloads():
    rng = np.random.default_rng(4)
    for _ in range(200):
        payload, width = _random_payload(rng)
        back = unpack_payload(pack_payload(payload, width), width)
        assert back == payload
        assert back.tail_mass == payload.tail_mass  # the float32 values survive bit for bit


def test_pack_payload_size():
    payload = PPayload(np.array([3, 4, 300]), np.array([0.5, 0.25, 0.125], np.float32),
                       np.array([70000, 5]), np.array([0.01, 0.02], np.float32))
    data = pack_payload(payload, 3)
    # n_top, ids 3 + 0 + 2 bytes (gap 295), 3 float32; n_tail, 2 x 3-byte ids, 2 float32.
    assert len(data) == 1 + 4 + 12 + 1 + 6 + 8
    assert unpack_payload(data, 3) == payload


def test_unpack_payload_rejects_every_truncation():
    rng = np.random.default_rng(5)
    for _ in range(10):
        payload, width = _random_payload(rng)
        data = pack_payload(payload, width)
        for cut in range(len(data)):
            with pytest.raises(ValueError):
                unpack_payload(data[:cut], width)
        with pytest.raises(ValueError):
            unpack_payload(data + b"\x00", width)


@pytest.mark.parametrize(
    "top_probs, tail_probs",
    [([0.0], [0.5]), ([np.nan], [0.5]), ([0.5], [-0.5]), ([0.5], [np.inf]), ([1.5], [0.5])],
)
def test_payload_rejects_unusable_probabilities(top_probs, tail_probs):
    bad = PPayload(np.array([1]), np.array(top_probs, np.float32), np.array([2]), np.array(tail_probs, np.float32))
    with pytest.raises(ValueError):
        pack_payload(bad, 2)
    # The same bytes forged by hand must not get past the unpacker either.
    forged = b"\x01\x01" + bad.top_probs.astype("<f4").tobytes() + b"\x01\x02\x00" + bad.tail_probs.astype("<f4").tobytes()
    with pytest.raises(ValueError):
        unpack_payload(forged, 2)


def test_pack_payload_rejects_unsorted_top_ids():
    bad = PPayload(np.array([5, 1]), np.array([0.5, 0.5], np.float32), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError):
        pack_payload(bad, 2)


def test_unpack_payload_garbage_only_raises_value_error():
    rng = np.random.default_rng(6)
    for _ in range(500):
        data = rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8).tobytes()
        assert_only_value_error(lambda b: unpack_payload(b, 2), data)
