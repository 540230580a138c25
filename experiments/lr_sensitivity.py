"""LR sensitivity of QK-layernorm and z-loss (Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities"), on the 2-core CPU scale.

widths {32, 64} x 5 LRs log-spaced over 3 decades (1e-4 .. 1e-1) x arms {baseline,
qk_norm, z_loss, both} = 40 trials of 150 steps, no weight decay, short warmup.

    lm sweep experiments/lr_sensitivity.py --workdir runs/lr_sensitivity [--parallel 2]
    lm results runs/lr_sensitivity && lm analyze runs/lr_sensitivity
    lm sweep experiments/lr_sensitivity.py --workdir runs/lr_smoke --smoke   # ~1 min
"""

from lm.sweep import Grid, Sweep, log_grid

ARMS = {
    "baseline": {},
    "qk_norm": {"model.qk_norm": True},
    "z_loss": {"optim.z_loss": 1e-4},
    "both": {"model.qk_norm": True, "optim.z_loss": 1e-4},
}


def sweep(smoke: bool = False) -> Sweep:
    base = {
        "model.n_layers": 2, "model.n_heads": 2, "model.max_seq_len": 64,
        "data.seq_len": 64, "batch_size": 16, "steps": 150,
        "optim.weight_decay": 0.0, "optim.warmup_steps": 15, "optim.schedule": "cosine",
        "log_every": 10, "eval_every": 150, "eval_batches": 4, "checkpoint_every": 150,
        "tensorboard": False,
    }
    widths, lrs = [32, 64], log_grid(1e-4, 1e-1, 5)
    if smoke:
        widths, lrs = [32], [1e-3, 1e-1]
    return Sweep(
        overrides=base,
        smoke={"steps": 8, "batch_size": 4, "data.seq_len": 32, "optim.warmup_steps": 2,
               "log_every": 4, "eval_every": 8, "eval_batches": 1, "checkpoint_every": 8},
        arms=ARMS,
        axes=[Grid("model.d_model", widths), Grid("optim.lr", lrs)],
    )
