"""Where the norm goes: pre-LN, post-LN, peri-LN, and pre-LN with LayerNorm scaling
(1/sqrt(layer index)), across depth, at a good and an aggressive LR.

arms {pre, post, peri, ln_scaling} x depth {2, 4, 8} x LR {3e-3, 3e-2} = 24 trials of
150 steps at d_model 48 (about 9 min on a 2-core CPU with --parallel 2, measured).

    lm sweep experiments/norm_placement.py --workdir runs/norm_placement
    lm results runs/norm_placement && lm analyze runs/norm_placement
"""

from lm.sweep import Grid, Sweep

ARMS = {
    "pre": {"model.norm_position": "pre"},
    "post": {"model.norm_position": "post"},
    "peri": {"model.norm_position": "peri"},
    "ln_scaling": {"model.norm_position": "pre", "model.layernorm_scaling": True},
}


def sweep(smoke: bool = False) -> Sweep:
    depths, lrs = [2, 4, 8], [3e-3, 3e-2]
    if smoke:
        depths, lrs = [1, 2], [3e-3]
    return Sweep(
        overrides={
            "model.d_model": 48, "model.n_heads": 2, "model.max_seq_len": 64,
            "data.seq_len": 64, "batch_size": 16, "steps": 150,
            "optim.weight_decay": 0.0, "optim.warmup_steps": 15,
            "log_every": 10, "eval_every": 150, "eval_batches": 4, "checkpoint_every": 150,
            "tensorboard": False,
        },
        smoke={"model.d_model": 32, "steps": 8, "batch_size": 4, "data.seq_len": 32,
               "optim.warmup_steps": 2, "log_every": 4, "eval_every": 8, "eval_batches": 1,
               "checkpoint_every": 8},
        arms=ARMS,
        axes=[Grid("model.n_layers", depths), Grid("optim.lr", lrs)],
    )
