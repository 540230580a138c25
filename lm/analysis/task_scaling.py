"""Two-step task scaling law: downstream accuracy of a larger run from a ladder of smaller
ones (Llama 3, section 3.2.1; Bhagia et al. 2024, "Establishing Task Scaling Laws via
Compute-Efficient Model Ladders", OLMo).

Step 1, task loss of the correct answer (`correct_bpb`, the gold continuation's
bits-per-byte, or `correct_nll` in nats) as a power law in training compute C,

    L(C) = A C^-alpha + E                         (`fit_compute_law`)

or in parameters N and tokens D, L(N, D) = A / N^alpha + B / D^beta + E, which is
Chinchilla's approach-3 law fitted by `scaling.fit_loss_law` to the task loss.
Step 2, accuracy as a sigmoid of that loss,

    Acc(L) = a / (1 + exp(-k (L - L0))) + b       (`fit_accuracy_law`)

with k <= 0 (a higher loss is a lower accuracy) and b near chance. A held-out run is
predicted by chaining them, Acc_hat = Acc(L_hat(C)). `bootstrap_task_law` resamples the
runs with replacement, refits both steps and gives percentile intervals for every
parameter and for the held-out prediction.

Step 1 is a least-squares fit of log L = logaddexp(ln A - alpha ln C, ln E) (log space:
the losses of a ladder differ by a factor, and relative errors are what is comparable),
ln C centred for conditioning, from a small grid of starts with bounded parameters.
Step 2 is a least-squares fit in accuracy, bounded (0 <= a, b <= 1, k <= 0, L0 near the
losses seen), from starts around the data's range and the chance level.

numpy/scipy only; the plot imports matplotlib lazily (`scaling._pyplot`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings
from pathlib import Path

import numpy as np
from scipy import optimize
from scipy.special import expit

from lm.analysis import scaling

#: Fewest runs a law is fitted to (the sigmoid has 4 parameters; the N, D law needs 5).
MIN_RUNS = 4


# ------------------------------------------------------------------ step 1: L(C)


@dataclasses.dataclass(frozen=True)
class ComputeLaw:
    """L(C) = A C^-alpha + E."""

    A: float
    alpha: float
    E: float

    def __call__(self, compute):
        return self.A * np.asarray(compute, float) ** -self.alpha + self.E

    @property
    def params(self) -> dict:
        return {"A": self.A, "alpha": self.alpha, "E": self.E}

    def theta(self, x_ref: float) -> np.ndarray:
        """The fit's coordinates (ln A - alpha x_ref, alpha, ln E), ln C centred at x_ref."""
        return np.array([math.log(self.A) - self.alpha * x_ref, self.alpha, math.log(self.E)])


def _log_power_residuals(theta, x, log_loss):
    a, alpha, e = theta
    return np.logaddexp(a - alpha * x, e) - log_loss


def _log_power_jacobian(theta, x, log_loss):
    a, alpha, e = theta
    w0 = expit(a - alpha * x - e)   # softmax weight of the power term
    return np.stack([w0, -x * w0, 1.0 - w0], axis=1)


def _least_squares(fun, jac, starts, lower, upper, args) -> np.ndarray:
    """Bounded least squares from every start (clipped into the bounds); the parameters
    of the lowest cost. Tight tolerances: a ladder's residuals are small."""
    lower, upper = np.array(lower, float), np.array(upper, float)
    fits = []
    with scaling._single_threaded_blas():
        for x0 in np.clip(np.asarray(starts, float), lower + 1e-9, upper - 1e-9):
            r = optimize.least_squares(fun, x0, jac=jac, bounds=(lower, upper), args=args,
                                       x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12)
            if np.all(np.isfinite(r.x)) and np.isfinite(r.cost):
                fits.append(r)
    if not fits:
        raise ValueError("every start of the fit failed")
    return min(fits, key=lambda r: r.cost).x


