"""`lm analyze WORKDIR`: the analyses of a sweep, each one registered `Analysis`.

An analysis is a function that prints its section (plots go under WORKDIR/analysis/)
and says when it runs:

    automatic    applies(sweep) -> bool: `lm analyze WORKDIR` runs, in registry order,
                 every automatic analysis that applies to the sweep's runs
    on request   flag: `lm analyze --FLAG WORKDIR` runs that analysis alone (the first
                 requested in registry order when several flags are given)

(An analysis may be both: automatic when it applies, and alone on request.)

Its command-line options (`options`) and its flag join `lm analyze` by themselves. A new
analysis is a function and one `register(Analysis(...))` line, here or in a plug-in
module imported before `lm analyze` parses its arguments.

Nothing is imported at the top but the standard library: `lm` builds its parser from
this registry at every start, so each analysis imports pandas / matplotlib itself.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path


class Sweep:
    """What an analysis reads: the workdir, the `lm analyze` options, and the runs
    (`lm.analysis.results.load_sweep`, loaded on first use) with views of them."""

    def __init__(self, workdir: str, options: argparse.Namespace):
        self.workdir = workdir
        self.options = options
        self.out = Path(workdir) / "analysis"  # where plots go

    @cached_property
    def runs(self):
        from lm.analysis.results import load_sweep
        return load_sweep(self.workdir)

    @cached_property
    def vary(self) -> list[str]:
        """The config columns that vary between runs (the sweep's axes)."""
        from lm.analysis.results import varying_columns
        return varying_columns(self.runs)

    @cached_property
    def finished(self):
        """Runs that ended (completed, diverged, interrupted, failed)."""
        return self.runs[~self.runs["status"].isin(["missing", "running"])]

    @cached_property
    def done(self):
        return self.runs[self.runs["status"] == "completed"]

    @cached_property
    def seed(self) -> str | None:
        """The column that repeats configurations over seeds, if any."""
        from lm.analysis.seeds import seed_column
        return seed_column(self.runs)

    @property
    def tags(self) -> dict[str, dict]:
        """Trial name -> its sweep.json tags (arm, size, budget, ...)."""
        return self.runs.attrs["tags"]

    def group_by(self, *leave_out: str) -> list[str]:
        """The arm/size tags and varying columns that name a group, but `leave_out`."""
        from lm.analysis.results import group_columns
        return group_columns(self.runs, [c for c in self.vary if c not in leave_out])


@dataclass(frozen=True)
class Analysis:
    """name: how `lm analyze` calls it.  run(sweep): prints its section.
    applies(sweep) and when (the same in words, for "nothing to analyze"): an automatic
    analysis.  flag and help: an analysis on request, `lm analyze --FLAG` (one or both).
    options(parser): its own `lm analyze` options (read back from `sweep.options`)."""

    name: str
    run: Callable[[Sweep], None]
    applies: Callable[[Sweep], bool] | None = None
    when: str = ""
    flag: str = ""
    help: str = ""
    options: Callable[[argparse.ArgumentParser], None] | None = None

    def __post_init__(self):
        if self.applies is None and not self.flag:
            raise TypeError(f"analysis {self.name!r}: give applies (automatic) or flag "
                            "(on request), or both")

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")


#: Every analysis, in the order `lm analyze` runs (and shows) them.
ANALYSES: list[Analysis] = []


def register(analysis: Analysis) -> Analysis:
    if any(a.name == analysis.name for a in ANALYSES):
        raise ValueError(f"analysis {analysis.name!r} is registered already")
    ANALYSES.append(analysis)
    return analysis


def add_options(parser: argparse.ArgumentParser) -> None:
    """The registered analyses' options and request flags, on `lm analyze`'s parser."""
    for a in ANALYSES:
        if a.options is not None:
            a.options(parser)
        if a.flag:
            parser.add_argument(f"--{a.flag}", action="store_true", help=a.help)


def default_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser)
    return parser.parse_args([])


