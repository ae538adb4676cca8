"""`edge-agent serve` through the official `openai` client: a real daemon (subprocess),
a real verifier behind link-sim's WAN profile, the real models.

The daemon speculates on every request (--no-adaptive: on one CPU a same-size
drafter never pays, and adaptive picospec would only stream cloud-only) with a
fixed block plan, codec and no cloud lead, so sampled output depends only on the seed.
"""
import json
import urllib.error
import urllib.request

import pytest

from common.procs import start_serve

openai = pytest.importorskip("openai")

PROMPT = "Why is the sky blue?"
TANDEM_KEYS = {"mode", "fallback", "acceptance_rate", "drafted", "bytes_up", "bytes_down", "emulated", "segments"}


@pytest.fixture(scope="module")
def serve(wan):
    d = start_serve(wan.address, "--no-adaptive", "--no-cloud-lead", "--gamma", "4", "--window", "2", "--codec", "P")
    yield d
    assert d.stop() == 0, "".join(d.stderr)


@pytest.fixture(scope="module")
def client(serve):
    return openai.OpenAI(base_url=f"http://{serve.address}/v1", api_key="unused", max_retries=0, timeout=120)


def http(serve, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(f"http://{serve.address}{path}", data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, dict(r.headers), json.loads(raw) if raw.startswith(b"{") else {"raw": raw.decode()}
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def chat_messages(text=PROMPT):
    return [{"role": "user", "content": text}]


def test_models_and_health(serve, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1", "tandem"]
    status, _, health = http(serve, "GET", "/healthz")
    assert status == 200 and health["verifier"]["reachable"] is True and health["serving"] == "picospec"


def test_chat_streamed_text_equals_the_response_at_t0(client):
    r = client.chat.completions.create(model="tandem", messages=chat_messages(), max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and text
    assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop"
    tandem = r.model_extra["tandem"]
    assert TANDEM_KEYS <= set(tandem) and tandem["mode"] == "picospec" and tandem["drafted"] > 0
    assert sum(s["tokens"] for s in tandem["segments"]) == r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tandem", messages=chat_messages(), max_tokens=24,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert TANDEM_KEYS <= set(chunks[-1].model_extra["tandem"])     # without include_usage: on the last chunk
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_is_the_targets_greedy_output(client, tokenizer, reference):
    prompt = "The three primary colours are"
    r = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=32, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    want, _ = reference.greedy(tokenizer.encode(prompt, raw=True), 32)
    assert r.choices[0].model_extra["token_ids"] == want
    assert r.choices[0].text == tokenizer.decode(want, prev=tokenizer.encode(prompt, raw=True))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 32
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tandem", prompt=prompt, max_tokens=32, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == r.choices[0].text


def test_stop_strings_across_tokens_are_never_sent(client, tokenizer):
    prompt = "The three primary colours are"
    full = client.completions.create(model="tandem", prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"return_token_ids": True, "ignore_eos": True})
    ids = full.choices[0].model_extra["token_ids"]
    pieces = [tokenizer.decode([t], prev=[0]) for t in ids]
    # a stop string that begins inside one token and ends inside the next
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:1]
    text = full.choices[0].text
    want = text[:text.find(stop)]
    r = client.completions.create(model="tandem", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00zz"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tandem", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    sent = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(sent) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_completions_use_seed_plus_i(client):
    kw = dict(model="tandem", messages=chat_messages("Name a colour."), max_tokens=12, temperature=0.9)
    two = client.chat.completions.create(n=2, seed=5, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.model_extra["tandem"]["seeds"] == [5, 6]
    assert two.usage.completion_tokens == sum(
        s["tokens"] for s in two.model_extra["tandem"]["segments"])
    second = client.chat.completions.create(n=1, seed=6, **kw)
    assert second.choices[0].message.content == two.choices[1].message.content
    first = client.chat.completions.create(n=1, seed=5, **kw)
    assert first.choices[0].message.content == two.choices[0].message.content


def test_include_usage_adds_a_final_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tandem", messages=chat_messages(), max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8 and last.usage.prompt_tokens > 0
    assert TANDEM_KEYS <= set(last.model_extra["tandem"])
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, None),
    (b'{"model": "tandem", "messages": "hi"}', 400, "messages"),
    (b'{"model": "tandem", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"model": "tandem", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', 400, "max_tokens"),
    (b'{"model": "tandem", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000000000}', 400,
     "max_tokens"),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
    (b'{"model": "tandem", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400,
     "tools"),
    (b'{"model": "tandem", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400,
     "temperature"),
    (b'[1, 2, 3]', 400, None),
])
def test_bad_requests_get_a_4xx_with_a_message(serve, body, status, field):
    got, _, reply = http(serve, "POST", "/v1/chat/completions", body)
    assert got == status and reply["error"]["message"]
    assert reply["error"]["param"] == field


def test_unsupported_fields_through_the_client_and_the_daemon_lives_on(serve, client):
    for extra in ({"response_format": {"type": "json_object"}}, {"logprobs": True}, {"tools": [
            {"type": "function", "function": {"name": "f", "parameters": {}}}]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tandem", messages=chat_messages(), max_tokens=4, **extra)
        assert next(iter(extra)) in str(e.value)
    assert http(serve, "GET", "/healthz")[0] == 200
    r = client.completions.create(model="tandem", prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_metrics_count_what_was_served(serve, client):
    client.completions.create(model="tandem", prompt="Hi", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    _, _, m = http(serve, "GET", "/metrics")
    text = m["raw"]
    for name in ("tandem_requests_total", "tandem_completion_tokens_total", "tandem_drafted_tokens_total",
                 "tandem_acceptance_rate", "tandem_fallbacks_total", "tandem_link_rtt_seconds",
                 "tandem_request_seconds_bucket", "tandem_ttft_seconds_bucket", "tandem_queue_waiting"):
        assert name in text
    ok = [line for line in text.splitlines() if line.startswith('tandem_requests_total{endpoint="completions",status="200"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    rtt = [line for line in text.splitlines() if line.startswith("tandem_link_rtt_seconds ")]
    assert float(rtt[0].split()[-1]) > 0.04      # picospec-wan: 50 ms RTT
