"""A data-mixture ablation with a cooldown mix (lm/data/mixture.py): the embedded
Shakespeare plays plus a second source, the synthetic passkey documents, at constant
mixes and as an anneal on the second source over the last 20% of the steps (the
MiniCPM / OLMo 2 / Llama 3 recipe: a different mix in the learning-rate decay). Every arm
is evaluated on both sources' validation splits (the passkey source's is measured even
where it has weight 0), with 3 seeds.

    arm          plays : keys                               keys share of the tokens
    plays_only   1 : 0                                      0
    mix_90_10    0.9 : 0.1                                  10%
    mix_70_30    0.7 : 0.3                                  30%
    cooldown     1 : 0 for 80% of the steps, then 0.7 : 0.3  6%

4 arms x 3 seeds = 12 runs, one at a time (a mixture's per-source evaluation trains
alone); 10m24s on a 2-core CPU shared with other work (measured).

    lm sweep experiments/data_mixture.py --workdir runs/data_mixture
    lm analyze runs/data_mixture      # validation loss per source and arm, with intervals
    lm sweep experiments/data_mixture.py --workdir runs/mixture_smoke --smoke   # ~1 min
"""

from lm.sweep import Sweep

MIX = "plays:{p}:shakespeare;keys:{k}:passkey"
ARMS = {
    "plays_only": {"data.sources": MIX.format(p=1, k=0)},
    "mix_90_10": {"data.sources": MIX.format(p=0.9, k=0.1)},
    "mix_70_30": {"data.sources": MIX.format(p=0.7, k=0.3)},
    "cooldown": {"data.sources": MIX.format(p=1, k=0),
                 "data.stages": "0.8:plays=1;1.0:plays=0.7,keys=0.3"},
}
STEPS = 600


def sweep(smoke: bool = False) -> Sweep:
    return Sweep(
        overrides={"model.d_model": 64, "model.n_layers": 4, "model.n_heads": 4,
                   "model.max_seq_len": 96, "data.seq_len": 96, "batch_size": 16,
                   "steps": STEPS, "optim.lr": 3e-3, "optim.warmup_steps": 60,
                   "optim.weight_decay": 0.1, "eval_every": STEPS, "eval_batches": 16,
                   "checkpoint_every": STEPS, "log_every": 50, "tensorboard": False},
        smoke={"steps": 40, "eval_every": 40, "checkpoint_every": 40, "eval_batches": 2,
               "optim.warmup_steps": 4},
        arms=ARMS,
        seeds=2 if smoke else 3,
    )


PAPER = ("Hu et al. 2024, MiniCPM: Unveiling the Potential of Small Language Models with "
         "Scalable Training Strategies (arXiv:2404.06395), section 4.5 (adding data in the "
         "decay stage); OLMo 2 (arXiv:2501.00656), mid-training")


def findings(sweep):
    """Training on a source lowers its validation loss; a cooldown mix reaches the
    second source's loss of a constant mix with a fraction of its tokens."""
    from lm.analysis import findings as f
    runs = sweep.finished
    arms = set(runs["arm"]) if "arm" in runs else set()
    col = "final_val_loss/keys"
    if sweep.seed is None or col not in runs or not {"plays_only", "mix_90_10",
                                                     "cooldown"} <= arms:
        return [f.Finding("Mixture findings", "needs the arms, seeds and per-source "
                          "validation loss", f.NOT_RESOLVED)]
    per_seed = runs.rename(columns={sweep.seed: "seed"})
    per_seed = per_seed.assign(keys_loss=per_seed[col],
                               plays_loss=per_seed["final_val_loss/plays"])
    out = []
    for arm, claim in (("mix_90_10", "10% of the tokens from the second source lowers its "
                                     "validation loss"),
                       ("cooldown", "A cooldown mix (6% of the tokens, at the end) lowers "
                                    "the second source's validation loss")):
        finding, _ = f.paired_finding(claim, per_seed, "keys_loss", arm, "plays_only",
                                      "model.d_model", "<0", label="width",
                                      what=f"{arm} minus plays_only")
        out.append(finding)
    finding, _ = f.paired_finding(
        "The cooldown mix beats the constant 10% mix on the second source with 60% of "
        "its tokens", per_seed, "keys_loss", "cooldown", "mix_90_10", "model.d_model", "<0",
        label="width", what="cooldown minus mix_90_10")
    out.append(finding)
    finding, _ = f.paired_finding(
        "The first source pays for the second: plays loss rises with a 30% mix", per_seed,
        "plays_loss", "mix_70_30", "plays_only", "model.d_model", ">0", label="width",
        what="mix_70_30 minus plays_only")
    out.append(finding)
    return out
