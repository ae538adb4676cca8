"""Token ids in, text out, as a client may see it: never a broken character,
never any part of a stop string.

A token is a few bytes; a UTF-8 character may span tokens (emoji, CJK), so
bytes go through an incremental decoder that keeps an unfinished character
until its last byte arrives. Text that could still become the start of a
stop string is held back until the next token decides it; the stop string
itself and everything after it are never released. The same object serves
streaming and non-streaming responses, so both give the same text.
"""
from __future__ import annotations

import codecs
from typing import Callable, Sequence

# token ids -> their bytes. llama.cpp renders each token as its own piece of
# bytes (its detokenize ignores the tokens before), so pieces concatenate.
Detokenize = Callable[[Sequence[int]], bytes]


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    def __init__(self, detokenize: Detokenize, stops: Sequence[str] = (), eos: int | None = None):
        self.detokenize = detokenize
        self.stops = [s for s in stops if s]
        self.eos = eos
        self.tokens: list[int] = []      # tokens that count: up to and including the one that ended it
        self.finish_reason: str | None = None   # "stop" once an end-of-sequence or a stop string was met
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""               # decoded, not yet released

    @property
    def stopped(self) -> bool:
        return self.finish_reason is not None

    def push(self, tokens: Sequence[int]) -> str:
        """Text that may be released after these tokens ('' when all is held back).
        Tokens after a stop are ignored."""
        out = []
        for t in tokens:
            if self.stopped:
                break
            self.tokens.append(t)
            if self.eos is not None and t == self.eos:
                self.finish_reason = "stop"
                out.append(self._flush())
                break
            self._pending += self._decoder.decode(self.detokenize([t]))
            out.append(self._release())
        return "".join(out)

    def finish(self) -> str:
        """The rest, once generation ended (length): what was held back for a stop
        string that never came, and an unfinished character as U+FFFD."""
        return "" if self.stopped else self._flush()

    def _flush(self) -> str:
        self._pending += self._decoder.decode(b"", final=True)
        hit = self._first_stop()
        text = self._pending if hit < 0 else self._pending[:hit]
        if hit >= 0:
            self.finish_reason = "stop"
        self._pending = ""
        return text

    def _first_stop(self) -> int:
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def _release(self) -> str:
        hit = self._first_stop()
        if hit >= 0:
            self.finish_reason = "stop"
            text, self._pending = self._pending[:hit], ""
            return text
        keep = held_back(self._pending, self.stops)
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text
