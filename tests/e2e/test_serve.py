"""`lm serve` over HTTP, talked to with the real `openai` client: greedy texts equal
one-prompt-at-a-time generation, streamed chunks add up to the whole text, n samples with
a seed are the engine's, stop strings cut; bad requests get OpenAI errors with the right
status and leave the server serving; a client that leaves mid-stream is cancelled in the
engine (pages all free after). One test goes through the real `lm serve` process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

PROMPTS = ["ROMEO:", "To be, or not to be", ""]


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def _reference(server, ids: list[int], new: int, stops) -> str:
    """The greedy text of `ids` by lm.sample.generate, one prompt alone."""
    from lm.sample import generate
    engine = server.engine
    out = generate(engine.graphdef, engine.params, ids, new, temperature=0.0,
                   max_seq_len=engine.max_seq_len, stop_ids=stops)[0]
    return server.loaded.tokenizer.decode(out)


def _health(server) -> dict:
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def _wait_idle(server) -> dict:
    """/health once nothing is in flight."""
    deadline = time.time() + 60
    while (h := _health(server))["sequences_in_flight"] or h["running"] or h["queued"]:
        assert time.time() < deadline, h
        time.sleep(0.1)
    return h


def _raw(server, method: str, path: str, body: bytes | None = None, headers=None):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=300)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None, resp


@pytest.fixture(scope="module")
def server(tiny_run):
    from lm.infer.load import load_engine
    from lm.infer.server import Limits, Server
    loaded = load_engine(str(tiny_run), [], slots=2, pages=0, page_size=8)
    s = Server(loaded, name="tiny", port=0,
               limits=Limits(max_tokens=60, max_body_bytes=4096, max_queued=1)).start()
    yield s
    s.close()


def test_models_lists_the_run(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert _client(server).models.retrieve("tiny").id == "tiny"


def test_greedy_completions_equal_one_prompt_at_a_time_generation(server):
    client = _client(server)
    texts = []
    for p in PROMPTS:
        ids, stops = server.loaded.prompt(p)
        r = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
        want = _reference(server, ids, 12, stops)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
        assert r.object == "text_completion" and r.model == "tiny"
        texts.append(want)
    # A list of prompts: one choice each, in order; usage summed.
    r = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == texts and [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 36
    # Three clients at once (two slots, one waits): each gets its own text.
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda p: client.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0), PROMPTS))
    assert [r.choices[0].text for r in replies] == texts


def test_streamed_chunks_add_up_to_the_whole_text(server):
    client = _client(server)
    kw = dict(model="tiny", prompt="JULIET:", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(chunks) > 2
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_n_samples_with_a_seed_are_the_engines(server):
    from lm.infer import Engine, Request
    client = _client(server)
    kw = dict(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=1.0, n=2, seed=7)
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    # The same request on an engine of its own (the batch does not matter).
    e, tok = server.engine, server.loaded.tokenizer
    ids, stops = server.loaded.prompt("ROMEO:")
    own = Engine(e.graphdef, e.params, slots=1, pages=9, page_size=8, decode=tok.decode)
    want = own.generate([Request(tuple(ids), max_new_tokens=12, temperature=1.0, seed=7,
                                 n=2, stop_ids=stops)])[0]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        c.text for c in want.completions]
    # Streamed, each choice's chunks add up to its text.
    parts = {0: "", 1: ""}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.text
    assert [parts[0], parts[1]] == [c.text for c in want.completions]


def test_a_stop_string_ends_the_text_before_it(server):
    client = _client(server)
    ids, stops = server.loaded.prompt("ROMEO:")
    full = _reference(server, ids, 16, stops)
    assert len(full) >= 4, full
    stop = full[2:4]
    want = full[:full.index(stop)]
    kw = dict(model="tiny", prompt="ROMEO:", max_tokens=16, temperature=0, stop=[stop, "\x00"])
    r = client.completions.create(**kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    client = _client(server)
    good = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2}).encode()
    for body, status, code in (
            (b"{not json", 400, "invalid_json"),
            (b'{"model": "tiny"}', 400, "missing_field"),
            (b'{"model": "tiny", "prompt": "a", "temperature": "hot"}', 400, "invalid_value"),
            (b'{"model": "tiny", "prompt": "a", "max_tokens": 61}', 400, "invalid_value"),
            (b'{"model": "gpt-4", "prompt": "a"}', 404, "model_not_found"),
            (b'{"model": "tiny", "prompt": "a", "n": 9}', 400, "too_many_sequences"),
            (json.dumps({"model": "tiny", "prompt": "x" * 80}).encode(), 400,
             "context_length_exceeded"),
            (b'{"model": "tiny", "prompt": "' + b"x" * 5000 + b'"}', 413, "body_too_large")):
        got, err, _ = _raw(server, "POST", "/v1/completions", body,
                           {"Content-Type": "application/json"})
        assert (got, err["error"]["code"]) == (status, code), (body[:60], err)
        assert err["error"]["message"] and err["error"]["type"] == "invalid_request_error"
    assert _raw(server, "GET", "/v1/nothing")[:2][0] == 404
    status, err, resp = _raw(server, "GET", "/v1/completions")
    assert status == 405 and resp.getheader("Allow") == "POST"
    assert _raw(server, "POST", "/v1/models", good)[0] == 405
    # A model with no chat template: 400 on chat.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}])
    # The openai client sees the same errors as its exception types.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 80)
    assert e.value.code == "context_length_exceeded"
    assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text \
        is not None
    health = _health(server)
    assert health["pages_free"] == health["pages_total"] and health["sequences_in_flight"] == 0


def test_a_client_that_leaves_is_cancelled_and_a_full_server_says_429(server):
    engine, before = server.engine, _health(server)
    step = engine.step

    def slow():  # (so the request is still running when the client leaves)
        time.sleep(0.05)
        return step()
    engine.step = slow
    try:
        host, port = server.httpd.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=300)
        # n=3 with 2 slots and max_queued 1: the server is full while it runs.
        conn.request("POST", "/v1/completions", json.dumps({
            "model": "tiny", "prompt": "ROMEO:", "max_tokens": 50, "n": 3, "stream": True}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        assert resp.readline().startswith(b"data: {")
        with pytest.raises(openai.RateLimitError):
            _client(server).completions.create(model="tiny", prompt="a", max_tokens=2)
        conn.sock.shutdown(socket.SHUT_RDWR)
        resp.close()
        conn.close()
        _wait_idle(server)
        # A client that leaves while its (not streamed) request runs.
        accepted = _health(server)["requests"]
        conn = http.client.HTTPConnection(host, port, timeout=300)
        conn.request("POST", "/v1/completions", json.dumps({
            "model": "tiny", "prompt": "ROMEO:", "max_tokens": 50}),
            {"Content-Type": "application/json"})
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.time() + 60
        while _health(server)["requests"] == accepted:  # (until the server has it)
            assert time.time() < deadline
            time.sleep(0.05)
        h = _wait_idle(server)
    finally:
        del engine.step
    assert h["cancelled"] == before["cancelled"] + 2
    assert h["pages_free"] == h["pages_total"]
    assert engine.idle and engine.pool.free == engine.pool.capacity
    r = _client(server).completions.create(model="tiny", prompt="ROMEO:", max_tokens=4,
                                           temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


# ------------------------------------------------------------------ chat


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """A run imported from an HF directory whose tokenizer ships a ChatML template."""
    from test_chat_template import SPECIALS, byte_bpe, jinja_dir
    from test_interop_hf import write_hf_dir

    from lm.infer.load import load_engine
    from lm.infer.server import Server
    from lm.interop.hf_import import import_hf
    tmp = tmp_path_factory.mktemp("chat")
    ids = {"bos_token_id": None, "pad_token_id": None,
           "eos_token_id": SPECIALS.index("<|im_end|>")}
    hf_dir, _ = write_hf_dir(tmp / "hf", ids, vocab_size=byte_bpe().get_vocab_size(),
                             max_seq_len=128)
    jinja_dir(tmp / "hf")
    assert import_hf(hf_dir, tmp / "run") == 0
    loaded = load_engine(str(tmp / "run"), [], slots=2, pages=0, page_size=16, chat=True)
    assert loaded.template is not None
    s = Server(loaded, name="chat", port=0).start()
    yield s
    s.close()


def test_chat_replies_are_the_templates_greedy_continuation(chat_server):
    client = _client(chat_server)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "a line about the sea"}]
    ids, stops = chat_server.loaded.chat(messages, "test")
    want = _reference(chat_server, ids, 16, stops)
    r = client.chat.completions.create(model="chat", messages=messages, max_tokens=16,
                                       temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="chat", messages=messages,
                                                 max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == c.finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


# ------------------------------------------------------------------ the real command


def test_lm_serve_serves_until_interrupted(tiny_run):
    """`lm serve --port 0` prints its URL, answers the openai client, and shuts down
    cleanly on SIGINT (Ctrl-C), exit 0."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "lm.cli", "serve", "--run", str(tiny_run),
                             "--port", "0", "--batch", "2", "--page-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny at http://127.0.0.1:"), (line, proc.stderr.read()
                                                                      if not line else "")
        url = line.split(" at ", 1)[1].strip()
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8,
                                      temperature=0)
        from lm.sample import generate
        from lm.train.param_source import restore_for_inference
        run, params, _ = restore_for_inference(tiny_run)
        tok = run.tokenizer
        ids = [int(t) for t in tok.frame(tok.encode("ROMEO:"))]
        want = tok.decode(generate(run.pieces.graphdef, params, ids, 8, temperature=0.0,
                                   max_seq_len=64, stop_ids=tok.stop_ids)[0])
        assert r.choices[0].text == want
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "shut down" in err and '"POST /v1/completions HTTP/1.1" 200' in err
