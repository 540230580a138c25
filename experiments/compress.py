"""Smaller models from a trained one: depth and width pruning (FinerCut / "What Matters
in Transformers"; Minitron), one-shot 2:4 sparsity, each healed with and without
distillation from the parent, against students of the same shapes trained from scratch
on the parent's whole token budget (with and without the parent as teacher), with seeds.
The question from Minitron (Muralidharan et al. 2024): does pruning a trained model and
healing it with distillation beat training the small model from scratch, at a fraction
of the tokens?

`prepare` (run once by `lm sweep`, resumable) trains the parent, the default model's
shape (d_model 128, 4 layers, 4 heads) on the embedded corpus, and writes the pruned
children with `lm prune` under WORKDIR/pruned/:

    depth25 / depth50   2 / 4 of the 8 sublayers removed (lowest residual-stream change)
    width25 / width50   non-embedding params down ~25% / ~50% (heads, MLP channels,
                        embedding channels ranked by activations)
    sparse24            2:4 masks on every block matrix, one-shot by magnitude (the
                        Fisher-diagonal "obs" score pruned worse on a small model:
                        docs/sparsity.md)

The trials, per child, 2 seeds each (a seed = data order; the same weights):

    <child>-heal        init from the child, HEAL_STEPS on the data alone
    <child>-heal_kd     the same with logit KD from the parent (distill.weight 1,
                        Minitron's choice)
    <child>-scratch     the child's shape (2:4: learned masks, AST) from a random init
                        for the parent's PARENT_STEPS
    <child>-scratch_kd  the same, distilled from the parent (distill.weight 0.5)

5 children x 4 recipes x 2 seeds = 40 trials (each recipe's seeds one batched program),
plus the parent. Wall time: see docs/findings.md (measured by `lm findings`).

    lm sweep experiments/compress.py --workdir runs/compress --parallel 2
    lm analyze --pareto runs/compress          # the table and analysis/pareto.png
    lm findings runs/compress
    lm sweep experiments/compress.py --workdir runs/compress_smoke --smoke   # ~2 min
"""

import json
import subprocess
import sys
from pathlib import Path

from lm.sweep import Sweep

PARENT_STEPS = 400
HEAL_STEPS = 80
SEEDS = [0, 1]

COMMON = {
    "model.max_seq_len": 64, "data.seq_len": 64, "batch_size": 16,
    "optim.lr": 3e-3, "optim.warmup_steps": 20, "optim.schedule": "cosine",
    "optim.weight_decay": 0.1, "log_every": 20, "eval_batches": 16, "tensorboard": False,
}
SMOKE = {"batch_size": 4, "data.seq_len": 32, "eval_batches": 2, "optim.warmup_steps": 2,
         "log_every": 2}
SMOKE_MODEL = {"model.d_model": 32, "model.n_heads": 2, "model.n_layers": 2}
SMOKE_STEPS = {"parent": 8, "heal": 4}

# child -> `lm prune` arguments
CHILDREN = {
    "depth25": ["--method", "depth", "--fraction", "0.25"],
    "depth50": ["--method", "depth", "--fraction", "0.5"],
    "width25": ["--method", "width", "--fraction", "0.25"],
    "width50": ["--method", "width", "--fraction", "0.5"],
    "sparse24": ["--method", "2:4", "--score", "magnitude"],
}
SMOKE_CHILDREN = ("depth50", "width50", "sparse24")


def _steps(smoke: bool) -> tuple[int, int]:
    return ((SMOKE_STEPS["parent"], SMOKE_STEPS["heal"]) if smoke
            else (PARENT_STEPS, HEAL_STEPS))


def _children(smoke: bool) -> dict:
    return {k: CHILDREN[k] for k in SMOKE_CHILDREN} if smoke else CHILDREN


def _sets(overrides: dict) -> list[str]:
    from lm.sweep.spec import format_value
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={format_value(v)}")]


def _lm(args: list[str], log: Path) -> None:
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-m", "lm.cli", *args], stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        from lm.errors import ConfigError
        raise ConfigError(f"prepare: lm {args[0]} failed (exit {done.returncode}); see {log}")


def _parent_overrides(smoke: bool) -> dict:
    steps, _ = _steps(smoke)
    return {**COMMON, **(SMOKE if smoke else {}), **(SMOKE_MODEL if smoke else {}),
            "steps": steps, "eval_every": steps, "checkpoint_every": steps, "seed": 0}


def prepare(workdir: Path, smoke: bool) -> None:
    """The parent (WORKDIR/parent, an ordinary run the analysis shows) and its pruned
    children (WORKDIR/pruned/<child>); what exists is kept."""
    parent, log = workdir / "parent", workdir / "prepare.log"
    summary = parent / "summary.json"
    if not (summary.exists() and json.loads(summary.read_text()).get("status") == "completed"):
        _lm(["train", "--run-dir", str(parent), *_sets(_parent_overrides(smoke))], log)
    for child, args in _children(smoke).items():
        out = workdir / "pruned" / child
        if not (out / "prune.json").exists():
            if out.exists():  # an attempt that did not finish: this experiment's own scratch
                import shutil
                shutil.rmtree(out)
            _lm(["prune", str(parent), "--out", str(out), *args], log)


