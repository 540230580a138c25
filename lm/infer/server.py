"""`lm serve`: an OpenAI-compatible HTTP server over the batched engine (docs/inference.md).

Threads: one engine thread owns the Engine and loops `step()` while anything is in
flight; the HTTP server (the standard library's ThreadingHTTPServer) runs each
connection in a thread of its own. A handler parses and checks its request (`parse`:
pure, no model), encodes the prompts, and hands the engine thread a `submit` through one
thread-safe inbox with a queue of its own; the engine thread answers on that queue
(accepted, or refused with the engine's reason: a prompt too long for max_seq_len or the
page pool), then sends it the request's events (tokens, then the result). A handler
whose client goes away (a failed write mid-stream, or a closed socket while it waits)
sends `cancel`: the engine drops the request's sequences and frees their slots and pages.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST
/v1/chat/completions (both with `stream`: Server-Sent Events in OpenAI's chunk format,
ending `data: [DONE]`), GET /health (the engine's slots, pages and counters). Errors are
OpenAI's `{"error": {"message", "type", "code", "param"}}` with the HTTP status.
"""

from __future__ import annotations

import itertools
import json
import queue
import secrets
import select
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lm.data.errors import DataError
from lm.errors import ConfigError
from lm.infer.engine import Request
from lm.infer.load import Loaded

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 411: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error"}
MAX_STOPS = 4  # stop strings per request (OpenAI's limit)
INT32 = 2 ** 31
DRAIN_BYTES = 16 << 20  # a body over the limit but under this is read and dropped (413)


class ApiError(Exception):
    """An error answered as OpenAI answers it: `status`, and the JSON body of `body()`."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "code": self.code, "param": self.param}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. `max_tokens`: its max_tokens at most; `max_body_bytes`:
    its body (413 beyond); `max_queued`: sequences waiting beyond the engine's slots (a
    request of n samples of p prompts is n * p sequences; 429 beyond)."""
    max_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_queued: int = 64


@dataclass(frozen=True)
class Spec:
    """A checked completion request. `prompts`: texts (/v1/completions) or one list of
    {"role", "content"} messages (/v1/chat/completions); `max_tokens` None: as many as
    the model's max_seq_len leaves."""
    chat: bool
    prompts: tuple
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# ------------------------------------------------------------------ request checks


def _bad(key: str, want: str, value: Any) -> ApiError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return ApiError(400, f"'{key}' must be {want}, got {shown}", "invalid_value", key)


def _field(body: dict, key: str, default, kind: str, ok=lambda v: True, want: str = ""):
    """body[key] (default where absent or null), checked to be `kind` ("int", "number",
    "bool", "str") and `ok`."""
    v = body.get(key)
    if v is None:
        return default
    is_kind = {"int": isinstance(v, int) and not isinstance(v, bool),
               "number": isinstance(v, (int, float)) and not isinstance(v, bool),
               "bool": isinstance(v, bool), "str": isinstance(v, str)}[kind]
    if not is_kind or not ok(v):
        raise _bad(key, want or {"int": "an integer", "number": "a number",
                                 "bool": "a boolean", "str": "a string"}[kind], v)
    return float(v) if kind == "number" else v


def _messages(value) -> tuple[dict, ...]:
    """Chat messages as {"role": str, "content": str}: content a string or a list of text
    parts ({"type": "text", "text": ...}), joined."""
    want = 'a non-empty list of {"role": string, "content": string or text parts}'
    if not isinstance(value, list) or not value:
        raise _bad("messages", want, value)
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("messages", want, m)
        content = m.get("content")
        if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad("messages", want + " (only text content is served)", m)
        out.append({"role": m["role"], "content": content})
    return tuple(out)


