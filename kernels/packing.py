"""Tight byte packing for what crosses the link: drafts are tens of bytes, so every byte counts.

Layouts (all integers little-endian):

- tokens:   fixed `width` bytes per id (`token_width(n_vocab)`).
- sparse q: varint count, then ids as varints of the gaps (first id, then id[i] - id[i-1] - 1),
            then one weight per id in ceil(bits/8) bytes; total is implied: 2**bits - 1.
- payload:  varint n_top, top ids as gap varints, n_top float32 probs;
            varint n_tail, tail ids at fixed width (draw order, may repeat), n_tail float32 probs.

Every unpacker validates what it reads and raises ValueError naming what is wrong, so the
server can answer INVALID_ARGUMENT instead of sampling from garbage.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kernels.rejection import PPayload
from kernels.sparse import SparseDist

_MAX_VARINT_BYTES = 10  # enough for any 64-bit value


# ---------------------------------------------------------------------------------------------
# Varints (unsigned LEB128)
# ---------------------------------------------------------------------------------------------


def encode_varint(n: int) -> bytes:
    n = int(n)
    if n < 0:
        raise ValueError(f"varints are unsigned, got {n}")
    if n >= 1 << 64:
        raise ValueError(f"varint value {n} does not fit in 64 bits")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_varint(data: bytes, offset: int) -> tuple[int, int]:
    """(value, offset just past it)."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        pos = offset + i
        if pos >= len(data):
            raise ValueError(f"truncated varint at byte {offset}")
        b = data[pos]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if value >= 1 << 64:
                raise ValueError(f"varint at byte {offset} overflows 64 bits")
            return value, pos + 1
    raise ValueError(f"varint at byte {offset} longer than {_MAX_VARINT_BYTES} bytes")


# ---------------------------------------------------------------------------------------------
# Fixed-width integers
# ---------------------------------------------------------------------------------------------


def token_width(n_vocab: int) -> int:
    """Bytes per token id."""
    if n_vocab < 1:
        raise ValueError(f"n_vocab must be >= 1, got {n_vocab}")
    if n_vocab <= 1 << 16:
        return 2
    if n_vocab <= 1 << 24:
        return 3
    if n_vocab <= 1 << 32:
        return 4
    raise ValueError(f"n_vocab {n_vocab} does not fit 4-byte token ids")


def _check_width(width: int) -> None:
    if width not in (1, 2, 3, 4):
        raise ValueError(f"token width must be 1..4 bytes, got {width}")


def _pack_uint(values: Sequence[int], width: int, what: str) -> bytes:
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= 1 << (8 * width)):
        raise ValueError(f"{what} out of range for {width}-byte fields")
    # Little-endian 8-byte words, keep the low `width` bytes of each.
    return v.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :width].tobytes()


def _unpack_uint(data: bytes, width: int, what: str) -> np.ndarray:
    if len(data) % width:
        raise ValueError(f"{what}: {len(data)} bytes is not a multiple of {width}")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    words = np.zeros((raw.shape[0], 8), dtype=np.uint8)
    words[:, :width] = raw
    return words.view("<u8").reshape(-1).astype(np.int64)


def pack_tokens(ids: Sequence[int], width: int) -> bytes:
    _check_width(width)
    return _pack_uint(ids, width, "token id")


def unpack_tokens(data: bytes, width: int) -> list[int]:
    _check_width(width)
    return _unpack_uint(data, width, "tokens").tolist()


def pack_u16(values: Sequence[int]) -> bytes:
    return _pack_uint(values, 2, "u16 value")


def unpack_u16(data: bytes) -> list[int]:
    return _unpack_uint(data, 2, "u16 values").tolist()


def pack_u8(values: Sequence[int]) -> bytes:
    return _pack_uint(values, 1, "u8 value")


def unpack_u8(data: bytes) -> list[int]:
    return _unpack_uint(data, 1, "u8 values").tolist()


def prob_to_u16(q: SparseDist, token: int) -> int:
    """q(token) as the exact 16-bit weight the cloud needs for its accept test."""
    if q.total != 0xFFFF:
        raise ValueError(f"prob_to_u16 needs a 16-bit SparseDist (total 65535), got {q.total}")
    return q.weight(token)


# ---------------------------------------------------------------------------------------------
# Sorted id sets as gap varints
# ---------------------------------------------------------------------------------------------


def _encode_sorted_ids(ids: np.ndarray) -> bytes:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids[0] < 0 or np.any(np.diff(ids) <= 0)):
        raise ValueError("ids must be non-negative, distinct and ascending to delta-encode")
    gaps = np.diff(ids, prepend=-1) - 1
    return b"".join(encode_varint(int(g)) for g in gaps)


def _decode_sorted_ids(data: bytes, offset: int, count: int, width: int) -> tuple[np.ndarray, int]:
    ids = np.empty(count, dtype=np.int64)
    prev = -1
    limit = 1 << (8 * width)
    for i in range(count):
        gap, offset = decode_varint(data, offset)
        prev = prev + 1 + gap
        if prev >= limit:
            raise ValueError(f"token id {prev} does not fit {width}-byte ids")
        ids[i] = prev
    return ids, offset


