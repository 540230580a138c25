"""Optimizers compared at the same token budget: AdamW, Lion, Adafactor, Muon, SGD-SaI,
each with its LR tuned on its own grid (x0.1 .. x10 of a centre, half a decade apart, so
that every optimum sits inside it: Lion's sign updates want ~3x smaller LRs than AdamW,
Muon's orthogonalised ones and SGD-SaI's SNR-scaled ones larger), at two widths, with
seeds, on the embedded corpus. Reports the best loss per optimizer with intervals, the optimizer-state
bytes per parameter and tokens/s; the question from "No More Adam" (SGD-SaI): does it
match AdamW at half the optimizer memory?

widths {64, 128} x 5 optimizers x 5 LRs x seeds {0, 1, 2} = 150 trials of 150 steps
(10 warmup steps, cosine, weight decay 0.1); each (optimizer, width) is one batched group
of 15 trials; 8m54s on a 2-core CPU (measured; Adafactor's arm re-run on its
new grid: 4m02s more, sharing the CPU with other work).

    lm sweep experiments/optimizers.py --workdir runs/optimizers --parallel 2
    lm analyze --optimizers runs/optimizers
    lm sweep experiments/optimizers.py --workdir runs/optimizers_smoke --smoke  # ~1 min
"""

from lm.sweep import Grid, Sweep

# The centre of each optimizer's LR grid (a 3-point grid around 1e-2 / 2e-3 / 1e-2 /
# 1e-2 / 3e-2 put AdamW's and SGD-SaI's optimum below it and Muon's above; a 5-point one
# around 1e-2 put Adafactor's at width 128 on its low edge, 1e-3).
CENTRE = {"adamw": 3e-3, "lion": 1e-3, "adafactor": 3e-3, "muon": 3e-2, "sgd_sai": 1e-2}
MULTS = [0.1, 0.32, 1.0, 3.2, 10.0]


def derive(cfg, tags):
    return {"optim.lr": round(CENTRE[tags["arm"]] * tags["lr_mult"], 8)}


def sweep(smoke: bool = False) -> Sweep:
    widths, mults, seeds, arms = [64, 128], MULTS, [0, 1, 2], list(CENTRE)
    if smoke:
        widths, mults, seeds, arms = [32], [0.32, 1.0, 3.2], [0], ["adamw", "sgd_sai", "muon"]
    base = {
        "model.n_layers": 2, "model.n_heads": 2, "model.max_seq_len": 64,
        "data.seq_len": 64, "batch_size": 16, "steps": 150,
        "optim.weight_decay": 0.1, "optim.warmup_steps": 10, "optim.schedule": "cosine",
        "log_every": 10, "eval_every": 150, "eval_batches": 4, "checkpoint_every": 150,
        "tensorboard": False,
    }
    return Sweep(
        overrides=base,
        smoke={"steps": 8, "batch_size": 4, "data.seq_len": 32, "optim.warmup_steps": 2,
               "log_every": 2, "eval_every": 8, "eval_batches": 1, "checkpoint_every": 8},
        arms={name: {"optim.name": name} for name in arms},
        axes=[Grid("model.d_model", widths), Grid("@lr_mult", mults), Grid("seed", seeds)],
        derive=derive,
        batch=len(mults) * len(seeds),  # per (optimizer, width): one program (lm/train/trials.py)
    )


PAPER = ("Xu et al. 2024, No More Adam: Learning Rate Scaling at Initialization is All "
         "You Need (arXiv:2412.11768), with AdamW, Lion, Adafactor and Muon as references")
MATCH = 0.05  # nats: "matches AdamW" = not worse by more than this (~2% of the loss)


def findings(sweep):
    """SGD-SaI matches AdamW at about half the optimizer state; the tuned ranking."""
    from lm.analysis import findings as f
    from lm.analysis import seeds, transfer

    runs = sweep.finished.copy()
    print(transfer.report(sweep.workdir, optimizers=True))  # tables, analysis/lr_transfer.png
    table = transfer.optimizer_table(runs)
    widths = sorted(table["model.d_model"].unique())
    top = table[table["model.d_model"] == widths[-1]].sort_values("loss")
    ranking = f.Finding(
        f"(measurement) Each optimizer at its own best LR, width {int(widths[-1])}",
        "; ".join(f"{r['arm']} {r['loss']:.3f} [{r['loss_lo']:.3f}, {r['loss_hi']:.3f}] at LR "
                  f"{transfer.Optimum(r['lr_best'], r['edge'])}, "
                  f"{r['state_bytes_per_param']:.1f} B/param" for _, r in top.iterrows())
        + f" ({int(top['seeds'].min())} seeds)", "-", ("lr_transfer.png",))
    arms = set(runs["arm"])
    if not {"adamw", "sgd_sai"} <= arms:
        return [ranking]
    at = f.loss_at_best_lr(runs, ["arm", "model.d_model"])
    d = seeds.paired_difference(at, "loss", "arm", "sgd_sai", "adamw",
                                ["model.d_model"]).set_index("model.d_model")
    state = table.set_index(["arm", "model.d_model"])["state_bytes_per_param"]
    edged = {f"{r['arm']}@{int(r['model.d_model'])}" for _, r in at.iterrows()
             if r["edge"] and r["arm"] in ("adamw", "sgd_sai")}
    verdicts = []
    for w in d.index:
        lo, hi = d.loc[w, "ci_lo"], d.loc[w, "ci_hi"]
        verdicts.append(f.NOT_RESOLVED if edged or not (lo == lo) else
                        f.REPRODUCED if hi < MATCH else
                        f.NOT_REPRODUCED if lo > MATCH else f.NOT_RESOLVED)
    verdict = (verdicts[0] if len(set(verdicts)) == 1 else
               f.PARTLY if f.REPRODUCED in verdicts else f.NOT_RESOLVED)
    match = f.Finding(
        f"SGD-SaI matches AdamW (not worse by more than {MATCH} nats) at about half its "
        "optimizer state",
        "sgd_sai minus adamw at each one's best LR, paired by seed: " + "; ".join(
            f"width {int(w)}: {f.iv(d.loc[w, 'diff'], d.loc[w, 'ci_lo'], d.loc[w, 'ci_hi'])}"
            for w in d.index) + f" ({int(d['pairs'].min())} seeds); state "
        f"{state.get(('sgd_sai', widths[-1]), float('nan')):.1f} vs "
        f"{state.get(('adamw', widths[-1]), float('nan')):.1f} bytes/param"
        + (f"; best LR on the grid's edge: {', '.join(sorted(edged))}" if edged else ""),
        verdict, ("lr_transfer.png",))
    return [match, ranking]