def fit_compute_law(compute, loss, *, starts=None) -> ComputeLaw:
    """Fit L(C) = A C^-alpha + E to runs (compute: training FLOPs; loss: a task loss).
    `starts`: ComputeLaws to start from (a bootstrap refit); default a grid of 12."""
    compute, loss = _finite_positive(compute, loss, names=("compute", "loss"))
    if compute.size < 3:
        raise ValueError(f"3 parameters need at least 3 runs, have {compute.size}")
    log_c, log_loss = np.log(compute), np.log(loss)
    x_ref = float(log_c.mean())
    x = log_c - x_ref
    top = float(log_loss.max())
    lower, upper = [-50.0, 0.0, -30.0], [top + 30.0, 5.0, top]
    if starts is None:
        grid = []
        for frac, alpha in itertools.product((0.2, 0.6, 0.9), (0.05, 0.2, 0.5, 1.0)):
            e = math.log(frac * loss.min())
            a = math.log(max(loss.mean() - frac * loss.min(), 1e-6 * loss.mean()))
            grid.append([a, alpha, e])
        x0s = np.array(grid)
    else:
        x0s = np.array([s.theta(x_ref) for s in starts])
    best = _least_squares(_log_power_residuals, _log_power_jacobian, x0s, lower, upper,
                          (x, log_loss))
    a, alpha, e = (float(v) for v in best)
    return ComputeLaw(A=math.exp(a + alpha * x_ref), alpha=alpha, E=math.exp(e))


# ------------------------------------------------------------------ step 2: Acc(L)


@dataclasses.dataclass(frozen=True)
class AccuracyLaw:
    """Acc(L) = a / (1 + exp(-k (L - L0))) + b."""

    a: float
    k: float
    L0: float
    b: float

    def __call__(self, loss):
        return self.a * expit(self.k * (np.asarray(loss, float) - self.L0)) + self.b

    @property
    def params(self) -> dict:
        return {"a": self.a, "k": self.k, "L0": self.L0, "b": self.b}

    @property
    def theta(self) -> np.ndarray:
        return np.array([self.a, self.k, self.L0, self.b])


def _sigmoid_residuals(theta, loss, acc):
    a, k, l0, b = theta
    return a * expit(k * (loss - l0)) + b - acc


def _sigmoid_jacobian(theta, loss, acc):
    a, k, l0, b = theta
    s = expit(k * (loss - l0))
    ds = a * s * (1.0 - s)
    return np.stack([s, ds * (loss - l0), -ds * k, np.ones_like(s)], axis=1)


def fit_accuracy_law(loss, acc, *, chance: float | None = None, starts=None) -> AccuracyLaw:
    """Fit Acc(L) = a / (1 + exp(-k (L - L0))) + b to runs' (task loss, accuracy).
    `chance` (1 / number of choices) is where b starts. `starts`: AccuracyLaws to start
    from (a bootstrap refit); default a grid of 12 around the data."""
    loss = scaling._as_array(loss, "loss")
    acc = scaling._as_array(acc, "acc")
    if loss.shape != acc.shape:
        raise ValueError(f"loss and acc differ in length: {loss.size}, {acc.size}")
    ok = np.isfinite(loss) & np.isfinite(acc)
    loss, acc = loss[ok], acc[ok]
    if loss.size < 4:
        raise ValueError(f"4 parameters need at least 4 runs, have {loss.size}")
    span = max(float(np.ptp(loss)), 1e-6)
    lower = [0.0, -50.0 / span, loss.min() - 3 * span, 0.0]
    upper = [1.0, 0.0, loss.max() + 3 * span, 1.0]
    if starts is None:
        b0 = float(np.clip(chance if chance is not None else 0.9 * acc.min(), 0.0, acc.min()))
        grid = []
        for top, q, k in itertools.product(
                (min(acc.max() + 0.05, 1.0), 1.0), (0.25, 0.5, 0.75), (-2.0, -8.0)):
            grid.append([top - b0, k / span, float(np.quantile(loss, q)), b0])
        x0s = np.array(grid)
    else:
        x0s = np.array([s.theta for s in starts])
    best = _least_squares(_sigmoid_residuals, _sigmoid_jacobian, x0s, lower, upper,
                          (loss, acc))
    return AccuracyLaw(*(float(v) for v in best))


