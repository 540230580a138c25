"""LR warmup length vs LR sensitivity (Wortsman et al. 2023, section 3.4 and figure 8: a
longer warmup lowers LR sensitivity, more so for larger models), at the scale and in the
form of experiments/lr_sensitivity.py: its depth, steps, LR grid and seeds, baseline
architecture (no qk-norm, no z-loss), at its smallest and largest width, warmup 1% vs
25% of the 300 steps.

2 widths x 7 LRs x 2 warmups x 5 seeds = 140 trials; warmup, LR and seed are scalars of
one program, so each width is one batched group of 70 trials.

    lm sweep experiments/warmup_sensitivity.py --workdir runs/warmup_sensitivity
    lm analyze runs/warmup_sensitivity     # LR sensitivity per warmup and width, with intervals
    lm sweep experiments/warmup_sensitivity.py --workdir runs/warmup_smoke --smoke   # ~1 min
"""

from pathlib import Path

from lm.config import exec_python_file
from lm.sweep import Grid, Sweep, log_grid

_lr = exec_python_file(Path(__file__).with_name("lr_sensitivity.py"), "sweep spec")
STEPS = _lr.STEPS
WARMUPS = {"warmup_1pct": 0.01, "warmup_25pct": 0.25}
WIDTHS = {k: _lr.WIDTHS[k] for k in ("w32", "w128")}


def sweep(smoke: bool = False) -> Sweep:
    base = _lr.sweep(smoke=False)
    sizes, lrs, seeds = WIDTHS, log_grid(*_lr.LRS), _lr.SEEDS
    warmups = {k: max(1, round(f * STEPS)) for k, f in WARMUPS.items()}
    if smoke:
        sizes, lrs, seeds = {"w32": _lr.WIDTHS["w32"]}, [1e-2, 1.0], 2
        warmups = {"warmup_1pct": 1, "warmup_25pct": 2}
    return Sweep(
        overrides=base.overrides,
        smoke=base.smoke,
        sizes=sizes,
        arms={k: {"optim.warmup_steps": w} for k, w in warmups.items()},
        axes=[Grid("optim.lr", lrs)],
        seeds=seeds,
        batch=len(lrs) * len(warmups) * _lr.SEEDS,
    )
