"""Where the norm goes (Peri-LN, Kim et al. 2025; The Curse of Depth, Sun et al. 2025):
pre-LN, post-LN, peri-LN and pre-LN with LayerNorm scaling (norm outputs x 1/sqrt(l)),
across depth, each with its LR tuned on a grid and with seeds.

Peri-LN is y = x + Norm(Module(Norm(x))) with the embedding normalised too (y0 =
Norm(x_emb), `model.embed_norm`) and a final norm; `peri_no_embed_norm` is the same
without the embedding norm (lmlab's peri-LN before it had one): there each sublayer adds
a unit-RMS vector to a residual stream whose embedding has RMS ~ init_std, so the tokens'
identity is swamped from the first layer on.

5 arms x depth {4, 8, 16} x LR {1e-3 .. 1e-1, 5 points} x seeds {0, 1, 2} = 225 trials
of 150 steps at d_model 48; each (arm, depth) is one batched group of 15 trials.

    lm sweep experiments/norm_placement.py --workdir runs/norm_placement
    lm results runs/norm_placement && lm analyze runs/norm_placement
    lm sweep experiments/norm_placement.py --workdir runs/norm_smoke --smoke   # ~1 min
"""

from lm.sweep import Grid, Sweep, log_grid

ARMS = {
    "pre": {"model.norm_position": "pre"},
    "post": {"model.norm_position": "post"},
    "peri": {"model.norm_position": "peri", "model.embed_norm": True},
    "peri_no_embed_norm": {"model.norm_position": "peri"},
    "ln_scaling": {"model.norm_position": "pre", "model.layernorm_scaling": True},
}
DEPTHS = [4, 8, 16]
LRS = (1e-3, 1e-1, 5)
SEEDS = [0, 1, 2]


def sweep(smoke: bool = False) -> Sweep:
    depths, lrs, seeds = DEPTHS, log_grid(*LRS), SEEDS
    if smoke:
        depths, lrs, seeds = [2], [3e-3, 3e-2], [0, 1]
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
        axes=[Grid("model.n_layers", depths), Grid("optim.lr", lrs), Grid("seed", seeds)],
        batch=len(lrs) * len(seeds),
    )
