"""Optimizers compared at the same token budget: AdamW, Lion, Adafactor, Muon, SGD-SaI,
each with its LR tuned on its own grid (around its usual range: Lion's sign updates want
~5x smaller, SGD-SaI's SNR-scaled steps larger), at two widths, with seeds, on the
embedded corpus. Reports the best loss per optimizer with intervals, the optimizer-state
bytes per parameter and tokens/s; the question from "No More Adam" (SGD-SaI): does it
match AdamW at half the optimizer memory?

widths {64, 128} x 5 optimizers x 3 LRs (x0.3, x1, x3 of the optimizer's centre) x seeds
{0, 1} = 60 trials of 150 steps (4 warmup-cosine, weight decay 0.1).

    lm sweep experiments/optimizers.py --workdir runs/optimizers --parallel 2
    lm analyze --optimizers runs/optimizers
    lm sweep experiments/optimizers.py --workdir runs/optimizers_smoke --smoke  # ~1 min
"""

from lm.sweep import Grid, Sweep

# The centre of each optimizer's LR grid (AdamW's at this scale is ~1e-2).
CENTRE = {"adamw": 1e-2, "lion": 2e-3, "adafactor": 1e-2, "muon": 1e-2, "sgd_sai": 3e-2}


def derive(cfg, tags):
    return {"optim.lr": round(CENTRE[tags["arm"]] * tags["lr_mult"], 8)}


def sweep(smoke: bool = False) -> Sweep:
    widths, mults, seeds = [64, 128], [0.3, 1.0, 3.0], [0, 1]
    if smoke:
        widths, mults, seeds = [32], [1.0], [0]
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
        arms={name: {"optim.name": name} for name in CENTRE},
        axes=[Grid("model.d_model", widths), Grid("@lr_mult", mults), Grid("seed", seeds)],
        derive=derive,
        batch=6,  # per (optimizer, width): its LRs x seeds as one program (lm/train/trials.py)
    )
