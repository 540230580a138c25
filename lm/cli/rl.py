"""`lm rl`: reinforcement learning with verifiable rewards (GRPO) from a policy run
(lm/post/rl.py; docs/rl.md)."""

from __future__ import annotations

from lm.cli.command import Command, config_options, load_config


def rl_arguments(p) -> None:
    config_options(p)
    p.add_argument("--run-dir", default="", help="run directory (default: runs/<name>)")
    p.add_argument("--init-from", default="", metavar="RUN_OR_HF_DIR",
                   help="the policy to start from (and the KL reference): an lmlab run or a "
                        "Hugging Face model dir; the same as --set init_from=...")
    p.add_argument("--write-sft", default="", metavar="FILE.jsonl",
                   help="write --sft-records prompt/response records of rl.task (for `lm "
                        "train --set data.format=instruction`, the warm start) and exit")
    p.add_argument("--sft-records", type=int, default=2000, help="records --write-sft writes")


def rl(args) -> int:
    if args.write_sft:
        from lm.config import resolve
        from lm.errors import ConfigError
        from lm.post.rl_tasks import write_sft_jsonl
        if args.sft_records < 1:
            raise ConfigError(f"lm rl --sft-records must be >= 1, got {args.sft_records}")
        cfg = resolve(args.config, list(args.overrides))
        path = write_sft_jsonl(args.write_sft, cfg.rl.task, cfg.rl.size, args.sft_records,
                               cfg.seed)
        print(f"wrote {args.sft_records} {cfg.rl.task} records to {path}")
        return 0
    from lm.post.rl import train_rl
    cfg = load_config(args)
    return train_rl(cfg, args.run_dir or f"runs/{cfg.name}")


COMMANDS = [Command("rl", "reinforcement learning with verifiable rewards (GRPO) on a "
                    "synthetic task", rl_arguments, rl)]
