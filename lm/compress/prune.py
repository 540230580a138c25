"""`lm prune RUN --out NEW --method M`: structured pruning of a trained run into a new,
ordinary run directory (config.json, the tokenizer files, an orbax checkpoint at step 0,
summary.json) that `lm eval`, `lm sample`, `lm generate`, `lm train --init-from` and
`lm export hf` read like any run, plus `prune.json` (the method, the importance scores,
what was removed, the parameter counts and the calibration loss before and after).

A method is one record in `METHODS`: its function `(parent: Parent, batches, options) ->
Pruned` (the new model section, its params and the method's part of the report) and the
options it reads. The rest
(reading the run, calibration batches, the checks, writing the new run) is shared here.

- depth: removes whole attention / MLP sublayers (a sublayer may go without its
  partner); the new config names them "-" in model.mixer_pattern / channel_pattern
  (lm/model/mixers/skip.py). Scores: see `depth_scores`.
- width (Minitron, Muralidharan et al. 2024): attention heads (whole KV groups or query
  heads within every group, so GQA stays valid), MLP hidden units and embedding
  channels by activation importance on calibration data, uniformly across layers (the
  config has one shape). See `width_importance` and `width_targets`.

Calibration batches are the first `calib_batches` batches of the run's own validation
split (its data config; batch_size rows each).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.model import mixers, recursive
from lm.model.config import ModelConfig
from lm.tree import get_path, leaf_paths, set_path

REPORT_FILE = "prune.json"


@dataclass
class Parent:
    """The run being pruned: its config (layers unstacked: scan_layers=false), params as
    a pure dict of host arrays, and what runs a model of a config on calibration data."""
    run: Path
    step: int
    cfg: TrainConfig
    params: dict
    tokenizer: object

    @property
    def model(self) -> ModelConfig:
        return self.cfg.model


@dataclass
class Pruned:
    model: ModelConfig
    params: dict
    report: dict = field(default_factory=dict)


# ------------------------------------------------------------------ running a model

def _graphdef(model_cfg: ModelConfig):
    from lm.model.transformer import Transformer
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))))


def _args(batch: dict) -> tuple:
    return batch["inputs"], batch["positions"], batch["segment_ids"]


def _log_probs_fn(model_cfg: ModelConfig):
    graphdef = _graphdef(model_cfg)

    @jax.jit
    def log_probs(params, batch):
        logits, _ = nnx.merge(graphdef, params)(*_args(batch))
        return jax.nn.log_softmax(logits, axis=-1)
    return log_probs


def _stats_fn(model_cfg: ModelConfig):
    """(params, batch, reference log-probs) -> (summed NLL, summed KL(ref || model),
    target tokens) over the real (loss-masked) targets."""
    graphdef = _graphdef(model_cfg)

    @jax.jit
    def stats(params, batch, ref_logp):
        logits, _ = nnx.merge(graphdef, params)(*_args(batch))
        logp = jax.nn.log_softmax(logits, axis=-1)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
        return jnp.sum(nll * mask), jnp.sum(kl * mask), jnp.sum(mask)
    return stats


def calibration_loss(model_cfg: ModelConfig, params: dict, batches: list[dict]) -> float:
    """Mean next-token loss of a model on the calibration batches."""
    stats, log_probs = _stats_fn(model_cfg), _log_probs_fn(model_cfg)
    nll = count = 0.0
    for b in batches:
        s, _, c = stats(params, b, log_probs(params, b))
        nll, count = nll + float(s), count + float(c)
    return nll / max(count, 1.0)


# ------------------------------------------------------------------ depth

def sublayers(model_cfg: ModelConfig) -> list[tuple[int, str]]:
    """Every present (layer, "mixer" | "channel") sublayer, in order."""
    out = []
    for i in range(model_cfg.n_layers):
        if not mixers.sequence_mixer(model_cfg, i).empty:
            out.append((i, "mixer"))
        if not mixers.channel_mixer(model_cfg, i).empty:
            out.append((i, "channel"))
    return out


def _mixer_of(model_cfg: ModelConfig, layer: int, slot: str):
    return (mixers.sequence_mixer if slot == "mixer" else mixers.channel_mixer)(model_cfg, layer)


def zeroed(model_cfg: ModelConfig, params: dict, layer: int, slot: str) -> dict:
    """params with sublayer (layer, slot)'s output zeroed: its declared output projection
    (_Mixer.output) and, where the block normalises that output (peri / out placement),
    its output norm's scale and bias (a LayerNorm of zeros is its bias). The block then
    computes what it computes without the sublayer."""
    block = dict(params["blocks"][layer])
    name = _mixer_of(model_cfg, layer, slot).output
    block[slot] = dict(block[slot], **{name: jnp.zeros_like(block[slot][name])})
    norm = "attn_out_norm" if slot == "mixer" else "mlp_out_norm"
    if norm in block:
        block[norm] = jax.tree.map(jnp.zeros_like, block[norm])
    blocks = dict(params["blocks"])
    blocks[layer] = block
    return dict(params, blocks=blocks)


def depth_scores(parent: Parent, batches: list[dict]) -> list[dict]:
    """Each sublayer's importance: the mean per-token KL divergence of the parent's
    next-token distribution from the parent's with that sublayer skipped (its output
    zeroed, which is exactly the pruned model: `zeroed`), on the calibration batches;
    the loss change is recorded too.

    Why this measure: like FinerCut (Zhang et al. 2024) it scores a sublayer by what
    removing it does to the model's output, not by the local change of the residual
    stream (1 - cos of a sublayer's input and output, Men et al. 2024's "What Matters"),
    which misses how later layers amplify or absorb the change. Against the loss change,
    KL is >= 0 and 0 exactly for a sublayer that does nothing (the loss of an
    undertrained model can drop when a sublayer goes). One-shot: all sublayers are
    scored against the full parent."""
    m = parent.model
    log_probs, stats = _log_probs_fn(m), _stats_fn(m)
    for i, slot in sublayers(m):
        if _mixer_of(m, i, slot).output is None:
            raise ConfigError(f"lm prune --method depth: the {_mixer_of(m, i, slot).name} "
                              "mixer declares no output projection to score it by")
    present = sublayers(m)
    nll, kl = np.zeros(len(present)), np.zeros(len(present))
    base_nll = count = 0.0
    for b in batches:  # one batch's [B, T, vocab] reference at a time
        ref = log_probs(parent.params, b)
        s, _, c = stats(parent.params, b, ref)
        base_nll, count = base_nll + float(s), count + float(c)
        for j, (i, slot) in enumerate(present):
            s, k, _ = stats(zeroed(m, parent.params, i, slot), b, ref)
            nll[j], kl[j] = nll[j] + float(s), kl[j] + float(k)
    count = max(count, 1.0)
    return [{"layer": i, "sublayer": _mixer_of(m, i, slot).name, "slot": slot,
             "kl": kl[j] / count, "loss_delta": (nll[j] - base_nll) / count}
            for j, (i, slot) in enumerate(present)]


def depth_model(model_cfg: ModelConfig, removed: list[tuple[int, str]]) -> ModelConfig:
    """model_cfg with the `removed` (layer, slot) sublayers named "-" in per-layer
    patterns (length n_layers), layers not scanned."""
    seq = [mixers.sequence_mixer(model_cfg, i).code for i in range(model_cfg.n_layers)]
    ch = [mixers.channel_mixer(model_cfg, i).code for i in range(model_cfg.n_layers)]
    for i, slot in removed:
        (seq if slot == "mixer" else ch)[i] = "-"
    return dataclasses.replace(model_cfg, mixer_pattern="".join(seq),
                               channel_pattern="".join(ch), scan_layers=False)


def subset_params(model_cfg: ModelConfig, params: dict) -> dict:
    """The parent's params at every path the model of `model_cfg` has (the params of a
    model with sublayers removed are a subset of its parent's)."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: _transformer(model_cfg)), nnx.Param))
    out: dict = {}
    for path, leaf in leaf_paths(abstract):
        value = get_path(params, path)
        assert tuple(value.shape) == tuple(leaf.shape), (path, value.shape, leaf.shape)
        set_path(out, path, value)
    return out


