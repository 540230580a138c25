"""Load a directory of runs into pandas: one row per run, and per-run metric curves.

A sweep is many `lm train` run directories under one workdir (local or a bucket), each
with config.json, summary.json and metrics.jsonl (see README "Runs"). Analyses want them
as one table: the config flattened so a sweep axis is a column (`model.d_model`,
`optim.lr`), next to the summary numbers. Runs still going, killed before their first
summary, or with a summary cut off mid-write are kept with status "missing" rather than
dropped, so a sweep with holes shows its holes.

Paths go through `etils.epath.Path`, so `gs://bucket/sweep` works like a local path.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any

import pandas as pd
from etils import epath

#: Sub-directories of a run that hold no runs and can be large (orbax writes many small
#: files): not searched for config.json.
_SKIP_DIRS = frozenset({"checkpoints", "tensorboard", "wandb"})

#: Summary fields in the order `lm train` writes them (columns come first in this order).
SUMMARY_FIELDS = ("status", "steps", "tokens_seen", "params", "non_embedding_params",
                  "active_params", "active_non_embedding_params", "flops_per_token", "training_flops", "final_val_loss", "best_val_loss",
                  "final_val_bpb")

_DIVERGED = re.compile(r"diverged at step (\d+)")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"d_model": 128}} -> {"model.d_model": 128}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_runs(workdir) -> list[epath.Path]:
    """Every directory under `workdir` (itself included, any depth) holding config.json,
    sorted. Does not descend into checkpoints/, tensorboard/ or wandb/."""
    root = epath.Path(workdir)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    found, stack = [], [root]
    while stack:
        d = stack.pop()
        if (d / "config.json").exists():
            found.append(d)
        for child in d.iterdir():
            if child.name not in _SKIP_DIRS and child.is_dir():
                stack.append(child)
    return sorted(found, key=str)


def _read_json(path: epath.Path) -> dict | None:
    """The JSON object at path, or None if absent, unreadable or not a complete object
    (a summary being rewritten, a run killed mid-write)."""
    try:
        obj = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, OSError):
        return None
    return obj if isinstance(obj, dict) else None


def _relative(run: epath.Path, root: epath.Path) -> str:
    r, base = str(run).rstrip("/"), str(root).rstrip("/")
    if r == base:
        return "."
    return r[len(base) + 1:] if r.startswith(base + "/") else r


def _config_defaults() -> dict:
    from lm.config import TrainConfig, to_dict
    return flatten(to_dict(TrainConfig()))


#: Every config field, flattened ("model.d_model"), with its default value.
CONFIG_DEFAULTS = _config_defaults()


def load(workdir) -> pd.DataFrame:
    """One row per run directory under `workdir` (see `find_runs`).

    Columns: `run` (path relative to workdir, "." for workdir itself), `path` (full
    path), `status` ("completed" | "interrupted" | "diverged at step N" | "running" |
    "missing" when summary.json is absent or incomplete), `diverged_step` (N for a
    diverged run, else NA), the other summary fields (NaN when missing), then the config
    flattened with dotted names, then `tasks/<task>/<metric>` for each downstream task
    score of the run's newest tasks file (`task_scores`; NaN for runs without one). A
    summary field that is also a config field — `steps` (steps done vs steps planned) —
    is named `summary.<field>`.

    Note: a diverged run's `final_val_loss` is the last evaluation *before* it diverged;
    filter on status (or use `stability.lr_sensitivity_table`, which does) before using
    losses as results.
    """
    root = epath.Path(workdir)
    rows = []
    for run in find_runs(root):
        config = _read_json(run / "config.json")
        if config is None:
            warnings.warn(f"{run}: unreadable config.json; its config columns are empty",
                          stacklevel=2)
            config = {}
        # A field added to the config after a run was written took its default value.
        config = {**CONFIG_DEFAULTS, **flatten(config)} if config else {}
        summary = _read_json(run / "summary.json")
        if summary is None or not isinstance(summary.get("status"), str):
            summary = {"status": "missing"}
        m = _DIVERGED.fullmatch(summary["status"])
        row = {"run": _relative(run, root), "path": str(run), "status": summary["status"],
               "diverged_step": int(m.group(1)) if m else None}
        for k in [*SUMMARY_FIELDS, *(k for k in summary if k not in SUMMARY_FIELDS)]:
            if k == "status":
                continue
            v = summary.get(k)
            row[_summary_column(k, config)] = math.nan if v is None else v
        row.update(config)
        row.update({f"{TASK_PREFIX}{task}/{metric}": v
                    for task, scores in task_scores(run).items() for metric, v in scores.items()})
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["run", "path", "status", "diverged_step",
                                     *(_summary_column(k, {}) for k in SUMMARY_FIELDS[1:])])
    df = pd.DataFrame(rows)
    df["diverged_step"] = df["diverged_step"].astype("Int64")
    return df


def _summary_column(field: str, config: dict) -> str:
    # `steps` always collides with the config's planned steps; anything else only if a
    # config happens to have a field of the same name.
    return f"summary.{field}" if field == "steps" or field in config else field


#: Column prefix of downstream task scores: `tasks/<task>/<metric>`.
TASK_PREFIX = "tasks/"
#: A run's task scores at one step: `<run>/evals/tasks-step<8-digit step>.json`, holding
#: {"step": int, "tasks": {"<task>": {"<metric>": float, ...}}}. Metric names are the
#: harness's without its ",none" filter suffix (acc, acc_norm, acc_stderr, ...) plus
#: correct_bpb / correct_nll (the gold continuation's mean bits-per-byte / nats) and
#: num_choices where known.
TASKS_FILE = re.compile(r"tasks-step(\d{8})\.json")


def task_scores(run_dir) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the highest-step tasks file of a run (see
    `TASKS_FILE`); {} when it has none. A file cut off mid-write is passed over for the
    next newest; values that are not numbers (the harness's aliases) are left out, and
    "nan" / "inf" strings come back as floats."""
    evals = epath.Path(run_dir) / "evals"
    if not evals.is_dir():
        return {}
    files = sorted(((int(m.group(1)), f) for f in evals.iterdir()
                    if (m := TASKS_FILE.fullmatch(f.name))), key=lambda sf: sf[0], reverse=True)
    for _, f in files:
        record = _read_json(f)
        tasks = record.get("tasks") if record is not None else None
        if not isinstance(tasks, dict):
            continue
        out = {}
        for task, scores in tasks.items():
            values = {}
            for metric, v in (scores.items() if isinstance(scores, dict) else ()):
                v = _number(v)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[metric] = float(v)
            if values:
                out[str(task)] = values
        return out
    return {}