def analyze(workdir: str, options: argparse.Namespace | None = None) -> int:
    """Run the analysis requested by a flag of `options`, or else every automatic one
    that applies (a ConfigError when the workdir holds no runs)."""
    sweep = Sweep(workdir, options if options is not None else default_options())
    requested = [a for a in ANALYSES if a.flag and getattr(sweep.options, a.dest, False)]
    if requested:
        requested[0].run(sweep)
        return 0
    df = sweep.runs
    print(f"{len(df)} runs ({len(sweep.finished)} finished); varying: "
          f"{', '.join(sweep.vary) or 'nothing'}")
    automatic = [a for a in ANALYSES if a.applies is not None]
    did = False
    for a in automatic:
        if a.applies(sweep):
            a.run(sweep)
            did = True
    if not did:
        print("nothing to analyze: " + "; ".join(f"{a.name} needs {a.when}" for a in automatic))
    return 0


def _say_warnings(caught) -> None:
    for w in caught:
        print(f"  note: {w.message}")


def _print_table(table, fmt: str = ".4g") -> None:
    import pandas as pd
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.to_string(index=False, float_format=lambda v: f"{v:{fmt}}"))


# ------------------------------------------------------------------ LR sensitivity


def lr_sensitivity(sweep: Sweep) -> None:
    """Wortsman et al. (2023) LR sensitivity per group, the LR sweep's plot; with seeds
    its mean and interval and the arms paired by seed; the instability precursors."""
    from lm.analysis import stability
    from lm.analysis.seeds import SEED_COLUMNS
    by = sweep.group_by("optim.lr", "steps", *SEED_COLUMNS) or ["model.d_model"]
    print(f"\nLR sensitivity (Wortsman et al. 2023) per {', '.join(by)}:")
    finished = sweep.finished
    if finished.empty:
        print("  not enough data: no finished runs")
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = stability.lr_sensitivity_table(finished, by)
            path = _lr_sweep_figure(finished, by, table, sweep.out / "lr_sweep.png")
        _print_table(table)
        _say_warnings(caught)
        print(f"  plot: {path}")
        if sweep.seed is not None:
            _lr_sensitivity_over_seeds(finished, by, sweep.seed)
        _precursors(finished, by, sweep.out)
    except (ValueError, KeyError) as e:
        print(f"  not enough data for the LR sensitivity table: {e}")


def _lr_sensitivity_over_seeds(finished, by: list[str], seed: str) -> None:
    """LR sensitivity per seed, its mean and 95% interval, and the arms paired by seed."""
    from lm.analysis import seeds, stability
    per_seed, summary = stability.lr_sensitivity_over_seeds(finished, by, seed)
    floor = seeds.noise_floor(per_seed, "lr_sensitivity", by)
    print(f"\nLR sensitivity over seeds ({seed}): mean and 95% interval "
          f"(noise floor: seed-to-seed std {floor:.4g}):")
    _print_table(summary)
    if "arm" in by and per_seed["arm"].nunique() > 1:
        first = next(iter(dict.fromkeys(finished["arm"])))
        print(f"paired by {seed}: LR sensitivity of each arm minus {first} "
              f"(95% CI; noise floor {floor:.4g}):")
        for line in seeds.paired_arm_lines(per_seed, "lr_sensitivity", by, "seed",
                                           finished["arm"], ".4g"):
            print(line)


def _precursors(finished, by: list[str], out: Path) -> None:
    """Max attention logit and log Z drift at the end of training, per group and LR."""
    import pandas as pd

    from lm.analysis import figures, stability
    table = stability.precursors(finished)
    if table["attn_logit_max"].isna().all() and table["logz_mean"].isna().all():
        return
    agg = (table.groupby([*by, "optim.lr"], sort=True, dropna=False)
           [["attn_logit_max", "logz_mean", "logz_drift"]].mean().reset_index())
    print("\nInstability precursors at the end of training (mean over seeds): max attention "
          "logit, mean log Z and its drift since the first record:")
    wide = agg.pivot_table(index="optim.lr", columns=by,
                           values=["attn_logit_max", "logz_drift"], dropna=False)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(wide.to_string(float_format=lambda v: f"{v:.3g}"))
    panel, colour = _panel_and_colour(table, by)
    print(f"  plot: {figures.precursor_panels(table, out / 'precursors.png', panel=panel, colour=colour)}")


