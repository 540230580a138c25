"""`lm train` (one run) and `lm train-group` (trials batched as one program)."""

from __future__ import annotations

import json

from lm.cli.command import Command, config_options, load_config


def train_arguments(p) -> None:
    config_options(p)
    p.add_argument("--run-dir", default="", help="run directory (default: runs/<name>)")
    p.add_argument("--init-from", default="", metavar="RUN_OR_HF_DIR",
                   help="start from these weights (an lmlab run or a Hugging Face model "
                        "dir), fresh optimizer; the same as --set init_from=...")
    p.add_argument("--distill-from", default="", metavar="TEACHER",
                   help="distil from this teacher (an lmlab run or a Hugging Face model dir "
                        "with the same tokenizer; the distill section sets the loss); the "
                        "same as --set distill.teacher=...")


def train(args) -> int:
    from lm.train.loop import train
    cfg = load_config(args)
    return train(cfg, args.run_dir or f"runs/{cfg.name}")


def group_arguments(p) -> None:
    p.add_argument("group", help="<workdir>/groups/<group>.json")


def train_group(args) -> int:
    """Trials batched as one program (`lm sweep --batch` writes the group file)."""
    from pathlib import Path

    from lm.config import ConfigError, apply_overrides, load_config_file
    from lm.train.trials import train_group
    try:
        spec = json.loads(Path(args.group).read_text())
        base = load_config_file(spec["base_config"])
        trials = spec["trials"]
        cfgs = [apply_overrides(base, t["overrides"]) for t in trials]
        dirs = [t["run_dir"] for t in trials]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"train-group {args.group}: not a group file ({e})") from None
    codes = train_group(cfgs, dirs)
    signalled = [c for c in codes if c > 128]
    return signalled[0] if signalled else max(codes)


COMMANDS = [
    Command("train", "train (or resume) a run", train_arguments, train),
    Command("train-group", "train the trials of a group file as one program (written by "
            "lm sweep --batch)", group_arguments, train_group),
]
