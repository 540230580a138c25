"""LR warmup length vs LR sensitivity (Wortsman et al. 2023, section 3.4: a longer
warmup lowers LR sensitivity, more so for larger models), at the scale and in the form of
experiments/lr_sensitivity.py: the same widths, depth, steps and LR grid, baseline
architecture (no qk-norm, no z-loss), warmup 1% / 5% / 25% of the 300 steps, 2 seeds.

3 widths x 7 LRs x 3 warmups x 2 seeds = 126 trials; warmup, LR and seed are scalars of
one program, so each width is one batched group of 42 trials.

    lm sweep experiments/warmup_sensitivity.py --workdir runs/warmup_sensitivity
    lm analyze runs/warmup_sensitivity     # LR sensitivity per warmup and width, with intervals
    lm sweep experiments/warmup_sensitivity.py --workdir runs/warmup_smoke --smoke   # ~1 min
"""

from lm.config import exec_python_file
from pathlib import Path

from lm.sweep import Grid, Sweep, log_grid

_lr = exec_python_file(Path(__file__).with_name("lr_sensitivity.py"), "sweep spec")
STEPS = _lr.STEPS
WARMUPS = {"warmup_1pct": 0.01, "warmup_5pct": 0.05, "warmup_25pct": 0.25}


def sweep(smoke: bool = False) -> Sweep:
    base = _lr.sweep(smoke=False)
    sizes, lrs = _lr.WIDTHS, log_grid(*_lr.LRS)
    warmups = {k: max(1, round(f * STEPS)) for k, f in WARMUPS.items()}
    if smoke:
        sizes, lrs = {"w32": _lr.WIDTHS["w32"]}, [1e-3, 1.0]
        warmups = {"warmup_1pct": 1, "warmup_25pct": 2}
    return Sweep(
        overrides=base.overrides,
        smoke=base.smoke,
        sizes=sizes,
        arms={k: {"optim.warmup_steps": w} for k, w in warmups.items()},
        axes=[Grid("optim.lr", lrs)],
        seeds=2,
        batch=42,
    )
