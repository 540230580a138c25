"""Compute-optimal scaling laws from a sweep of finished runs (Hoffmann et al. 2022).

Two of Chinchilla's three estimators, because they fail differently and agreeing
estimates are the check:

* Approach 2 (IsoFLOP profiles), `fit_isoflops`: runs are grouped by compute budget C;
  within a budget the final loss is a parabola in ln N whose minimiser is N_opt(C)
  (D_opt = C / 6 N_opt); power laws N_opt = k_N C^a, D_opt = k_D C^b are then fitted by
  least squares in log-log. Model-free apart from the parabola, but it needs an IsoFLOP
  sweep that brackets the optimum of every budget.
* Approach 3 (parametric law), `fit_loss_law`: L(N, D) = E + A / N^alpha + B / D^beta fitted
  to every run at once with the Huber loss on log L (robust to the odd bad run), using
  Chinchilla's parametrisation log L = LSE(a - alpha ln N, b - beta ln D, e) with
  A = e^a, B = e^b, E = e^e, so the fit is unconstrained and well scaled. L-BFGS runs from
  a grid of starts because the objective has many local minima; the best is kept. The
  Huber terms are SUMMED, not averaged: with delta = 1e-3 an averaged objective is
  ~1e-5 and L-BFGS's absolute tolerances stop it early (one of the problems Besiroglu
  et al. 2024 found in the original fit). `bootstrap_loss_law` gives percentile
  intervals by refitting resampled runs, because point estimates of alpha, beta alone
  say nothing about how well a sweep constrains them.

The allocation that minimises the fitted law at 6ND = C is closed form:
N_opt = G (C/6)^a, D_opt = (C/6)^b / G, G = (alpha A / (beta B))^(1/(alpha+beta)),
a = beta / (alpha+beta), b = alpha / (alpha+beta).

numpy/scipy only; the plots import matplotlib lazily (Agg) so fits work without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import optimize

#: Training FLOPs per parameter per token (forward + backward), the Chinchilla convention.
FLOPS_PER_PARAM_TOKEN = 6.0


def _as_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _keep_finite(name: str, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Drop runs with a non-finite or non-positive value: a diverged run has no loss to
    fit and log of a non-positive size is undefined. Warns, because silently shrinking a
    sweep changes the fit."""
    ok = np.ones(arrays[0].shape, bool)
    for a in arrays:
        ok &= np.isfinite(a) & (a > 0)
    if not ok.all():
        warnings.warn(f"{name}: dropping {int((~ok).sum())} of {ok.size} runs with a "
                      "non-finite or non-positive value", stacklevel=3)
    return tuple(a[ok] for a in arrays)


# --------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles.


@dataclasses.dataclass(frozen=True)
class IsoFlopBudget:
    """One IsoFLOP profile: the runs at one compute budget and their parabola."""

    compute: float          # the budget (geometric mean of its runs' compute)
    n: np.ndarray           # parameters of each run
    loss: np.ndarray        # final loss of each run
    coeffs: np.ndarray      # loss = c0 (ln N)^2 + c1 ln N + c2 (numpy.polyfit order)
    n_opt: float            # minimiser of the parabola
    d_opt: float            # compute / (6 n_opt)
    loss_opt: float         # parabola at its minimiser
    interior: bool          # n_opt lies inside the sampled N range (not extrapolated)


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
    """Per-budget optima and the power laws N_opt = k_n C^a, D_opt = k_d C^b through them.

    `budgets` holds every usable profile; `used` marks those the power laws were fitted
    to (interior minimisers only, unless fit_isoflops(allow_extrapolated=True))."""

    budgets: tuple[IsoFlopBudget, ...]
    used: tuple[bool, ...]
    a: float
    k_n: float
    b: float
    k_d: float

    @property
    def compute(self) -> np.ndarray:
        return np.array([g.compute for g in self.budgets])

    @property
    def n_opts(self) -> np.ndarray:
        return np.array([g.n_opt for g in self.budgets])

    @property
    def d_opts(self) -> np.ndarray:
        return np.array([g.d_opt for g in self.budgets])

    def n_opt(self, compute):
        return self.k_n * np.asarray(compute, float) ** self.a

    def d_opt(self, compute):
        return self.k_d * np.asarray(compute, float) ** self.b