def _transformer(model_cfg: ModelConfig):
    from lm.model.transformer import Transformer
    return Transformer(model_cfg, nnx.Rngs(0))


def prune_depth(parent: Parent, batches: list[dict], options: dict) -> Pruned:
    """Remove the K lowest-scoring sublayers (--remove K, or --fraction F of them;
    --only attention|mlp restricts both the candidates and the count)."""
    only = options.get("only") or ""
    if only not in ("", "attention", "mlp"):
        raise ConfigError(f"--only must be attention or mlp, got {only!r}")
    slot_of = {"attention": "mixer", "mlp": "channel"}
    present = sublayers(parent.model)
    n = sum(1 for _, slot in present if not only or slot == slot_of[only])
    k = _count(options, n, "sublayers" if not only else f"{only} sublayers")
    if k >= len(present):
        raise ConfigError(f"--remove {k} would remove every sublayer of the model "
                          f"({len(present)})")
    scores = depth_scores(parent, batches)  # (checked first: scoring is the work)
    candidates = [s for s in scores if not only or s["slot"] == slot_of[only]]
    ranked = sorted(candidates, key=lambda s: (s["kl"], s["layer"], s["slot"]))
    removed = sorted((s["layer"], s["slot"]) for s in ranked[:k])
    model = depth_model(parent.model, removed)
    return Pruned(model, subset_params(model, parent.params), {
        "score": "kl: mean per-token KL(parent || parent with the sublayer skipped) on the "
                 "calibration batches; loss_delta: the loss change",
        "scores": scores,
        "removed": [{"layer": i, "slot": s, "sublayer": _mixer_of(parent.model, i, s).name}
                    for i, s in removed]})


