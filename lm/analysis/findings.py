"""The findings page: for each stored sweep, the paper it reproduces, the paper's claims,
what lmlab measured (with intervals and seed counts), a verdict, the command and the wall
time, written as markdown by `lm findings WORKDIR... --out docs/findings.md`.

A sweep spec (experiments/*.py) declares what its sweep tests, next to how it runs it:

    PAPER = "Wortsman et al. 2023, Small-scale proxies ... (arXiv:2309.14322)"
    def findings(sweep) -> list[Finding]      # sweep: lm.analysis.analyses.Sweep

and `findings` measures each claim from the sweep's runs with the helpers here, so a
verdict is computed from the stored results, never typed. The verdict words:

    reproduced       every interval the claim needs excludes the null, the right way
    partly           some of them do (e.g. at the largest width only)
    not reproduced   an interval excludes the null the wrong way
    not resolved     the intervals include the null, or an optimum sits on the grid's
                     edge, or there are too few seeds for an interval
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_RESOLVED = (
    "reproduced", "partly", "not reproduced", "not resolved")


@dataclass(frozen=True)
class Finding:
    """One claim of a paper and what the sweep measured of it. `figures`: PNG names under
    the sweep's analysis/ folder that show it."""
    claim: str
    result: str
    verdict: str
    figures: tuple[str, ...] = ()


# ------------------------------------------------------------------ measuring helpers


def iv(mean: float, lo: float, hi: float, fmt: str = "+.3f") -> str:
    """'mean [lo, hi]', or 'mean (no interval)' when there is none."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:{fmt}} (no interval)"
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def sign_verdict(intervals: list[tuple[float, float]], want: str) -> str:
    """The verdict of a claim that each interval lies below (`want` "<0") or above (">0")
    zero: all of them -> reproduced, some -> partly, any the other way round -> not
    reproduced, none -> not resolved."""
    ok = [lo > 0 if want == ">0" else hi < 0 for lo, hi in intervals]
    wrong = [hi < 0 if want == ">0" else lo > 0 for lo, hi in intervals]
    known = [math.isfinite(lo) and math.isfinite(hi) for lo, hi in intervals]
    if not intervals or not any(known):
        return NOT_RESOLVED
    if all(ok):
        return REPRODUCED
    if any(wrong) and not any(ok):
        return NOT_REPRODUCED
    return PARTLY if any(ok) else NOT_RESOLVED


def paired_finding(claim: str, df: pd.DataFrame, metric: str, a: str, b: str, over: str,
                   want: str, *, label: str, what: str = "", seed: str = "seed",
                   figures: tuple[str, ...] = ()) -> tuple[Finding, pd.DataFrame]:
    """A claim that arm `a`'s `metric` is below (`want` "<0") or above (">0") arm `b`'s
    at every value of `over` (e.g. each width), measured as the difference paired by
    `seed` with its Student-t interval. Returns the Finding and the differences (indexed
    by `over`: diff, ci_lo, ci_hi, pairs)."""
    from lm.analysis.seeds import paired_difference
    d = paired_difference(df, metric, "arm", a, b, [over], pair=seed).set_index(over)
    text = (f"{what or f'{a} minus {b}'}, paired by seed: " + "; ".join(
        f"{label} {k:g}: {iv(r['diff'], r['ci_lo'], r['ci_hi'])}" for k, r in d.iterrows())
        + f" ({int(d['pairs'].min()) if len(d) else 0} seeds)")
    verdict = sign_verdict([(r["ci_lo"], r["ci_hi"]) for _, r in d.iterrows()], want)
    return Finding(claim, text, verdict, figures), d


def loss_at_best_lr(runs: pd.DataFrame, by: list[str], seed: str = "seed",
                    lr: str = "optim.lr", loss: str = "final_val_loss") -> pd.DataFrame:
    """Per group `by`: the LR with the best mean loss over seeds (a diverged or unfinished
    run counts as infinitely bad), whether it is the grid's edge, and each seed's loss
    there: columns by + [seed, lr, edge, loss] (one row per seed)."""
    rows = []
    for key, g in runs.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        ok = g["status"] == "completed"
        vals = g[loss].where(ok, np.inf).fillna(np.inf)
        mean = vals.groupby(g[lr]).mean().sort_index()
        best = float(mean.idxmin())
        edge = ("low" if best == mean.index[0] else "high" if best == mean.index[-1] else "") \
            if len(mean) > 1 else ""
        at = g[g[lr] == best]
        for _, r in at.iterrows():
            value = r[loss] if r["status"] == "completed" else math.inf
            rows.append({**dict(zip(by, key)), seed: r[seed], "lr": best, "edge": edge,
                         "loss": float(value)})
    return pd.DataFrame(rows)


def per_seed_slope(per_seed: pd.DataFrame, x: str, y: str, seed: str = "seed"):
    """The slope of `y` against log2(`x`) fitted per seed, and its mean with a Student-t
    interval over seeds (an `lm.analysis.seeds.Interval`)."""
    from lm.analysis.seeds import interval
    slopes = []
    for _, g in per_seed.groupby(seed):
        g = g[np.isfinite(g[y].to_numpy(float))]
        if g[x].nunique() >= 2:
            slopes.append(np.polyfit(np.log2(g[x].to_numpy(float)), g[y].to_numpy(float), 1)[0])
    return interval(slopes)


# ------------------------------------------------------------------ the page


def _wall_time(workdir: Path) -> tuple[float, dict]:
    """Seconds of every `lm sweep` invocation on the workdir (sweep_times.jsonl) and the
    machine of the last one."""
    from lm.sweep.runner import TIMES
    total, machine = 0.0, {}
    path = workdir / TIMES
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            total += float(rec.get("wall_s", 0))
            machine = {k: rec[k] for k in ("cpu", "cores", "memory_gib") if k in rec}
    return total, machine


def _minutes(seconds: float) -> str:
    return "not recorded" if seconds <= 0 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


@dataclass(frozen=True)
class Study:
    """One stored sweep's part of the page."""
    name: str
    paper: str
    command: str
    smoke: bool
    trials: int
    finished: int
    seeds: int
    wall_s: float
    machine: dict
    findings: list[Finding]
    analysis: Path


