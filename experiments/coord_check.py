"""Coordinate check: SP vs muP over a width ladder, the first steps of Adam(W) (or any
direction: --optim). Writes WORKDIR/coord_check.json; `lm analyze --coord-check WORKDIR`
prints the table (width x step x quantity), the log-log slopes against width and writes
coord_check.png.

    python experiments/coord_check.py --workdir runs/coord                # 64 .. 1024
    python experiments/coord_check.py --workdir runs/coord_smoke --smoke  # ~1 min
    lm analyze --coord-check runs/coord
"""

from __future__ import annotations

import argparse
import sys
import time

from lm.analysis import coord_check
from lm.config import TrainConfig, apply_overrides, validate

BASE = ["model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "data.seq_len=64",
        "batch_size=8", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.weight_decay=0", "optim.clip_norm=0", "data.prefetch=0"]
SMOKE = ["model.n_heads=2", "model.max_seq_len=16", "data.seq_len=16", "batch_size=4"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--widths", default="64,128,256,512,1024")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--optim", default="adamw")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--smoke", action="store_true", help="widths 16, 32, 64 and 3 steps")
    args = p.parse_args(argv)
    widths = [16, 32, 64] if args.smoke else [int(w) for w in args.widths.split(",")]
    steps = 3 if args.smoke else args.steps
    overrides = BASE + (SMOKE if args.smoke else []) + [
        f"optim.lr={args.lr}", f"optim.name={args.optim}", f"steps={steps}", *args.set]
    cfg = validate(apply_overrides(TrainConfig(), overrides))
    t0 = time.perf_counter()
    rows = coord_check.run(cfg, widths, steps=steps)
    meta = {"optim.name": args.optim, "optim.lr": args.lr, "steps": steps,
            "widths": widths, "base_width": min(widths), "overrides": " ".join(args.set),
            "seconds": round(time.perf_counter() - t0, 1)}
    print(f"wrote {coord_check.save(rows, args.workdir, meta)}")
    print(coord_check.report(args.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
