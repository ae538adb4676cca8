"""A token prefix compressed for the uplink (`prompt_zstd` in OpenRequest and
GenerateRequest).

A resumed session re-sends everything decided so far, prompt and output, which
on a slow uplink is the longest message of a session. The edge sends the ids
packed at the verifier's token width (kernels.packing) and zstd-compressed, but
only where that is smaller than the plain `prompt` field. The verifier
decompresses with a hard limit on the output, fed a few bytes at a time, so a
small message that would expand to gigabytes (a "zstd bomb") is refused after
at most `max_tokens` tokens' worth of output.
"""
from __future__ import annotations

from typing import Sequence

import zstandard

from kernels import packing

LEVEL = 3
FEED = 16          # compressed bytes per step: one step expands to at most a few zstd blocks


def compress_prompt(tokens: Sequence[int], width: int) -> bytes:
    return zstandard.ZstdCompressor(level=LEVEL).compress(packing.pack_tokens(tokens, width))


def plain_size(tokens: Sequence[int]) -> int:
    """Bytes of the tokens as a packed `repeated uint32` field's payload (varints)."""
    return sum(1 if t < 1 << 7 else 2 if t < 1 << 14 else 3 if t < 1 << 21 else 4 if t < 1 << 28 else 5
               for t in tokens)


def prompt_fields(tokens: Sequence[int], width: int, allow_zstd: bool = True) -> dict:
    """Keyword arguments for a request message: `prompt_zstd` where it is
    smaller on the wire than the plain `prompt`, else `prompt`."""
    if allow_zstd and len(tokens) > 8:
        packed = compress_prompt(tokens, width)
        if len(packed) < plain_size(tokens):
            return {"prompt_zstd": packed}
    return {"prompt": list(tokens)}


def decompress_prompt(data: bytes, width: int, max_tokens: int) -> list[int]:
    """The token ids in `data`; ValueError when it is not one complete zstd frame
    of whole ids, or would exceed `max_tokens` ids."""
    limit = max_tokens * width
    d = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    try:
        for i in range(0, len(data), FEED):
            out += d.decompress(data[i:i + FEED])
            if len(out) > limit:
                raise ValueError(f"compressed prompt expands past {max_tokens} tokens")
            if d.eof:
                if d.unused_data or i + FEED < len(data):
                    raise ValueError("compressed prompt has bytes after its zstd frame")
                break
    except zstandard.ZstdError as e:
        raise ValueError(f"compressed prompt is not valid zstd: {e}") from None
    if not d.eof:
        raise ValueError("compressed prompt is truncated (incomplete zstd frame)")
    if len(out) % width:
        raise ValueError(f"compressed prompt holds {len(out)} bytes, not a whole number of {width}-byte ids")
    return packing.unpack_tokens(bytes(out), width)