# ------------------------------------------------------------------ the chain


@dataclasses.dataclass(frozen=True)
class TaskLaw:
    """Step 1 (`ComputeLaw` of C, or `scaling.LossLaw` of N and D) chained into step 2."""

    loss_law: ComputeLaw | scaling.LossLaw
    acc_law: AccuracyLaw
    n_runs: int

    @property
    def by_compute(self) -> bool:
        return isinstance(self.loss_law, ComputeLaw)

    def loss(self, at):
        """The task loss at `at`: a compute C, or (N, D) for the N, D law."""
        return self.loss_law(at) if self.by_compute else self.loss_law(*at)

    def acc(self, at):
        return self.acc_law(self.loss(at))

    @property
    def params(self) -> dict:
        step1 = self.loss_law.params if self.by_compute else {
            k: getattr(self.loss_law, k) for k in ("A", "alpha", "B", "beta", "E")}
        return {**step1, **self.acc_law.params}


def _finite_positive(*arrays, names, acc=None) -> tuple[np.ndarray, ...]:
    """The runs where every array is finite and positive (log of them is taken), and
    `acc`, if given, finite (an accuracy may be 0); it comes back last."""
    arrays = [scaling._as_array(a, k) for a, k in zip(arrays, names)]
    if acc is not None:
        arrays.append(scaling._as_array(acc, "acc"))
    if len({a.size for a in arrays}) > 1:
        raise ValueError(f"{', '.join(names)}{', acc' if acc is not None else ''} differ "
                         f"in length: {[a.size for a in arrays]}")
    ok = np.logical_and.reduce([np.isfinite(a) & (a > 0) for a in arrays[:len(names)]])
    if acc is not None:
        ok &= np.isfinite(arrays[-1])
    return tuple(a[ok] for a in arrays)


