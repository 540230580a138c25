"""`lm serve`: an OpenAI-compatible HTTP server over the batched engine (lm/infer/server.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from lm.cli.command import (Command, engine_options, engine_settings, overrides_option,
                             run_option)


def arguments(p) -> None:
    run_option(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 "
                        "serves the network, with no authentication)")
    p.add_argument("--port", type=int, default=8000, help="0 = a free port (printed)")
    p.add_argument("--model-name", default="",
                   help="the model id clients name (default: the run directory's name)")
    engine_options(p, batch=8)
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="the largest max_tokens a request may ask for (400 beyond)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="the largest request body (413 beyond)")
    p.add_argument("--max-queued", type=int, default=64,
                   help="sequences (prompts x n) that may wait beyond the --batch being "
                        "decoded; a request beyond them gets 429")
    overrides_option(p, "eval-time model knob (as for lm sample)")


def _check(args) -> None:
    from lm.errors import ConfigError
    for flag, value, ok, want in (
            ("--port", args.port, 0 <= args.port < 65536, "in [0, 65535] (0 = a free one)"),
            ("--max-tokens-limit", args.max_tokens_limit, args.max_tokens_limit >= 1, ">= 1"),
            ("--max-body-bytes", args.max_body_bytes, args.max_body_bytes >= 1, ">= 1"),
            ("--max-queued", args.max_queued, args.max_queued >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"lm serve {flag} must be {want}, got {value}")


def serve(args) -> int:
    import signal

    from lm.errors import ConfigError
    from lm.evals.overrides import check_keys
    from lm.infer.load import load_engine
    from lm.infer.server import Limits, Server
    _check(args)
    options = engine_settings(args)
    check_keys(args.overrides)
    name = args.model_name or Path(args.run).resolve().name
    loaded = load_engine(args.run, args.overrides, slots=args.batch, pages=args.pages,
                         page_size=args.page_size, chat=True,
                         options=options)
    limits = Limits(max_tokens=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                    max_queued=args.max_queued)
    try:
        server = Server(loaded, name=name, host=args.host, port=args.port, limits=limits,
                        log=True)
    except OSError as e:
        raise ConfigError(f"lm serve: cannot listen on {args.host}:{args.port} "
                          f"({e.strerror})") from None

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    engine = loaded.engine
    chat = "with" if loaded.template is not None else "without"
    print(f"lm serve: {name} ({args.run} at checkpoint step {loaded.step}; batch "
          f"{engine.slots}, {engine.pool.pages} pages of {engine.page_size}; {chat} a chat "
          "template)", file=sys.stderr, flush=True)
    print(f"serving {name} at {server.url}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    print("lm serve: shut down", file=sys.stderr, flush=True)
    return 0


COMMANDS = [Command("serve", "serve a run over HTTP with an OpenAI-compatible API (the batched "
                             "engine: /v1/completions, /v1/chat/completions, streaming)",
                    arguments, serve)]
