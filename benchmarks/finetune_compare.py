"""LoRA vs full fine-tuning from one base run: trainable params, optimizer state bytes,
tokens/s, checkpoint bytes and final validation loss. Prints a markdown table.

    python benchmarks/finetune_compare.py --workdir /tmp/ftcmp --base-steps 200 --steps 100

The base is the default config (`lm train`, its step count cut by --base-steps); both
fine-tunes continue on the embedded corpus (`--init-from` the base, fresh optimizer,
constant LR) for --steps steps: one updates every weight, the other only LoRA adapters
on attention and MLP weights (--rank, alpha = 2 * rank).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def lm(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lm.cli", *args], capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"lm {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def checkpoint_bytes(run: Path) -> int:
    """Bytes on disk of the run's newest checkpoint (a LoRA one holds no base)."""
    newest = max((p for p in (run / "checkpoints").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())


def describe(run: Path, stdout: str, full_params: int) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    speeds = [r["tokens_per_s"] for r in map(json.loads, (run / "metrics.jsonl").open())
              if r.get("kind") == "train" and "tokens_per_s" in r][1:]  # after compiling
    lora = re.search(r"LoRA: ([\d,]+) trainable params .*optimizer state ([\d.]+) MiB", stdout)
    state = re.search(r"params \+ optimizer ([\d.]+) MiB", stdout)
    return {"trainable": int(lora.group(1).replace(",", "")) if lora else full_params,
            "optimizer MiB": float(lora.group(2)) if lora else None,
            "params+optimizer MiB": float(state.group(1)),
            "tokens/s": sum(speeds) / max(len(speeds), 1),
            "checkpoint MiB": checkpoint_bytes(run) / 2**20,
            "final val loss": summary["final_val_loss"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--base-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    work = Path(args.workdir)
    base = work / "base"
    if not (base / "summary.json").is_file() or json.loads(
            (base / "summary.json").read_text())["status"] != "completed":
        lm("train", "--run-dir", str(base), *sets(f"steps={args.base_steps}", "eval_batches=8"))
    base_summary = json.loads((base / "summary.json").read_text())
    common = sets(f"steps={args.steps}", "eval_batches=8", f"eval_every={args.steps}",
                  "optim.schedule=constant", "optim.warmup_steps=10", f"optim.lr={args.lr}",
                  "log_every=10", "seed=1")
    rows = {}
    for name, extra in [("full fine-tune", []),
                        (f"LoRA r={args.rank}", sets(f"lora.rank={args.rank}",
                                                     f"lora.alpha={2 * args.rank}",
                                                     "lora.targets=*.mixer.w[qkvo],*.channel.w_*"))]:
        run = work / name.split()[0].lower()
        out = lm("train", "--init-from", str(base), "--run-dir", str(run), *common, *extra)
        rows[name] = describe(run, out, base_summary["params"])
    print(f"base: default config, {args.base_steps} steps, final val loss "
          f"{base_summary['final_val_loss']:.4f}, {base_summary['params']:,} params")
    keys = list(next(iter(rows.values())))
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, r in rows.items():
        cells = [f"{v:,}" if isinstance(v, int) else "—" if v is None else f"{v:.4g}"
                 for v in r.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
