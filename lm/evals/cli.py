"""`lm eval --lengths ... | --task passkey`: the long-context evaluations of a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lm.config import ConfigError, validate


def run_eval(args) -> int:
    from lm.evals.lengths import loss_by_length, parse_lengths, plot_loss_by_position
    from lm.evals.overrides import check_keys, eval_time_config
    from lm.train.param_source import restore_for_inference
    lengths = parse_lengths(args.lengths) if args.lengths else []
    if args.task == "loss" and not lengths:
        raise ConfigError("lm eval --set needs --lengths (or --task passkey)")
    if args.batches < 0:
        raise ConfigError(f"--batches must be >= 0, got {args.batches}")
    check_keys(args.overrides)  # before the run is read
    run, params, step = restore_for_inference(args.run)
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