def _panel_and_colour(runs, by: list[str]) -> tuple[str, str]:
    """The figures' layout for groups `by`: a panel per arm, a colour per model size (its
    width when a size tag stands for one), as in Wortsman et al.'s figure 1. Any further
    group columns join the colour (a `group` column is added to `runs`)."""
    panel = "arm" if "arm" in by else (by[0] if len(by) > 1 else "")
    rest = [c for c in by if c != panel]
    if rest == ["size"] and "model.d_model" in runs and (
            runs.groupby("size")["model.d_model"].nunique() <= 1).all():
        rest = ["model.d_model"]
    if len(rest) == 1:
        return panel, rest[0]
    runs["group"] = runs[rest].astype(str).agg(", ".join, axis=1) if rest else "all"
    return panel, "group"


def _lr_sweep_figure(finished, by: list[str], table, path) -> Path:
    """Wortsman et al.'s figure 1: loss vs LR, a panel per arm, a colour per size, each
    line's LR sensitivity in the legend."""
    from lm.analysis import figures
    runs = finished.copy()
    panel, colour = _panel_and_colour(runs, by)
    keyed = table.copy()
    _panel_and_colour(keyed, by)
    if colour not in keyed:  # a size tag drawn as its width
        keyed[colour] = keyed["size"].map(runs.groupby("size")[colour].first())
    notes = {(r[panel] if panel else None, r[colour]): f"sens. {r['lr_sensitivity']:.2f}"
             for _, r in keyed.iterrows()}
    optima = None
    if panel and "seed" in runs:  # the stars: each line's best LR, hollow on the edge
        from lm.analysis.transfer import lr_optima
        optima = lr_optima(runs, by=(panel, colour), n_boot=50)
    return figures.lr_panels(runs, path, panel=panel or "_none_", colour=colour,
                             loss_init=float(table["loss_init"].max()), notes=notes,
                             optima=optima,
                             title="LR sensitivity (Wortsman et al. 2023, fig. 1)")


register(Analysis("lr-sensitivity", lr_sensitivity,
                  applies=lambda s: "optim.lr" in s.vary, when="optim.lr to vary"))


# ------------------------------------------------------------------ residual growth

_NORM_AXES = ("model.norm_position", "model.layernorm_scaling")


def residual_growth(sweep: Sweep) -> None:
    """Residual-stream RMS after the first and the last layer, per run; the figure: a
    panel per norm placement, a line per depth, each at its best LR."""
    from lm.analysis import figures, stability
    by = sweep.group_by("steps")
    table = stability.residual_growth_table(sweep.finished, by)
    print("\nResidual-stream RMS after the first / last layer at the end of training:")
    if table.empty:
        print("  no run logged resid_rms/<layer>")
        return
    _print_table(table.drop(columns=["profile"]).sort_values(by))
    panel, colour = _panel_and_colour(table, [c for c in by if c not in ("optim.lr", sweep.seed)])
    if "optim.lr" in table:
        path = figures.residual_panels(table, sweep.out / "residual_growth.png", panel=panel,
                                       colour=colour)
    else:
        path = stability.plot_residual_growth(table, sweep.out / "residual_growth.png", label=by)
    print(f"  plot: {path}")


register(Analysis("residual-growth", residual_growth,
                  applies=lambda s: bool(set(_NORM_AXES) & set(s.vary)) and not s.finished.empty,
                  when=" or ".join(_NORM_AXES) + " to vary"))


# ------------------------------------------------------------------ scaling laws