def metrics(run_dir) -> pd.DataFrame:
    """metrics.jsonl of one run as a DataFrame, one row per record, in file order.

    Columns `step`, `kind` ("train" | "eval") and every metric logged (NaN where a record
    lacks it, e.g. eval rows have no grad_norm). Non-finite values, which `lm train`
    writes as the strings "nan" / "inf" / "-inf" (JSON has no NaN), come back as floats.
    A truncated last line (the run was killed mid-write) is skipped; an empty or absent
    file gives an empty frame.
    """
    path = epath.Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue  # cut off mid-write
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
        records.append({k: _number(v) if k != "kind" else v for k, v in rec.items()})
    if not records:
        return pd.DataFrame({"step": pd.Series(dtype="int64"),
                             "kind": pd.Series(dtype="object")})
    df = pd.DataFrame(records)
    df["step"] = df["step"].astype("int64")
    return df


def _number(v):
    if isinstance(v, str):
        try:
            return float(v)   # "nan", "inf", "-inf"
        except ValueError:
            return v
    return v


# ------------------------------------------------------------------ a sweep's runs

#: Trial tags of sweep.json that become columns of `load_sweep` (a study's arms and sizes).
TAG_COLUMNS = ("arm", "size")
# Bookkeeping fields (they do not change what is trained; nor do the track.* trackers):
# never shown as sweep axes.
_BOOKKEEPING = {"name", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                "keep_checkpoints", "tensorboard"}


def load_sweep(workdir: str) -> pd.DataFrame:
    """`load`, plus `arm` / `size` columns from sweep.json's trial tags (all tags, by
    trial name, in `df.attrs["tags"]`); a missing or empty workdir is one ConfigError."""
    from pathlib import Path

    from lm.errors import ConfigError
    if not Path(workdir).is_dir() and "://" not in workdir:
        raise ConfigError(f"{workdir}: no such directory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = load(workdir)
    if df.empty:
        raise ConfigError(f"{workdir}: no runs (no */config.json) there")
    tags = _tags(Path(workdir))
    df.attrs["tags"] = tags  # trial name -> tags (arm, size, budget, ...) for analyze
    for col in TAG_COLUMNS:
        if any(col in t for t in tags.values()) and col not in df:
            df.insert(2, col, [tags.get(r, {}).get(col) for r in df["run"]])
    return df


def _tags(workdir) -> dict[str, dict]:
    try:
        spec = json.loads((workdir / "sweep.json").read_text())
        return {t["name"]: t.get("tags", {}) for t in spec["trials"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def varying_columns(df: pd.DataFrame) -> list[str]:
    """Config columns whose value differs between runs (the sweep's axes)."""
    cols = []
    for c in df.columns:
        if c not in CONFIG_DEFAULTS or c in _BOOKKEEPING or c.startswith("track."):
            continue
        if df[c].astype(str).nunique(dropna=False) > 1:
            cols.append(c)
    return cols


def group_columns(df: pd.DataFrame, vary: list[str]) -> list[str]:
    """The arm/size tags, then varying config columns they do not already determine."""
    tags = [c for c in TAG_COLUMNS if c in df and df[c].astype(str).nunique() > 1]
    out = list(tags)
    for c in vary:
        if tags and (df.groupby(tags, dropna=False)[c]
                     .agg(lambda x: x.astype(str).nunique()) <= 1).all():
            continue
        out.append(c)
    return out
