"""The pure, jitted functions of training: loss, train step (with gradient accumulation
as a lax.scan over microbatches) and evaluation step."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.compress.distill import (hidden_loss, kd_per_token, mixed_loss, projection_optimizer,
                                 relation_loss)
from lm.compress import sparsity as sparsity_lib
from lm.model import recursive
from lm.post.preference import Objective, preference_stats, valid_pairs


AUTO_CHUNK_VOCAB = 32_768  # loss_chunk=-1: chunk the cross-entropy from this vocabulary up
AUTO_CHUNK = 512  # positions per chunk then: [B, 512, V] f32 logits live at a time


def loss_chunk_for(loss_chunk: int, vocab: int, seq_len: int) -> int:
    """Positions per cross-entropy chunk (0 = the whole sequence at once) for the
    `loss_chunk` knob: -1 = auto. The chunk is the largest divisor of seq_len not above it."""
    chunk = (AUTO_CHUNK if vocab >= AUTO_CHUNK_VOCAB else 0) if loss_chunk < 0 else loss_chunk
    if not chunk or chunk >= seq_len:
        return 0
    return max(d for d in range(1, chunk + 1) if seq_len % d == 0)


def _per_token(logits_BTV, targets_BT):
    """(nll, log Z, mean logit) per token, all float32."""
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
    return logz_BT - target_logit_BT, logz_BT, jnp.mean(logits_BTV, -1)


def token_losses(graphdef, params, batch, loss_chunk: int = 0, per_token=_per_token,
                 teacher=None):
    """Per-token negative log-likelihood, log Z and mean logit, plus the model's
    diagnostics. `per_token(logits_BTV, targets_BT)` -> a tuple of [B, T] arrays may
    replace what is computed from the logits (the harness's scorer: NLL and greedy match).

    loss_chunk > 0: the readout and the cross-entropy run over chunks of that many
    positions under rematerialisation, so the [batch, seq, vocab] float32 logits never
    exist at once (at a 128k vocabulary and seq 2048 they alone are 1 GiB per sequence);
    the backward recomputes each chunk's logits (one more readout matmul: 2 * d_model *
    vocab FLOPs per token).

    teacher: (graphdef, params, kd, student taps, teacher taps) of a frozen teacher
    (lm/compress): its forward runs on the same batch under stop_gradient, chunked like
    the student's readout, and `kd(student_logits_BTV, teacher_logits_BTV)` -> [B, T] is
    appended to the per-token outputs; aux["taps"] and aux["teacher_taps"] then hold
    the two models' hidden states after the layers the taps name.

    A model tagged for quantized training runs its forward under its qwix rules
    (lm/compress/quantize.py): training, evaluation and `lm compile` all pass here."""
    from lm.compress.quantize import intercepted
    model = nnx.merge(graphdef, params)
    return intercepted(model, _model_losses)(model, batch, loss_chunk, per_token, teacher)


def _model_losses(model, batch, loss_chunk, per_token, teacher):
    t_model, taps, t_taps = None, (), ()
    if teacher is not None:
        t_graphdef, t_params, kd, taps, t_taps = teacher
        t_model = nnx.merge(t_graphdef, jax.lax.stop_gradient(t_params))
        inner = per_token

        def per_token(logits_BTV, targets_BT, teacher_logits_BTV):  # noqa: F811
            return (*inner(logits_BTV, targets_BT),
                    kd(logits_BTV, jax.lax.stop_gradient(teacher_logits_BTV)))
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if not loss_chunk and t_model is None:
        logits_BTV, aux = model(*args)
        return (*per_token(logits_BTV, batch["targets"]), aux)
    x_BTD, aux = model.hidden_states(*args, taps=taps) if taps else model.hidden_states(*args)
    if t_model is not None:
        xt_BTE, t_aux = (t_model.hidden_states(*args, taps=t_taps) if t_taps
                         else t_model.hidden_states(*args))
        xt_BTE = jax.lax.stop_gradient(xt_BTE)
        t_weight = jax.lax.stop_gradient(t_model.readout_weight())
        if t_taps:
            aux = dict(aux, teacher_taps=jax.lax.stop_gradient(t_aux["taps"]))
    if not loss_chunk:  # the teacher's: the whole sequence at once
        return (*per_token(model.readout(x_BTD), batch["targets"],
                           t_model.readout(xt_BTE, t_weight)), aux)
    b, t, d = x_BTD.shape
    n = t // loss_chunk

    def split(x_BT_):  # chunks as the leading axis
        return x_BT_.reshape(b, n, loss_chunk, *x_BT_.shape[2:]).swapaxes(0, 1)

    weight = model.readout_weight()
    if t_model is None:
        @jax.checkpoint
        def chunk(weight_DV, x_BCD, targets_BC):
            return per_token(model.readout(x_BCD, weight_DV), targets_BC)

        # A sequential map: one chunk's logits live at a time.
        outs = jax.lax.map(lambda xt: chunk(weight, *xt), (split(x_BTD), split(batch["targets"])))
    else:
        @jax.checkpoint
        def chunk(weight_DV, x_BCD, targets_BC, xt_BCE):
            return per_token(model.readout(x_BCD, weight_DV), targets_BC,
                             t_model.readout(xt_BCE, t_weight))

        outs = jax.lax.map(lambda xt: chunk(weight, *xt),
                           (split(x_BTD), split(batch["targets"]), split(xt_BTE)))
    return (*(o.swapaxes(0, 1).reshape(b, t) for o in outs), aux)


def loss_sums(graphdef, params, batch, z_loss: float, denom, loss_chunk: int = 0,
              teacher=None):
    """Loss normalised by `denom` (the token count of the whole step's batch, so that
    summing microbatch gradients gives exactly the full-batch gradient), plus the channel
    mixers' auxiliary losses (MoE load balancing, router z-loss) weighted by this
    batch's share of those tokens. stats["channel"]: the mixers' aux per layer.

    teacher: (graphdef, params, distill section, Plan, projection params or None) of a
    frozen teacher: the data loss and the distillation loss are mixed by
    distill.weight; the hidden-state loss (over plan.hidden's (student layer, teacher
    layer) pairs) and the attention-relation loss (plan.relation) are added at
    distill.hidden_weight and relation_weight (lm/compress/distill.py). stats["loss"]
    stays the data cross-entropy; stats["kd_loss"], ["hidden_loss"] and
    ["relation_loss"] are the distillation's."""
    kd_args, pairs, rel = None, (), None
    if teacher is not None:
        t_graphdef, t_params, dcfg, plan, proj = teacher
        pairs, rel = plan.hidden, plan.relation
        s_taps, t_taps = [p[0] for p in pairs], [p[1] for p in pairs]
        if rel is not None:  # the relation layers' inputs: the previous layers' outputs
            s_taps.append(rel[0] - 1)
            t_taps.append(rel[1] - 1)
        kd_args = (t_graphdef, t_params, functools.partial(
            kd_per_token, temperature=dcfg.temperature, kind=dcfg.kind),
            tuple(s_taps), tuple(t_taps))
    out = token_losses(graphdef, params, batch, loss_chunk, teacher=kd_args)
    nll, logz, mean_logit, aux = out[0], out[1], out[2], out[-1]
    mask = batch["loss_mask"]
    ce = jnp.sum(nll * mask) / denom
    zl = jnp.sum(jnp.square(logz) * mask) / denom
    share = jnp.sum(mask) / denom  # 1 without gradient accumulation
    channel = aux["channel"]
    aux_loss = sum((a["loss"] for a in channel.values() if "loss" in a), jnp.float32(0)) * share
    stats = {
        "loss": ce,
        "z_loss": zl,
        "logz_mean": jnp.sum(logz * mask) / denom,
        "logit_mean": jnp.sum(mean_logit * mask) / denom,
        "attn_logit_max": aux["attn_logit_max"],
        "resid_rms": aux["resid_rms"],
        "aux_loss": aux_loss,
        "channel": channel,
    }
    objective = ce
    if teacher is not None:
        kd = jnp.sum(out[3] * mask) / denom
        stats["kd_loss"] = kd
        objective = mixed_loss(ce, kd, dcfg.weight)
        if pairs:
            n = len(pairs)
            hl = hidden_loss(aux["taps"][:n], aux["teacher_taps"][:n], proj, mask, denom)
            stats["hidden_loss"] = hl
            objective = objective + jnp.asarray(dcfg.hidden_weight, jnp.float32) * hl
        if rel is not None:
            s_qkv = _layer_qkv(graphdef, params, batch, rel[0], aux["taps"][-1])
            t_qkv = _layer_qkv(t_graphdef, jax.lax.stop_gradient(t_params), batch, rel[1],
                               aux["teacher_taps"][-1])
            rl = relation_loss(s_qkv, t_qkv, rel[2], mask, batch["segment_ids"], denom)
            stats["relation_loss"] = rl
            objective = objective + jnp.asarray(dcfg.relation_weight, jnp.float32) * rl
    return objective + z_loss * zl + aux_loss, stats