#: A coarse grid of L-BFGS starts for `lm analyze` (243 starts; --full-grid: Chinchilla's 4500).
COARSE_GRID = {"a": [0.0, 10.0, 20.0], "b": [0.0, 10.0, 20.0], "e": [-1.0, 0.0, 1.0],
               "alpha": [0.25, 0.75, 1.5], "beta": [0.25, 0.75, 1.5]}


def _scaling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full-grid", action="store_true",
                   help="fit the parametric law from Chinchilla's 4500 starts (default: 243)")
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap resamples (0 = none)")
    p.add_argument("--params", choices=("total", "active"), default="total",
                   help="scaling laws in total or active (MoE: routed) parameters")


def compute_budgets(sweep: Sweep) -> list:
    """Each completed run's compute budget tag (None where it has none)."""
    return [sweep.tags.get(r, {}).get("budget") for r in sweep.done["run"]]


def _is_scaling_sweep(sweep: Sweep) -> bool:
    """Compute budgets tagged, or a size ladder that does not also sweep the LR (that is
    an LR-sensitivity study across widths)."""
    sized = "size" in {k for t in sweep.tags.values() for k in t}
    return any(b is not None for b in compute_budgets(sweep)) or (sized and "optim.lr" not in sweep.vary)


def scaling_laws(sweep: Sweep) -> None:
    """Chinchilla approach 2 (IsoFLOP profiles) and 3 (parametric law, bootstrap), in
    total or active parameters (`--params`: an MoE model's routed experts only)."""
    import numpy as np

    from lm.analysis import scaling
    opts, done = sweep.options, sweep.done
    budget = compute_budgets(sweep)
    has_budget = any(b is not None for b in budget)
    n = done["params"].to_numpy(float)
    if opts.params == "active" and "active_params" in done:
        n = done["active_params"].fillna(done["params"]).to_numpy(float)
    d = done["tokens_seen"].to_numpy(float)
    loss = done["final_val_loss"].to_numpy(float)
    compute = (np.array([np.nan if b is None else float(b) for b in budget])
               if has_budget else 6 * n * d)
    print("\nChinchilla approach 2 (IsoFLOP profiles):")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = scaling.fit_isoflops(n, loss, compute=compute, rtol=0.15)
        _say_warnings(caught)
        for g, used in zip(fit.budgets, fit.used):
            print(f"  C={g.compute:.3g}: N_opt={g.n_opt:.3g} D_opt={g.d_opt:.3g} "
                  f"loss={g.loss_opt:.4f}{'' if used else ' (extrapolated; not fitted)'}")
        print(f"  N_opt = {fit.k_n:.3g} C^{fit.a:.3f}   D_opt = {fit.k_d:.3g} C^{fit.b:.3f}")
        print(f"  plot: {scaling.plot_isoflops(fit, sweep.out / 'isoflops.png')}")
    except ValueError as e:
        _say_warnings(caught)
        print(f"  not enough data for an IsoFLOP fit: {e}")
    print("\nChinchilla approach 3 (L = E + A/N^alpha + B/D^beta):")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            law = scaling.fit_loss_law(n, d, loss, grid=None if opts.full_grid else COARSE_GRID)
        _say_warnings(caught)
        print(f"  E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} alpha={law.alpha:.4f} "
              f"beta={law.beta:.4f}  (N_opt ~ C^{law.a:.3f}, D_opt ~ C^{law.b:.3f}; "
              f"{'full' if opts.full_grid else 'coarse'} grid of starts)")
        print(f"  plot: {scaling.plot_loss_law(law, n, d, loss, sweep.out / 'loss_law.png')}")
    except ValueError as e:
        print(f"  not enough data for the parametric fit: {e}")
        return
    if opts.n_boot > 0:
        _bootstrap(law, n, d, loss, compute, opts.n_boot)