def study(workdir: str | Path) -> Study:
    """Measure a stored sweep's findings (its spec's `findings(sweep)`), after running
    `lm analyze`'s automatic analyses quietly so that their figures exist."""
    from lm.analysis import analyses
    from lm.config import exec_python_file
    from lm.errors import ConfigError
    wd = Path(workdir)
    try:
        meta = json.loads((wd / "sweep.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{wd}: not a sweep workdir (no readable sweep.json: {e})") from None
    spec = Path(meta["spec"])
    module = exec_python_file(spec, "sweep spec")
    if not hasattr(module, "findings") or not hasattr(module, "PAPER"):
        raise ConfigError(f"{spec}: declares no PAPER and findings(sweep): nothing to report")
    sweep = analyses.Sweep(str(wd), analyses.default_options())
    with contextlib.redirect_stdout(io.StringIO()):
        analyses.analyze(str(wd), sweep.options)
        found = list(module.findings(sweep))
    wall, machine = _wall_time(wd)
    try:
        rel = spec.relative_to(Path.cwd())
    except ValueError:
        rel = Path("experiments") / spec.name
    seeds = sweep.runs[sweep.seed].nunique() if sweep.seed else 1
    return Study(name=spec.stem, paper=module.PAPER,
                 command=f"lm sweep {rel} --workdir {wd}" + (" --smoke" if meta.get("smoke") else ""),
                 smoke=bool(meta.get("smoke")), trials=len(meta.get("trials", sweep.runs)),
                 finished=len(sweep.finished), seeds=int(seeds), wall_s=wall, machine=machine,
                 findings=found, analysis=sweep.out)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def page(studies: list[Study], out: Path | None, argv: str) -> str:
    """The markdown page; with `out`, each study's figures are copied next to it (into
    <out's folder>/<out's stem>/<study>/) and shown."""
    lines = [
        "# Findings: the papers lmlab's experiments reproduce",
        "",
        f"Generated by `{argv}` from the stored sweeps "
        f"({time.strftime('%Y-%m-%d')}); do not edit by hand: rerun the sweeps and the "
        "command. Each verdict is computed from the runs by the experiment's "
        "`findings()` (experiments/*.py); intervals are 95% over seeds (Student-t, or a "
        "bootstrap over seeds for fitted optima), and an optimum on its grid's edge is a "
        "bound, never a value.",
        "",
        "| experiment | claim | lmlab's result | verdict | seeds | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for s in studies:
        for i, f in enumerate(s.findings):
            name = f"[{s.name}](#{s.name}){' (smoke)' if s.smoke else ''}" if i == 0 else ""
            lines.append(f"| {name} | {_cell(f.claim)} | {_cell(f.result)} | **{f.verdict}** "
                         f"| {s.seeds} | {_minutes(s.wall_s) if i == 0 else ''} |")
    for s in studies:
        m = s.machine
        lines += ["", f"## {s.name}", "", f"*{s.paper}*", "",
                  f"- command: `{s.command}`",
                  f"- trials: {s.finished} of {s.trials} finished, {s.seeds} seed(s)",
                  f"- wall time: {_minutes(s.wall_s)}"
                  + (f" on {m.get('cores')} cores of {m.get('cpu')} ({m.get('memory_gib')} GiB)"
                     if m else ""), ""]
        for f in s.findings:
            lines += [f"**{f.claim}** — {f.verdict}. {f.result}", ""]
        names = dict.fromkeys(n for f in s.findings for n in f.figures)
        for name in names if out is not None else ():
            src = s.analysis / name
            if src.exists():
                dst = out.parent / out.stem / s.name / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                lines += [f"![{s.name}: {name}]({dst.relative_to(out.parent).as_posix()})", ""]
    return "\n".join(lines) + "\n"


def write(workdirs: list[str], out: str | None, argv: str) -> str:
    """The page of the sweeps in `workdirs`, written to `out` (with its figures) or
    returned for printing."""
    studies = [study(w) for w in workdirs]
    target = Path(out) if out else None
    text = page(studies, target, argv)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return text
