"""LR transfer across width: standard parametrisation vs muP (Yang et al. 2022, Tensor
Programs V). An LR sweep at several widths, with seeds; under SP the best LR drifts with
width, under muP (base width = the smallest) it should stay put.

widths {32, 64, 128} (n_heads fixed: head_dim grows) x 5 LRs (3e-3 .. 1e-1) x seeds {0, 1}
x arms {sp, mup} = 60 trials of 120 steps, Adam(W), constant LR after a short warmup.

    lm sweep experiments/mup_transfer.py --workdir runs/mup_transfer --parallel 2
    lm analyze --lr-transfer runs/mup_transfer     # best LR per width + transfer penalty
    lm sweep experiments/mup_transfer.py --workdir runs/mup_smoke --smoke   # ~1 min
"""

from lm.sweep import Grid, Sweep, log_grid

WIDTHS = [32, 64, 128]


def sweep(smoke: bool = False) -> Sweep:
    widths, lrs, seeds = WIDTHS, log_grid(3e-3, 1e-1, 5), [0, 1]
    if smoke:
        widths, lrs, seeds = [16, 32], [1e-2, 5e-2], [0]
    base = {
        "model.n_layers": 2, "model.n_heads": 2, "model.max_seq_len": 64,
        "data.seq_len": 64, "batch_size": 16, "steps": 120,
        "optim.weight_decay": 0.0, "optim.warmup_steps": 10, "optim.schedule": "constant",
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
        batch=10,  # per (arm, width): its LRs x seeds as one program (lm/train/trials.py)
    )