def _count(options: dict, n: int, what: str) -> int:
    remove, fraction = options.get("remove"), options.get("fraction")
    if (remove is None) == (fraction is None):
        raise ConfigError("lm prune --method depth: give one of --remove K or --fraction F")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ConfigError(f"--fraction must be in (0, 1), got {fraction}")
        remove = round(fraction * n)
    if remove < 1:
        raise ConfigError(f"--remove must be >= 1 (got {remove}; --fraction rounds the "
                          f"count of {n} {what})")
    if remove > n:
        raise ConfigError(f"--remove {remove}: the model has only {n} {what}")
    return remove


# ------------------------------------------------------------------ width

class _Recorder:
    """Stands in for a block's mixer in a calibration forward: calls it and keeps its
    input (and the positions / segment ids a sequence mixer got)."""

    def __init__(self, inner, seen: list):
        self.inner, self.seen = inner, seen

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, *rest):
        self.seen.append((x, *rest[:2]))
        return self.inner(x, *rest)


def _head_outputs(attn, x_BTD, positions_BT, segment_ids_BT):
    """Each head's attention output before the output projection, [B, T, H, Dh]: the
    module run with wo replaced by the identity (its own code, every option honoured)."""
    graphdef, state = nnx.split(attn)
    pure = nnx.to_pure_dict(state)
    h, dh, _ = pure["wo"].shape
    pure["wo"] = jnp.eye(h * dh, dtype=pure["wo"].dtype).reshape(h, dh, h * dh)
    probe = nnx.merge(graphdef, pure)
    y, _, _ = probe(x_BTD, positions_BT, segment_ids_BT)
    return y.reshape(*y.shape[:2], h, dh)


def _importance_fn(model_cfg: ModelConfig):
    """(params, batch) -> sums over the real tokens of: |each head's output| (L2 norm,
    [L, H]), |each MLP hidden unit's activation| ([L, F]; SwiGLU/GeGLU: the gated
    product), |each residual channel at every norm output the sublayers read and the
    final norm| ([D]), and the token count."""
    from lm.model.mixers.mlp import GATED, activation
    graphdef = _graphdef(model_cfg)

    @jax.jit
    def importance(params, batch):
        model = nnx.merge(graphdef, params)
        seen = [([], []) for _ in range(model_cfg.n_layers)]
        for i, block in enumerate(model.blocks):
            block.mixer = _Recorder(block.mixer, seen[i][0])
            block.channel = _Recorder(block.channel, seen[i][1])
        final, _ = model.hidden_states(*_args(batch))
        w = (batch["segment_ids"] > 0).astype(jnp.float32)[..., None]  # real tokens
        heads, units = [], []
        embed = jnp.sum(jnp.abs(final.astype(jnp.float32)) * w, axis=(0, 1))
        for i, block in enumerate(model.blocks):
            (x, pos, seg), = seen[i][0]
            (xc,), = seen[i][1]
            out = _head_outputs(block.mixer.inner, x, pos, seg).astype(jnp.float32)
            heads.append(jnp.sum(jnp.linalg.norm(out, axis=-1) * w, axis=(0, 1)))
            mlp = block.channel.inner
            cdt = mlp.compute_dtype
            w_ins = (mlp.w_in[...].astype(cdt),)
            if mlp.kind in GATED:
                w_ins = (mlp.w_gate[...].astype(cdt),) + w_ins
            act = activation(mlp.kind, tuple(xc @ wi for wi in w_ins)).astype(jnp.float32)
            units.append(jnp.sum(jnp.abs(act) * w, axis=(0, 1)))
            for h in (x, xc):
                embed = embed + jnp.sum(jnp.abs(h.astype(jnp.float32)) * w, axis=(0, 1))
        return jnp.stack(heads), jnp.stack(units), embed, jnp.sum(w)
    return importance


