"""`lm results` (a terminal table of a sweep's runs) and `lm analyze` (fits and plots)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from lm.config import ConfigError
from lm.sweep.spec import short_names

# Bookkeeping fields (they do not change what is trained): never shown as sweep axes.
_IGNORE = {"name", "log_every", "eval_every", "eval_batches", "checkpoint_every",
           "keep_checkpoints", "tensorboard"}
#: A coarse grid of L-BFGS starts for `lm analyze` (243 starts; --full-grid: Chinchilla's 4500).
COARSE_GRID = {"a": [0.0, 10.0, 20.0], "b": [0.0, 10.0, 20.0], "e": [-1.0, 0.0, 1.0],
               "alpha": [0.25, 0.75, 1.5], "beta": [0.25, 0.75, 1.5]}


_TAG_COLUMNS = ("arm", "size")


def load_runs(workdir: str):
    """results.load, plus `arm` / `size` columns from sweep.json's trial tags."""
    from lm.analysis import results
    if not Path(workdir).is_dir() and "://" not in workdir:
        raise ConfigError(f"{workdir}: no such directory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = results.load(workdir)
    if df.empty:
        raise ConfigError(f"{workdir}: no runs (no */config.json) there")
    tags = _tags(Path(workdir))
    df.attrs["tags"] = tags  # trial name -> tags (arm, size, budget, ...) for analyze
    for col in _TAG_COLUMNS:
        if any(col in t for t in tags.values()) and col not in df:
            df.insert(2, col, [tags.get(r, {}).get(col) for r in df["run"]])
    return df


def group_columns(df, vary: list[str]) -> list[str]:
    """The arm/size tags, then varying config columns they do not already determine."""
    tags = [c for c in _TAG_COLUMNS if c in df and df[c].astype(str).nunique() > 1]
    out = list(tags)
    for c in vary:
        if tags and (df.groupby(tags, dropna=False)[c]
                     .agg(lambda x: x.astype(str).nunique()) <= 1).all():
            continue
        out.append(c)
    return out


def varying_columns(df) -> list[str]:
    """Config columns whose value differs between runs (the sweep's axes)."""
    from lm.analysis.results import CONFIG_DEFAULTS
    cols = []
    for c in df.columns:
        if c not in CONFIG_DEFAULTS or c in _IGNORE:
            continue
        if df[c].astype(str).nunique(dropna=False) > 1:
            cols.append(c)
    return cols


def results_table(workdir: str) -> str:
    import pandas as pd
    df = load_runs(workdir)
    vary = varying_columns(df)
    table = pd.DataFrame({"run": df["run"], "status": df["status"]})
    for c in _TAG_COLUMNS:
        if c in df:
            table[c] = df[c]
    vary = [c for c in vary if c not in _TAG_COLUMNS]
    for c, short in short_names(vary).items():
        table[short] = df[c]
    for c in ("final_val_loss", "best_val_loss"):
        table[c] = df[c].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    table["params"] = df["params"].map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    table["tokens"] = df["tokens_seen"].map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    with pd.option_context("display.max_rows", None, "display.max_columns", None,
                           "display.width", 250, "display.max_colwidth", 60):
        text = table.to_string(index=False)
    counts = df["status"].astype(str).str.replace(r" at step \d+", "", regex=True) \
        .str.replace(r": exit \d+", "", regex=True).value_counts()
    text += "\n" + f"{len(df)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    return text + seeds_report(df, vary)


def _config_columns(df, vary: list[str]) -> list[str]:
    """What names a configuration when seeds repeat it: the varying columns (and the
    arm/size tags) but the seeds."""
    from lm.analysis.seeds import SEED_COLUMNS
    return group_columns(df, [c for c in vary if c not in (*SEED_COLUMNS, "steps")])


def _paired_arm_lines(df, metric: str, by: list[str], pair: str, arm_order, fmt: str,
                      names: dict | None = None, count_pairs: bool = False) -> list[str]:
    """One line per arm after the first and configuration: its `metric` minus the first
    arm's, paired by `pair` (a seed column), with the 95% interval."""
    from lm.analysis import seeds
    arms = list(dict.fromkeys(arm_order))
    rest = [c for c in by if c != "arm"]
    lines = []
    for other in arms[1:]:
        d = seeds.paired_difference(df, metric, "arm", other, arms[0], rest, pair=pair)
        for _, r in d.iterrows():
            where = ", ".join(f"{(names or {}).get(c, c)}={r[c]}" for c in rest)
            lines.append(f"  {other} - {arms[0]}{' @ ' + where if where else ''}: "
                         f"{r['diff']:+{fmt}} [{r['ci_lo']:+{fmt}}, {r['ci_hi']:+{fmt}}]"
                         + (f" ({r['pairs']} pairs)" if count_pairs else ""))
    return lines


def seeds_report(df, vary: list[str], metric: str = "final_val_loss") -> str:
    """With several seeds: the metric's mean and 95% interval per configuration, the
    noise floor, and each arm against the first paired by seed. "" otherwise."""
    import pandas as pd

    from lm.analysis import seeds
    seed = seeds.seed_column(df)
    if seed is None:
        return ""
    done = df[df["status"] == "completed"].copy()
    if done.empty:
        return ""
    by = _config_columns(df, vary)
    if not by:
        by = ["model.d_model"]
    table = seeds.seed_table(done, metric, by)
    floor = seeds.noise_floor(done, metric, by)
    shown = pd.DataFrame({**{short: table[c] for c, short in short_names(by).items()}})
    shown[f"{metric} (mean ± 95% CI)"] = [
        f"{m:.4f} ± {(hi - lo) / 2:.4f}" if n > 1 else f"{m:.4f} (n=1)"
        for m, lo, hi, n in zip(table["mean"], table["ci_lo"], table["ci_hi"], table["n"])]
    shown["seeds"] = table["n"]
    with pd.option_context("display.max_rows", None, "display.width", 250):
        out = (f"\n\nover seeds ({seed}), completed runs: {metric} per configuration\n"
               + shown.to_string(index=False)
               + f"\nnoise floor (seed-to-seed std of {metric}, pooled): {floor:.4f}")
    if "arm" in by and done["arm"].nunique() > 1:
        lines = _paired_arm_lines(done, metric, by, seed, done["arm"], ".4f",
                                  names=short_names([c for c in by if c != "arm"]),
                                  count_pairs=True)
        out += (f"\npaired by {seed} (difference of {metric}, 95% CI; noise floor "
                f"{floor:.4f}):\n" + "\n".join(lines))
    return out


def _tags(workdir: Path) -> dict[str, dict]:
    try:
        spec = json.loads((workdir / "sweep.json").read_text())
        return {t["name"]: t.get("tags", {}) for t in spec["trials"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _say_warnings(caught) -> None:
    for w in caught:
        print(f"  note: {w.message}")


def _lr_sensitivity_over_seeds(finished, by: list[str], seed: str) -> None:
    """LR sensitivity per seed, its mean and 95% interval, and the arms paired by seed."""
    import pandas as pd

    from lm.analysis import seeds, stability
    per_seed, summary = stability.lr_sensitivity_over_seeds(finished, by, seed)
    floor = seeds.noise_floor(per_seed, "lr_sensitivity", by)
    print(f"\nLR sensitivity over seeds ({seed}): mean and 95% interval "
          f"(noise floor: seed-to-seed std {floor:.4g}):")
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if "arm" in by and per_seed["arm"].nunique() > 1:
        first = next(iter(dict.fromkeys(finished["arm"])))
        print(f"paired by {seed}: LR sensitivity of each arm minus {first} "
              f"(95% CI; noise floor {floor:.4g}):")
        for line in _paired_arm_lines(per_seed, "lr_sensitivity", by, "seed",
                                      finished["arm"], ".4g"):
            print(line)


def _precursors(finished, by: list[str], out: Path) -> None:
    """Max attention logit and log Z drift at the end of training, per group and LR."""
    import pandas as pd

    from lm.analysis import stability
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
    print(f"  plot: {stability.plot_precursors(table, out / 'precursors.png', by=by)}")


def analyze(workdir: str, *, full_grid: bool = False, n_boot: int = 100,
            params: str = "total") -> int:
    """`params`: fit scaling laws on total parameters or on active ones (what a token
    uses: an MoE model's routed experts only; runs without the column are dense)."""
    import numpy as np

    from lm.analysis import scaling, stability
    df = load_runs(workdir)
    wd = Path(workdir)
    out = wd / "analysis"
    vary = varying_columns(df)
    finished = df[~df["status"].isin(["missing", "running"])]
    print(f"{len(df)} runs ({len(finished)} finished); varying: {', '.join(vary) or 'nothing'}")
    did = False

    from lm.analysis.seeds import SEED_COLUMNS, seed_column
    seed = seed_column(df)
    if "optim.lr" in vary:
        did = True
        by = group_columns(df, [c for c in vary if c not in ("optim.lr", "steps", *SEED_COLUMNS)])
        by = by or ["model.d_model"]
        print(f"\nLR sensitivity (Wortsman et al. 2023) per {', '.join(by)}:")
        if finished.empty:
            print("  not enough data: no finished runs")
        else:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    table = stability.lr_sensitivity_table(finished, by)
                    path = stability.plot_lr_sweep(finished, out / "lr_sweep.png", by=by,
                                                   table=table)
                import pandas as pd
                with pd.option_context("display.width", 250, "display.max_columns", None):
                    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
                _say_warnings(caught)
                print(f"  plot: {path}")
                if seed is not None:
                    _lr_sensitivity_over_seeds(finished, by, seed)
                _precursors(finished, by, out)
            except (ValueError, KeyError) as e:
                print(f"  not enough data for the LR sensitivity table: {e}")

    if {"model.norm_position", "model.layernorm_scaling"} & set(vary) and not finished.empty:
        did = True
        by = group_columns(df, [c for c in vary if c != "steps"])
        table = stability.residual_growth_table(finished, by)
        print("\nResidual-stream RMS after the first / last layer at the end of training:")
        if table.empty:
            print("  no run logged resid_rms/<layer>")
        else:
            import pandas as pd
            shown = table.drop(columns=["profile"]).sort_values(by)
            with pd.option_context("display.width", 250, "display.max_columns", None):
                print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            path = stability.plot_residual_growth(table, out / "residual_growth.png", label=by)
            print(f"  plot: {path}")

    tags = df.attrs["tags"]
    done = df[df["status"] == "completed"]
    budget = [tags.get(r, {}).get("budget") for r in done["run"]]
    has_budget = any(b is not None for b in budget)
    # A size ladder is a scaling-law sweep unless it sweeps the LR too (an LR-sensitivity
    # study across widths, above).
    sized = "size" in {k for t in tags.values() for k in t} and "optim.lr" not in vary
    if has_budget or sized:
        did = True
        n = done["params"].to_numpy(float)
        if params == "active" and "active_params" in done:
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
            print(f"  plot: {scaling.plot_isoflops(fit, out / 'isoflops.png')}")
        except ValueError as e:
            _say_warnings(caught)
            print(f"  not enough data for an IsoFLOP fit: {e}")
        print("\nChinchilla approach 3 (L = E + A/N^alpha + B/D^beta):")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                law = scaling.fit_loss_law(n, d, loss, grid=None if full_grid else COARSE_GRID)
            _say_warnings(caught)
            print(f"  E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} alpha={law.alpha:.4f} "
                  f"beta={law.beta:.4f}  (N_opt ~ C^{law.a:.3f}, D_opt ~ C^{law.b:.3f}; "
                  f"{'full' if full_grid else 'coarse'} grid of starts)")
            print(f"  plot: {scaling.plot_loss_law(law, n, d, loss, out / 'loss_law.png')}")
        except ValueError as e:
            print(f"  not enough data for the parametric fit: {e}")
            law = None
        if law is not None and n_boot > 0:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    budgets = sorted({float(c) for c in compute if np.isfinite(c)})
                    boot = scaling.bootstrap_loss_law(n, d, loss, fit=law, n_boot=n_boot,
                                                      compute=budgets)
                print(f"  95% bootstrap intervals ({n_boot} resamples of the runs):")
                names = ["E", "A", "B", "alpha", "beta", "a", "b"] + [
                    f"{q}@{c:.3g}" for c in budgets
                    for q in ("n_opt", "d_opt", "tokens_per_param")]
                for k in names:
                    lo, hi = boot.interval(k)
                    print(f"    {k:>24}: {boot.estimate(k):.4g}  [{lo:.4g}, {hi:.4g}]")
            except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:
                print(f"  bootstrap failed (too few / degenerate runs?): {e}")

    from lm.analysis import moe
    if moe.is_moe(df).any() and not finished.empty:
        did = True
        by = group_columns(df, [c for c in vary if c != "steps"]) or ["run"]
        table = moe.moe_table(finished, by)
        print("\nMixture of experts: loss at active compute, load imbalance (n_experts x max "
              "expert load, mean over MoE layers; 1 = balanced):")
        import pandas as pd
        with pd.option_context("display.width", 250, "display.max_columns", None):
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"  plot: {moe.plot_moe(finished, out / 'moe.png', label=by)}")

    if not did:
        print("nothing to analyze: the sweep varies neither optim.lr nor a size ladder / "
              "compute budget, and has no MoE runs")
    return 0