def _read_count(data: bytes, offset: int, min_bytes_each: int, what: str) -> tuple[int, int]:
    count, offset = decode_varint(data, offset)
    # Each entry takes at least min_bytes_each bytes: refuse counts the data cannot hold before
    # allocating anything for them.
    if count * min_bytes_each > len(data) - offset:
        raise ValueError(f"{what} count {count} exceeds the {len(data) - offset} bytes left")
    return count, offset


def _take(data: bytes, offset: int, n: int, what: str) -> tuple[bytes, int]:
    if offset + n > len(data):
        raise ValueError(f"truncated {what}: need {n} bytes at {offset}, have {len(data) - offset}")
    return data[offset : offset + n], offset + n


# ---------------------------------------------------------------------------------------------
# Sparse distributions
# ---------------------------------------------------------------------------------------------


def _bits_of_total(total: int) -> int:
    bits = int(total).bit_length()
    if total != (1 << bits) - 1:
        raise ValueError(f"SparseDist total {total} is not 2**bits - 1")
    return bits


def pack_sparse(dist: SparseDist, width: int) -> bytes:
    _check_width(width)
    if dist.ids[-1] >= 1 << (8 * width):
        raise ValueError(f"token id {int(dist.ids[-1])} does not fit {width}-byte ids")
    wbytes = (_bits_of_total(dist.total) + 7) // 8
    return (
        encode_varint(dist.ids.size)
        + _encode_sorted_ids(dist.ids)
        + _pack_uint(dist.weights, wbytes, "weight")
    )


def unpack_sparse(data: bytes, width: int, bits: int) -> SparseDist:
    _check_width(width)
    if not 1 <= bits <= 62:
        raise ValueError(f"bits must be in [1, 62], got {bits}")
    wbytes = (bits + 7) // 8
    data = bytes(data)
    count, off = _read_count(data, 0, 1 + wbytes, "sparse entry")
    if count == 0:
        raise ValueError("sparse distribution with no entries")
    ids, off = _decode_sorted_ids(data, off, count, width)
    raw, off = _take(data, off, count * wbytes, "sparse weights")
    if off != len(data):
        raise ValueError(f"{len(data) - off} trailing bytes after sparse distribution")
    weights = _unpack_uint(raw, wbytes, "sparse weights")
    return SparseDist(ids=ids, weights=weights, total=(1 << bits) - 1)


# ---------------------------------------------------------------------------------------------
# Codec-P payloads
# ---------------------------------------------------------------------------------------------


def _pack_f32(x: np.ndarray) -> bytes:
    return np.asarray(x, dtype="<f4").tobytes()


def _check_probs(p: np.ndarray, what: str) -> np.ndarray:
    # Probabilities of tokens that were kept or drawn are divisors in the edge's accept test.
    if p.size and not (np.all(np.isfinite(p)) and p.min() > 0.0 and p.max() <= 1.0):
        raise ValueError(f"{what} must be finite probabilities in (0, 1]")
    return p


def _unpack_probs(raw: bytes, what: str) -> np.ndarray:
    return _check_probs(np.frombuffer(raw, dtype="<f4").astype(np.float32), what)


def pack_payload(payload: PPayload, width: int) -> bytes:
    _check_width(width)
    n_top, n_tail = payload.top_ids.size, payload.tail_ids.size
    if n_top and payload.top_ids[-1] >= 1 << (8 * width):
        raise ValueError(f"token id {int(payload.top_ids[-1])} does not fit {width}-byte ids")
    _check_probs(payload.top_probs, "top probs")
    _check_probs(payload.tail_probs, "tail probs")
    return b"".join(
        [
            encode_varint(n_top),
            _encode_sorted_ids(payload.top_ids),
            _pack_f32(payload.top_probs),
            encode_varint(n_tail),
            _pack_uint(payload.tail_ids, width, "tail token id"),
            _pack_f32(payload.tail_probs),
        ]
    )


def unpack_payload(data: bytes, width: int) -> PPayload:
    _check_width(width)
    data = bytes(data)
    n_top, off = _read_count(data, 0, 5, "top entry")
    top_ids, off = _decode_sorted_ids(data, off, n_top, width)
    raw, off = _take(data, off, 4 * n_top, "top probs")
    top_probs = _unpack_probs(raw, "top probs")
    n_tail, off = _read_count(data, off, width + 4, "tail draw")
    raw_ids, off = _take(data, off, width * n_tail, "tail ids")
    raw_probs, off = _take(data, off, 4 * n_tail, "tail probs")
    if off != len(data):
        raise ValueError(f"{len(data) - off} trailing bytes after payload")
    return PPayload(
        top_ids=top_ids,
        top_probs=top_probs,
        tail_ids=_unpack_uint(raw_ids, width, "tail ids"),
        tail_probs=_unpack_probs(raw_probs, "tail probs"),
    )