def group_budgets(compute, rtol: float = 0.05) -> np.ndarray:
    """Label each run with its nominal budget: runs whose compute differs by less than
    `rtol` (relative, chained in sorted order) share a budget. Needed because 6ND of an
    IsoFLOP run is only approximately the budget once N and D are rounded to a real
    model shape and batch count. Returns the geometric mean of each group, per run."""
    c = _as_array(compute, "compute")
    order = np.argsort(c)
    logc = np.log(c[order])
    breaks = np.flatnonzero(np.diff(logc) > math.log1p(rtol)) + 1
    labels = np.empty_like(c)
    for idx in np.split(order, breaks):
        labels[idx] = math.exp(np.log(c[idx]).mean())
    return labels


def fit_isoflops(n, loss, *, d=None, compute=None, rtol: float = 0.05,
                 min_points: int = 3, allow_extrapolated: bool = False) -> IsoFlopFit:
    """Chinchilla approach 2.

    n, loss: per run parameters and final loss. The budget of a run is `compute` if
    given (e.g. summary training_flops, or the sweep's nominal budget), else 6 * n * d;
    runs are grouped with `group_budgets(.., rtol)`. A budget needs `min_points` distinct
    N and a convex parabola, else it is skipped with a warning. Minimisers outside the
    sampled N range are extrapolations of the parabola and are left out of the power-law
    fit unless `allow_extrapolated`.
    """
    n = _as_array(n, "n")
    loss = _as_array(loss, "loss")
    if compute is None:
        if d is None:
            raise ValueError("fit_isoflops needs d (tokens) or compute per run")
        compute = FLOPS_PER_PARAM_TOKEN * n * _as_array(d, "d")
    compute = _as_array(compute, "compute")
    if not (n.shape == loss.shape == compute.shape):
        raise ValueError(f"n, loss, compute differ in length: {n.size}, {loss.size}, "
                         f"{compute.size}")
    n, loss, compute = _keep_finite("fit_isoflops", n, loss, compute)
    labels = group_budgets(compute, rtol)

    budgets = []
    for c in np.unique(labels):
        sel = labels == c
        bn, bl = n[sel], loss[sel]
        if np.unique(bn).size < min_points:
            warnings.warn(f"budget {c:.3g}: {np.unique(bn).size} distinct N < {min_points}; "
                          "skipped", stacklevel=2)
            continue
        x = np.log(bn)
        coeffs = np.polyfit(x, bl, 2)
        if coeffs[0] <= 0:
            warnings.warn(f"budget {c:.3g}: loss is not convex in ln N (no minimum); "
                          "skipped", stacklevel=2)
            continue
        x_opt = -coeffs[1] / (2 * coeffs[0])
        n_opt = math.exp(x_opt)
        order = np.argsort(bn)
        budgets.append(IsoFlopBudget(
            compute=float(c), n=bn[order], loss=bl[order], coeffs=coeffs, n_opt=n_opt,
            d_opt=float(c) / (FLOPS_PER_PARAM_TOKEN * n_opt),
            loss_opt=float(np.polyval(coeffs, x_opt)),
            interior=bool(x.min() <= x_opt <= x.max())))

    used = tuple(g.interior or allow_extrapolated for g in budgets)
    fitted = [g for g, u in zip(budgets, used) if u]
    if len(budgets) > len(fitted):
        warnings.warn(f"{len(budgets) - len(fitted)} budget(s) have their minimum outside "
                      "the sampled N range; left out of the power-law fit", stacklevel=2)
    if len(fitted) < 2:
        raise ValueError(f"need at least 2 usable budgets for the power laws, have "
                         f"{len(fitted)}")
    logc = np.log([g.compute for g in fitted])
    a, log_kn = np.polyfit(logc, np.log([g.n_opt for g in fitted]), 1)
    b, log_kd = np.polyfit(logc, np.log([g.d_opt for g in fitted]), 1)
    return IsoFlopFit(budgets=tuple(budgets), used=used, a=float(a),
                      k_n=math.exp(log_kn), b=float(b), k_d=math.exp(log_kd))