def parse(body: Any, *, chat: bool, model: str, limits: Limits) -> Spec:
    """The checked form of a /v1/completions (or, `chat`, /v1/chat/completions) body, or
    ApiError: 400 for a missing or ill-typed field or an unsupported feature, 404 for
    another model than `model`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    name = _field(body, "model", model, "str")
    if name != model:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves "
                            f"'{model}'", "model_not_found", "model")
    if chat:
        if "messages" not in body:
            raise ApiError(400, "'messages' is required", "missing_field", "messages")
        prompts: tuple = (_messages(body["messages"]),)
    else:
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", "missing_field", "prompt")
        p = body["prompt"]
        if isinstance(p, str):
            prompts = (p,)
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            prompts = tuple(p)
        else:
            raise _bad("prompt", "a string or a non-empty list of strings", p)
    for key, off in (("logprobs", (False, 0)), ("top_logprobs", (0,)), ("echo", (False,)),
                     ("suffix", ("",)), ("best_of", (1,)), ("logit_bias", ({},)),
                     ("tools", ([],)), ("functions", ([],)),
                     ("presence_penalty", (0,)), ("frequency_penalty", (0,))):
        if body.get(key) is not None and body[key] not in off:
            raise ApiError(400, f"'{key}' is not supported by lm serve", "unsupported", key)
    limit = limits.max_tokens
    tokens_key = "max_completion_tokens" if chat and body.get(
        "max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, tokens_key, None if chat else min(16, limit), "int",
                        lambda v: 1 <= v <= limit, f"an integer in [1, {limit}]")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(
            isinstance(s, str) and s for s in stop)):
        raise _bad("stop", f"a non-empty string or a list of at most {MAX_STOPS}",
                   body.get("stop"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", 'an object ({"include_usage": true})', options)
    return Spec(
        chat=chat, prompts=prompts, max_tokens=max_tokens,
        temperature=_field(body, "temperature", 1.0, "number", lambda v: 0 <= v <= 2,
                           "a number in [0, 2] (0 = greedy)"),
        top_p=_field(body, "top_p", 1.0, "number", lambda v: 0 < v <= 1,
                     "a number in (0, 1]"),
        top_k=_field(body, "top_k", 0, "int", lambda v: v >= 0, "an integer >= 0 (0 = off)"),
        n=_field(body, "n", 1, "int", lambda v: 1 <= v <= 128, "an integer in [1, 128]"),
        seed=_field(body, "seed", None, "int",
                    lambda v: -INT32 <= v < INT32 - len(prompts), "a 32-bit integer"),
        stop=tuple(stop), stream=_field(body, "stream", False, "bool"),
        include_usage=bool(options.get("include_usage")))


# ------------------------------------------------------------------ streamed text


class _Text:
    """The text of one sample as it grows, handed out in deltas that are never taken
    back: held back are a trailing partial character (U+FFFD) and a tail that may yet
    become a stop string; the text ends before the first stop string (as the engine's)."""

    def __init__(self, decode, stops: tuple[str, ...]):
        self.decode, self.stops, self.tokens, self.sent = decode, stops, [], ""

    def delta(self) -> str:
        text = self.decode(self.tokens)
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            text = text[:min(cuts)]
        else:
            text = text.rstrip("\ufffd")
            for k in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1),
                           0, -1):
                if any(s.startswith(text[-k:]) for s in self.stops):
                    text = text[:-k]
                    break
        return self._to(text)

    def final(self, text: str) -> str:
        return self._to(text)

    def _to(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        out, self.sent = text[len(self.sent):], text
        return out


# ------------------------------------------------------------------ the server


class _ClientGone(Exception):
    pass


class Server:
    """`Server(loaded, name=..., host=..., port=...)`: binds at once (port 0: a free one,
    see `url`); `serve_forever()` serves in this thread, `start()` in a thread of its own;
    `close()` stops both threads."""

    def __init__(self, loaded: Loaded, *, name: str, host: str = "127.0.0.1",
                 port: int = 8000, limits: Limits = Limits(), log: bool = False):
        self.loaded, self.engine, self.name, self.limits = loaded, loaded.engine, name, limits
        self.log, self.created = log, int(time.time())
        self.inbox: queue.Queue = queue.Queue()
        self._routes: dict[int, tuple[queue.Queue, int]] = {}  # engine thread only
        self._lock = threading.Lock()
        self._in_flight = 0  # sequences submitted and not yet done (under _lock)
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self.counters = {"requests": 0, "cancelled": 0, "errors": 0}
        self.snapshot: dict = {}
        self._publish()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self  # type: ignore[attr-defined]
        self._serving: threading.Thread | None = None
        self._engine_thread = threading.Thread(target=self._engine_loop, daemon=True,
                                               name="lm-serve-engine")
        self._engine_thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> Server:
        self._serving = threading.Thread(target=self.serve_forever, daemon=True,
                                         name="lm-serve-http")
        self._serving.start()
        return self

    def close(self) -> None:
        if self._serving is not None:
            self.httpd.shutdown()
            self._serving.join()
        self.httpd.server_close()
        self._stopping.set()
        self.inbox.put(None)
        self._engine_thread.join(timeout=30)

    # -------------------------------------------------------------- handler side

    def admit(self, seqs: int) -> None:
        """Count `seqs` sequences in, or 429 when the queue is full."""
        room = self.engine.slots + self.limits.max_queued
        if seqs > room:
            raise ApiError(400, f"the request asks for {seqs} sequences (prompts x n); the "
                                f"server holds at most {room} at once", "too_many_sequences")
        with self._lock:
            if self._in_flight + seqs > room:
                raise ApiError(429, f"the server is full ({self._in_flight} sequences in "
                                    f"flight, at most {room}); retry later", "queue_full")
            self._in_flight += seqs

    def _release(self, seqs: int) -> None:
        with self._lock:
            self._in_flight -= seqs

    # -------------------------------------------------------------- engine side

    def _engine_loop(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            commands = []
            try:
                commands.append(self.inbox.get(timeout=0.2) if engine.idle else
                                self.inbox.get_nowait())
            except queue.Empty:
                pass
            while True:
                try:
                    commands.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for c in commands:
                if c is not None:
                    getattr(self, f"_{c[0]}")(*c[1:])
            if not engine.idle:
                try:
                    events = engine.step()
                except Exception:  # noqa: BLE001 (a bug: fail what is in flight, go on)
                    traceback.print_exc()
                    self._fail_all(500, "the engine failed on this batch (see the server log)")
                    events = []
                for e in events:
                    route = self._routes.get(e.id)
                    if route is None:
                        continue
                    if e.result is not None:
                        del self._routes[e.id]
                        self._release(route[1])
                    route[0].put(("event", e))
            self._publish()
        self._fail_all(503, "the server is shutting down")

    def _submit(self, requests: list[Request], out: queue.Queue) -> None:
        done = []
        try:
            for r in requests:
                self.engine.submit(r)
                done.append(r)
                self._routes[r.id] = (out, r.n)
        except ConfigError as e:
            for r in done:
                self.engine.cancel(r.id)
                del self._routes[r.id]
            self._release(sum(r.n for r in requests))
            message = str(e).removeprefix("engine: ")
            code = "context_length_exceeded" if "max_seq_len" in message or \
                "pool" in message else "invalid_value"
            out.put(("error", ApiError(400, message, code, "prompt")))
            return
        self.counters["requests"] += 1
        out.put(("accepted",))

    def _cancel(self, rids: list[int]) -> None:
        for rid in rids:
            route = self._routes.pop(rid, None)
            if route is not None and self.engine.cancel(rid):
                self._release(route[1])
                self.counters["cancelled"] += 1

    def _fail_all(self, status: int, message: str) -> None:
        for rid, (out, n) in list(self._routes.items()):
            try:
                self.engine.cancel(rid)
            except Exception:  # noqa: BLE001 (its state may be what failed)
                pass
            del self._routes[rid]
            self._release(n)
            self.counters["errors"] += 1
            out.put(("error", ApiError(status, message, "server_error")))

    def _publish(self) -> None:
        e = self.engine
        self.snapshot = {
            "status": "ok", "model": self.name,
            "sequences_in_flight": self._in_flight,
            "running": sum(s is not None for s in e.running), "queued": len(e.queue),
            "slots": e.slots, "pages_free": e.pool.free, "pages_total": e.pool.capacity,
            "page_size": e.page_size, "max_seq_len": e.max_seq_len,
            **self.counters, "engine": dict(e.stats)}


# ------------------------------------------------------------------ HTTP


def _now_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lmlab"
    timeout = 300  # seconds a connection may sit idle or stall a write

    ROUTES = {"/v1/models": ("GET",), "/v1/completions": ("POST",),
              "/v1/chat/completions": ("POST",), "/health": ("GET",)}

    @property
    def app(self) -> Server:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format, *args):
        if self.app.log:
            sys.stderr.write(f"lm serve: {self.address_string()} {format % args}\n")

    # -------------------------------------------------------------- dispatch

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            allowed = self.ROUTES.get(path)
            if allowed is None and path.startswith("/v1/models/"):
                allowed = ("GET",)
            if allowed is None:
                raise ApiError(404, f"no such endpoint: {method} {path}", "not_found")
            if method not in allowed:
                raise ApiError(405, f"{path} takes {' or '.join(allowed)}, not {method}",
                               "method_not_allowed", headers={"Allow": ", ".join(allowed)})
            if path == "/health":
                self._json(200, self.app.snapshot)
            elif path == "/v1/models":
                self._json(200, {"object": "list", "data": [self._model()]})
            elif path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                if name != self.app.name:
                    raise ApiError(404, f"the model '{name}' does not exist",
                                   "model_not_found", "model")
                self._json(200, self._model())
            else:
                self._completion(chat=path == "/v1/chat/completions")
        except ApiError as e:
            self._json(e.status, e.body(), e.headers)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError,
                _ClientGone):
            self.close_connection = True

    def _model(self) -> dict:
        e = self.app.engine
        return {"id": self.app.name, "object": "model", "created": self.app.created,
                "owned_by": "lmlab", "max_model_len": e.max_seq_len}

    # -------------------------------------------------------------- bodies

    def _body(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or \
                self.headers.get("Content-Length") is None:
            self.close_connection = True
            raise ApiError(411, "a request body needs a Content-Length", "length_required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "Content-Length is not a number", "invalid_header") from None
        if length > self.app.limits.max_body_bytes:
            if length <= DRAIN_BYTES:  # read past it: the connection stays usable
                for at in range(0, length, 1 << 16):
                    self.rfile.read(min(1 << 16, length - at))
            else:
                self.close_connection = True
            raise ApiError(413, f"the request body is {length} bytes; the server takes at "
                                f"most {self.app.limits.max_body_bytes}", "body_too_large")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON ({e})", "invalid_json") from None

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, obj) -> None:
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
                    + b"\n\n")

    def _gone(self) -> bool:
        """The client closed its end (readable, and nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _next(self, out: queue.Queue):
        """The next message from the engine thread, checking on the client meanwhile."""
        while True:
            try:
                return out.get(timeout=0.25)
            except queue.Empty:
                if self._gone():
                    raise _ClientGone() from None

    # -------------------------------------------------------------- completions

    def _requests(self, spec: Spec) -> list[Request]:
        app, loaded = self.app, self.app.loaded
        if spec.chat:
            if loaded.template is None:
                raise ApiError(400, f"the model '{app.name}' has no chat template (its "
                                    "tokenizer ships none): use /v1/completions",
                               "no_chat_template")
            encoded = [loaded.chat(list(spec.prompts[0]), "messages")]
        else:
            encoded = [loaded.prompt(p) for p in spec.prompts]
        seed = secrets.randbelow(INT32 - len(encoded)) if spec.seed is None else spec.seed
        out = []
        for i, (ids, stops) in enumerate(encoded):
            room = app.engine.max_seq_len - len(ids)
            max_new = spec.max_tokens if spec.max_tokens is not None else max(
                1, min(app.limits.max_tokens, room))
            out.append(Request(tuple(ids), max_new_tokens=max_new,
                               temperature=spec.temperature, top_k=spec.top_k,
                               top_p=spec.top_p, seed=seed + i, stop_ids=tuple(stops),
                               stop_strings=spec.stop, n=spec.n, id=next(app._ids)))
        return out

    def _completion(self, chat: bool) -> None:
        app = self.app
        spec = parse(self._body(), chat=chat, model=app.name, limits=app.limits)
        try:
            requests = self._requests(spec)
        except DataError as e:  # the chat template failed on these messages
            raise ApiError(400, str(e), "invalid_value", "messages") from None
        app.admit(sum(r.n for r in requests))
        out: queue.Queue = queue.Queue()
        app.inbox.put(("submit", requests, out))
        finished = False
        try:
            reply = out.get()
            if reply[0] == "error":
                finished = True  # (the engine thread dropped them)
                raise reply[1]
            head = {"id": _now_id("chatcmpl" if chat else "cmpl"),
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": app.name}
            if spec.stream:
                self._stream(spec, requests, out, head)
            else:
                self._whole(spec, requests, out, head)
            finished = True
        finally:
            if not finished:
                app.inbox.put(("cancel", [r.id for r in requests]))

    def _results(self, requests: list[Request], out: queue.Queue, on_token=None) -> dict:
        """Wait for every request's result (events for tokens go to on_token)."""
        results: dict = {}
        while len(results) < len(requests):
            msg = self._next(out)
            if msg[0] == "error":
                raise msg[1]
            e = msg[1]
            if e.result is not None:
                results[e.id] = e.result
            elif on_token is not None:
                on_token(e)
        return results

    @staticmethod
    def _usage(requests: list[Request], results: dict) -> dict:
        prompt = sum(results[r.id].prompt_tokens for r in requests)
        completion = sum(len(c.tokens) for r in requests for c in results[r.id].completions)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _whole(self, spec: Spec, requests: list[Request], out: queue.Queue, head: dict):
        results = self._results(requests, out)
        choices = []
        for i, r in enumerate(requests):
            for j, c in enumerate(results[r.id].completions):
                choice = {"index": i * spec.n + j, "logprobs": None,
                          "finish_reason": c.finish_reason}
                if spec.chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                choices.append(choice)
        self._json(200, {**head, "choices": choices, "usage": self._usage(requests, results)})

    def _stream(self, spec: Spec, requests: list[Request], out: queue.Queue, head: dict):
        head = {**head, "object": "chat.completion.chunk" if spec.chat else "text_completion"}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        decode = self.app.loaded.tokenizer.decode
        index = {(r.id, j): i * spec.n + j for i, r in enumerate(requests) for j in range(r.n)}
        texts = {k: _Text(decode, spec.stop) for k in index}

        def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False):
            if spec.chat:
                delta = {"role": "assistant", "content": ""} if role else \
                    {} if text is None else {"content": text}
                choice = {"index": i, "delta": delta}
            else:
                choice = {"index": i, "text": text or ""}
            choice.update(logprobs=None, finish_reason=finish)
            self._event({**head, "choices": [choice]})

        if spec.chat:
            for i in sorted(index.values()):
                chunk(i, None, role=True)
        results: dict = {}
        while len(results) < len(requests):
            msgs = [self._next(out)]
            while True:  # what else has come: one delta per sample
                try:
                    msgs.append(out.get_nowait())
                except queue.Empty:
                    break
            changed = []
            for msg in msgs:
                if msg[0] == "error":
                    self._event({"error": msg[1].body()["error"]})
                    self._event(b"[DONE]")
                    self._chunk(b"")
                    return
                e = msg[1]
                if e.result is not None:
                    results[e.id] = e.result
                else:
                    texts[e.id, e.sample].tokens.append(e.token)
                    changed.append((e.id, e.sample))
            for key in dict.fromkeys(changed):
                if key[0] not in results and (delta := texts[key].delta()):
                    chunk(index[key], delta)
            for rid in dict.fromkeys(e.id for m in msgs if m[0] == "event" and
                                     (e := m[1]).result is not None):
                for j, c in enumerate(results[rid].completions):
                    rest = texts[rid, j].final(c.text or "")
                    if rest:
                        chunk(index[rid, j], rest)
                    chunk(index[rid, j], None, c.finish_reason)
        if spec.include_usage:
            self._event({**head, "choices": [], "usage": self._usage(requests, results)})
        self._event(b"[DONE]")
        self._chunk(b"")
