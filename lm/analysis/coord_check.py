"""Coordinate check (Yang et al. 2022, Tensor Programs V, section 9 and appendix D.1):
train the same model at several widths for a few steps and record, at every step, the
RMS of each block's output (the residual stream after it), the largest attention logit
and the RMS of the output logits. Under muP these stay flat as the width grows; under
standard parametrisation (SP) they grow (the per-entry update of a hidden matrix has a
width-independent size, so its effect on the output grows with fan-in).

    measure(cfg, steps)      one width: {quantity: [value at step 0..steps]}
    run(cfg, widths, ...)    the ladder, for SP and muP -> rows
    slopes(rows)             d log(value) / d log(width) per (init, quantity, step)
    table(rows) / plot(rows, path)

The numbers are read from what the model already reports (aux["resid_rms"],
aux["attn_logit_max"]) and its logits, by a jitted forward on a fixed batch before each
train step, so the train step itself is untouched. Only `measure` / `run` import jax;
the rest renders a saved coord_check.json on any machine.

`lm analyze --coord-check WORKDIR` renders WORKDIR/coord_check.json (table, slopes, PNG);
experiments/coord_check.py produces it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

FILE = "coord_check.json"


def measure(cfg, steps: int) -> dict[str, list[float]]:
    """{quantity: [value at steps 0 .. steps]} for one config (step 0 = at init)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lm.data import train_iterator
    from lm.train.setup import setup_run

    run = setup_run(cfg)
    cfg, pieces = run.cfg, run.pieces
    data = train_iterator(cfg.data, run.tokenizer, cfg.batch_size, cfg.seed)
    batches = [pieces.global_batch(next(data)) for _ in range(steps)]
    probe_batch = batches[0]  # the activations are always measured on the same tokens

    @jax.jit
    def probe(params, batch):
        model = nnx.merge(pieces.graphdef, params)
        logits, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        return {"resid_rms": aux["resid_rms"], "attn_logit_max": jnp.max(aux["attn_logit_max"]),
                "logits_rms": jnp.sqrt(jnp.mean(jnp.square(logits)))}

    step_fn = pieces.train_step()
    state = pieces.init_state()
    out: dict[str, list[float]] = {}
    for t in range(steps + 1):
        p = jax.device_get(probe(state["params"], probe_batch))
        for i, v in enumerate(np.asarray(p["resid_rms"])):
            out.setdefault(f"block{i}", []).append(float(v))
        out.setdefault("attn_logit_max", []).append(float(p["attn_logit_max"]))
        out.setdefault("logits_rms", []).append(float(p["logits_rms"]))
        if t < steps:
            state, _ = step_fn(state, batches[t])
    return out


def run(cfg, widths: Sequence[int], steps: int = 4,
        inits: Sequence[str] = ("standard", "mup"), base_width: int | None = None) -> list[dict]:
    """Rows {init, width, step, quantity, value} over the width ladder; muP's base width
    is the smallest width unless given (SP and muP then coincide there)."""
    base = base_width or min(widths)
    rows = []
    for init in inits:
        for width in widths:
            model = dataclasses.replace(cfg.model, d_model=width, init=init, mup_base_width=base)
            values = measure(dataclasses.replace(cfg, model=model), steps)
            rows += [{"init": init, "width": width, "step": t, "quantity": q, "value": v}
                     for q, vs in values.items() for t, v in enumerate(vs)]
    return rows


def save(rows: list[dict], workdir, meta: dict | None = None) -> Path:
    path = Path(workdir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta or {}, "rows": rows}, indent=1))
    return path


def load(workdir) -> tuple[list[dict], dict]:
    d = json.loads((Path(workdir) / FILE).read_text())
    return d["rows"], d.get("meta", {})


def _fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x (NaN when a value is not positive)."""
    if any(y <= 0 or not math.isfinite(y) for y in ys) or len(xs) < 2:
        return float("nan")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return (sum((a - mx) * (b - my) for a, b in zip(lx, ly))
            / sum((a - mx) ** 2 for a in lx))


def slopes(rows: list[dict]) -> dict[tuple[str, str, int], float]:
    """(init, quantity, step) -> log-log slope of the value against width."""
    groups: dict[tuple, dict[int, float]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["quantity"], r["step"]), {})[r["width"]] = r["value"]
    out = {}
    for key, by_width in groups.items():
        ws = sorted(by_width)
        out[key] = _fit_slope(ws, [by_width[w] for w in ws])
    return out


def quantities(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["quantity"], None)
    return list(seen)


def table(rows: list[dict]) -> str:
    """One line per (init, quantity, step): the value at each width, then the slope."""
    widths = sorted({r["width"] for r in rows})
    value = {(r["init"], r["quantity"], r["step"], r["width"]): r["value"] for r in rows}
    s = slopes(rows)
    head = f"{'init':8s} {'quantity':15s} {'step':>4s} " + " ".join(
        f"{'w=' + str(w):>10s}" for w in widths) + f" {'slope':>7s}"
    lines = [head, "-" * len(head)]
    for init in dict.fromkeys(r["init"] for r in rows):
        for q in quantities(rows):
            for t in sorted({r["step"] for r in rows}):
                vals = " ".join(f"{value.get((init, q, t, w), float('nan')):10.4g}" for w in widths)
                lines.append(f"{init:8s} {q:15s} {t:4d} {vals} {s[(init, q, t)]:+7.2f}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """init -> {quantity: slope at the last step}."""
    last = max(r["step"] for r in rows)
    s = slopes(rows)
    return {init: {q: s[(init, q, last)] for q in quantities(rows)}
            for init in dict.fromkeys(r["init"] for r in rows)}


def plot(rows: list[dict], path) -> Path:
    """One panel per quantity: value against width (log-log), a line per step, SP dashed
    and muP solid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs = quantities(rows)
    steps = sorted({r["step"] for r in rows})
    cols = min(len(qs), 3)
    fig, axes = plt.subplots(math.ceil(len(qs) / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(len(qs) / cols)),
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, q in zip(axes.flat, qs):
        for init, style in (("standard", "--"), ("mup", "-")):
            for j, t in enumerate(steps):
                pts = sorted((r["width"], r["value"]) for r in rows
                             if r["init"] == init and r["quantity"] == q and r["step"] == t)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3,
                            color=cmap(j / max(len(steps) - 1, 1)),
                            label=f"{'SP' if init == 'standard' else 'muP'} t={t}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(q)
        ax.set_xlabel("width (d_model)")
    for ax in list(axes.flat)[len(qs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.suptitle("coordinate check: SP (dashed) vs muP (solid)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(workdir) -> str:
    """The table, the last step's slopes per init and the plot's path, for `lm analyze`."""
    rows, meta = load(workdir)
    png = plot(rows, Path(workdir) / "coord_check.png")
    lines = [table(rows), ""]
    for init, by_q in summary(rows).items():
        lines.append(f"{init}: slope at the last step: " + ", ".join(
            f"{q} {v:+.2f}" for q, v in by_q.items()))
    if meta:
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    lines.append(f"plot: {png}")
    return "\n".join(lines)
