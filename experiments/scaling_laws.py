"""An IsoFLOP grid (Chinchilla approach 2; the runs also feed approach 3): 5 compute
budgets x 5 model sizes; each trial's steps are chosen so that 6 N D matches its budget
(N = total params with the tokenizer's vocabulary, D = steps x batch x seq_len); about
11 min on a 2-core CPU with --parallel 2 (measured).

    lm sweep experiments/scaling_laws.py --workdir runs/scaling_laws [--parallel 2]
    lm analyze runs/scaling_laws      # IsoFLOP and parametric fits, plots in analysis/
    lm sweep experiments/scaling_laws.py --workdir runs/scaling_smoke --smoke   # ~1 min
"""

from lm.sweep import Grid, Sweep

SIZES = {  # d_model, n_layers, n_heads
    "d16": (16, 1, 2), "d24": (24, 2, 2), "d32": (32, 2, 2), "d48": (48, 3, 2),
    "d64": (64, 4, 2),
}
BUDGETS = [6e10, 1.2e11, 2.4e11, 4.8e11, 9.6e11]   # FLOPs = 6 N D


def _params(cfg) -> int:
    from lm.data import load_tokenizer
    from lm.model.transformer import count_params
    from lm.train.setup import with_vocab
    return count_params(with_vocab(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size).model)["total"]


def _steps(cfg, tags) -> dict:
    tokens = 6 * _params(cfg)
    steps = max(1, round(float(tags["budget"]) / (tokens * cfg.batch_size * cfg.data.seq_len)))
    return {"steps": steps, "optim.warmup_steps": max(1, steps // 10),
            "eval_every": steps, "checkpoint_every": steps, "log_every": max(1, steps // 10)}


def sweep(smoke: bool = False) -> Sweep:
    sizes, budgets = SIZES, BUDGETS
    if smoke:
        sizes = {k: SIZES[k] for k in ("d16", "d24", "d32")}
        budgets = [5e9, 1e10]
    return Sweep(
        overrides={"model.max_seq_len": 64, "data.seq_len": 64, "batch_size": 32,
                   "optim.lr": 3e-3, "optim.weight_decay": 0.1, "eval_batches": 8,
                   "tensorboard": False},
        smoke={"eval_batches": 2, "batch_size": 16},
        sizes={k: {"model.d_model": d, "model.n_layers": n, "model.n_heads": h}
               for k, (d, n, h) in sizes.items()},
        axes=[Grid("@budget", budgets)],
        derive=_steps,
    )
