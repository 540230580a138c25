"""`lm serve`'s request checks (lm.infer.server.parse) and its streamed text (deltas never
taken back; a stop string and a partial character held back). The server itself, over
HTTP with the openai client: tests/e2e/test_serve.py."""

from __future__ import annotations

import pytest

from lm.infer.server import ApiError, Limits, _Text, parse

LIMITS = Limits(max_tokens=100)


def _parse(body, chat=False):
    return parse(body, chat=chat, model="tiny", limits=LIMITS)


def test_a_completion_body_with_openai_defaults_and_extensions():
    spec = _parse({"model": "tiny", "prompt": "hi"})
    assert (spec.prompts, spec.max_tokens, spec.temperature, spec.top_p, spec.n, spec.seed,
            spec.stop, spec.stream) == (("hi",), 16, 1.0, 1.0, 1, None, (), False)
    spec = _parse({"prompt": ["a", "b"], "max_tokens": 7, "temperature": 0, "top_p": 0.5,
                   "top_k": 3, "n": 2, "seed": 5, "stop": "\n", "stream": True,
                   "stream_options": {"include_usage": True}, "user": "ignored"})
    assert (spec.prompts, spec.max_tokens, spec.temperature, spec.top_p, spec.top_k, spec.n,
            spec.seed, spec.stop, spec.stream, spec.include_usage) == (
        ("a", "b"), 7, 0.0, 0.5, 3, 2, 5, ("\n",), True, True)
    assert _parse({"prompt": "x", "stop": ["a", "bc"]}).stop == ("a", "bc")


def test_a_chat_body_takes_text_parts_and_max_completion_tokens():
    spec = _parse({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "},
                                     {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 9}, chat=True)
    assert spec.prompts == (({"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hi there"}),)
    assert spec.max_tokens == 9
    assert _parse({"messages": [{"role": "user", "content": "x"}]}, chat=True).max_tokens is None


@pytest.mark.parametrize("body,chat,status,param", [
    ([1, 2], False, 400, None),
    ({"model": "other", "prompt": "x"}, False, 404, "model"),
    ({"model": 3, "prompt": "x"}, False, 400, "model"),
    ({}, False, 400, "prompt"),
    ({"prompt": 3}, False, 400, "prompt"),
    ({"prompt": []}, False, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, False, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 101}, False, 400, "max_tokens"),  # over the limit
    ({"prompt": "x", "max_tokens": 2.5}, False, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, False, 400, "temperature"),
    ({"prompt": "x", "temperature": 3}, False, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, False, 400, "top_p"),
    ({"prompt": "x", "n": 0}, False, 400, "n"),
    ({"prompt": "x", "n": True}, False, 400, "n"),
    ({"prompt": "x", "seed": 2 ** 40}, False, 400, "seed"),
    ({"prompt": "x", "stop": ""}, False, 400, "stop"),
    ({"prompt": "x", "stop": ["a"] * 5}, False, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, False, 400, "stream"),
    ({"prompt": "x", "stream_options": 1}, False, 400, "stream_options"),
    ({"prompt": "x", "logprobs": 2}, False, 400, "logprobs"),
    ({"prompt": "x", "echo": True}, False, 400, "echo"),
    ({"prompt": "x"}, True, 400, "messages"),
    ({"messages": []}, True, 400, "messages"),
    ({"messages": [{"role": "user"}]}, True, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, True, 400,
     "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, True,
     400, "tools"),
])
def test_bad_bodies_are_openai_errors(body, chat, status, param):
    with pytest.raises(ApiError) as e:
        _parse(body, chat)
    assert (e.value.status, e.value.param) == (status, param), e.value.message
    error = e.value.body()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    assert error["type"] == "invalid_request_error"


def _bytes(ids):  # a stand-in byte-level decode
    return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stops: tuple[str, ...], final: str) -> list[str]:
    t = _Text(_bytes, stops)
    out = []
    for b in text.encode():
        t.tokens.append(b)
        out.append(t.delta())
    out.append(t.final(final))
    return out


def test_streamed_deltas_add_up_to_the_final_text():
    # A 2-byte character is held back until it is whole.
    deltas = _stream("aé!", (), "aé!")
    assert deltas == ["a", "", "é", "!", ""]
    # A stop string's prefix is held back until it is known not to be one ...
    deltas = _stream("xy ab ac", ("abd",), "xy ab ac")
    assert "".join(deltas) == "xy ab ac" and deltas[3:6] == ["", "", "ab "]
    # ... and the text ends before the stop string.
    deltas = _stream("hello world", ("lo w", "zz"), "hel")
    assert deltas[:4] == ["h", "e", "", "l"] and "".join(deltas) == "hel"
