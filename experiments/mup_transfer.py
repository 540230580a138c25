"""LR transfer across width: standard parametrisation vs muP (Yang et al. 2022, Tensor
Programs V, figure 1). An LR sweep at several widths, with seeds; under SP the best LR
drifts with width (down, roughly as 1/width for the hidden weights under Adam), under muP
(base width = the smallest) it should stay put, and the wider model should never be
worse at its best LR.

widths {32, 128, 512} (n_heads fixed: head_dim grows) x 7 LRs (1e-4 .. 1e-1, half a
decade apart, so every width's optimum sits inside the grid) x seeds {0, 1, 2} x arms
{sp, mup} = 126 trials of 120 steps, Adam(W) without weight decay, 10 warmup steps then
cosine decay to 10%. Each (arm, width) is one batched group of 21 trials.

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
