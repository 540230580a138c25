"""LR sensitivity of qk-layernorm and z-loss (Wortsman et al. 2023, "Small-scale proxies
for large-scale Transformer training instabilities"), at 2-core CPU scale.

The paper's effect is that without qk-layernorm, high learning rates make attention
logits grow until training fails (loss stuck near its initial value or diverging), and
that this failure sets in at lower LRs as models grow; qk-layernorm removes it, z-loss
removes output-logit divergence. So the grid must reach LRs where baselines fail: LR
1e-4 .. 1 (4 decades, 7 points), widths 32 / 64 / 96 with 4 layers (head dim 32),
300 steps with the paper's warmup share (5%) and cosine decay, no weight decay (the
paper's setting for these arms), AdamW(0.9, 0.95), 2 seeds. Arms baseline / qk_norm /
z_loss (1e-4, the paper's coefficient) / both.

3 widths x 7 LRs x 4 arms x 2 seeds = 168 trials. The LR, z-loss coefficient and seed
are scalars of one program, so each (width, qk-norm) pair is one batched group of 28
trials (lm/train/trials.py): 6 programs instead of 168 processes.

    lm sweep experiments/lr_sensitivity.py --workdir runs/lr_sensitivity
    lm results runs/lr_sensitivity && lm analyze runs/lr_sensitivity
    lm sweep experiments/lr_sensitivity.py --workdir runs/lr_smoke --smoke   # ~1 min

`lm analyze` prints LR sensitivity per arm and width (mean and 95% interval over
seeds, each arm paired with the baseline by seed), final loss vs LR per width with seed
intervals (analysis/lr_sweep.png), and the max attention logit and log-Z drift against
LR (analysis/precursors.png).
"""

from lm.sweep import Grid, Sweep, log_grid

ARMS = {
    "baseline": {},
    "qk_norm": {"model.qk_norm": True},
    "z_loss": {"optim.z_loss": 1e-4},
    "both": {"model.qk_norm": True, "optim.z_loss": 1e-4},
}

WIDTHS = {"w32": {"model.d_model": 32, "model.n_heads": 1},
          "w64": {"model.d_model": 64, "model.n_heads": 2},
          "w96": {"model.d_model": 96, "model.n_heads": 3}}

STEPS = 300
LRS = (1e-4, 1.0, 7)  # log-spaced, inclusive


def sweep(smoke: bool = False) -> Sweep:
    base = {
        "model.n_layers": 4, "model.max_seq_len": 64, "data.seq_len": 64, "batch_size": 8,
        "steps": STEPS, "optim.warmup_steps": round(0.05 * STEPS), "optim.schedule": "cosine",
        "optim.weight_decay": 0.0, "optim.min_lr_ratio": 0.1,
        "log_every": 10, "eval_every": STEPS, "eval_batches": 4, "checkpoint_every": STEPS,
        "tensorboard": False,
    }
    sizes, lrs = WIDTHS, log_grid(*LRS)
    if smoke:
        sizes, lrs = {"w32": WIDTHS["w32"]}, [1e-3, 1.0]
    return Sweep(
        overrides=base,
        smoke={"steps": 8, "model.n_layers": 2, "batch_size": 4, "data.seq_len": 32,
               "optim.warmup_steps": 2, "log_every": 4, "eval_every": 8, "eval_batches": 1,
               "checkpoint_every": 8},
        sizes=sizes,
        arms=ARMS,
        axes=[Grid("optim.lr", lrs)],
        seeds=2,
        batch=28,
    )
