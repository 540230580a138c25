"""LR transfer across width: standard parametrisation vs muP (Yang et al. 2022, Tensor
Programs V, figure 1). An LR sweep at several widths, with seeds; under SP the best LR
drifts with width (down, roughly as 1/width for the hidden weights under Adam), under muP
(base width = the smallest) it should stay put, and the wider model should never be
worse at its best LR.

widths {32, 128, 512} (n_heads fixed: head_dim grows) x 7 LRs (1e-4 .. 1e-1, half a
decade apart, so every width's optimum sits inside the grid) x seeds {0, 1, 2} x arms
{sp, mup} = 126 trials of 120 steps, Adam(W) without weight decay, 10 warmup steps then
cosine decay to 10%. Each (arm, width) is one batched group of 21 trials; 32m37s on a
2-core CPU (measured; the width-512 groups take most of it).

    lm sweep experiments/mup_transfer.py --workdir runs/mup_transfer
    lm analyze --lr-transfer runs/mup_transfer     # best LR per width + transfer penalty
    lm sweep experiments/mup_transfer.py --workdir runs/mup_smoke --smoke   # ~1 min
"""

from lm.sweep import Grid, Sweep, log_grid

WIDTHS = [32, 128, 512]
LRS = (1e-4, 1e-1, 7)  # log-spaced, inclusive
SEEDS = [0, 1, 2]


def sweep(smoke: bool = False) -> Sweep:
    widths, lrs, seeds = WIDTHS, log_grid(*LRS), SEEDS
    if smoke:
        widths, lrs, seeds = [16, 32], [1e-3, 1e-2, 1e-1], [0, 1]
    base = {
        "model.n_layers": 2, "model.n_heads": 2, "model.max_seq_len": 64,
        "data.seq_len": 64, "batch_size": 16, "steps": 120,
        "optim.weight_decay": 0.0, "optim.warmup_steps": 10, "optim.schedule": "cosine",
        "optim.min_lr_ratio": 0.1,
        "log_every": 20, "eval_every": 120, "eval_batches": 4, "checkpoint_every": 120,
        "tensorboard": False,
    }
    return Sweep(
        overrides=base,
        smoke={"steps": 8, "batch_size": 4, "data.seq_len": 32, "optim.warmup_steps": 2,
               "log_every": 4, "eval_every": 8, "eval_batches": 1, "checkpoint_every": 8},
        arms={"sp": {"model.init": "standard"},
              "mup": {"model.init": "mup", "model.mup_base_width": widths[0]}},
        axes=[Grid("model.d_model", widths), Grid("optim.lr", lrs), Grid("seed", seeds)],
        batch=len(lrs) * len(seeds),  # per (arm, width): one program (lm/train/trials.py)
    )


PAPER = ("Yang et al. 2022, Tensor Programs V: Tuning Large Neural Networks via Zero-Shot "
         "Hyperparameter Transfer (arXiv:2203.03466), figure 1")


def findings(sweep):
    """The best LR stays put across width under muP and drifts under SP; under muP the
    wider model is better at its best LR."""
    from lm.analysis import findings as f
    from lm.analysis import transfer

    runs = sweep.finished.copy()
    print(transfer.report(sweep.workdir))  # the tables and analysis/lr_transfer.png
    optima = transfer.lr_optima(runs)
    drift = transfer.lr_drift(optima).set_index("arm")
    claims = []
    parts, verdicts = [], []
    for arm in ("sp", "mup"):
        if arm not in drift.index:
            continue
        d = drift.loc[arm]
        if d["edge"]:
            parts.append(f"{arm}: optimum on the grid's edge at width {d['edge']}, slope not "
                         "measured")
            verdicts.append(f.NOT_RESOLVED)
            continue
        parts.append(f"{arm}: {f.iv(d['slope'], d['slope_lo'], d['slope_hi'], '+.2f')}")
        inside = d["slope_lo"] <= 0 <= d["slope_hi"]
        if arm == "mup":
            verdicts.append(f.REPRODUCED if inside and d["slope_hi"] - d["slope_lo"] < 1
                            else f.NOT_RESOLVED if inside else f.NOT_REPRODUCED)
        else:
            verdicts.append(f.sign_verdict([(d["slope_lo"], d["slope_hi"])], "<0"))
    best = "; ".join(f"{r['arm']} w{int(r['model.d_model'])}: {transfer.Optimum(r['lr_best'], r['edge'])}"
                     for _, r in optima.iterrows())
    verdict = (f.REPRODUCED if verdicts and all(v == f.REPRODUCED for v in verdicts)
               else f.PARTLY if f.REPRODUCED in verdicts else
               f.NOT_RESOLVED if f.NOT_RESOLVED in verdicts or not verdicts else f.NOT_REPRODUCED)
    claims.append(f.Finding(
        "The best LR drifts with width under SP and stays put under muP",
        "slope of log2(best LR) per doubling of width: " + "; ".join(parts)
        + f" (best LRs: {best})", verdict, ("lr_transfer.png",)))
    # wider is better under muP, at each width's best LR
    if "mup" in set(runs["arm"]):
        at = f.loss_at_best_lr(runs[runs["arm"] == "mup"], ["model.d_model"])
        widths = sorted(at["model.d_model"].unique())
        if len(widths) >= 2:
            small, large = (at[at["model.d_model"] == w].set_index("seed")["loss"]
                            for w in (widths[0], widths[-1]))
            from lm.analysis.seeds import interval
            common = small.index.intersection(large.index)
            d = interval((large.loc[common] - small.loc[common]).to_numpy(float))
            claims.append(f.Finding(
                "Under muP the wider model is better at its best LR",
                f"muP loss at width {int(widths[-1])} minus width {int(widths[0])}, each at "
                f"its best grid LR, paired by seed: {f.iv(d.mean, d.lo, d.hi)} ({d.n} seeds)",
                f.sign_verdict([(d.lo, d.hi)], "<0"), ("lr_transfer.png",)))
    return claims