def _runs(loss, acc, compute, n, d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, loss, acc) of the usable runs (all finite; loss and sizes positive): x is C
    per run, or (N, D) per run as a (runs, 2) array for the N, D law."""
    if (compute is None) == (n is None or d is None):
        raise ValueError("give compute (for L(C)) or n and d (for L(N, D)), not both")
    if compute is not None:
        compute, loss, acc = _finite_positive(compute, loss, names=("compute", "loss"), acc=acc)
        return compute, loss, acc
    n, d, loss, acc = _finite_positive(n, d, loss, names=("n", "d", "loss"), acc=acc)
    return np.stack([n, d], axis=1), loss, acc


def fit_task_law(loss, acc, *, compute=None, n=None, d=None, chance: float | None = None,
                 grid: dict | None = None, starts: TaskLaw | None = None) -> TaskLaw:
    """Both steps: the task loss as a power law in `compute` (or in `n` and `d`, from
    `grid`'s starts of `scaling.fit_loss_law`), then accuracy as a sigmoid of the loss.
    Runs with a non-finite value (or a non-positive loss or size) are left out; fewer
    than `MIN_RUNS` usable runs is a ValueError. `starts`: a fit to start from (the
    bootstrap's refits)."""
    x, loss, acc = _runs(loss, acc, compute, n, d)
    if loss.size < MIN_RUNS:
        raise ValueError(f"{loss.size} usable runs; a task law needs at least {MIN_RUNS}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-finite runs were dropped above
        if compute is not None:
            loss_law = fit_compute_law(x, loss, starts=None if starts is None
                                       else [starts.loss_law])
        elif starts is None:
            loss_law = scaling.fit_loss_law(x[:, 0], x[:, 1], loss, grid=grid)
        else:
            loss_law = scaling.refit_loss_law(starts.loss_law, x[:, 0], x[:, 1], loss)
    acc_law = fit_accuracy_law(loss, acc, chance=chance,
                               starts=None if starts is None else [starts.acc_law])
    return TaskLaw(loss_law=loss_law, acc_law=acc_law, n_runs=int(loss.size))


@dataclasses.dataclass(frozen=True)
class TaskLawBootstrap(scaling.PercentileIntervals):
    """Percentile bootstrap of a `TaskLaw` over runs: samples[name] for every parameter
    (`TaskLaw.params`) and, with a held-out point, `loss_hat` and `acc_hat` there."""

    fit: TaskLaw
    samples: dict
    confidence: float
    at: object = None   # the held-out point: C, or (N, D)

    @property
    def _estimates(self) -> dict:
        return _quantities(self.fit, self.at)


def _quantities(law: TaskLaw, at) -> dict:
    out = dict(law.params)
    if at is not None:
        out["loss_hat"] = float(law.loss(at))
        out["acc_hat"] = float(law.acc(at))
    return out


def bootstrap_task_law(loss, acc, *, compute=None, n=None, d=None, at=None,
                       fit: TaskLaw | None = None, n_boot: int = 200,
                       confidence: float = 0.95, seed: int = 0, chance: float | None = None,
                       grid: dict | None = None) -> TaskLawBootstrap:
    """Resample the runs with replacement `n_boot` times and refit both steps (from the
    full fit, `fit` or fitted here); percentile intervals of every parameter and, at the
    held-out point `at` (C, or (N, D)), of the predicted loss and accuracy. A resample
    whose fit fails (too few distinct runs) counts as NaN, left out of the intervals."""
    x, loss, acc = _runs(loss, acc, compute, n, d)
    by_compute = compute is not None
    if fit is None:
        fit = fit_task_law(loss, acc, chance=chance, grid=grid,
                           **({"compute": x} if by_compute else {"n": x[:, 0], "d": x[:, 1]}))
    rng = np.random.default_rng(seed)
    keys = list(_quantities(fit, at))
    rows = []
    for _ in range(n_boot):
        idx = rng.integers(0, loss.size, loss.size)
        xi = x[idx]
        try:
            law = fit_task_law(loss[idx], acc[idx], chance=chance, starts=fit,
                               **({"compute": xi} if by_compute else
                                  {"n": xi[:, 0], "d": xi[:, 1]}))
            rows.append(_quantities(law, at))
        except (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError):
            rows.append(dict.fromkeys(keys, math.nan))
    samples = {k: np.array([r[k] for r in rows], float) for k in keys}
    return TaskLawBootstrap(fit=fit, samples=samples, confidence=confidence, at=at)


# ------------------------------------------------------------------ plot


def plot_task_law(law: TaskLaw, compute, loss, acc, path, *, task: str = "",
                  loss_name: str = "correct_bpb", acc_name: str = "acc",
                  holdout: dict | None = None, boot: TaskLawBootstrap | None = None,
                  fitted=None) -> Path:
    """Left: task loss vs compute with the fitted law (for the N, D law, `fitted`: its
    value at each run, hollow); right: accuracy vs task loss with the sigmoid. `holdout` ({"name",
    "compute", "at", "loss", "acc"}; measured values may be NaN) is starred where it was
    measured and drawn where predicted, with `boot`'s 95% intervals as error bars."""
    plt = scaling._pyplot()
    compute, loss, acc = (np.asarray(v, float) for v in (compute, loss, acc))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.scatter(compute, loss, color="C0", s=16, label="ladder runs")
    c_max = compute.max() if holdout is None else max(compute.max(), holdout["compute"])
    if law.by_compute:
        cc = np.geomspace(compute.min() / 1.5, c_max * 1.5, 100)
        p = law.loss_law
        ax.plot(cc, law.loss(cc), color="C0", lw=1,
                label=f"L = {p.A:.3g} C^-{p.alpha:.3f} + {p.E:.3g}")
    elif fitted is not None:
        ax.scatter(compute, fitted, facecolor="none", edgecolor="C0", s=30,
                   label="fitted L(N, D)")
    ll = np.linspace(min(loss.min(), law.acc_law.L0) - 0.1 * np.ptp(loss),
                     max(loss.max(), law.acc_law.L0) + 0.1 * np.ptp(loss), 200)
    if holdout is not None:
        pred_loss, pred_acc = float(law.loss(holdout["at"])), float(law.acc(holdout["at"]))
        ll = np.linspace(min(ll.min(), pred_loss), max(ll.max(), pred_loss), 200)
        err = {}
        if boot is not None:
            err = {q: np.abs(np.array(boot.interval(f"{q}_hat")) - v)[:, None]
                   for q, v in (("loss", pred_loss), ("acc", pred_acc))}
        ax.errorbar([holdout["compute"]], [pred_loss], yerr=err.get("loss"), fmt="x",
                    color="C3", capsize=3, zorder=4, label=f"predicted {holdout['name']}")
        ax.scatter([holdout["compute"]], [holdout["loss"]], marker="*", s=120, color="C1",
                   edgecolor="k", linewidth=0.5, zorder=3, label=f"measured {holdout['name']}")
        ax2.errorbar([pred_loss], [pred_acc], yerr=err.get("acc"), fmt="x", color="C3",
                     capsize=3, zorder=4, label="predicted (chained)")
        ax2.scatter([holdout["loss"]], [holdout["acc"]], marker="*", s=120, color="C1",
                    edgecolor="k", linewidth=0.5, zorder=3, label="measured")
    ax.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel=f"{task} {loss_name}",
           title=f"{task}: step 1, task loss")
    ax.legend(fontsize=7)
    s = law.acc_law
    ax2.scatter(loss, acc, color="C0", s=16, label="ladder runs")
    ax2.plot(ll, s(ll), color="C0", lw=1,
             label=f"{s.a:.3g} / (1 + exp({-s.k:.3g} (L - {s.L0:.3g}))) + {s.b:.3g}")
    ax2.set(xlabel=f"{task} {loss_name}", ylabel=f"{task} {acc_name}",
            title=f"{task}: step 2, accuracy")
    ax2.legend(fontsize=7)
    return scaling.save_figure(fig, plt, path)


# ------------------------------------------------------------------ `lm analyze`


def task_names(runs) -> list[str]:
    """The tasks with score columns (`tasks/<task>/<metric>`), in column order."""
    from lm.analysis.results import TASK_PREFIX
    names = [c[len(TASK_PREFIX):].rsplit("/", 1)[0] for c in runs.columns
             if c.startswith(TASK_PREFIX) and c.count("/") >= 2]
    return list(dict.fromkeys(names))


def _column(runs, name: str) -> np.ndarray:
    return runs[name].to_numpy(float) if name in runs else np.full(len(runs), math.nan)


def _x(runs, law: str):
    """Per run: training FLOPs (law "C"), or N (non-embedding parameters, OLMo's N; all
    parameters where a summary lacks them) and D (tokens seen) for law "ND"."""
    if law == "C":
        return {"compute": _column(runs, "training_flops")}
    n = _column(runs, "non_embedding_params")
    n = np.where(np.isfinite(n), n, _column(runs, "params"))
    return {"n": n, "d": _column(runs, "tokens_seen")}


def _interval(boot, name: str) -> str:
    if boot is None:
        return ""
    lo, hi = boot.interval(name)
    return f" [{lo:.4g}, {hi:.4g}]"


def report(runs, out, *, tasks=None, holdout: str | None = None,
           loss_metric: str = "correct_bpb", acc_metric: str = "acc", law: str = "C",
           n_boot: int = 100, seed: int = 0, grid: dict | None = None) -> None:
    """Print the two-step law of each task (`tasks`, default every task with columns)
    fitted to `runs` (rows of `results.load`) but one held out (`holdout`, a run name;
    default: the one with the most training FLOPs), its parameters with 95% bootstrap
    intervals, the prediction for the held-out run beside its measurement, and a plot
    per task under `out`. A task with too few runs or a failed fit is one line. `law`:
    "C" (L of training FLOPs) or "ND" (L of N and D, from `grid`'s starts)."""
    from lm.analysis.results import TASK_PREFIX
    law_text = ("L = A C^-alpha + E" if law == "C" else "L = A/N^alpha + B/D^beta + E")
    print(f"\nTask scaling, two steps (Bhagia et al. 2024; Llama 3, sec. 3.2.1): {loss_metric} "
          f"{law_text}, then {acc_metric} = a / (1 + exp(-k (L - L0))) + b; "
          + (f"95% intervals from {n_boot} bootstrap resamples of the runs:"
             if n_boot > 0 else "no bootstrap (--n-boot 0):"))
    x_all = _x(runs, law)
    flops = _column(runs, "training_flops")
    need = MIN_RUNS if law == "C" else 5
    for task in tasks if tasks is not None else task_names(runs):
        col = f"{TASK_PREFIX}{task}/"
        loss, acc = _column(runs, col + loss_metric), _column(runs, col + acc_metric)
        ok = np.isfinite(loss) & np.isfinite(acc) & (loss > 0) & np.logical_and.reduce(
            [np.isfinite(v) & (v > 0) for v in x_all.values()])
        names = runs["run"].to_numpy(object)
        if holdout is not None:
            held = int(np.flatnonzero(names == holdout)[0])
        elif ok.any():
            held = int(np.flatnonzero(ok)[np.argmax(np.where(np.isfinite(flops), flops, -1)[ok])])
        else:
            print(f"  {task}: not enough data: no run has finite {acc_metric} and "
                  f"{loss_metric} with its size")
            continue
        fit_rows = ok & (np.arange(len(runs)) != held)
        if fit_rows.sum() < need:
            print(f"  {task}: not enough data: {int(fit_rows.sum())} usable runs besides "
                  f"the held-out {names[held]} (need {need})")
            continue
        x = {k: v[fit_rows] for k, v in x_all.items()}
        at = (x_all["compute"][held] if law == "C"
              else (x_all["n"][held], x_all["d"][held]))
        if not np.all(np.isfinite(at)):
            at = None
        choices = np.nanmedian(_column(runs, col + "num_choices")[fit_rows]) \
            if col + "num_choices" in runs else math.nan
        chance = 1.0 / choices if np.isfinite(choices) and choices > 0 else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = fit_task_law(loss[fit_rows], acc[fit_rows], chance=chance, **x,
                                   grid=grid)
                boot = (bootstrap_task_law(loss[fit_rows], acc[fit_rows], chance=chance,
                                           at=at, fit=fit, n_boot=n_boot, seed=seed, **x)
                        if n_boot > 0 else None)
        except (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError) as e:
            print(f"  {task}: the fit failed: {e}")
            continue
        print(f"  {task} ({fit.n_runs} runs" + (f", chance {chance:.3g}" if chance else "")
              + "):")
        params = fit.params
        step1 = [k for k in params if k in ("A", "alpha", "B", "beta", "E")]
        for label, keys in (("step 1", step1), ("step 2", ["a", "k", "L0", "b"])):
            print(f"    {label}: " + "  ".join(f"{k}={params[k]:.4g}{_interval(boot, k)}"
                                               for k in keys))
        measured_loss, measured_acc = loss[held], acc[held]
        if at is None:
            print(f"    held-out {names[held]}: no {'training_flops' if law == 'C' else 'N, D'}"
                  " to predict at")
            continue
        pred_loss, pred_acc = float(fit.loss(at)), float(fit.acc(at))
        print(f"    held-out {names[held]}: predicted {acc_metric} {pred_acc:.4g}"
              f"{_interval(boot, 'acc_hat')}, measured {measured_acc:.4g}; predicted "
              f"{loss_metric} {pred_loss:.4g}{_interval(boot, 'loss_hat')}, measured "
              f"{measured_loss:.4g}")
        if np.isfinite(measured_loss):
            print(f"    step 2 alone, from the measured {loss_metric}: {acc_metric} "
                  f"{float(fit.acc_law(measured_loss)):.4g}")
        fitted = None if law == "C" else fit.loss((x["n"], x["d"]))
        path = plot_task_law(
            fit, flops[fit_rows], loss[fit_rows], acc[fit_rows],
            Path(out) / (f"task_scaling_{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}"
                         f"{'' if law == 'C' else '_nd'}.png"),
            task=task, loss_name=loss_metric, acc_name=acc_metric, boot=boot, fitted=fitted,
            holdout={"name": names[held], "compute": flops[held], "at": at,
                     "loss": measured_loss, "acc": measured_acc})
        print(f"    plot: {path}")
