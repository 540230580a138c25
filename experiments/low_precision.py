"""Low-precision training and qk-layernorm: does qk-norm widen the stable LR range more
under fp8 than under bf16? Wortsman et al. (2023) show qk-layernorm lowers LR
sensitivity by keeping attention logits small; low-precision matmuls (int8, fp8 e4m3:
3 mantissa bits, max 448) quantize exactly those logits, so the question the seeds'
stability papers raise is whether the two interact. Nobody packages it; here it is one
sweep.

Precisions (the `size` tag), every one with bf16 compute:
    bf16   no quantization
    int8   every block's matmuls (attention scores and values included) in int8 forward,
           per-channel scales, straight-through backward in bf16 (qwix, quant.mode=train)
    fp8    the same in fp8 e4m3 forward, e5m2 backward (the recipe of fp8 training)
Arms: baseline / qk_norm. Width 128, 4 layers (head dim 32), 200 steps, 5% warmup then
cosine, AdamW(0.9, 0.95), no weight decay; LR 1e-3 .. 1 (5 points, log-spaced); 3 seeds.
Each (precision, arm) is one batched group of 15 trials (LR and seed are scalars of one
program): 3 x 2 x 5 x 3 = 90 trials.

    lm sweep experiments/low_precision.py --workdir runs/low_precision
    lm analyze runs/low_precision        # LR sensitivity per precision and arm, lr_sweep.png
    lm findings runs/low_precision
    lm sweep experiments/low_precision.py --workdir runs/low_precision_smoke --smoke
"""

from lm.sweep import Grid, Sweep, log_grid

PRECISIONS = {
    "bf16": {"quant.mode": "off"},
    "int8": {"quant.mode": "train", "quant.weight": "int8", "quant.act": "int8",
             "quant.bwd": "none"},
    "fp8": {"quant.mode": "train", "quant.weight": "fp8_e4m3", "quant.act": "fp8_e4m3",
            "quant.bwd": "fp8_e5m2"},
}
ARMS = {"baseline": {}, "qk_norm": {"model.qk_norm": True}}
STEPS = 200
LRS = (1e-3, 1.0, 5)
SEEDS = 3


def sweep(smoke: bool = False) -> Sweep:
    base = {
        "model.d_model": 128, "model.n_heads": 4, "model.n_layers": 4,
        "model.max_seq_len": 64, "model.compute_dtype": "bfloat16",
        "data.seq_len": 64, "batch_size": 8, "steps": STEPS,
        "optim.warmup_steps": round(0.05 * STEPS), "optim.schedule": "cosine",
        "optim.weight_decay": 0.0, "optim.min_lr_ratio": 0.1,
        "log_every": 10, "eval_every": STEPS, "eval_batches": 4, "checkpoint_every": STEPS,
        "tensorboard": False,
    }
    lrs, precisions = log_grid(*LRS), PRECISIONS
    if smoke:
        lrs, precisions = [1e-2, 1.0], {k: PRECISIONS[k] for k in ("bf16", "fp8")}
    return Sweep(
        overrides=base,
        smoke={"steps": 8, "model.d_model": 32, "model.n_heads": 1, "model.n_layers": 2,
               "batch_size": 4, "data.seq_len": 32, "optim.warmup_steps": 2,
               "log_every": 4, "eval_every": 8, "eval_batches": 1, "checkpoint_every": 8},
        sizes=precisions,
        arms=ARMS,
        axes=[Grid("optim.lr", lrs)],
        seeds=2 if smoke else SEEDS,
        batch=len(lrs) * SEEDS,
    )


PAPER = ("Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training "
         "instabilities (arXiv:2309.14322), asked of int8 / fp8 training (qwix)")


def findings(sweep):
    """LR sensitivity per precision and arm (paired by seed); whether qk-norm's reduction
    of it is larger under fp8 than under bf16; the final loss at each one's best LR."""
    from lm.analysis import findings as f
    from lm.analysis import stability
    from lm.analysis.seeds import interval, paired_difference

    runs = sweep.finished
    if sweep.seed is None or "size" not in runs or "arm" not in runs:
        return [f.Finding("qk-layernorm lowers LR sensitivity at every precision",
                          "needs precisions, both arms and seeds", f.NOT_RESOLVED)]
    by = ["size", "arm"]
    per_seed, _ = stability.lr_sensitivity_over_seeds(runs, by, sweep.seed)
    precisions = [p for p in PRECISIONS if p in set(per_seed["size"])]
    d = paired_difference(per_seed, "lr_sensitivity", "arm", "qk_norm", "baseline", ["size"],
                          pair=sweep.seed).set_index("size")
    lower = f.Finding(
        "qk-layernorm lowers LR sensitivity at every precision",
        "qk_norm minus baseline LR sensitivity, paired by seed: " + "; ".join(
            f"{p}: {f.iv(d.loc[p, 'diff'], d.loc[p, 'ci_lo'], d.loc[p, 'ci_hi'])}"
            for p in precisions if p in d.index) + f" ({int(d['pairs'].min())} seeds)",
        f.sign_verdict([(d.loc[p, "ci_lo"], d.loc[p, "ci_hi"]) for p in precisions
                        if p in d.index], "<0"), ("lr_sweep.png",))
    # the interaction: (qk - base) under fp8 minus the same under bf16, paired by seed
    wide = per_seed.pivot_table(index=[sweep.seed], columns=["size", "arm"],
                                values="lr_sensitivity")
    out = [lower]
    for p in ("int8", "fp8"):
        if p not in precisions or "bf16" not in precisions:
            continue
        gain = ((wide[(p, "qk_norm")] - wide[(p, "baseline")])
                - (wide[("bf16", "qk_norm")] - wide[("bf16", "baseline")])).dropna()
        iv = interval(gain.to_numpy(float))
        out.append(f.Finding(
            f"qk-layernorm lowers LR sensitivity more under {p} than under bf16",
            f"(qk_norm - baseline) LR sensitivity under {p} minus the same under bf16, "
            f"paired by seed: {f.iv(iv.mean, iv.lo, iv.hi)} ({iv.n} seeds)",
            f.sign_verdict([(iv.lo, iv.hi)], "<0"), ("lr_sweep.png",)))
    at = f.loss_at_best_lr(runs, by, seed=sweep.seed)
    best = at.groupby(by)["loss"].mean()
    out.append(f.Finding(
        "(measurement) Final loss at each one's best LR",
        "; ".join(f"{p}/{a} {best[(p, a)]:.3f}" for p in precisions for a in ARMS
                  if (p, a) in best.index), "-", ("lr_sweep.png",)))
    return out