# --------------------------------------------------------------------------------------
# Approach 3: parametric loss L(N, D) = E + A / N^alpha + B / D^beta.

#: Chinchilla's grid of L-BFGS starts (Hoffmann et al. 2022, appendix D.2), 4500 points,
#: over the parameters (a, b, e, alpha, beta) with A = e^a, B = e^b, E = e^e.
CHINCHILLA_GRID = {
    "a": np.arange(0, 30, 5.0), "b": np.arange(0, 30, 5.0), "e": np.arange(-1, 1.5, 0.5),
    "alpha": np.arange(0, 2.5, 0.5), "beta": np.arange(0, 2.5, 0.5),
}
_PARAMS = ("a", "b", "e", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, and the allocation that minimises it."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan   # summed Huber loss at the fit (nan if not fitted)
    n_runs: int = 0               # runs it was fitted to
    # Distinct local optima found from the grid, best first, as (a, b, e, alpha, beta)
    # rows: the bootstrap restarts from them.
    local_optima: np.ndarray = dataclasses.field(default=None, repr=False, compare=False)

    def __call__(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def theta(self) -> np.ndarray:
        """(a, b, e, alpha, beta) = (ln A, ln B, ln E, alpha, beta)."""
        return np.array([math.log(self.A), math.log(self.B), math.log(self.E),
                         self.alpha, self.beta])

    @property
    def a(self) -> float:
        """Exponent of N_opt in C: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt in C: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        # np.float64 power: a degenerate (negative) ratio gives nan, not a complex number.
        ratio = np.float64(self.alpha * self.A / (self.beta * self.B))
        return float(ratio ** (1 / (self.alpha + self.beta)))

    def n_opt(self, compute):
        return self.G * (np.asarray(compute, float) / FLOPS_PER_PARAM_TOKEN) ** self.a

    def d_opt(self, compute):
        return (np.asarray(compute, float) / FLOPS_PER_PARAM_TOKEN) ** self.b / self.G

    def optimal_allocation(self, compute) -> tuple:
        """(N_opt, D_opt) minimising the law subject to 6 N D = compute."""
        return self.n_opt(compute), self.d_opt(compute)

    def tokens_per_param(self, compute):
        """D_opt / N_opt at `compute` (constant only when alpha == beta)."""
        return self.d_opt(compute) / self.n_opt(compute)


def huber_objective(theta, log_n, log_d, log_loss, delta: float = 1e-3):
    """Summed Huber loss of LSE(a - alpha ln N, b - beta ln D, e) - ln L, and its gradient
    in theta = (a, b, e, alpha, beta). Analytic gradient: each L-BFGS run then costs a few
    dozen vectorised evaluations, which is what makes thousands of starts affordable."""
    a, b, e, alpha, beta = theta
    t0 = a - alpha * log_n
    t1 = b - beta * log_d
    m = np.maximum(np.maximum(t0, t1), e)       # stable log-sum-exp
    w0, w1, w2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = w0 + w1 + w2
    r = m + np.log(s) - log_loss
    abs_r = np.abs(r)
    quad = abs_r <= delta
    f = 0.5 * np.dot(r[quad], r[quad]) + delta * (abs_r[~quad].sum() - 0.5 * delta * (~quad).sum())
    psi = np.clip(r, -delta, delta) / s           # Huber derivative times softmax denominator
    p0, p1 = psi * w0, psi * w1
    grad = np.array([p0.sum(), p1.sum(), np.dot(psi, w2),
                     -np.dot(p0, log_n), -np.dot(p1, log_d)])
    return float(f), grad


def _grid_starts(grid: dict | None) -> np.ndarray:
    grid = CHINCHILLA_GRID if grid is None else grid
    missing = set(_PARAMS) - set(grid)
    if missing:
        raise ValueError(f"grid lacks {sorted(missing)}; needs {_PARAMS}")
    return np.array(list(itertools.product(*(np.atleast_1d(grid[p]) for p in _PARAMS))),
                    dtype=float)


def _single_threaded_blas():
    """L-BFGS-B calls OpenBLAS on tiny matrices every iteration; with OpenBLAS's default
    thread pool on a busy machine each call waits on spinning threads and a fit runs
    ~50x slower (measured on 2 loaded cores: 2.8 ms vs ~0.05 ms per iteration; 72
    starts 20.7 s vs 0.95 s). One BLAS thread is always enough here. threadpoolctl is
    optional: without it fits are correct, only possibly slow."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _minimise(starts: np.ndarray, log_n, log_d, log_loss, delta: float):
    """L-BFGS-B from every start; returns (thetas, objectives) sorted best first."""
    # Tight tolerances: the summed objective near the optimum is ~n * delta * |r| and its
    # gradient small; scipy's defaults would stop early on small sweeps.
    options = {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10}
    thetas, objs = [], []
    for x0 in starts:
        res = optimize.minimize(huber_objective, x0, args=(log_n, log_d, log_loss, delta),
                                jac=True, method="L-BFGS-B", options=options)
        if np.all(np.isfinite(res.x)) and np.isfinite(res.fun):
            thetas.append(res.x)
            objs.append(res.fun)
    if not thetas:
        raise RuntimeError("every L-BFGS start failed")
    order = np.argsort(objs)
    return np.array(thetas)[order], np.array(objs)[order]


def _distinct(thetas: np.ndarray, k: int, tol: float = 1e-3) -> np.ndarray:
    out = []
    for th in thetas:
        if all(np.max(np.abs(th - o)) > tol for o in out):
            out.append(th)
            if len(out) == k:
                break
    return np.array(out)


def _law(theta, objective, n_runs, local_optima=None) -> LossLaw:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return LossLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                   objective=float(objective), n_runs=n_runs, local_optima=local_optima)


def _prepare(n, d, loss):
    n, d, loss = _as_array(n, "n"), _as_array(d, "d"), _as_array(loss, "loss")
    if not (n.shape == d.shape == loss.shape):
        raise ValueError(f"n, d, loss differ in length: {n.size}, {d.size}, {loss.size}")
    n, d, loss = _keep_finite("fit_loss_law", n, d, loss)
    if n.size < 5:
        raise ValueError(f"5 parameters need at least 5 runs, have {n.size}")
    return np.log(n), np.log(d), np.log(loss)


def fit_loss_law(n, d, loss, *, delta: float = 1e-3, grid: dict | None = None,
                 keep_optima: int = 8) -> LossLaw:
    """Chinchilla approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta to runs.

    n: parameters per run (summary `params` or `non_embedding_params`: use the count
    your compute accounting uses), d: training tokens, loss: final loss. Non-finite runs
    are dropped with a warning. `grid` maps each of a, b, e, alpha, beta to the values to
    start from (all combinations); default `CHINCHILLA_GRID` (4500 starts: ~30 s for a
    hundred runs on one busy core; a coarser grid often finds the same optimum, check by
    comparing objectives). The best optimum is returned; the `keep_optima` best distinct
    ones are kept on the result for `bootstrap_loss_law` to restart from.
    """
    log_n, log_d, log_loss = _prepare(n, d, loss)
    with _single_threaded_blas():
        thetas, objs = _minimise(_grid_starts(grid), log_n, log_d, log_loss, delta)
    return _law(thetas[0], objs[0], log_n.size, _distinct(thetas, keep_optima))


class PercentileIntervals:
    """Percentile intervals of a bootstrap: `samples[name]` holds one value per resample
    (NaN for a resample whose fit failed), `confidence` the default coverage and
    `_estimates[name]` the full-data estimate."""

    samples: dict
    confidence: float
    _estimates: dict

    def estimate(self, name: str) -> float:
        return float(self._estimates[name])

    def interval(self, name: str, confidence: float | None = None) -> tuple[float, float]:
        q = self.confidence if confidence is None else confidence
        lo, hi = np.nanpercentile(self.samples[name], [50 * (1 - q), 50 * (1 + q)])
        return float(lo), float(hi)

    @property
    def intervals(self) -> dict:
        return {k: self.interval(k) for k in self.samples}

    def table(self):
        """pandas DataFrame: estimate, lo, hi per quantity."""
        import pandas as pd

        rows = {k: (self.estimate(k), *self.interval(k)) for k in self.samples}
        return pd.DataFrame.from_dict(rows, orient="index", columns=["estimate", "lo", "hi"])


def refit_loss_law(fit: LossLaw, n, d, loss, *, delta: float = 1e-3) -> LossLaw:
    """Fit `n, d, loss` (a bootstrap resample of the runs `fit` was fitted to) from
    `fit`'s distinct local optima: a resample's objective is a small perturbation of the
    full one, so its optimum is next to one of them."""
    log_n, log_d, log_loss = _prepare(n, d, loss)
    starts = fit.local_optima if fit.local_optima is not None else fit.theta[None]
    with _single_threaded_blas():
        thetas, objs = _minimise(starts, log_n, log_d, log_loss, delta)
    return _law(thetas[0], objs[0], log_n.size)


@dataclasses.dataclass(frozen=True)
class LossLawBootstrap(PercentileIntervals):
    """Percentile bootstrap of an approach-3 fit.

    samples[name] holds one value per resample for E, A, B, alpha, beta, a, b, G and, for
    each requested budget C, n_opt@C, d_opt@C, tokens_per_param@C (C formatted %.3g)."""

    fit: LossLaw
    samples: dict
    confidence: float
    budgets: tuple[float, ...] = ()  # where n_opt, d_opt and tokens_per_param were taken

    @functools.cached_property
    def _estimates(self) -> dict:
        return _derived(self.fit, self.budgets)


def _derived(law: LossLaw, budgets: Sequence[float]) -> dict:
    out = {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta,
           "a": law.a, "b": law.b, "G": law.G}
    for c in budgets:
        key = f"{c:.3g}"
        out[f"n_opt@{key}"] = float(law.n_opt(c))
        out[f"d_opt@{key}"] = float(law.d_opt(c))
        out[f"tokens_per_param@{key}"] = float(law.tokens_per_param(c))
    return out


def bootstrap_loss_law(n, d, loss, *, n_boot: int = 200, confidence: float = 0.95,
                       seed: int = 0, compute: Sequence[float] = (), fit: LossLaw | None = None,
                       delta: float = 1e-3, grid: dict | None = None,
                       restart: str = "optima") -> LossLawBootstrap:
    """Bootstrap intervals for the approach-3 parameters and the allocation they imply.

    Each of `n_boot` resamples draws the runs with replacement and refits. `restart`:
    "optima" (default) starts each refit from the full-data fit's distinct local optima
    (`fit.local_optima`): a resample's objective is a small perturbation of the full one,
    so its optimum is next to one of them, at 1/500th of the cost of the whole grid;
    "grid" restarts from the whole `grid` (exact but slow). `compute`: budgets at which
    to report n_opt, d_opt and tokens_per_param. `fit`: the full-data fit if already
    computed (else it is fitted here with `grid`).
    """
    log_n, log_d, log_loss = _prepare(n, d, loss)
    if fit is None:
        fit = fit_loss_law(n, d, loss, delta=delta, grid=grid)
    if restart == "optima":
        starts = fit.local_optima if fit.local_optima is not None else fit.theta[None]
    elif restart == "grid":
        starts = _grid_starts(grid)
    else:
        raise ValueError(f"restart must be 'optima' or 'grid', not {restart!r}")
    rng = np.random.default_rng(seed)
    budgets = [float(c) for c in compute]
    rows = []
    with _single_threaded_blas():
        for _ in range(n_boot):
            idx = rng.integers(0, log_n.size, log_n.size)
            thetas, objs = _minimise(starts, log_n[idx], log_d[idx], log_loss[idx], delta)
            rows.append(_derived(_law(thetas[0], objs[0], log_n.size), budgets))
    samples = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return LossLawBootstrap(fit=fit, samples=samples, confidence=confidence,
                            budgets=tuple(budgets))


# --------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily, Agg backend: they run headless, on a cluster node).


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_isoflops(fit: IsoFlopFit, path, *, title: str = "IsoFLOP profiles") -> Path:
    """Left: loss vs N per budget with its parabola and minimiser. Right: N_opt and D_opt
    vs C with the fitted power laws. Writes a PNG to `path`; returns the path."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(fit.budgets), 1)))
    for g, used, col in zip(fit.budgets, fit.used, colors):
        ax.scatter(g.n, g.loss, color=col, s=14, label=f"C={g.compute:.2g}")
        x = np.linspace(np.log(g.n.min()) - 0.3, np.log(g.n.max()) + 0.3, 100)
        ax.plot(np.exp(x), np.polyval(g.coeffs, x), color=col, lw=1)
        ax.scatter([g.n_opt], [g.loss_opt], color=col, marker="*" if used else "x", s=80,
                   edgecolor="k", linewidth=0.5, zorder=3)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss", title=title)
    ax.legend(fontsize=7)
    c = fit.compute
    cc = np.geomspace(c.min() / 2, c.max() * 2, 50)
    ax2.scatter(c, fit.n_opts, color="C0", label="N_opt per budget")
    ax2.plot(cc, fit.n_opt(cc), color="C0", label=f"N_opt = {fit.k_n:.3g} C^{fit.a:.3f}")
    ax2.scatter(c, fit.d_opts, color="C1", label="D_opt per budget")
    ax2.plot(cc, fit.d_opt(cc), color="C1", label=f"D_opt = {fit.k_d:.3g} C^{fit.b:.3f}")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", title="optima")
    ax2.legend(fontsize=7)
    return save_figure(fig, plt, path)


def plot_loss_law(law: LossLaw, n, d, loss, path, *, title: str | None = None) -> Path:
    """Left: loss vs tokens, runs coloured by N, with the fitted law along D for each
    distinct N (up to 8, else for 6 quantiles of N). Right: predicted vs observed loss."""
    plt = _pyplot()
    n, d, loss = (np.asarray(v, float).reshape(-1) for v in (n, d, loss))
    ok = np.isfinite(n) & np.isfinite(d) & np.isfinite(loss)
    n, d, loss = n[ok], d[ok], loss[ok]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sc = ax.scatter(d, loss, c=np.log10(n), cmap="viridis", s=14)
    fig.colorbar(sc, ax=ax, label="log10 N")
    ns = np.unique(n)
    if ns.size > 8:
        ns = np.quantile(n, np.linspace(0, 1, 6))
    dd = np.geomspace(d.min(), d.max(), 100)
    cmap = plt.cm.viridis
    lo, hi = np.log10(n.min()), np.log10(n.max())
    for nv in ns:
        ax.plot(dd, law(nv, dd), color=cmap((np.log10(nv) - lo) / max(hi - lo, 1e-12)), lw=1)
    ax.set(xscale="log", xlabel="tokens D", ylabel="final loss",
           title=title or (f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + "
                           f"{law.B:.3g}/D^{law.beta:.3f}"))
    pred = law(n, d)
    ax2.scatter(loss, pred, s=12)
    lims = [min(loss.min(), pred.min()), max(loss.max(), pred.max())]
    ax2.plot(lims, lims, "k--", lw=1)
    ax2.set(xlabel="observed loss", ylabel="fitted loss", title="fit vs data")
    return save_figure(fig, plt, path)


def save_figure(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
