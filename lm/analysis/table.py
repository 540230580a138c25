"""`lm results`: a terminal table of a sweep's runs (status, the sweep's axes, losses,
size), a count by status, and with several seeds each configuration's mean and interval,
the noise floor and each arm against the first paired by seed."""

from __future__ import annotations

import pandas as pd

from lm.analysis import seeds
from lm.analysis.results import TAG_COLUMNS, group_columns, load_sweep, varying_columns


def results_table(workdir: str) -> str:
    from lm.sweep.spec import short_names
    df = load_sweep(workdir)
    vary = varying_columns(df)
    table = pd.DataFrame({"run": df["run"], "status": df["status"]})
    for c in TAG_COLUMNS:
        if c in df:
            table[c] = df[c]
    vary = [c for c in vary if c not in TAG_COLUMNS]
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


def config_columns(df: pd.DataFrame, vary: list[str]) -> list[str]:
    """What names a configuration when seeds repeat it: the varying columns (and the
    arm/size tags) but the seeds."""
    return group_columns(df, [c for c in vary if c not in (*seeds.SEED_COLUMNS, "steps")])


def seeds_report(df: pd.DataFrame, vary: list[str], metric: str = "final_val_loss") -> str:
    """With several seeds: the metric's mean and 95% interval per configuration, the
    noise floor, and each arm against the first paired by seed. "" otherwise."""
    from lm.sweep.spec import short_names
    seed = seeds.seed_column(df)
    if seed is None:
        return ""
    done = df[df["status"] == "completed"].copy()
    if done.empty:
        return ""
    by = config_columns(df, vary)
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
        lines = seeds.paired_arm_lines(done, metric, by, seed, done["arm"], ".4f",
                                       names=short_names([c for c in by if c != "arm"]),
                                       count_pairs=True)
        out += (f"\npaired by {seed} (difference of {metric}, 95% CI; noise floor "
                f"{floor:.4f}):\n" + "\n".join(lines))
    return out
