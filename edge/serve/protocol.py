"""The OpenAI API's request fields, checked, and its response shapes.

Every field is either supported, accepted at its neutral value (an explicit
`presence_penalty: 0` changes nothing, so it is no reason to refuse a
request), or refused with a 400 that names it: a field silently ignored would
give an app something other than what it asked for.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4

# Fields accepted only at a value that changes nothing (None always counts as unset).
NEUTRAL = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
    "parallel_tool_calls": (False, True), "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "n", "stop", "stream", "stream_options", "user",
          "top_k", "ignore_eos", "return_token_ids"}
CHAT = COMMON | {"messages", "max_completion_tokens"}
COMPLETION = COMMON | {"prompt"}


class RequestError(Exception):
    """A request the daemon refuses: status, a message naming the field, the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    kind: str                          # "chat" | "completion"
    model: str
    messages: list[dict] | None = None
    prompt_text: str | None = None
    prompt_tokens: list[int] | None = None
    max_tokens: int | None = None      # None: the daemon's default for this kind
    max_tokens_field: str = "max_tokens"   # the field it came from, for error messages
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    return_token_ids: bool = False


def _int(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{key}' must be an integer, got {v!r}", key)
    if lo is not None and v < lo:
        raise RequestError(f"'{key}' must be >= {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise RequestError(f"'{key}' must be <= {hi}, got {v}", key)
    return v


def _num(body: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise RequestError(f"'{key}' must be a number, got {v!r}", key)
    if v < lo or v > hi or (lo_open and v == lo):
        raise RequestError(f"'{key}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}", key)
    return float(v)


def _bool(body: dict, key: str) -> bool | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise RequestError(f"'{key}' must be true or false, got {v!r}", key)
    return v


def _check_fields(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed or value is None:
            continue
        if key in NEUTRAL:
            if any(value == x and type(value) is type(x) for x in NEUTRAL[key]):
                continue
            raise RequestError(f"'{key}' is not supported by tandem (only {NEUTRAL[key][0]!r} or null is accepted)",
                               key, code="unsupported_field")
        raise RequestError(f"'{key}' is not supported by tandem", key, code="unsupported_field")


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise RequestError("'messages' must be a non-empty array of {role, content}", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"'{where}' must be an object with 'role' and 'content'", where)
        for k in m:
            if k not in ("role", "content", "name"):
                raise RequestError(f"'{where}.{k}' is not supported by tandem", f"{where}.{k}", code="unsupported_field")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        if isinstance(content, list):          # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(f"'{where}.content[{j}]': only text parts are supported, got {kind!r}",
                                       f"{where}.content", code="unsupported_field")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"'{where}.content' must be a string or an array of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt(v) -> tuple[str | None, list[int] | None]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]                               # a batch of one prompt
    if isinstance(v, str):
        if not v:
            raise RequestError("'prompt' must not be empty", "prompt")
        return v, None
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return None, list(v)
    if isinstance(v, list) and len(v) > 1:
        raise RequestError("'prompt': batches of prompts are not supported; send one request per prompt", "prompt",
                           code="unsupported_field")
    raise RequestError("'prompt' must be a string or an array of token ids", "prompt")


def _stops(v) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return [s for s in stops if s]


def parse_request(body, kind: str, max_n: int) -> GenRequest:
    """A GenRequest from a decoded JSON body, or RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(body, CHAT if kind == "chat" else COMPLETION)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a string (see GET /v1/models)", "model")
    req = GenRequest(kind=kind, model=model)
    if kind == "chat":
        req.messages = _messages(body.get("messages"))
        mct, mt = _int(body, "max_completion_tokens", 1), _int(body, "max_tokens", 1)
        req.max_tokens = mct if mct is not None else mt
        if mct is not None:
            req.max_tokens_field = "max_completion_tokens"
    else:
        if "prompt" not in body:
            raise RequestError("'prompt' is required", "prompt")
        req.prompt_text, req.prompt_tokens = _prompt(body["prompt"])
        req.max_tokens = _int(body, "max_tokens", 1)
    t = _num(body, "temperature", 0.0, 2.0)
    req.temperature = 1.0 if t is None else t
    p = _num(body, "top_p", 0.0, 1.0, lo_open=True)
    req.top_p = 1.0 if p is None else p
    req.top_k = _int(body, "top_k", 0, 2 ** 31 - 1) or 0
    req.seed = _int(body, "seed", -(2 ** 63), 2 ** 63 - 1)
    n = _int(body, "n", 1, max_n)
    req.n = 1 if n is None else n
    req.stops = _stops(body.get("stop"))
    req.stream = bool(_bool(body, "stream"))
    req.ignore_eos = bool(_bool(body, "ignore_eos"))
    req.return_token_ids = bool(_bool(body, "return_token_ids"))
    so = body.get("stream_options")
    if so is not None:
        if not req.stream:
            raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(so, dict) or any(k != "include_usage" for k in so):
            raise RequestError("'stream_options' supports only {'include_usage': bool}", "stream_options")
        req.include_usage = bool(_bool(so, "include_usage"))
    return req


# -- responses -----------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(kind: str, index: int, text: str, finish_reason: str | None, token_ids: list[int] | None = None) -> dict:
    c = {"index": index, "finish_reason": finish_reason}
    if kind == "chat":
        c["message"] = {"role": "assistant", "content": text}
    else:
        c["text"] = text
    c["logprobs"] = None
    if token_ids is not None:
        c["token_ids"] = token_ids
    return c


def response(kind: str, rid: str, model: str, created: int, choices: list[dict], use: dict, tandem: dict) -> dict:
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": use, "tandem": tandem}


def chunk(kind: str, rid: str, model: str, created: int, index: int, text: str | None,
          finish_reason: str | None = None, role: bool = False, token_ids: list[int] | None = None) -> dict:
    if kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        c = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        c = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        c["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
            "model": model, "choices": [c]}


def now() -> int:
    return int(time.time())
