"""LR sensitivity of qk-layernorm (Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities", figure 1), at 2-core CPU scale.

The paper's effect: without qk-layernorm, high learning rates make attention logits grow
until training fails, and this failure sets in at lower LRs as models grow, so the
baseline's LR sensitivity grows with width while qk-layernorm's stays flat and low. The
grid must reach LRs where baselines fail: 1e-3 .. 1 (7 points, half a decade apart).
The paper's grid starts at 3e-4 with 10k+ steps; at 300 steps an LR of 1e-4 leaves every
model far from converged, and that shortfall (shrinking with width, as wider models
learn faster) dominated the statistic and hid the high-LR failures it is meant to show,
so the grid starts where 300 steps converge. Widths 32 / 64 / 128 with 4 layers (head
dim 32), 300 steps with the paper's warmup share (5%) and cosine decay, no weight decay,
AdamW(0.9, 0.95), 5 seeds. Arms baseline / qk_norm. The z-loss arms (the paper's fix
for output-logit divergence, which needs far larger vocabularies and models than a CPU
trains to show) stay in ARMS: a spec whose `sweep(smoke)` returns
`lr_sensitivity.sweep(smoke, arms=lr_sensitivity.ARMS)` runs all four.

3 widths x 7 LRs x 2 arms x 5 seeds = 210 trials; the LR and seed are scalars of one
program, so each (width, arm) is one batched group of 35 trials; 21m23s on a 2-core CPU
(measured).

    lm sweep experiments/lr_sensitivity.py --workdir runs/lr_sensitivity
    lm results runs/lr_sensitivity && lm analyze runs/lr_sensitivity
    lm sweep experiments/lr_sensitivity.py --workdir runs/lr_smoke --smoke   # ~1 min

`lm analyze` prints LR sensitivity per arm and width (mean and 95% interval over seeds,
each arm paired with the baseline by seed), the paper's figure 1 (analysis/lr_sweep.png:
a panel per arm, LR on x, final loss on y, widths as colours) and the max attention
logit and log-Z drift against LR in the same layout (analysis/precursors.png).
"""

from lm.sweep import Grid, Sweep, log_grid

ARMS = {
    "baseline": {},
    "qk_norm": {"model.qk_norm": True},
    "z_loss": {"optim.z_loss": 1e-4},
    "both": {"model.qk_norm": True, "optim.z_loss": 1e-4},
}
DEFAULT_ARMS = ("baseline", "qk_norm")

WIDTHS = {"w32": {"model.d_model": 32, "model.n_heads": 1},
          "w64": {"model.d_model": 64, "model.n_heads": 2},
          "w128": {"model.d_model": 128, "model.n_heads": 4}}

STEPS = 300
LRS = (1e-3, 1.0, 7)  # log-spaced, inclusive
SEEDS = 5


def sweep(smoke: bool = False, arms: dict | None = None) -> Sweep:
    base = {
        "model.n_layers": 4, "model.max_seq_len": 64, "data.seq_len": 64, "batch_size": 8,
        "steps": STEPS, "optim.warmup_steps": round(0.05 * STEPS), "optim.schedule": "cosine",
        "optim.weight_decay": 0.0, "optim.min_lr_ratio": 0.1,
        "log_every": 10, "eval_every": STEPS, "eval_batches": 4, "checkpoint_every": STEPS,
        "tensorboard": False,
    }
    sizes, lrs = WIDTHS, log_grid(*LRS)
    if smoke:
        sizes, lrs = {"w32": WIDTHS["w32"], "w64": WIDTHS["w64"]}, [1e-2, 1.0]
    return Sweep(
        overrides=base,
        smoke={"steps": 8, "model.n_layers": 2, "batch_size": 4, "data.seq_len": 32,
               "optim.warmup_steps": 2, "log_every": 4, "eval_every": 8, "eval_batches": 1,
               "checkpoint_every": 8},
        sizes=sizes,
        arms=arms or {k: ARMS[k] for k in DEFAULT_ARMS},
        axes=[Grid("optim.lr", lrs)],
        seeds=2 if smoke else SEEDS,
        batch=len(lrs) * SEEDS,
    )


PAPER = ("Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training "
         "instabilities (arXiv:2309.14322), figures 1 and 2")


def findings(sweep):
    """qk-layernorm lowers LR sensitivity; the baseline's grows with width while
    qk-layernorm's stays flat; the mechanism: attention logits grow without it."""
    from lm.analysis import findings as f
    from lm.analysis import stability

    runs = sweep.finished
    if sweep.seed is None or "arm" not in runs or runs["arm"].nunique() < 2:
        return [f.Finding("qk-layernorm lowers LR sensitivity", "needs both arms and seeds",
                          f.NOT_RESOLVED)]
    by = ["arm", "model.d_model"]
    per_seed, _ = stability.lr_sensitivity_over_seeds(runs, by, sweep.seed)
    widths = sorted(per_seed["model.d_model"].unique())
    lower, _ = f.paired_finding("qk-layernorm lowers LR sensitivity", per_seed, "lr_sensitivity",
                                "qk_norm", "baseline", "model.d_model", "<0", label="width",
                                figures=("lr_sweep.png",))
    slopes = {arm: f.per_seed_slope(per_seed[per_seed["arm"] == arm], "model.d_model",
                                    "lr_sensitivity", "seed")
              for arm in ("baseline", "qk_norm")}
    means = per_seed.groupby(by)["lr_sensitivity"].mean()
    grows = f.sign_verdict([(slopes["baseline"].lo, slopes["baseline"].hi)], ">0")
    flat = slopes["qk_norm"]
    flat_ok = (flat.lo <= 0 <= flat.hi) or flat.hi < 0
    growth = f.Finding(
        "The baseline's LR sensitivity grows with width; qk-layernorm's stays flat",
        "slope of LR sensitivity per doubling of width: baseline "
        f"{f.iv(slopes['baseline'].mean, slopes['baseline'].lo, slopes['baseline'].hi)}, qk_norm "
        f"{f.iv(flat.mean, flat.lo, flat.hi)} ({slopes['baseline'].n} seeds); means by width: "
        + ", ".join(f"{arm} " + " -> ".join(f"{means[(arm, w)]:.2f}" for w in widths)
                    for arm in ("baseline", "qk_norm")),
        (grows if flat_ok else f.PARTLY if grows == f.REPRODUCED else grows)
        if len(widths) > 1 else f.NOT_RESOLVED, ("lr_sweep.png",))
    pre = stability.precursors(runs)
    top = max(lr for lr in pre["optim.lr"].unique()
              if (pre[pre["optim.lr"] == lr]["status"] == "completed").all()) \
        if (pre["status"] == "completed").any() else pre["optim.lr"].max()
    at = pre[pre["optim.lr"] == top].groupby(by)["attn_logit_max"].mean()
    base = [at.get(("baseline", w), float("nan")) for w in widths]
    qk = [at.get(("qk_norm", w), float("nan")) for w in widths]
    rises = len(widths) > 1 and base[-1] > 2 * base[0] and max(qk) < 0.25 * base[-1]
    mechanism = f.Finding(
        "Without qk-layernorm the attention logits grow with width at high LR; with it they "
        "stay small",
        f"max attention logit at LR {top:.2g} (the largest LR no run of which diverged), mean "
        f"over seeds, by width: baseline " + " -> ".join(f"{x:.3g}" for x in base)
        + ", qk_norm " + " -> ".join(f"{x:.3g}" for x in qk),
        f.REPRODUCED if rises else f.NOT_RESOLVED, ("precursors.png",))
    return [lower, growth, mechanism]