def width_importance(parent: Parent, batches: list[dict]) -> dict:
    """Mean activation importance per head [L, H], MLP unit [L, F] and embedding
    channel [D] over the calibration tokens (Minitron's activation-based criteria)."""
    fn = _importance_fn(parent.model)
    sums = None
    for b in batches:
        out = [np.asarray(v, np.float64) for v in fn(parent.params, b)]
        sums = out if sums is None else [a + o for a, o in zip(sums, out)]
    n = max(float(sums[3]), 1.0)
    return {"heads": sums[0] / n, "mlp": sums[1] / n, "embed": sums[2] / n}


def width_targets(m: ModelConfig, options: dict) -> dict:
    """The target shape {heads, kv_heads, ffn, d_model} from --heads / --kv-heads / --ffn /
    --d-model (unset: kept) and --fraction F. The fraction rule: the query heads scale by
    1 - F (whole groups while a KV group has one query head, else the same query heads
    per group fewer in every group: the KV heads stay), rounded to a valid GQA shape;
    then ffn is chosen so that the non-embedding parameter count is (1 - F) times the
    parent's as nearly as it can be (the count is linear in ffn; the KV projections a
    GQA model keeps are made up for there). d_model is kept. Explicit flags take
    precedence over the fraction."""
    ffn0 = m.mlp.d_ff(m.d_model)
    t = {"heads": m.n_heads, "kv_heads": m.kv_heads, "ffn": ffn0, "d_model": m.d_model}
    fraction = options.get("fraction")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ConfigError(f"--fraction must be in (0, 1), got {fraction}")
        keep = 1 - fraction
        group = m.n_heads // m.kv_heads
        if group == 1:
            t["heads"] = t["kv_heads"] = max(1, round(m.n_heads * keep))
        else:
            t["heads"] = max(1, round(group * keep)) * m.kv_heads
    for key in ("heads", "kv_heads", "ffn", "d_model"):
        if options.get(key) is not None:
            t[key] = options[key]
    if options.get("heads") is not None and options.get("kv_heads") is None \
            and m.kv_heads == m.n_heads:
        t["kv_heads"] = t["heads"]  # multi-head attention stays multi-head
    if fraction is not None and options.get("ffn") is None and t["heads"] % t["kv_heads"] == 0:
        from lm.model import count_params
        goal = (1 - fraction) * count_params(m)["non_embedding"]
        n = [count_params(width_model(m, dict(t, ffn=f)))["non_embedding"] for f in (1, 2)]
        t["ffn"] = min(ffn0, max(1, round(1 + (goal - n[0]) / (n[1] - n[0]))))
    names = {"heads": "--heads", "kv_heads": "--kv-heads", "ffn": "--ffn",
             "d_model": "--d-model"}
    now = {"heads": m.n_heads, "kv_heads": m.kv_heads, "ffn": ffn0, "d_model": m.d_model}
    for key, value in t.items():
        if value < 1:
            raise ConfigError(f"{names[key]} must be >= 1, got {value}")
        if value > now[key]:
            raise ConfigError(f"{names[key]} {value} is larger than the model's {now[key]} "
                              "(pruning only shrinks)")
    if t["heads"] % t["kv_heads"]:
        raise ConfigError(f"--heads {t['heads']} is not a multiple of the KV heads "
                          f"({t['kv_heads']}): GQA needs whole groups")
    if t["heads"] // t["kv_heads"] > m.n_heads // m.kv_heads:
        raise ConfigError(f"--heads {t['heads']} over {t['kv_heads']} KV heads needs "
                          f"{t['heads'] // t['kv_heads']} query heads per group; the model "
                          f"has {m.n_heads // m.kv_heads}")
    if t == now:
        raise ConfigError("lm prune --method width: give a smaller --heads, --kv-heads, "
                          "--ffn, --d-model or a --fraction (the target is the model)")
    return t


