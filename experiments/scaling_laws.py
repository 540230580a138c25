"""An IsoFLOP grid (Chinchilla approach 2; the runs also feed approach 3): 5 compute
budgets x 5 model sizes; each trial's steps are chosen so that 6 N D matches its budget
(N = total params with the tokenizer's vocabulary, D = steps x batch x seq_len); 7m58s
on a 2-core CPU, one trial at a time (measured).

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
        budgets = [2.5e9, 5e9]
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


PAPER = ("Hoffmann et al. 2022, Training Compute-Optimal Large Language Models "
         "(Chinchilla, arXiv:2203.15556), approaches 2 and 3")


def findings(sweep):
    """Compute-optimal N and D grow about equally with compute: N_opt ~ C^a, a ~ 0.5."""
    import warnings

    import numpy as np

    from lm.analysis import analyses, scaling
    from lm.analysis import findings as f

    done = sweep.done
    n = done["params"].to_numpy(float)
    d = done["tokens_seen"].to_numpy(float)
    loss = done["final_val_loss"].to_numpy(float)
    budgets = np.array([float(b) if b is not None else np.nan for b in analyses.compute_budgets(sweep)])
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            iso = scaling.fit_isoflops(n, loss, compute=budgets, rtol=0.15)
            out.append(f.Finding("(approach 2) IsoFLOP minima: N_opt ~ C^a",
                                 f"a = {iso.a:.3f}, D_opt ~ C^{iso.b:.3f} (no interval: one "
                                 "parabola per budget)", "-", ("isoflops.png",)))
        except ValueError as e:
            out.append(f.Finding("(approach 2) IsoFLOP minima: N_opt ~ C^a",
                                 f"no fit: {e}", f.NOT_RESOLVED))
        try:
            law = scaling.fit_loss_law(n, d, loss, grid=analyses.COARSE_GRID)
            boot = scaling.bootstrap_loss_law(n, d, loss, fit=law, n_boot=100)
            lo, hi = boot.interval("a")
            verdict = (f.REPRODUCED if lo <= 0.5 <= hi and hi - lo < 0.4 else
                       f.NOT_RESOLVED if lo <= 0.5 <= hi else f.NOT_REPRODUCED)
            out.append(f.Finding(
                "(approach 3) Compute-optimal parameters and tokens scale about equally: "
                "N_opt ~ C^a with a ~ 0.5 (Chinchilla: 0.46 by approach 3)",
                f"a = {f.iv(law.a, lo, hi, '.3f')} (100 bootstrap resamples of {len(n)} runs), "
                f"alpha = {law.alpha:.3f}, beta = {law.beta:.3f}, E = {law.E:.3f}",
                verdict, ("loss_law.png",)))
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:
            out.append(f.Finding("(approach 3) N_opt ~ C^a with a ~ 0.5", f"no fit: {e}",
                                 f.NOT_RESOLVED))
    return out
