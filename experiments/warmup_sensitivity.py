"""LR warmup length vs LR sensitivity (Wortsman et al. 2023, section 3.4 and figure 8: a
longer warmup lowers LR sensitivity, more so for larger models), at the scale and in the
form of experiments/lr_sensitivity.py: its depth, steps, LR grid and seeds, baseline
architecture (no qk-norm, no z-loss), at its two smaller widths (32, 64), warmup 1% vs
25% of the 300 steps.

2 widths x 7 LRs x 2 warmups x 5 seeds = 140 trials; warmup, LR and seed are scalars of
one program, so each width is one batched group of 70 trials; 7m44s on a 2-core CPU
(measured).

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
WIDTHS = {k: _lr.WIDTHS[k] for k in ("w32", "w64")}


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


PAPER = ("Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training "
         "instabilities (arXiv:2309.14322), section 3.4 and figure 8")


def findings(sweep):
    """A longer warmup lowers LR sensitivity, more so for larger models."""
    from lm.analysis import findings as f
    from lm.analysis import seeds, stability

    runs = sweep.finished
    arms = set(runs["arm"]) if "arm" in runs else set()
    if sweep.seed is None or not {"warmup_1pct", "warmup_25pct"} <= arms:
        return [f.Finding("A longer warmup lowers LR sensitivity", "needs both warmups and "
                          "seeds", f.NOT_RESOLVED)]
    per_seed, _ = stability.lr_sensitivity_over_seeds(runs, ["arm", "model.d_model"], sweep.seed)
    lower, diff = f.paired_finding(
        "A longer warmup (25% vs 1% of the steps) lowers LR sensitivity", per_seed,
        "lr_sensitivity", "warmup_25pct", "warmup_1pct", "model.d_model", "<0", label="width",
        what="warmup 25% minus 1%", figures=("lr_sweep.png",))
    widths = sorted(diff.index)
    if len(widths) < 2:
        return [lower]
    # more so for larger models: the difference of the paired differences, per seed
    wide = per_seed.pivot_table(index="seed", columns=["arm", "model.d_model"],
                                values="lr_sensitivity")
    effect = {w: wide[("warmup_25pct", w)] - wide[("warmup_1pct", w)] for w in (widths[0], widths[-1])}
    dd = seeds.interval((effect[widths[-1]] - effect[widths[0]]).dropna().to_numpy(float))
    more = f.Finding(
        "The effect is larger for the larger model",
        f"(25% - 1%) at width {int(widths[-1])} minus at width {int(widths[0])}, paired by "
        f"seed: {f.iv(dd.mean, dd.lo, dd.hi)} ({dd.n} seeds)",
        f.sign_verdict([(dd.lo, dd.hi)], "<0"), ("lr_sweep.png",))
    return [lower, more]