def objective_sums(graphdef, params, pairs, objective: Objective, z_loss: float, denom,
                   pair_denom, loss_chunk: int = 0, reference_params=None):
    """A preference objective's loss (lm/post/preference.py) on a (micro)batch of pairs
    ([P, 2, T] per key: chosen, rejected), normalised by `pair_denom` (the step's pair
    count), plus the z-loss and the mixers' aux losses as `loss_sums` adds them
    (`denom`: the step's response-token count). The reference (dpo) runs on the same
    rows under stop_gradient: `reference_params` (a frozen model of this graph, the
    step's third argument) or, for a LoRA run, this run's own base without adapters."""
    rows = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), pairs)  # 2i chosen, 2i+1 rejected
    nll, logz, mean_logit, aux = token_losses(graphdef, params, rows, loss_chunk)
    ref_nll = None
    if objective.reference == "argument":
        ref_nll = token_losses(graphdef, jax.lax.stop_gradient(reference_params), rows,
                               loss_chunk)[0]
    elif objective.reference == "lora_base":
        ref_nll = token_losses(objective.base_graphdef, jax.lax.stop_gradient(params["base"]),
                               rows, loss_chunk)[0]
    mask = rows["loss_mask"]
    stats = preference_stats(objective.kind, objective.cfg, nll, mask, pair_denom, ref_nll)
    zl = jnp.sum(jnp.square(logz) * mask) / denom
    share = jnp.sum(mask) / denom
    channel = aux["channel"]
    aux_loss = sum((a["loss"] for a in channel.values() if "loss" in a), jnp.float32(0)) * share
    stats.update(z_loss=zl, logz_mean=jnp.sum(logz * mask) / denom,
                 logit_mean=jnp.sum(mean_logit * mask) / denom,
                 attn_logit_max=aux["attn_logit_max"], resid_rms=aux["resid_rms"],
                 aux_loss=aux_loss, channel=channel)
    return stats["loss"] + z_loss * zl + aux_loss, stats


