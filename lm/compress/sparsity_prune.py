"""The one-shot N:M pruner behind `lm prune RUN --out NEW --method 2:4`: scores (magnitude,
or w^2 x the empirical Fisher's diagonal), masks, and the new run it writes. Apart from
lm/compress/sparsity.py (the config section, masks and the step's hook), which lm.config
imports: this module reads runs and so imports lm.config's world."""

from __future__ import annotations

from lm.compress.sparsity import (SCORES, SparsityConfig, _copy_dicts, mask_stats, masked,
                                  masks_from_scores, validate)
from lm.errors import ConfigError


def fisher_diagonal(pieces, params: dict, batches: list, fan_ins: dict) -> dict:
    """The diagonal of the empirical Fisher (the mean over calibration sequences of the
    squared per-sequence gradient of the mean token loss) at the targets' paths."""
    import jax
    import jax.numpy as jnp
    from lm.train.step import loss_sums
    from lm.tree import get_path, set_path
    paths = list(fan_ins)

    def targets(tree):
        return [get_path(tree, p) for p in paths]

    def row_sq_grads(p, row):
        def loss(ts):
            full = _copy_dicts(p)
            for path, t in zip(paths, ts):
                set_path(full, path, t)
            denom = jnp.maximum(jnp.sum(row["loss_mask"]), 1.0)
            return loss_sums(pieces.graphdef, full, row, 0.0, denom, pieces.loss_chunk)[0]
        return [jnp.square(g.astype(jnp.float32)) for g in jax.grad(loss)(targets(p))]

    @jax.jit
    def batch_sums(p, batch):
        rows = jax.tree.map(lambda x: x[:, None], batch)  # one sequence at a time
        init = [jnp.zeros(t.shape, jnp.float32) for t in targets(p)]

        def body(acc, row):
            return [a + g for a, g in zip(acc, row_sq_grads(p, row))], None
        return jax.lax.scan(body, init, rows)[0]

    total, count = None, 0
    for batch in batches:
        sums = batch_sums(params, {k: jnp.asarray(v) for k, v in batch.items()})
        total = sums if total is None else [a + b for a, b in zip(total, sums)]
        count += int(batch["loss_mask"].any(axis=-1).sum())
    out: dict = {}
    for path, s in zip(paths, total):
        set_path(out, path, s / max(count, 1))
    return out


def scores_for(score: str, cfg: SparsityConfig, pieces, params: dict, batches: list,
               fan_ins: dict) -> dict:
    """The saliency of each target weight. magnitude: |w|. obs: Optimal Brain Damage's
    (LeCun et al. 1990; the diagonal case of Hassibi & Stork's OBS) second-order loss
    increase w^2 * H_jj / 2 when w is set to zero, with the Hessian's diagonal taken as
    the empirical Fisher's (`fisher_diagonal`, from the calibration batches). Chosen
    over Wanda / SparseGPT's activation Hessian X^T X because it needs only the
    gradient of the model's own loss: one score for every target matrix, with no hook
    into each mixer's activations, and it weighs a weight by the loss's sensitivity to
    it, not only by its input's size."""
    import jax.numpy as jnp
    from lm.tree import get_path, set_path
    if score not in SCORES:
        raise ConfigError(f"--score {score!r}: one of {', '.join(SCORES)}")
    out: dict = {}
    fisher = fisher_diagonal(pieces, params, batches, fan_ins) if score == "obs" else None
    for path in fan_ins:
        w = get_path(params, path).astype(jnp.float32)
        set_path(out, path, jnp.abs(w) if fisher is None
                 else jnp.square(w) * get_path(fisher, path))
    return out


def prune_2_4(run_dir, out_dir, *, score: str = "magnitude", targets: str | None = None,
              calib_batches: int = 8, pattern: str = "2:4") -> dict:
    """One-shot N:M pruning of the newest checkpoint of `run_dir` into a new run dir
    `out_dir`: its config (sparsity.mode=fixed, the pattern and targets), its params
    with zeros outside the masks, the masks in the checkpoint (state["sparsity"]), the
    tokenizer files, summary.json and prune.json (the report returned: per-matrix
    sparsity, the calibration loss before and after). Calibration: the first
    `calib_batches` validation batches of the run's data (the obs score's Fisher, and
    the losses). `lm train --init-from out_dir` heals it with the masks fixed."""
    import dataclasses
    import json
    import shutil
    from pathlib import Path

    from lm import config as config_lib
    from lm.data import eval_batches
    from lm.interop.hf_import import TOKENIZER_FILES, save_state
    from lm.train.loop import evaluate
    from lm.train.param_source import restore_for_inference
    from lm.train.state import build

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if score not in SCORES:
        raise ConfigError(f"--score {score!r}: one of {', '.join(SCORES)}")
    if calib_batches <= 0:
        raise ConfigError(f"--calib-batches must be positive, got {calib_batches}")
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"lm prune: {run_dir} has no config.json (not a run directory)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"lm prune: --out {out_dir} exists and is not empty (nothing is "
                          "overwritten)")
    saved = config_lib.load_run_config(run_dir / "config.json")
    if saved.lora.rank:
        raise ConfigError(f"lm prune: {run_dir} is a LoRA run (export or merge it first)")
    sparsity = dataclasses.replace(
        saved.sparsity, mode="fixed",
        pattern=pattern, **({"targets": targets} if targets else {}))
    validate(sparsity)
    setup, params, step = restore_for_inference(run_dir)
    cfg = setup.cfg
    pieces = build(dataclasses.replace(cfg, sparsity=sparsity), setup.pieces.mesh)
    fan_ins = pieces.sparse_targets
    batches = eval_batches(cfg.data, setup.tokenizer, cfg.batch_size, calib_batches)
    scores = scores_for(score, sparsity, pieces, params, batches, fan_ins)
    masks = masks_from_scores(sparsity, scores, fan_ins)
    pruned = masked(params, masks)
    eval_step = setup.pieces.eval_step()
    before = evaluate(setup.pieces, eval_step, params, batches, setup.tokenizer)
    after = evaluate(setup.pieces, eval_step, pruned, batches, setup.tokenizer)
    state = pieces.fresh_state(pruned, masks=masks)

    out_cfg = dataclasses.replace(saved, sparsity=sparsity)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Path(cfg.data.tokenizer)
    if tok.is_file() and tok.parent.absolute() == run_dir.absolute():
        # A tokenizer kept in the run dir (an imported model's) moves with it.
        for name in TOKENIZER_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, out_dir / name)
        out_cfg = dataclasses.replace(out_cfg, data=dataclasses.replace(
            out_cfg.data, tokenizer=str((out_dir / tok.name).absolute())))
    (out_dir / "config.json").write_text(config_lib.to_json(out_cfg))
    save_state(out_dir, state)
    report = {
        "source": str(run_dir.absolute()), "source_step": step, "method": pattern,
        "score": score, "calib_batches": len(batches),
        "calib_loss_before": before["loss"], "calib_loss_after": after["loss"],
        "sparsity": mask_stats(masks),
    }
    (out_dir / "prune.json").write_text(json.dumps(report, indent=2))
    (out_dir / "summary.json").write_text(json.dumps({
        "status": "pruned", "source": str(run_dir.absolute()), "steps": 0}, indent=2))
    return report
