"""Throughput of the batched engine (lm/infer) against the loop of lm.sample.generate
(one prompt at a time, what `lm sample` called before it went through the engine) and,
optionally, transformers' `generate` on the same weights: N prompts of mixed length,
greedy, no stops; every side runs round by round, interleaved, after a warm-up round
that compiles every program (transformers' warm-up is one short batch: nothing to
compile). Prints requests/s and generated tokens/s (median over
rounds) and how many requests' tokens equal the reference's (the first engine row).

Two models, both random and built in process:
  --preset small (default)  d_model 256, 4 layers, vocab 4096, 8-128 prompt tokens and
                            16-48 new; the table of docs/inference.md before the 100M one
  --preset 100m             a Llama-like ~110M model (d_model 768, 12 layers, 12 heads /
                            4 KV heads, SwiGLU 2048, vocab 32000, tied embeddings),
                            16-256 prompt tokens, 32 new each
(a shape or length flag, when given, overrides the preset's value).

transformers (--hf-python PY, default $LMLAB_HF_PYTHON; --skip-hf to leave it out): the
model is written as an HF Llama directory with lmlab's exporter (lm/interop/hf_export
write_model, what `lm export hf` writes) and a worker in that interpreter loads it once,
then generates when asked: batches of B prompts in input order, left-padded, greedy,
float32, timed in the worker.

Engine options: --shared-prefix N puts the same N random tokens before every prompt (a
few-shot prefix); --no-hydragen / --no-pack / --engine-kwargs JSON pass hydragen=False /
pack_prefill=False / any other constructor option (share_prefixes, prefill_tokens, ...)
to Engine; --ab adds the engine rows with the defaults too, interleaved.

    python benchmarks/engine_throughput.py --prompts 64 --rounds 2
    python benchmarks/engine_throughput.py --preset 100m --prompts 64 --rounds 1 \\
        --hf-python ~/.cache/lmlab/hfref-py311/bin/python
    python benchmarks/engine_throughput.py --preset 100m --prompts 256 --shared-prefix 1024 \\
        --no-hydragen --ab --skip-hf --skip-loop
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "small": dict(d_model=256, layers=4, heads=4, kv_heads=0, mlp_hidden=0, vocab=4096,
                  max_seq_len=256, min_len=8, max_len=128, new_min=16, new_max=48),
    "100m": dict(d_model=768, layers=12, heads=12, kv_heads=4, mlp_hidden=2048, vocab=32000,
                 max_seq_len=1024, min_len=16, max_len=256, new_min=32, new_max=32),
}
PAD = 0  # the HF side's padding id (attention-masked, never a prompt token)


# ------------------------------------------------------------------ transformers worker


def hf_worker(model_dir: str, threads: int) -> None:
    """Runs in the transformers interpreter: loads the directory once, then answers one
    JSON line per request on stdin ({"batch": B, "work": [[prompt, new], ...]}) with
    {"seconds", "tokens"} on stdout."""
    import torch
    import transformers
    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).eval()
    print(json.dumps({"ready": transformers.__version__}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        work, b = ask["work"], ask["batch"]
        out = []
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(work), b):
                chunk = work[i:i + b]
                width = max(len(p) for p, _ in chunk)
                new = max(n for _, n in chunk)
                ids = torch.tensor([[PAD] * (width - len(p)) + p for p, _ in chunk])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
                gen = model.generate(ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=new, min_new_tokens=new,
                                     eos_token_id=None, pad_token_id=PAD)
                out += [row[width:width + n].tolist() for row, (_, n) in zip(gen, chunk)]
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "tokens": out}), flush=True)


class HFSide:
    def __init__(self, python: str, model_dir: Path, threads: int):
        self.proc = subprocess.Popen(
            [python, __file__, "--hf-worker", str(model_dir), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self._read()["ready"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the transformers worker died (its stderr is above)")
        return json.loads(line)

    def run(self, batch: int, work) -> tuple[float, list]:
        self.proc.stdin.write(json.dumps({"batch": batch, "work": work}) + "\n")
        self.proc.stdin.flush()
        got = self._read()
        return got["seconds"], got["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------ lmlab


def engine_kwargs(args) -> dict:
    """The Engine constructor options asked for (an unknown one: one line, exit 2)."""
    from lm.infer import Engine
    asked = json.loads(args.engine_kwargs) if args.engine_kwargs else {}
    if args.no_hydragen:
        asked["hydragen"] = False
    if args.no_pack:
        asked["pack_prefill"] = False
    have = inspect.signature(Engine.__init__).parameters
    unknown = [k for k in asked if k not in have]
    if unknown:
        print(f"error: Engine has no option {', '.join(unknown)}", file=sys.stderr)
        raise SystemExit(2)
    return asked


def build(args):
    from flax import nnx

    from lm.config import ModelConfig
    from lm.model import Transformer
    from lm.model.mixers.mlp import MLPConfig
    mlp = {}
    if args.mlp_hidden:  # SwiGLU of this width (Llama's MLP)
        mlp = dict(mlp=MLPConfig(activation="swiglu", ratio=args.mlp_hidden / args.d_model))
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads,
                      max_seq_len=args.max_seq_len, init_std=0.1, **mlp)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    return cfg, graphdef, nnx.to_pure_dict(params)


def export(cfg, params, out: Path) -> str:
    """The model as an HF directory, through lmlab's exporter (`lm export hf`'s)."""
    from types import SimpleNamespace

    from lm.interop.hf_export import write_model
    run_cfg = SimpleNamespace(model=cfg, data=SimpleNamespace(tokenizer=""))
    tok = SimpleNamespace(bos_id=1, eos_id=2, pad_id=PAD)
    return write_model(out, run_cfg, tok, params, "llama")


def count_params(params) -> int:
    import jax
    return sum(x.size for x in jax.tree.leaves(params))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--prompts", type=int, default=32)
    for flag in ("min-len", "max-len", "new-min", "new-max", "d-model", "layers", "heads",
                 "kv-heads", "mlp-hidden", "vocab", "max-seq-len"):
        p.add_argument(f"--{flag}", type=int, help="default: the preset's")
    p.add_argument("--batches", default="1,8,32", help="engine slots / HF batch sizes")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (after a warm-up one)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="every prompt starts with the same N tokens")
    p.add_argument("--no-hydragen", action="store_true", help="Engine(hydragen=False)")
    p.add_argument("--no-pack", action="store_true", help="Engine(pack_prefill=False)")
    p.add_argument("--engine-kwargs", metavar="JSON", help='e.g. \'{"hydragen": false}\'')
    p.add_argument("--ab", action="store_true",
                   help="with engine options: also the engine rows without them")
    p.add_argument("--skip-loop", action="store_true", help="leave out the lm.sample loop")
    p.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    p.add_argument("--hf-python", default=os.environ.get("LMLAB_HF_PYTHON"),
                   help="an interpreter with torch + transformers (default $LMLAB_HF_PYTHON)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads on the HF side")
    args = p.parse_args()
    if args.hf_worker:
        return hf_worker(args.hf_worker, args.threads)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    need = args.shared_prefix + args.max_len + args.new_max
    if need > args.max_seq_len:
        args.max_seq_len = 1 << (need - 1).bit_length()
        print(f"max_seq_len raised to {args.max_seq_len} (prefix + prompt + new tokens)",
              file=sys.stderr)

    import jax

    from lm.infer import Engine, Request
    from lm.sample import generate

    cfg, graphdef, params = build(args)
    rng = random.Random(0)
    prefix = [rng.randrange(3, args.vocab) for _ in range(args.shared_prefix)]
    work = [(prefix + [rng.randrange(3, args.vocab)
                       for _ in range(rng.randint(args.min_len, args.max_len))],
             rng.randint(args.new_min, args.new_max)) for _ in range(args.prompts)]
    batches = [int(b) for b in args.batches.split(",")]
    pages_per_seq = -(-min(need, args.max_seq_len) // args.page_size)
    options = engine_kwargs(args)

    def loop():
        return [generate(graphdef, params, prompt, new, temperature=0.0,
                         max_seq_len=args.max_seq_len)[0] for prompt, new in work]

    def engine(slots, kwargs):
        def run():
            e = Engine(graphdef, params, slots=slots, pages=slots * pages_per_seq + 1,
                       page_size=args.page_size, **kwargs)
            return [r.completions[0].tokens for r in e.generate(
                Request(tuple(prompt), max_new_tokens=new) for prompt, new in work)]
        return run

    sides = {}
    if not args.skip_loop:
        sides["lm.sample loop"] = loop
    tag = ", ".join(f"{k}={v}" for k, v in options.items())
    for b in batches:
        if not options or args.ab:
            sides[f"engine batch {b}"] = engine(b, {})
        if options:
            sides[f"engine batch {b} ({tag})"] = engine(b, options)
    hf, version = None, None
    if not args.skip_hf and not args.mlp_hidden:
        print("transformers side left out: the model has lmlab's GELU MLP, which no HF "
              "family expresses (--preset 100m or --mlp-hidden N give a Llama)",
              file=sys.stderr)
    elif not args.skip_hf:
        if not args.hf_python:
            raise SystemExit("transformers side: give --hf-python (or $LMLAB_HF_PYTHON), "
                             "or --skip-hf")
        folder = Path(tempfile.mkdtemp(prefix="engine_throughput_hf_"))
        print(f"exported {export(cfg, params, folder)}", file=sys.stderr)
        hf = HFSide(os.path.expanduser(args.hf_python), folder, args.threads)
        version = hf.version
        for b in batches:  # (torch compiles nothing: its warm-up is one short batch)
            sides[f"hf batch {b}"] = (lambda b: lambda warm=False: hf.run(
                b, [(prompt, 2) for prompt, _ in work[:b]] if warm else work))(b)

    times = {name: [] for name in sides}
    outputs = {}
    for r in range(args.rounds + 1):  # round 0: warm-up (compiles), not timed
        for name, fn in sides.items():
            start = time.perf_counter()
            out = fn(warm=True) if name.startswith("hf ") and not r else fn()
            jax.block_until_ready(out)
            seconds = time.perf_counter() - start
            if name.startswith("hf "):
                seconds, out = out  # timed in the worker: no pipe, no JSON
            if r:
                times[name].append(seconds)
            outputs[name] = out
            print(f"round {r} {name}: {seconds:.2f}s", file=sys.stderr, flush=True)
    if hf is not None:
        hf.close()
        shutil.rmtree(folder, ignore_errors=True)

    reference = next(n for n in sides if n.startswith("engine"))
    want = outputs[reference]
    tokens = sum(len(o) for o in want)
    lens = [len(prompt) for prompt, _ in work]
    print(f"model d_model={args.d_model} layers={args.layers} heads={args.heads}/"
          f"{args.kv_heads or args.heads} mlp={args.mlp_hidden or '4x gelu'} "
          f"vocab={args.vocab} max_seq_len={args.max_seq_len} "
          f"({count_params(params) / 1e6:.1f}M params, float32); {args.prompts} prompts of "
          f"{min(lens)}-{max(lens)} tokens"
          f"{f' (a shared {args.shared_prefix}-token prefix)' if prefix else ''}, "
          f"{args.new_min}-{args.new_max} new each ({tokens} generated), greedy; "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cores"
          f"{f', transformers {version} with {args.threads} threads' if version else ''}; "
          f"median of {args.rounds} rounds; same tokens: requests equal to {reference!r}")
    print(f"| {'':34} | {'seconds':>8} | {'requests/s':>10} | {'tokens/s':>9} | "
          f"{'same tokens':>11} |")
    print(f"|{'-' * 36}|{'-' * 9}:|{'-' * 11}:|{'-' * 10}:|{'-' * 12}:|")
    for name in sides:
        s = statistics.median(times[name])
        same = sum(a == b for a, b in zip(outputs[name], want))
        print(f"| {name:34} | {s:8.2f} | {args.prompts / s:10.2f} | {tokens / s:9.1f} | "
              f"{f'{same}/{args.prompts}':>11} |")


if __name__ == "__main__":
    main()