def width_model(m: ModelConfig, t: dict) -> ModelConfig:
    """The model section of shape `t` (width_targets): head_dim is set (it no longer
    follows d_model / n_heads), mlp.ratio gives d_ff = t["ffn"] exactly."""
    ratio = t["ffn"] / t["d_model"]
    while int(ratio * t["d_model"]) < t["ffn"]:  # d_ff = int(ratio * d_model) exactly
        ratio = float(np.nextafter(ratio, np.inf))
    return dataclasses.replace(
        m, d_model=t["d_model"], n_heads=t["heads"],
        n_kv_heads=0 if (m.n_kv_heads == 0 and t["kv_heads"] == t["heads"]) else t["kv_heads"],
        head_dim=m.dh, mlp=dataclasses.replace(m.mlp, ratio=ratio))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, in their original order (ties: lower index)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return np.sort(order)


def keep_heads(head_scores: np.ndarray, kv: int, heads: int, kv_new: int) -> tuple:
    """(kept query heads, kept KV heads) of one layer: the kv_new groups with the largest
    summed head importance, then in each the heads // kv_new most important query heads,
    so every kept query head reads a kept KV head (query head h reads KV head
    h // (H / KV))."""
    group = len(head_scores) // kv
    per_group = head_scores.reshape(kv, group)
    groups = _top(per_group.sum(1), kv_new)
    q = [g * group + j for g in groups for j in _top(per_group[g], heads // kv_new)]
    return np.asarray(q), groups


def prune_width(parent: Parent, batches: list[dict], options: dict) -> Pruned:
    m = parent.model
    t = width_targets(m, options)
    imp = width_importance(parent, batches)
    keep = {"embed": _top(imp["embed"], t["d_model"])}
    per_layer = {"heads": [], "kv_heads": [], "mlp": []}
    for i in range(m.n_layers):
        q, g = keep_heads(imp["heads"][i], m.kv_heads, t["heads"], t["kv_heads"])
        per_layer["heads"].append(q)
        per_layer["kv_heads"].append(g)
        per_layer["mlp"].append(_top(imp["mlp"][i], t["ffn"]))
    model = width_model(m, t)
    params = slice_params(m, parent.params, keep, per_layer)
    report = {
        "score": "mean over calibration tokens of: |head output| (L2, before wo), "
                 "|MLP hidden activation| (gated product for GLUs), |residual channel| at "
                 "each norm output the sublayers read and at the final norm (summed over "
                 "layers)",
        "before": {"heads": m.n_heads, "kv_heads": m.kv_heads,
                   "ffn": m.mlp.d_ff(m.d_model), "d_model": m.d_model},
        "after": t,
        "importance": {k: np.round(v, 6).tolist() for k, v in imp.items()},
        "kept": {"embed": keep["embed"].tolist(),
                 **{k: [v.tolist() for v in vs] for k, vs in per_layer.items()}}}
    return Pruned(model, params, report)


def slice_params(m: ModelConfig, params: dict, keep: dict, per_layer: dict) -> dict:
    """Every parameter sliced along its logical axes: "embed" by the kept channels,
    "heads" / "kv_heads" / "mlp" by the layer's kept heads and units (a flat
    [heads * head_dim] axis, q/k/v biases and an all-heads qk-norm, by the kept heads'
    slices). An RMSNorm whose normalised axis shrinks has its scale multiplied by
    sqrt(old / new): the mean square is then taken as if the removed entries were there
    and zero, so a parent whose removed channels carry nothing is reproduced exactly.
    `keep`: {"embed": kept channels}; `per_layer`: {"heads" | "kv_heads" | "mlp": [kept
    indices of each layer]}."""
    from lm.model.transformer import param_axes
    axes_tree = param_axes(_abstract_model(m))
    dh = m.dh
    out: dict = {}
    for path, value in leaf_paths(params):
        value = np.asarray(value)
        axes = get_path(axes_tree, path)
        layer = path[1] if path[0] == "blocks" else None
        for dim, name in enumerate(axes):
            if name == "embed":
                idx = keep["embed"]
            elif name in per_layer:
                idx = per_layer[name][layer]
                n = {"heads": m.n_heads, "kv_heads": m.kv_heads}.get(name)
                if n is not None and value.shape[dim] == n * dh:  # flat over heads
                    idx = (idx[:, None] * dh + np.arange(dh)).reshape(-1)
            else:
                continue
            old = value.shape[dim]
            value = np.take(value, idx, axis=dim)
            if path[-1] == "scale" and value.ndim == 1 and m.norm == "rms" and len(idx) < old:
                value = value * np.asarray(math.sqrt(old / len(idx)), value.dtype)
        set_path(out, path, value)
    return out


def _abstract_model(m: ModelConfig):
    return nnx.eval_shape(lambda: _transformer(m))


# ------------------------------------------------------------------ the command

@dataclass(frozen=True)
class Method:
    """A pruning method: `prune(parent, calibration batches, options) -> Pruned` and the
    keyword options (CLI flags, --kv-heads -> kv_heads) it reads; others are refused."""
    prune: Callable[[Parent, list, dict], Pruned]
    options: tuple[str, ...]


METHODS: dict[str, Method] = {
    "depth": Method(prune_depth, ("remove", "fraction", "only")),
    "width": Method(prune_width, ("heads", "kv_heads", "ffn", "d_model", "fraction")),
}


def _refusals(cfg: TrainConfig, method: str) -> None:
    m = cfg.model
    if cfg.lora.rank:
        raise ConfigError("lm prune: a LoRA run (lora.rank > 0); merge it first (lm train "
                          "--init-from it writes a run with the adapters merged)")
    if recursive.enabled(m):
        raise ConfigError("lm prune: a recursive (tied-block) model is not supported "
                          "(model.recursion.blocks > 0)")
    if any(mixers.channel_mixer(m, i).inactive_params(m) for i in range(m.n_layers)):
        raise ConfigError("lm prune: mixture-of-experts layers are not supported")
    if method == "width":
        from lm.model.mixers.attention import Attention
        from lm.model.mixers.mlp import MLP
        from lm.model.mixers.skip import SkipChannel, SkipMixer
        other = [x.name for x in mixers.used_mixers(m)
                 if x not in (Attention, MLP, SkipMixer, SkipChannel)]
        if other:
            raise ConfigError(f"lm prune --method width: prunes attention heads and MLP "
                              f"units; this model has {', '.join(other)} layers")
        if any(mixers.sequence_mixer(m, i).empty or mixers.channel_mixer(m, i).empty
               for i in range(m.n_layers)):
            raise ConfigError("lm prune --method width: the model has removed sublayers "
                              "(\"-\"): prune its width before its depth")
        if m.init == "mup":
            raise ConfigError("lm prune --method width: a muP model (model.init=mup) scales "
                              "its logits by its width; not supported")


def load_parent(run: Path) -> Parent:
    """The run's config and newest checkpoint, layers unstacked (scan_layers=false)."""
    from lm.train.param_source import restore_for_inference
    try:
        setup, params, step = restore_for_inference(run)
    except ConfigError as e:
        raise ConfigError(f"lm prune: {str(e).replace('--run ', '', 1)}") from None
    cfg = setup.cfg
    params = jax.tree.map(np.asarray, params)
    if cfg.model.scan_layers:  # one params tree per layer, as the pruned model holds them
        stacked = params["blocks"]
        params = dict(params, blocks={i: jax.tree.map(lambda x, i=i: x[i], stacked)
                                      for i in range(cfg.model.n_layers)})
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
    return Parent(run, step, cfg, params, setup.tokenizer)


def prune(run: str | Path, out: str | Path, method: str, *, calib_batches: int = 4,
          force: bool = False, **options) -> dict:
    """Prune the run in `run` into a new run dir `out` with `method` (METHODS); returns
    the report written to out/prune.json. Options (None = not given): depth: remove,
    fraction, only; width: heads, kv_heads, ffn, d_model, fraction."""
    from lm.data import eval_batches
    from lm.model import count_params

    run, out = Path(run), Path(out)
    if method not in METHODS:
        raise ConfigError(f"lm prune: unknown --method {method!r} (choose from "
                          f"{', '.join(METHODS)})")
    options = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(set(options) - set(METHODS[method].options))
    if wrong:
        raise ConfigError(f"lm prune --method {method}: --{wrong[0].replace('_', '-')} is "
                          f"not one of its options ({', '.join(METHODS[method].options)})")
    if calib_batches < 1:
        raise ConfigError(f"--calib-batches must be >= 1, got {calib_batches}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"lm prune: --out {out} is a file")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"lm prune: --out {out} exists and is not empty (nothing is "
                          "overwritten; --force replaces it)")
    if out.absolute() == run.absolute():
        raise ConfigError("lm prune: --out must not be the run being pruned")
    if not (run / "config.json").is_file():
        raise ConfigError(f"lm prune: {run} is not a run directory (no config.json)")
    _refusals(config_lib.load_run_config(run / "config.json"), method)
    parent = load_parent(run)
    batches = eval_batches(parent.cfg.data, parent.tokenizer, parent.cfg.batch_size,
                           calib_batches)
    pruned = METHODS[method].prune(parent, batches, options)
    if config_lib.load_run_config(run / "config.json").model.scan_layers:
        pruned = _restacked(pruned)
    before, after = count_params(parent.model), count_params(pruned.model)
    report = {
        "method": method, "source": str(run.absolute()), "source_step": parent.step,
        "calibration": {"batches": len(batches), "split": "validation",
                        "batch_size": parent.cfg.batch_size,
                        "seq_len": parent.cfg.data.seq_len},
        "options": options,
        **pruned.report,
        "params_before": before["total"], "params_after": after["total"],
        "non_embedding_params_before": before["non_embedding"],
        "non_embedding_params_after": after["non_embedding"],
        "calib_loss_before": calibration_loss(parent.model, parent.params, batches),
        "calib_loss_after": calibration_loss(pruned.model, pruned.params, batches),
        "model": {"mixer_pattern": pruned.model.mixer_pattern,
                  "channel_pattern": pruned.model.channel_pattern,
                  "d_model": pruned.model.d_model, "n_heads": pruned.model.n_heads,
                  "n_kv_heads": pruned.model.kv_heads,
                  "d_ff": pruned.model.mlp.d_ff(pruned.model.d_model)}}
    _write_run(parent, pruned, out, report, force)
    return report


def _restacked(pruned: Pruned) -> Pruned:
    """A scanned parent's pruned model scanned again where it can be (one mixer per kind:
    width pruning); a depth-pruned one stays unscanned (its layers differ)."""
    m = pruned.model
    if len(set(m.mixer_pattern)) > 1 or len(set(m.channel_pattern)) > 1:
        return pruned
    blocks = pruned.params["blocks"]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[blocks[i] for i in range(m.n_layers)])
    return Pruned(dataclasses.replace(m, scan_layers=True),
                  dict(pruned.params, blocks=stacked), pruned.report)


def _write_run(parent: Parent, pruned: Pruned, out: Path, report: dict, force: bool) -> None:
    """The new run, staged beside `out` and moved into place whole: a failure leaves no
    half-written run, and with --force the old one goes only once the new one is done."""
    import os

    from lm.compress.distill import DistillConfig
    from lm.interop.hf_import import save_state
    from lm.peft.lora import LoRAConfig
    from lm.train.setup import setup_run

    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        cfg = dataclasses.replace(
            parent.cfg, model=pruned.model, name=out.name, init_from="",
            lora=LoRAConfig(), distill=DistillConfig())
        if _copy_tokenizer(cfg, staging):
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, tokenizer=str(out / "tokenizer.json")))
        probe = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, tokenizer=parent.cfg.data.tokenizer))
        setup = setup_run(config_lib.validate(probe))
        params = jax.device_put(
            jax.tree.map(jnp.asarray, pruned.params), setup.pieces.state_shardings["params"])
        save_state(staging, setup.pieces.fresh_state(params))
        (staging / "config.json").write_text(config_lib.to_json(cfg))
        (staging / "summary.json").write_text(json.dumps({
            "status": "pruned", "source": report["source"], "method": report["method"],
            "steps": 0, "params": report["params_after"],
            "non_embedding_params": report["non_embedding_params_after"]}, indent=2))
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1))
        if out.exists():
            shutil.rmtree(out) if force else out.rmdir()  # (checked: empty unless force)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _copy_tokenizer(cfg: TrainConfig, staging: Path) -> bool:
    """A tokenizer file and its companions (lm/interop/hf_import.py TOKENIZER_FILES)
    copied into the new run: True. A named tokenizer ("byte", ...): False."""
    from lm.interop.hf_import import TOKENIZER_FILES
    tok = Path(cfg.data.tokenizer)
    if not tok.is_file():
        return False
    for name in TOKENIZER_FILES:
        if (tok.parent / name).is_file():
            shutil.copyfile(tok.parent / name, staging / name)
    shutil.copyfile(tok, staging / "tokenizer.json")
    return True