def _bootstrap(law, n, d, loss, compute, n_boot: int) -> None:
    import numpy as np

    from lm.analysis import scaling
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            budgets = sorted({float(c) for c in compute if np.isfinite(c)})
            boot = scaling.bootstrap_loss_law(n, d, loss, fit=law, n_boot=n_boot,
                                              compute=budgets)
        print(f"  95% bootstrap intervals ({n_boot} resamples of the runs):")
        names = ["E", "A", "B", "alpha", "beta", "a", "b"] + [
            f"{q}@{c:.3g}" for c in budgets for q in ("n_opt", "d_opt", "tokens_per_param")]
        for k in names:
            lo, hi = boot.interval(k)
            print(f"    {k:>24}: {boot.estimate(k):.4g}  [{lo:.4g}, {hi:.4g}]")
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:
        print(f"  bootstrap failed (too few / degenerate runs?): {e}")


register(Analysis("scaling-laws", scaling_laws, applies=_is_scaling_sweep,
                  when="a size ladder or compute budgets (sweep tags size / budget)",
                  options=_scaling_options))


# ------------------------------------------------------------------ data mixtures


def _source_columns(runs) -> list[str]:
    return [c for c in runs.columns if c.startswith("final_val_loss/")]


def per_source_loss(sweep: Sweep) -> None:
    """A mixture sweep's validation loss per source (and overall) per arm: mean and 95%
    interval over seeds (lm/data/mixture.py records final_val_loss/<source>)."""
    import pandas as pd

    from lm.analysis.seeds import interval
    done = sweep.done
    cols = ["final_val_loss", *_source_columns(done)]
    by = sweep.group_by(*( [sweep.seed] if sweep.seed else []), "data.sources", "data.stages")
    by = by or ["run"]
    rows = []
    for key, group in done.groupby(by, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for c in cols:
            iv = interval(group[c].to_numpy(float))
            name = "overall" if c == "final_val_loss" else c.split("/", 1)[1]
            row[name] = (f"{iv.mean:.4f}" if iv.n < 2 else
                         f"{iv.mean:.4f} [{iv.lo:.4f}, {iv.hi:.4f}]")
        row["runs"] = len(group)
        rows.append(row)
    seeds = f"; 95% intervals over {sweep.seed}" if sweep.seed else ""
    print(f"Validation loss per source (nats/token; mean{seeds}):")
    _print_table(pd.DataFrame(rows))


register(Analysis("per-source-loss", per_source_loss,
                  applies=lambda sweep: bool(_source_columns(sweep.done)),
                  when="data mixtures (final_val_loss/<source> in summary.json)"))


# ------------------------------------------------------------------ task scaling


def _task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", action="append", metavar="NAME",
                   help="task scaling: this task (repeat for more; default: every task "
                        "with scores)")
    p.add_argument("--holdout", metavar="RUN", help="task scaling: the run to predict "
                   "(default: the one with the most training FLOPs)")
    p.add_argument("--task-loss", choices=("correct_bpb", "correct_nll"),
                   default="correct_bpb", help="task scaling: step 1's task loss")
    p.add_argument("--task-metric", default="acc",
                   help="task scaling: the accuracy of step 2 (acc, acc_norm, ...)")
    p.add_argument("--task-law", choices=("C", "ND"), default="C",
                   help="task scaling: step 1 in compute C (A C^-alpha + E) or in N and D "
                        "(A/N^alpha + B/D^beta + E)")


def _has_task_scores(sweep: Sweep) -> bool:
    from lm.analysis import task_scaling
    return bool(task_scaling.task_names(sweep.done))


def task_scaling(sweep: Sweep) -> None:
    """The two-step task scaling law (task loss of compute, accuracy of task loss) of each
    task, fitted to the completed runs but one, and its prediction of that one."""
    from lm.analysis import task_scaling
    from lm.errors import ConfigError
    opts, done = sweep.options, sweep.done
    have = task_scaling.task_names(done)
    if not have:
        raise ConfigError(f"lm analyze --task-scaling: no completed run in {sweep.workdir} "
                          "has task scores (<run>/evals/tasks-step*.json)")
    unknown = [t for t in opts.task or () if t not in have]
    if unknown:
        raise ConfigError(f"--task {unknown[0]}: no scores for it; tasks: {', '.join(have)}")
    if opts.holdout is not None and opts.holdout not in set(done["run"]):
        raise ConfigError(f"--holdout {opts.holdout}: not a completed run of {sweep.workdir}")
    task_scaling.report(done, sweep.out, tasks=opts.task, holdout=opts.holdout,
                        loss_metric=opts.task_loss, acc_metric=opts.task_metric,
                        law=opts.task_law, n_boot=opts.n_boot,
                        grid=None if opts.full_grid else COARSE_GRID)


