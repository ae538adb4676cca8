"""OpenAI request fields: supported, neutral, or refused with a 400 that names them."""
import pytest

from edge.serve.protocol import RequestError, parse_request

CHAT = {"model": "tandem", "messages": [{"role": "user", "content": "Hi"}]}
COMP = {"model": "tandem", "prompt": "Hi"}


def test_defaults_follow_the_api():
    r = parse_request(dict(CHAT), "chat", 8)
    assert (r.temperature, r.top_p, r.n, r.stream, r.max_tokens, r.stops) == (1.0, 1.0, 1, False, None, [])


def test_supported_fields():
    r = parse_request({**CHAT, "max_completion_tokens": 7, "max_tokens": 9, "temperature": 0, "top_p": 0.5,
                       "seed": 3, "n": 2, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
                       "user": "u1", "presence_penalty": 0, "logprobs": False, "top_k": 4}, "chat", 8)
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.n, r.stops, r.include_usage, r.top_k) == \
        (7, 0.0, 0.5, 3, 2, ["x"], True, 4)
    r = parse_request({**COMP, "prompt": [1, 2, 3], "echo": False, "best_of": 1}, "completion", 8)
    assert r.prompt_tokens == [1, 2, 3]
    r = parse_request({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}]},
                      "chat", 8)
    assert r.messages == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize("extra, field", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"functions": []}, "functions"),
    ({"whatever": 1}, "whatever"),
])
def test_unsupported_fields_are_named(extra, field):
    with pytest.raises(RequestError) as e:
        parse_request({**CHAT, **extra}, "chat", 8)
    assert e.value.status == 400 and e.value.param == field and f"'{field}'" in e.value.message


@pytest.mark.parametrize("body, field", [
    ({**CHAT, "max_tokens": -1}, "max_tokens"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": "5"}, "max_tokens"),
    ({**CHAT, "max_tokens": 2.5}, "max_tokens"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "n": 9}, "n"),
    ({**CHAT, "n": True}, "n"),
    ({**CHAT, "top_k": 2 ** 40}, "top_k"),
    ({**CHAT, "seed": "x"}, "seed"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "tandem", "messages": "hi"}, "messages"),
    ({"model": "tandem", "messages": []}, "messages"),
    ({"model": "tandem", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "tandem", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_bad_values_are_refused_with_the_field(body, field):
    with pytest.raises(RequestError) as e:
        parse_request(body, "chat", 8)
    assert e.value.status == 400 and e.value.param == field


@pytest.mark.parametrize("prompt", ["", [], ["a", "b"], [1, "a"], {"x": 1}, None])
def test_bad_prompts(prompt):
    with pytest.raises(RequestError) as e:
        parse_request({"model": "m", "prompt": prompt}, "completion", 8)
    assert e.value.param == "prompt"


def test_a_body_that_is_not_an_object():
    with pytest.raises(RequestError):
        parse_request([1, 2], "chat", 8)


def engine(n_ctx=100):
    from edge.config import GenConfig
    from edge.serve.config import ServeConfig
    from edge.serve.engine import Engine
    from edge.serve.metrics import Metrics
    e = Engine(None, None, GenConfig(mode="sync", gamma=3), ServeConfig(default_max_tokens=50), Metrics("sync", 9))
    e.n_ctx = n_ctx
    return e


def test_configs_per_completion():
    e = engine()
    req = parse_request({**CHAT, "n": 3, "seed": -1, "temperature": 0.5, "ignore_eos": True}, "chat", 8)
    cfgs = e.configs(req, 10)
    assert [c.sampling.seed for c in cfgs] == [2 ** 64 - 1, 0, 1]       # seed + i, as uint64 on the wire
    assert all(c.max_tokens == 50 and c.mode == "sync" and c.gamma == 3 and not c.stop_at_eos for c in cfgs)
    assert e.configs(parse_request(dict(COMP), "completion", 8), 10)[0].max_tokens == 16   # the API's default
    assert e.configs(parse_request(dict(CHAT), "chat", 8), 80)[0].max_tokens == 20         # what the context has left
    with pytest.raises(RequestError) as err:
        e.configs(parse_request({**CHAT, "max_tokens": 91}, "chat", 8), 10)
    assert err.value.param == "max_tokens" and "90" in err.value.message
    with pytest.raises(RequestError):
        e.configs(parse_request(dict(CHAT), "chat", 8), 100)
