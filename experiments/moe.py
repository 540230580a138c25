"""Mixture of experts on the embedded corpus: dense vs MoE at equal active compute, an
expert-count ladder, and auxiliary-loss vs auxiliary-loss-free balancing.

Every arm has the same attention and the same active channel compute per token: the
dense MLP is 4 x d_model wide; each MoE layer routes a token to 2 experts of 2 x d_model.
    dense          model.channel_pattern=f
    e4 / e8 / e16  4 / 8 / 16 experts, top-2, Switch load-balancing loss 0.01
    e8_bias        8 experts, no balancing loss, DeepSeek-V3's bias (rate 0.001)
5 trials of 300 steps at d_model 64, 4 layers.

    lm sweep experiments/moe.py --workdir runs/moe
    lm results runs/moe && lm analyze runs/moe      # table + runs/moe/analysis/moe.png
"""

from lm.sweep import Sweep

MOE = {"model.channel_pattern": "e", "model.moe.top_k": 2, "model.moe.ratio": 2.0}
ARMS = {
    "dense": {"model.channel_pattern": "f"},
    "e4": {**MOE, "model.moe.n_experts": 4},
    "e8": {**MOE, "model.moe.n_experts": 8},
    "e16": {**MOE, "model.moe.n_experts": 16},
    "e8_bias": {**MOE, "model.moe.n_experts": 8, "model.moe.aux_loss": 0.0,
                "model.moe.bias_rate": 0.001},
}


def sweep(smoke: bool = False) -> Sweep:
    return Sweep(
        overrides={
            "model.d_model": 64, "model.n_layers": 4, "model.n_heads": 2,
            "model.max_seq_len": 64, "data.seq_len": 64, "batch_size": 16, "steps": 300,
            "optim.warmup_steps": 30, "log_every": 10, "eval_every": 300, "eval_batches": 8,
            "checkpoint_every": 300, "tensorboard": False,
        },
        smoke={"model.d_model": 32, "model.n_layers": 2, "steps": 8, "batch_size": 4,
               "data.seq_len": 32, "optim.warmup_steps": 2, "log_every": 2, "eval_every": 8,
               "eval_batches": 1, "checkpoint_every": 8},
        arms=ARMS,
    )