register(Analysis("task-scaling", task_scaling, applies=_has_task_scores,
                  when="task scores (<run>/evals/tasks-step*.json)", flag="task-scaling",
                  help="two-step task scaling law: task loss of compute, accuracy of task "
                       "loss; predicts the largest run from the rest",
                  options=_task_options))


# ------------------------------------------------------------------ mixture of experts


def _has_moe_runs(sweep: Sweep) -> bool:
    from lm.analysis import moe
    return bool(moe.is_moe(sweep.runs).any()) and not sweep.finished.empty


def mixture_of_experts(sweep: Sweep) -> None:
    """Loss at active compute and the routing's load imbalance, per run."""
    from lm.analysis import moe
    by = sweep.group_by("steps") or ["run"]
    table = moe.moe_table(sweep.finished, by)
    print("\nMixture of experts: loss at active compute, load imbalance (n_experts x max "
          "expert load, mean over MoE layers; 1 = balanced):")
    _print_table(table)
    print(f"  plot: {moe.plot_moe(sweep.finished, sweep.out / 'moe.png', label=by)}")


register(Analysis("moe", mixture_of_experts, applies=_has_moe_runs, when="finished MoE runs"))


# ------------------------------------------------------------------ compression


def compression_front(sweep: Sweep) -> None:
    """The Pareto front of compressed variants: loss against params, bytes, FLOPs/token
    per recipe (lm/analysis/pareto.py)."""
    from lm.analysis import pareto
    print("\nCompressed models (loss against deployed size; * front = Pareto-optimal for "
          "that size):")
    print(pareto.report(sweep.finished, sweep.out))


def _has_children(sweep: Sweep) -> bool:
    runs = sweep.finished
    return ("init_from" in runs and runs["init_from"].astype(str).str.len().gt(0).any()
            and runs["params"].nunique() > 1)


register(Analysis("pareto", compression_front, applies=_has_children,
                  when="runs of several sizes started from others (init_from)", flag="pareto",
                  help="loss against params, bytes and FLOPs/token per recipe (arm), with "
                       "intervals over seeds and the Pareto front"))


# ------------------------------------------------------------------ on request


def coordinate_check(sweep: Sweep) -> None:
    """WORKDIR/coord_check.json (experiments/coord_check.py): table, slopes, plot."""
    from lm.analysis import coord_check
    from lm.errors import ConfigError
    if not (Path(sweep.workdir) / coord_check.FILE).exists():
        raise ConfigError(f"lm analyze --coord-check: no {coord_check.FILE} in {sweep.workdir} "
                          "(run experiments/coord_check.py --workdir DIR first)")
    print(coord_check.report(sweep.workdir))


def optimizers(sweep: Sweep) -> None:
    from lm.analysis import transfer
    print(transfer.report(sweep.workdir, optimizers=True))


def lr_transfer(sweep: Sweep) -> None:
    from lm.analysis import transfer
    print(transfer.report(sweep.workdir))


register(Analysis("coord-check", coordinate_check, flag="coord-check",
                  help="render WORKDIR/coord_check.json: table, slopes and plot (SP vs muP)"))
register(Analysis("optimizers", optimizers, flag="optimizers",
                  help="best loss per optimizer (arm) and width, state bytes, tokens/s"))
register(Analysis("lr-transfer", lr_transfer, flag="lr-transfer",
                  help="best LR per arm and width with intervals, and the transfer penalty"))
