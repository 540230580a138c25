"""Where the norm goes (Peri-LN, Kim et al. 2025; The Curse of Depth, Sun et al. 2025):
pre-LN, post-LN, peri-LN and pre-LN with LayerNorm scaling (norm outputs x 1/sqrt(l)),
across depth, each with its LR tuned on a grid and with seeds.

Peri-LN is y = x + Norm(Module(Norm(x))) with the embedding normalised too (y0 =
Norm(x_emb), `model.embed_norm`) and a final norm; `peri_no_embed_norm` is the same
without the embedding norm (lmlab's peri-LN before it had one): there each sublayer adds
a unit-RMS vector to a residual stream whose embedding has RMS ~ init_std, so the tokens'
identity is swamped from the first layer on.

5 arms x depth {4, 8, 16} x LR {1e-3 .. 1e-1, 5 points} x seeds {0, 1, 2} = 225 trials
of 150 steps at d_model 48; each (arm, depth) is one batched group of 15 trials; 22m45s
on a 2-core CPU (measured).

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
    depths, lrs, seeds, arms = DEPTHS, log_grid(*LRS), SEEDS, ARMS
    if smoke:
        depths, lrs, seeds = [2], [3e-3, 3e-2], [0, 1]
        arms = {k: ARMS[k] for k in ("pre", "peri", "ln_scaling")}
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
        arms=arms,
        axes=[Grid("model.n_layers", depths), Grid("optim.lr", lrs), Grid("seed", seeds)],
        batch=len(lrs) * len(seeds),
    )


PAPER = ("Kim et al. 2025, Peri-LN: Revisiting Layer Normalization in the Transformer "
         "Architecture (arXiv:2502.02732); Sun et al. 2025, The Curse of Depth in Large "
         "Language Models (arXiv:2502.05795)")


def findings(sweep):
    """Each placement at its own best LR, paired with pre-LN by seed, per depth; and the
    residual stream's growth with depth."""
    import dataclasses

    from lm.analysis import findings as f
    from lm.analysis import stability

    runs = sweep.finished
    if "arm" not in runs or "pre" not in set(runs["arm"]):
        return [f.Finding("Peri-LN beats pre-LN", "needs the pre arm", f.NOT_RESOLVED)]
    at = f.loss_at_best_lr(runs, ["arm", "model.n_layers"], seed=sweep.seed or "seed")
    depths = sorted(at["model.n_layers"].unique())

    def versus(arm, claim, want):
        found, _ = f.paired_finding(claim, at, "loss", arm, "pre", "model.n_layers", want,
                                    label="depth", seed=sweep.seed or "seed",
                                    what=f"{arm} minus pre at each one's best LR",
                                    figures=("lr_sweep.png",))
        on_edge = at[at["arm"].isin([arm, "pre"]) & (at["edge"] != "")]
        edges = sorted({f"{r['arm']}@{int(r['model.n_layers'])}:{r['edge']}"
                        for _, r in on_edge.iterrows()})
        # an arm on its grid's edge could do better than measured: that bounds the
        # difference only one way (the reference's edge, or the arm's when it should lose)
        spoiled = ("pre" if want == "<0" else arm) in set(on_edge["arm"])
        return dataclasses.replace(
            found, result=found.result + (f"; best LR on the grid's edge: {', '.join(edges)}"
                                          if edges else ""),
            verdict=f.NOT_RESOLVED if spoiled else found.verdict)

    out = []
    for arm, claim, want in [
            ("peri", "Peri-LN (norms around each sublayer and on the embedding) reaches a "
                     "lower loss than pre-LN", "<0"),
            ("ln_scaling", "LayerNorm scaling (1/sqrt(l)) reaches a lower loss than pre-LN",
             "<0"),
            ("post", "Post-LN trains worse than pre-LN", ">0")]:
        if arm not in set(at["arm"]):
            continue
        out.append(versus(arm, claim, want))
    if "peri" in set(at["arm"]) and sweep.seed is not None:
        per_seed, _ = stability.lr_sensitivity_over_seeds(runs, ["arm", "model.n_layers"],
                                                          sweep.seed)
        robust, _ = f.paired_finding(
            "Peri-LN is less sensitive to the learning rate than pre-LN", per_seed,
            "lr_sensitivity", "peri", "pre", "model.n_layers", "<0", label="depth",
            what="LR sensitivity (Wortsman et al.) of peri minus pre", seed="seed",
            figures=("lr_sweep.png",))
        out.append(robust)
    if "peri_no_embed_norm" in set(at["arm"]):
        check = versus("peri_no_embed_norm", "(implementation check) Peri-LN without the "
                       "embedding norm", "<0")
        out.append(dataclasses.replace(check, verdict="-"))
    growth = stability.residual_growth_table(runs, ["arm", "model.n_layers", "optim.lr"])
    if not growth.empty:
        deep = growth[growth["model.n_layers"] == depths[-1]]
        g = deep.groupby("arm")["rms_last"].median()
        out.append(f.Finding(
            "Pre-LN's residual stream grows with depth (the Curse of Depth); LN scaling and "
            "Peri-LN curb it",
            f"residual RMS after the last of {int(depths[-1])} layers, median over LRs and "
            "seeds: " + ", ".join(f"{a} {v:.3g}" for a, v in g.items()),
            f.REPRODUCED if {"pre", "ln_scaling", "peri"} <= set(g.index)
            and g["ln_scaling"] < g["pre"] and g["peri"] < g["pre"] else f.NOT_REPRODUCED
            if {"pre", "ln_scaling"} <= set(g.index) else f.NOT_RESOLVED,
            ("residual_growth.png",)))
    return out
