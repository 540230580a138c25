"""Semi-structured N:M sparsity (2:4 by default): the `sparsity` config section, the
masks, their scores, the train step's hook, and the one-shot `prune_2_4`
(`lm prune RUN --out NEW --method 2:4`).

A mask keeps N of every M consecutive weights along a matrix's fan-in (input)
dimension, the layout NVIDIA's 2:4 sparse tensor cores run: for y = x @ W with W
[in, out], each group is M consecutive input rows of one output column. A matrix with
several fan-in axes (attention's wo [heads, head_dim, d_model]) groups along them
flattened (heads-major), as its Hugging Face form [d_model, heads * head_dim] does.

The masks live in the train state beside the params, state["sparsity"]: a tree with
the targets' paths of the params tree, boolean, on the params' shardings; not
trained, no optimizer state; checkpointed with the state and restored on resume. The
forward always computes with params * mask (`masked`), in the train step and wherever
params are read for inference or export (lm/train/param_source.py `_read_params`, the
one place: lm eval, sample, generate, serve, export hf and --init-from all go through
it), so a run's weights outside the mask never act.

mode
  fixed    the masks are kept as they are. The step multiplies the gradient by the mask
           and the updated params again by it: pruned weights stay exactly zero, whatever
           the optimizer (momentum, weight decay) would do.
  learned  Adaptive Sparse Training (Huang et al. 2024, "Pruning LLMs with Semi-Structural
           Adaptive Sparse Training"): the dense weights train through a straight-through
           estimator (the gradient of the masked weights is applied to the dense ones)
           with SR-STE's decay of the pruned weights (Zhou et al. 2021: gradient +=
           decay * (1 - mask) * w), and the mask is recomputed from the weights'
           magnitudes after every `update_every` steps up to step `freeze_at`, frozen
           after.

A run's first masks (a fresh state: its init, or --init-from weights) are the top-N
magnitudes per group of the weights it starts from: for a pruned run's weights (zeros
outside its mask) that is its mask again.

This module imports nothing of lmlab beyond the schema and errors at import: lm.config
imports it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from lm.errors import ConfigError
from lm.schema import knob

MODES = ("off", "fixed", "learned")
SCORES = ("magnitude", "obs")

# The fan-in (input) axes of each projection matrix, by its name and logical axis names:
# what a group of M runs along; the first alternative whose axes the matrix has. (The
# MLP's w_out is stored [d_model, d_ff], MoE's [experts, d_expert, d_model], Mamba-2's
# [d_inner, d_model]: their inputs are the "mlp" / "expert_mlp" axes.)
_EMBED = (("embed",),)
FAN_IN = {
    "wq": _EMBED, "wk": _EMBED, "wv": _EMBED, "wg": _EMBED, "wo": (("heads", "head_dim"),),
    "w_in": _EMBED, "w_gate": _EMBED, "w_out": (("mlp",), ("expert_mlp",)),
    "w_z": _EMBED, "w_x": _EMBED, "w_b": _EMBED, "w_c": _EMBED, "w_dt": _EMBED,
}


@dataclass(frozen=True)
class SparsityConfig:
    """Semi-structured N:M weight sparsity (lm/compress/sparsity.py)."""
    mode: Literal["off", "fixed", "learned"] = knob(
        "off", doc="off; fixed = the masks are kept (pruned weights stay exactly zero; `lm "
                   "prune --method 2:4` writes such a run); learned = Adaptive Sparse "
                   "Training: the masks follow the weights' magnitudes every update_every "
                   "steps until freeze_at, the dense weights training through a "
                   "straight-through estimator with SR-STE decay. A run's first masks are "
                   "the top-N magnitudes per group of its first weights.")
    pattern: str = knob(
        "2:4", doc="N:M: N weights kept in every M consecutive ones along each target "
                   "matrix's fan-in (input) dimension (2:4: NVIDIA's sparse tensor cores).")
    targets: str = knob(
        "blocks.*.mixer.w[qkvo],blocks.*.channel.w_*",
        doc="Comma-separated globs over the params' dotted paths (e.g. blocks.0.mixer.wq) "
            "of the matrices made sparse; each must match a parameter. Default: the "
            "attention and MLP projections of every block (not the embedding, readout or "
            "norms).")
    update_every: int = knob(
        10, doc="mode=learned: the masks are recomputed from the weights' magnitudes after "
                "every this many steps.")
    freeze_at: int = knob(
        0, doc="mode=learned: no mask update after this step (the masks are frozen); 0 = "
               "never frozen.")
    decay: float = knob(
        2e-4, doc="mode=learned: SR-STE's decay of the pruned weights, added to their "
                  "gradient as decay * w (Zhou et al. 2021).")


def enabled(cfg: SparsityConfig) -> bool:
    return cfg.mode != "off"


def parse_pattern(pattern: str) -> tuple[int, int]:
    """(N, M) of "N:M", or ConfigError."""
    n, sep, m = pattern.partition(":")
    try:
        n, m = int(n), int(m)
    except ValueError:
        sep = ""
    if not sep:
        raise ConfigError(f"sparsity.pattern={pattern!r} is not N:M (e.g. 2:4)")
    if not 0 < n < m:
        raise ConfigError(f"sparsity.pattern={pattern!r}: need 0 < N < M")
    return n, m


def validate(cfg: SparsityConfig) -> None:
    if cfg.mode not in MODES:
        raise ConfigError(f"sparsity.mode={cfg.mode!r}: one of {', '.join(MODES)}")
    parse_pattern(cfg.pattern)
    if not [g for g in cfg.targets.split(",") if g.strip()]:
        raise ConfigError("sparsity.targets is empty")
    if cfg.update_every <= 0:
        raise ConfigError(f"sparsity.update_every must be positive, got {cfg.update_every}")
    if cfg.freeze_at < 0:
        raise ConfigError(f"sparsity.freeze_at must be >= 0, got {cfg.freeze_at}")
    if cfg.decay < 0:
        raise ConfigError(f"sparsity.decay must be >= 0, got {cfg.decay}")


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def target_paths(cfg: SparsityConfig, params: dict, axes: dict) -> dict[tuple, tuple[int, ...]]:
    """{path of a target matrix in params: its fan-in axes (indices)}; ConfigError for a
    glob that matches no parameter, a target with no known fan-in, or a fan-in that M
    does not divide. `params` may be abstract (shapes only)."""
    from lm.tree import get_path, leaf_paths
    _, m = parse_pattern(cfg.pattern)
    leaves = dict(leaf_paths(params))
    out = {}
    for glob in filter(None, (g.strip() for g in cfg.targets.split(","))):
        hits = [p for p in leaves if fnmatch.fnmatchcase(dotted(p), glob)]
        if not hits:
            raise ConfigError(f"sparsity.targets: {glob!r} matches no parameter (e.g. "
                              f"{', '.join(dotted(p) for p in list(leaves)[:3])})")
        for path in hits:
            names = get_path(axes, path)
            fan_in = next((f for f in FAN_IN.get(path[-1], ()) if set(f) <= set(names)), None)
            if fan_in is None:
                raise ConfigError(f"sparsity.targets: {dotted(path)} {tuple(names)} is not a "
                                  f"projection matrix with a known fan-in ({', '.join(FAN_IN)})")
            idx = tuple(names.index(a) for a in fan_in)
            k = 1
            for i in idx:
                k *= leaves[path].shape[i]
            if k % m:
                raise ConfigError(f"sparsity.pattern={cfg.pattern}: the fan-in of "
                                  f"{dotted(path)} ({k}) does not divide by M={m}")
            out[path] = idx
    return out


def group_mask(score, fan_in: tuple[int, ...], n: int, m: int):
    """Boolean mask of score's shape keeping the N largest scores of every M consecutive
    entries along the (flattened) fan-in axes; ties go to the first."""
    import jax
    import jax.numpy as jnp
    nd = score.ndim
    rest = tuple(i for i in range(nd) if i not in fan_in)
    perm = rest + tuple(fan_in)
    moved = jnp.transpose(score, perm)
    lead = moved.shape[:len(rest)]
    groups = moved.reshape(*lead, -1, m).astype(jnp.float32)
    _, keep = jax.lax.top_k(groups, n)
    mask = jnp.sum(jax.nn.one_hot(keep, m, dtype=jnp.int32), axis=-2) > 0
    return jnp.transpose(mask.reshape(moved.shape), tuple(perm.index(i) for i in range(nd)))


def masks_from_scores(cfg: SparsityConfig, scores: dict, fan_ins: dict) -> dict:
    """{"path": mask} trees: the N:M masks of `scores` (a tree holding the targets'
    paths) for the targets of `fan_ins` (target_paths)."""
    from lm.tree import get_path, set_path
    n, m = parse_pattern(cfg.pattern)
    out: dict = {}
    for path, fan_in in fan_ins.items():
        set_path(out, path, group_mask(get_path(scores, path), fan_in, n, m))
    return out


def magnitude_masks(cfg: SparsityConfig, params: dict, fan_ins: dict) -> dict:
    import jax.numpy as jnp
    from lm.tree import get_path, set_path
    scores: dict = {}
    for path in fan_ins:
        set_path(scores, path, jnp.abs(get_path(params, path)))
    return masks_from_scores(cfg, scores, fan_ins)


def _map_targets(fn, params: dict, masks: dict, *more: dict) -> dict:
    """params with fn(param, mask, *more's leaves) at the paths `masks` holds."""
    from lm.tree import get_path, leaf_paths, set_path
    out = _copy_dicts(params)
    for path, mask in leaf_paths(masks):
        set_path(out, path, fn(get_path(params, path), mask, *(get_path(t, path) for t in more)))
    return out


def _copy_dicts(tree):
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def masked(params: dict, masks: dict) -> dict:
    """params with every target multiplied by its mask (the weights the model computes
    with)."""
    return _map_targets(lambda w, m: w * m.astype(w.dtype), params, masks)


def effective_params(state: dict) -> dict:
    """A train state's params as the model computes with them (masked when the state has
    masks)."""
    if "sparsity" not in state:
        return state["params"]
    return masked(state["params"], state["sparsity"])


def gradients(cfg: SparsityConfig, grads: dict, params: dict, masks: dict) -> dict:
    """The gradient the optimizer gets, from the gradient of the masked weights: fixed,
    masked (pruned weights get none); learned, straight through to the dense weights
    plus SR-STE's decay of the pruned ones."""
    if cfg.mode == "fixed":
        return _map_targets(lambda g, m: g * m.astype(g.dtype), grads, masks)
    decay = cfg.decay
    return _map_targets(lambda g, m, w: g + (decay * (~m)).astype(g.dtype) * w.astype(g.dtype),
                        grads, masks, params)


def after_update(cfg: SparsityConfig, new_params: dict, masks: dict, step, fan_ins: dict):
    """(params, masks, number of mask entries changed) after the optimizer's update at
    0-based `step` (traced): fixed, the params masked again; learned, the masks
    recomputed from the new weights when step + 1 is a multiple of update_every and not
    past freeze_at."""
    import jax
    import jax.numpy as jnp
    if cfg.mode == "fixed":
        return masked(new_params, masks), masks, jnp.float32(0)
    done = step + 1
    due = (done % cfg.update_every) == 0
    if cfg.freeze_at:
        due = due & (done <= cfg.freeze_at)
    fresh = magnitude_masks(cfg, new_params, fan_ins)
    new_masks = jax.tree.map(lambda f, old: jnp.where(due, f, old), fresh, masks)
    flips = sum(jnp.sum(a != b) for a, b in zip(jax.tree.leaves(new_masks),
                                               jax.tree.leaves(masks)))
    return new_params, new_masks, flips.astype(jnp.float32)


def mask_stats(masks: dict) -> dict[str, float]:
    """{dotted path: fraction of zeros} of each mask."""
    import numpy as np
    from lm.tree import leaf_paths
    return {dotted(p): float(1 - np.mean(np.asarray(m))) for p, m in leaf_paths(masks)}


# --- the one-shot pruner: lm prune RUN --out NEW --method 2:4 -------------------------

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