def _child_config(workdir: Path, child: str) -> dict:
    path = workdir / "pruned" / child / "config.json"
    if not path.exists():
        from lm.errors import ConfigError
        raise ConfigError(f"{path}: missing; run the sweep (not --dry-run) first: its "
                          "prepare() trains the parent and prunes it")
    return json.loads(path.read_text())


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def arms(workdir: Path, smoke: bool) -> dict[str, dict]:
    parent = str((workdir / "parent").resolve())
    parent_steps, heal_steps = _steps(smoke)
    out = {}
    for child in _children(smoke):
        cfg = _child_config(workdir, child)
        sparse = cfg.get("sparsity", {}).get("mode", "off") != "off"
        heal = {"init_from": str((workdir / "pruned" / child).resolve()), "steps": heal_steps,
                "eval_every": heal_steps, "checkpoint_every": heal_steps}
        if sparse:  # the masks stay fixed while the weights heal
            heal.update(_flat({k: v for k, v in cfg["sparsity"].items()}, "sparsity."))
        shape = _flat(cfg["model"], "model.")
        scratch = {**shape, "steps": parent_steps, "eval_every": parent_steps,
                   "checkpoint_every": parent_steps}
        if sparse:  # the same shape from scratch: masks learned during training (AST)
            scratch.update({"sparsity.mode": "learned",
                            "sparsity.pattern": cfg["sparsity"]["pattern"]})
        out[f"{child}-heal"] = heal
        out[f"{child}-heal_kd"] = {**heal, "distill.teacher": parent, "distill.weight": 1.0}
        out[f"{child}-scratch"] = scratch
        out[f"{child}-scratch_kd"] = {**scratch, "distill.teacher": parent,
                                      "distill.weight": 0.5}
    return out


def sweep(smoke: bool = False, workdir: Path | None = None) -> Sweep:
    from lm.sweep import Grid
    workdir = Path(workdir or ".")
    # The model comes from the child (init_from) or its config (scratch arms), never
    # from the base: init_from refuses a model section that differs from its source's.
    base = {k: v for k, v in _parent_overrides(smoke).items()
            if k not in ("steps", "eval_every", "checkpoint_every", "seed")
            and not k.startswith("model.")}
    return Sweep(overrides=base, arms=arms(workdir, smoke),
                 axes=[Grid("seed", [0] if smoke else SEEDS)], batch=len(SEEDS))


PAPER = ("Muralidharan et al. 2024, Compact Language Models via Pruning and Knowledge "
         "Distillation (Minitron, arXiv:2407.14679); Kim et al. 2024 FinerCut; He et al. "
         "2024 What Matters in Transformers?; Huang et al. 2024 Adaptive Sparse Training")


def findings(sweep):
    """The Pareto table, and per child: healing with KD vs data alone, and pruned+KD vs
    the same shape from scratch, paired by seed."""
    from lm.analysis import findings as f
    from lm.analysis import pareto
    from lm.analysis.seeds import paired_difference

    runs = sweep.finished.copy()
    print(pareto.report(runs, sweep.out))
    runs = runs[runs["arm"].notna()].copy()
    runs["child"] = runs["arm"].str.split("-").str[0]
    runs["recipe"] = runs["arm"].str.split("-").str[1]
    seed = sweep.seed or "seed"

    def compare(a, b, claim, want):
        d = paired_difference(runs, "final_val_loss", "recipe", a, b, ["child"], pair=seed)
        d = d[d["pairs"] > 0].set_index("child")
        if d.empty:
            return f.Finding(claim, f"needs the {a} and {b} recipes", f.NOT_RESOLVED)
        text = f"{a} minus {b} (validation loss, paired by seed): " + "; ".join(
            f"{c}: {f.iv(r['diff'], r['ci_lo'], r['ci_hi'])}" for c, r in d.iterrows()) + (
            f" ({int(d['pairs'].min())} seeds)")
        verdict = f.sign_verdict([(r["ci_lo"], r["ci_hi"]) for _, r in d.iterrows()], want)
        return f.Finding(claim, text, verdict, ("pareto.png",))

    steps = runs.groupby("recipe")["steps"].max()
    heal_steps, parent_steps = int(steps.get("heal", 0)), int(steps.get("scratch", 0))
    return [
        compare("heal_kd", "scratch",
                f"A pruned model healed with distillation ({heal_steps} steps) beats the same "
                f"shape trained from scratch on the parent's {parent_steps} steps", "<0"),
        compare("heal_kd", "heal", "Distillation from the parent heals a pruned model "
                "better than the data alone (same steps)", "<0"),
        compare("scratch_kd", "scratch", "A student distilled from the parent beats the "
                "same shape trained on the data alone (same steps)", "<0"),
    ]
