"""`lm eval`: a run's validation loss and bits-per-byte; with --lengths / --task passkey /
--set, the long-context evaluations (lm/evals): loss by length and position, passkey
retrieval, with eval-time attention / RoPE-scaling overrides; with --tasks, downstream
tasks through lm-evaluation-harness (lm/evals/harness.py, lm/evals/downstream.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lm.cli.command import Command, overrides_option


def arguments(p) -> None:
    p.add_argument("--run", default="", help="run directory (an `lm import hf` run too)")
    p.add_argument("--step", type=int, default=None,
                   help="the checkpoint step to evaluate (default: the newest)")
    p.add_argument("--tasks", default="", help="lm-evaluation-harness tasks, e.g. "
                   "hellaswag,arc_easy or the embedded shakespeare_next_line (offline: their "
                   "data must be on disk)")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: examples in context "
                   "(default: each task's own)")
    p.add_argument("--limit", type=int, default=None, help="--tasks: documents per task")
    p.add_argument("--batch-size", type=int, default=8, help="--tasks: rows per forward")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="--tasks: a folder of harness YAML tasks (repeatable)")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    p.add_argument("--batches", type=int, default=0, help="0 = whole validation split "
                   "(with --lengths: 0 = 4 batches per length)")
    p.add_argument("--task", choices=("loss", "passkey"), default="loss")
    p.add_argument("--lengths", default="", help="e.g. 256,1024,4096: loss per length and "
                   "by position (with --task passkey: the prompt lengths)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="--task passkey: where the "
                   "key sits, as fractions of the filler")
    p.add_argument("--trials", type=int, default=20, help="--task passkey: keys per cell")
    p.add_argument("--seed", type=int, default=0, help="--task passkey: the keys and filler")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="--lengths: tokens per batch (0 = the run's batch_size x seq_len)")
    p.add_argument("--plot", default="", metavar="PNG", help="write the curve / heat map here")
    p.add_argument("--json", default="", metavar="PATH", help="also write the results as JSON")
    overrides_option(p, "eval-time model knob, e.g. --set model.attention.window=256 --set "
                        "model.attention.sinks=4 (Λ mask), --set model.rope_scaling.type=yarn")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="a LoRA / DyLoRA run's adapters up to this rank (0 = all)")


def evaluate(args) -> int:
    from lm.errors import ConfigError
    if args.list_tasks:
        return list_tasks(args)
    if not args.run:
        raise ConfigError("lm eval: --run DIR is required")
    if args.tasks:
        if args.lengths or args.task != "loss" or args.overrides:
            raise ConfigError("lm eval --tasks does not combine with --lengths / --task / --set")
        return downstream(args)
    if args.lengths or args.task != "loss" or args.overrides:
        if args.lora_rank:
            from lm.errors import ConfigError
            raise ConfigError("lm eval --lora-rank works with the plain loss evaluation "
                              "only (not with --lengths / --task / --set)")
        return long_context(args)
    from lm.data import eval_batches
    from lm.train.loop import evaluate
    from lm.train.param_source import restore_for_inference
    run, params, step = restore_for_inference(args.run, lora_rank=args.lora_rank, step=args.step)
    batches = eval_batches(run.cfg.data, run.tokenizer, run.cfg.batch_size, args.batches)
    result = evaluate(run.pieces, run.pieces.eval_step(), params, batches, run.tokenizer)
    print(json.dumps({"step": step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                      "batches": len(batches)}))
    return 0


def long_context(args) -> int:
    """Loss per length (and by position), or passkey retrieval per length and depth."""
    from lm.config import validate
    from lm.errors import ConfigError
    from lm.evals.lengths import loss_by_length, parse_lengths, plot_loss_by_position
    from lm.evals.overrides import check_keys, eval_time_config
    from lm.train.param_source import restore_for_inference
    lengths = parse_lengths(args.lengths) if args.lengths else []
    if args.task == "loss" and not lengths:
        raise ConfigError("lm eval --set needs --lengths (or --task passkey)")
    if args.batches < 0:
        raise ConfigError(f"--batches must be >= 0, got {args.batches}")
    check_keys(args.overrides)  # before the run is read
    run, params, step = restore_for_inference(args.run, step=args.step)
    validate(eval_time_config(run.cfg, args.overrides))  # bad values: one line, now
    if args.task == "loss":
        results = loss_by_length(run, params, lengths, args.overrides,
                                 max_batches=args.batches or 4, batch_tokens=args.batch_tokens)
        for r in results:
            print(json.dumps({"step": step, "length": r["length"], "val_loss": r["loss"],
                              "tokens": r["tokens"]}))
        report = {"step": step, "overrides": args.overrides, "lengths": results}
        if args.plot:
            path = plot_loss_by_position(results, args.plot,
                                         trained_length=run.cfg.data.seq_len,
                                         title=" ".join(args.overrides) or "loss by position")
            print(f"wrote {path}", file=sys.stderr)
    else:
        from lm.evals.passkey import parse_depths, plot_heatmap, run_passkey
        depths = parse_depths(args.depths)
        if args.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {args.trials}")
        report = run_passkey(run, params, lengths or [run.cfg.data.seq_len], depths,
                             args.overrides, trials=args.trials, seed=args.seed)
        report["step"] = step
        for cell in report["cells"]:
            print(json.dumps(cell))
        if args.plot:
            print(f"wrote {plot_heatmap(report, args.plot)}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def list_tasks(args) -> int:
    from lm.evals.downstream import task_manager
    for name in sorted(task_manager(args.include_path).all_tasks):
        print(name)
    return 0


def downstream(args) -> int:
    """Harness tasks on a run's checkpoint: the harness's table, its results dictionary
    (--json) and the scores kept in the run dir (<run>/evals/tasks-step<N>.json)."""
    from lm.errors import ConfigError
    from lm.evals import downstream as ds
    ds.go_offline()
    tasks = ds.parse_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    manager = ds.task_manager(args.include_path)
    ds.load_tasks(manager, tasks)  # bad names, missing data: one line before the model loads
    from lm.evals.harness import HarnessLM
    from lm.train.param_source import restore_for_inference
    run, params, step = restore_for_inference(args.run, lora_rank=args.lora_rank, step=args.step)
    print(f"evaluating {args.run} at checkpoint step {step}", file=sys.stderr, flush=True)
    lm = HarnessLM(run, params, batch_size=args.batch_size)
    results = ds.evaluate_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                manager=manager, checked=True)
    print(ds.table(results))
    kept = ds.record(args.run, step, results["scores"],
                     {"num_fewshot": args.num_fewshot, "limit": args.limit})
    print(f"scores kept in {kept}", file=sys.stderr)
    if args.json:
        from lm_eval.utils import handle_non_serializable
        body = {k: v for k, v in results.items() if k != "samples"}
        Path(args.json).write_text(json.dumps(body, indent=2, default=handle_non_serializable))
    return 0


COMMANDS = [Command("eval", "validation loss and bits-per-byte of a run", arguments, evaluate)]