def _layer_qkv(graphdef, params, batch, layer: int, x_BTD):
    """The raw Q, K, V projections ([B, T, width]) of `layer`'s attention, from that
    layer's input x (a LoRA model's with its adapters merged; a recursive model's shared
    block with the layer's relaxation)."""
    model = nnx.merge(graphdef, params)
    if hasattr(model, "merged"):  # a LoRAModel: the effective weights
        model = model.merged(batch["inputs"])
    block = recursive.layer_block(model, layer)
    return block.mixer.projections(block.mixer_input(x_BTD, jnp.float32(layer)))


def _all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (no overflow, unlike a norm)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _tree_rms(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    # A float count: beyond 2^31 parameters (a 7B model) an int does not fit a jit argument.
    return jnp.sqrt(total / float(sum(x.size for x in leaves)))


def make_train_step(graphdef, tx: optax.GradientTransformation, lr_fn, z_loss: float,
                    grad_accum: int, loss_chunk: int = 0, model_cfg=None, distill=None,
                    sparsity=None, objective: Objective | None = None):
    """state = {"params", "opt_state", "step", "rng"} -> (state, metrics).

    distill: (the teacher's graphdef, the distill section, the hidden-state loss's
    (student layer, teacher layer) pairs) of a distilling run (lm/compress): the step is
    then (state, batch, teacher_params) -> (state, metrics), the teacher's params an
    argument of their own (frozen: never differentiated, no optimizer state), and
    metrics["kd_loss"] (and "hidden_loss") the distillation losses. state["distill"]
    (when the widths differ): the learned projection of the hidden-state loss and its
    Adam state, updated here on the same LR schedule.

    metrics["channel"]: per layer, the channel mixers' diagnostics (MoE load, ...; means
    over microbatches); `model_cfg` applies their rule-based parameter updates (MoE's
    balancing bias) after the optimizer's.

    sparsity: (the sparsity section, {target path: fan-in axes}) of a sparse run
    (lm/compress/sparsity.py): the forward computes with params * state["sparsity"]
    (the masks); fixed, the gradient and the updated params are masked; learned, the
    gradient goes straight through to the dense weights (plus SR-STE decay) and the
    masks follow the weights' magnitudes when due (metrics["mask_flips"]: entries
    changed).

    objective: a preference objective (lm/post/preference.py `Objective`): the batch's rows
    are pairs (2i chosen, 2i + 1 rejected; microbatches split by pairs), the loss and
    metrics["loss"] are the objective's, with its reward metrics; with a reference passed
    as an argument (dpo, no LoRA) the step is (state, batch, reference_params) -> (state,
    metrics), the reference frozen as a teacher is.

    metrics["finite"]: the loss, the gradient norm and every updated parameter are
    finite; the loop stops a run (diverged) at the first step where it is not, and never
    checkpoints such a state."""

    def grads_and_stats(params, batch, teacher_params=None, proj=None):
        """((gradient of params, of the distillation projection), stats)."""
        denom = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        if objective is not None:  # pairs: the unit microbatches split by
            batch = jax.tree.map(lambda x: x.reshape(x.shape[0] // 2, 2, *x.shape[1:]), batch)
            pair_denom = jnp.maximum(jnp.sum(valid_pairs(batch["loss_mask"].reshape(
                -1, batch["loss_mask"].shape[-1]))), 1.0)

        def loss_of(p, pr, mb):
            if objective is not None:
                return objective_sums(graphdef, p, mb, objective, z_loss, denom, pair_denom,
                                      loss_chunk, teacher_params)
            teacher = None if distill is None else (distill[0], teacher_params, distill[1],
                                                    distill[2], pr)
            # loss_chunk is a shape decision, bound here: eval_shape below would trace it.
            return loss_sums(graphdef, p, mb, z_loss, denom, loss_chunk, teacher)

        grad_fn = jax.grad(loss_of, argnums=(0, 1), has_aux=True)
        if grad_accum == 1:
            return grad_fn(params, proj, batch)

        # Microbatch i takes rows i, i + accum, ...: the sharded batch dimension stays
        # the (sharded) microbatch dimension, so splitting needs no communication.
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
            batch)

        def body(acc, mb):
            g, s = grad_fn(params, proj, mb)
            acc_g, acc_s = acc
            # Token-weighted sums add up to full-batch values; maxima stay maxima.
            merged = {k: jax.tree.map(jnp.maximum if k == "attn_logit_max" else jnp.add,
                                      acc_s[k], s[k]) for k in s}
            return (jax.tree.map(jnp.add, acc_g, g), merged), None

        g0, s0 = jax.eval_shape(grad_fn, params, proj, jax.tree.map(lambda x: x[0], micro))
        init = (jax.tree.map(jnp.zeros_like, g0), jax.tree.map(jnp.zeros_like, s0))
        init[1]["attn_logit_max"] = jnp.full(s0["attn_logit_max"].shape, -jnp.inf)
        (grads, stats), _ = jax.lax.scan(body, init, micro)
        # Means over microbatches.
        stats["resid_rms"] = stats["resid_rms"] / grad_accum
        stats["channel"] = jax.tree.map(lambda v: v / grad_accum, stats["channel"])
        return grads, stats

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array], teacher_params=None):
        params = state["params"]
        proj = (state["distill"]["params"] if distill is not None and objective is None
                and "distill" in state else None)
        masks = state["sparsity"] if sparsity is not None else None
        forward = params if masks is None else sparsity_lib.masked(params, masks)
        (grads, proj_grads), stats = grads_and_stats(forward, batch, teacher_params, proj)
        if masks is not None:
            grads = sparsity_lib.gradients(sparsity[0], grads, params, masks)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if masks is not None:
            new_params, masks, flips = sparsity_lib.after_update(
                sparsity[0], new_params, masks, state["step"], sparsity[1])
        if model_cfg is not None:
            from lm.model.transformer import update_outside_gradient
            new_params = update_outside_gradient(model_cfg, params, new_params, stats["channel"])
        metrics = dict(stats)
        # Per-layer diagnostics as metrics name -> {layer: value} (logged as name/layer).
        for layer, aux in metrics.pop("channel").items():
            for key, value in aux.items():
                if key != "loss":  # its weighted sum over layers is metrics["aux_loss"]
                    metrics.setdefault(key, {})[layer] = value
        grad_norm = optax.tree.norm(grads)
        metrics.update(
            lr=lr_fn(state["step"]),
            grad_norm=grad_norm,
            update_rms=_tree_rms(updates),
            param_norm=optax.tree.norm(new_params),
            tokens=jnp.sum(batch["loss_mask"]),
            finite=jnp.isfinite(stats["loss"]) & jnp.isfinite(grad_norm) & _all_finite(new_params),
        )
        new_state = {"params": new_params, "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], 1)}
        if masks is not None:
            new_state["sparsity"] = masks
            if sparsity[0].mode == "learned":
                metrics["mask_flips"] = flips
        if "distill" in state:  # the hidden-state loss's projection (lm/compress/distill.py)
            new_state["distill"] = state["distill"]
            if proj is not None:
                direction, p_state = projection_optimizer().update(
                    proj_grads, state["distill"]["opt_state"], proj)
                lr = lr_fn(state["step"])
                new_proj = jax.tree.map(lambda p, d: p - lr * d, proj, direction)
                new_state["distill"] = {"params": new_proj, "opt_state": p_state}
                metrics["finite"] = metrics["finite"] & _all_finite(new_proj)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, loss_chunk: int = 0):
    """batch -> (sum of nll over real targets, number of real targets)."""

    def eval_step(params, batch):
        nll, _, _, _ = token_losses(graphdef, params, batch, loss_chunk)
        return jnp.sum(nll * batch["loss_mask"]), jnp.sum(batch["loss_mask"])

    return eval_step


def make_preference_eval_step(graphdef, objective: Objective, loss_chunk: int = 0):
    """(params, batch of pairs[, reference params]) -> {the objective's metrics summed
    over the real pairs, "pairs": their count} (lm/post/preference.py)."""

    def eval_step(params, batch, reference_params=None):
        pairs = jax.tree.map(lambda x: x.reshape(x.shape[0] // 2, 2, *x.shape[1:]), batch)
        _, stats = objective_sums(graphdef, params, pairs, objective, 0.0, 1.0, 1.0,
                                  loss_chunk, reference_params)
        keys = ("loss", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected")
        return dict({k: stats[k] for k in keys}, pairs=jnp.sum(valid_pairs(batch["loss_mask"])))

    return eval_step
