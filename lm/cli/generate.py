"""`lm generate`: many prompts through the batched engine (lm/infer), JSONL in and out."""

from __future__ import annotations

import json
import sys
import time

from lm.cli.command import (Command, engine_options, engine_settings, overrides_option,
                             run_option)


def arguments(p) -> None:
    run_option(p)
    p.add_argument("--in", dest="inp", required=True, metavar="PROMPTS.jsonl",
                   help='one request a line: {"prompt": TEXT} or, with --chat, {"messages": '
                        '[{"role": ..., "content": ...}, ...]}; optional "id" (copied to the '
                        'output) and "stop" (a string or a list of strings that end the text)')
    p.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="one line per request, in input order: text, prompt_tokens, "
                        "completion_tokens, finish_reason")
    p.add_argument("--chat", action="store_true",
                   help="render each line's messages with the run's chat template (and its "
                        "generation prompt); the reply ends at the template's end of turn")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0,
                   help="line i samples with seed + i: its text depends on nothing else")
    engine_options(p, batch=16)
    overrides_option(p, "eval-time model knob (as for lm sample)")


def _check(args) -> None:
    from lm.errors import ConfigError
    for flag, value, ok, want in (
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
            ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
            ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = off)"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1 = off)")):
        if not ok:
            raise ConfigError(f"lm generate {flag} must be {want}, got {value}")


def read_requests(path: str, chat: bool) -> list[dict]:
    """The lines of --in, checked: each a JSON object with "prompt" (a string) or, with
    --chat, "messages" (a list of {"role", "content"}). ConfigError names the line."""
    from lm.errors import ConfigError
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise ConfigError(f"lm generate --in {path}: {e.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"lm generate --in {path} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg})") from None
        key = "messages" if chat else "prompt"
        if not isinstance(rec, dict) or key not in rec:
            other = " (use --chat for messages)" if isinstance(rec, dict) and \
                "messages" in rec else ""
            raise ConfigError(f'{where}: needs a "{key}" field{other}')
        if chat and not (isinstance(rec["messages"], list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and
                isinstance(m.get("content"), str) for m in rec["messages"])):
            raise ConfigError(f'{where}: "messages" must be a list of {{"role": str, '
                              '"content": str}}')
        if not chat and not isinstance(rec["prompt"], str):
            raise ConfigError(f'{where}: "prompt" must be a string')
        stop = rec.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise ConfigError(f'{where}: "stop" must be a non-empty string or a list of them')
        out.append(dict(rec, stop=stop, line=n))
    if not out:
        raise ConfigError(f"lm generate --in {path}: no requests in it")
    return out


def generate(args) -> int:
    from lm.errors import ConfigError
    from lm.evals.overrides import check_keys
    from lm.infer import Request
    from lm.infer.load import load_engine
    _check(args)
    options = engine_settings(args)
    check_keys(args.overrides)
    records = read_requests(args.inp, args.chat)
    loaded = load_engine(args.run, args.overrides, slots=args.batch, pages=args.pages,
                         page_size=args.page_size, chat=args.chat,
                         options=options)
    engine, step, pages = loaded.engine, loaded.step, loaded.engine.pool.pages
    if args.chat and loaded.template is None:
        raise ConfigError(f"lm generate --chat: the run's tokenizer ({loaded.tokenizer.spec}) "
                          "has no chat template")
    for i, rec in enumerate(records):
        if args.chat:
            ids, stops = loaded.chat(rec["messages"], f"lm generate --in line {rec['line']}")
        else:
            ids, stops = loaded.prompt(rec["prompt"])
        try:
            engine.submit(Request(tuple(ids), max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed + i,
                                  stop_ids=tuple(stops), stop_strings=tuple(rec["stop"]), id=i))
        except ConfigError as e:
            raise ConfigError(f"lm generate --in {args.inp} line {rec['line']}: "
                              f"{str(e).removeprefix('engine: ')}") from None
    print(f"generating {len(records)} requests from {args.run} at checkpoint step {step} "
          f"(batch {args.batch}, {pages} pages of {args.page_size})", file=sys.stderr,
          flush=True)
    results, tokens, start, shown = {}, 0, time.perf_counter(), 0.0

    def progress() -> str:
        s = max(time.perf_counter() - start, 1e-9)
        return (f"generate: {len(results)}/{len(records)} requests, "
                f"{len(results) / s:.2f} requests/s, {tokens / s:.1f} tokens/s")

    for event in engine.run():
        if event.result is None:
            tokens += 1
            continue
        results[event.id] = event.result
        if time.perf_counter() - shown > 2.0:
            shown = time.perf_counter()
            print(progress(), file=sys.stderr, flush=True)
    print(progress() + f" in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            r = results[i]
            c = r.completions[0]
            line = {"index": i, **({"id": rec["id"]} if "id" in rec else {}), "text": c.text,
                    "prompt_tokens": r.prompt_tokens, "completion_tokens": len(c.tokens),
                    "finish_reason": c.finish_reason}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    import os
    os.replace(tmp, args.out)
    return 0


COMMANDS = [Command("generate", "generate text for a JSONL file of prompts with the batched "
                                "engine (paged K/V, continuous batching)", arguments, generate)]
