"""`lm train | eval | sample | bench | data prepare`.

User-caused errors (bad config, bad data, missing run) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.py"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="Python config file with a config() function (default: configs/default.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.n_layers=4 (repeatable)")


def _load(args):
    from lm.config import resolve
    return resolve(args.config, args.overrides)


def _restore(run_dir: str):
    """(cfg, tokenizer, pieces, params) of the latest checkpoint in a run dir."""
    from lm import config as config_lib
    from lm.config import ConfigError
    from lm.data import load_tokenizer
    from lm.train.checkpoint import Checkpointer
    from lm.train.state import build

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConfigError(f"--run {run_dir}: no config.json there (not a run directory)")
    cfg = config_lib.from_json((run / "config.json").read_text())
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    pieces = build(cfg)
    ckpt = Checkpointer(run / "checkpoints", cfg.checkpoint_every, cfg.keep_checkpoints)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"--run {run_dir}: no checkpoint yet")
    state = ckpt.restore_params(step, pieces.abstract_state())
    ckpt.close()
    return cfg, tokenizer, pieces, state["params"], step


def cmd_train(args) -> int:
    from lm.train.loop import train
    cfg = _load(args)
    return train(cfg, args.run_dir or f"runs/{cfg.name}")


def cmd_eval(args) -> int:
    import jax

    from lm.data import eval_batches
    from lm.train.loop import evaluate
    from lm.train.step import make_eval_step
    cfg, tokenizer, pieces, params, step = _restore(args.run)
    batches = eval_batches(cfg.data, tokenizer, cfg.batch_size, args.batches)
    result = evaluate(jax.jit(make_eval_step(pieces.graphdef)), params, batches, tokenizer)
    print(json.dumps({"step": step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                      "batches": len(batches)}))
    return 0


def cmd_sample(args) -> int:
    from lm.sample import generate
    cfg, tokenizer, pieces, params, _ = _restore(args.run)
    prompt = [tokenizer.bos_id] + list(tokenizer.encode(args.prompt))
    outs = generate(pieces.graphdef, params, prompt, args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, num_samples=args.num_samples,
                    max_seq_len=cfg.model.max_seq_len, eos_id=tokenizer.eos_id)
    for i, ids in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tokenizer.decode(ids))
    return 0


def cmd_bench(args) -> int:
    from lm.bench import bench
    bench(_load(args), steps=args.steps)
    return 0


def cmd_data_prepare(args) -> int:
    from lm.data import prepare
    cfg = _load(args)
    stats = prepare(cfg.data, args.out)
    print(json.dumps(stats))
    print(f"prepared {args.out}; train on it with --set data.corpus={args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description="lmlab: train and study language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run")
    _config_args(p)
    p.add_argument("--run-dir", default="", help="run directory (default: runs/<name>)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="validation loss and bits-per-byte of a run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--batches", type=int, default=0, help="0 = whole validation split")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("bench", help="training throughput (tokens/s, MFU) of a config")
    _config_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("prepare", help="tokenize a corpus once into shards")
    _config_args(q)
    q.add_argument("--out", required=True)
    q.set_defaults(fn=cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lm.config import ConfigError
    from lm.data import DataError
    try:
        code = args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
