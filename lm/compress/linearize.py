"""Linearization (`lm linearize`): a trained transformer's attention layers replaced by
scan mixers (retention or Mamba-2), each first trained to imitate the attention it
replaces (LoLCATs' attention transfer, Zhang et al. 2024; Liger; Lizard), written as an
ordinary run with a hybrid `model.mixer_pattern`. Its LoRA fine-tune is then an
ordinary `lm train --init-from NEW --set lora.rank=...` (docs/linearization.md).

Construction (`hybrid_model`, `initial_mixer`):

  retention  the LoLCATs linear attention: model.retention.feature_map=hedgehog (a
             per-head learned map [softmax(x W), softmax(-x W)], W = I at the start),
             normalize=sum (linear attention's denominator), gate=false; the RetNet
             decay is kept (decay=retnet; --set model.retention.decay=none drops it);
             --keep-window W sets retention.window = W (LoLCATs' hybrid: the last W
             tokens by softmax attention, the older by the linear part, one normaliser).
             Q/K/V/O map directly: wq = wq, wk / wv = the kv heads repeated to the
             query heads (GQA), wo = wo; RoPE is the same. Attention's qkv biases and
             qk-norm have no place (dropped, listed in the report).
  mamba2     state = head_dim and expand = n_heads * head_dim / d_model (when whole):
             x <- V (kv heads repeated, flattened), out <- O (flattened), B <- the mean
             over kv heads of K, C <- the mean over heads of Q (Mamba-2 has one B/C group
             shared by the heads: an approximate start), the convolutions start as the
             identity (the current input's tap 1) and the skip D at 0; z (the gate), dt
             and A start fresh (the reference init). No RoPE.

Attention transfer (`transfer`): the parent runs frozen; for each chosen layer i the new
mixer reads the attention's input (the block's norm of the residual stream the parent
computes: hidden_states taps) and is trained by MSE to the attention's output on the
same input, all layers at once, one jitted step (adamw on the new mixers' params only).
Per-layer MSE is reported before and after on validation batches, with the relative
MSE (MSE / mean square of the attention's output).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm import config as config_lib
from lm.config import ConfigError, TrainConfig
from lm.model import Transformer, mixers

TARGETS = {"retention": "r", "mamba2": "m"}  # --to NAME -> its mixer code
REPORT_FILE = "linearize.json"


# ------------------------------------------------------------------------ the new model

def parse_layers(model_cfg, spec: str) -> tuple[int, ...]:
    """The layers to linearize: "1,3" (0-based), "" = every attention layer. Each must
    exist and be an attention layer (ConfigError, one line)."""
    n = model_cfg.n_layers
    attention = [i for i in range(n) if mixers.sequence_mixer(model_cfg, i).name == "attention"]
    if not spec.strip():
        if not attention:
            raise ConfigError("lm linearize: the run has no attention layer "
                              f"(model.mixer_pattern={model_cfg.mixer_pattern!r})")
        return tuple(attention)
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--layers {spec!r}: must be layer indices like 0,2,3") from None
    for i in layers:
        if not 0 <= i < n:
            raise ConfigError(f"--layers: layer {i} is out of range (the model has {n} layers, "
                              f"0..{n - 1})")
        if i not in attention:
            raise ConfigError(f"--layers: layer {i} is not an attention layer (it is "
                              f"{mixers.sequence_mixer(model_cfg, i).name})")
    if not layers:
        raise ConfigError(f"--layers {spec!r}: names no layer")
    return tuple(layers)


def hybrid_model(parent, layers: tuple[int, ...], target: str, overrides: list[str] = (),
                 keep_window: int = 0):
    """The linearized model config: `target`'s code at `layers`, the parent's mixers
    elsewhere (the pattern written out per layer), the target's section set for the
    construction (module doc) unless the parent already uses that mixer, with
    `keep_window` (retention.window: LoLCATs' softmax window), then `overrides`
    (--set model.*)."""
    if target not in TARGETS:
        raise ConfigError(f"lm linearize --to {target!r}: unknown target mixer (choose "
                          f"{' or '.join(TARGETS)})")
    if keep_window < 0 or (keep_window and target != "retention"):
        raise ConfigError(f"lm linearize --keep-window {keep_window}: must be >= 0, and "
                          "works with --to retention only")
    code = TARGETS[target]
    n = parent.n_layers
    pattern = "".join(code if i in layers else parent.mixer_pattern[i % len(parent.mixer_pattern)]
                      for i in range(n))
    used = {mixers.sequence_mixer(parent, i).name for i in range(n)}
    model = dataclasses.replace(parent, mixer_pattern=pattern,
                                scan_layers=parent.scan_layers and len(set(pattern)) == 1)
    if target not in used:  # its section is ours to set (no parent layer reads it)
        if target == "retention":
            model = dataclasses.replace(model, retention=dataclasses.replace(
                parent.retention, feature_map="hedgehog", normalize="sum", gate=False,
                window=keep_window))
        else:
            width = parent.n_heads * parent.dh
            expand = width // parent.d_model if width % parent.d_model == 0 else parent.mamba2.expand
            model = dataclasses.replace(model, mamba2=dataclasses.replace(
                parent.mamba2, state=parent.dh, expand=max(1, expand)))
    elif keep_window and model.retention.window != keep_window:
        raise ConfigError("lm linearize --keep-window: the run already has retention layers "
                          f"(model.retention.window={model.retention.window}), whose settings "
                          "the new layers share")
    if overrides:
        bad = [o for o in overrides if not o.strip().startswith("model.")]
        if bad:
            raise ConfigError(f"lm linearize --set {bad[0]!r}: only model.* keys (the new "
                              "model's knobs, e.g. model.retention.decay=none)")
        probe = config_lib.apply_overrides(TrainConfig(model=model), list(overrides))
        model = probe.model
        if model.mixer_pattern != pattern or model.n_layers != n:
            raise ConfigError("lm linearize --set: the layer pattern and count are the "
                              "linearization's (use --layers)")
    return model


def _heads(w, groups: int):
    """[d, kv, dh] -> [d, kv * groups, dh]: each kv head repeated for its query heads."""
    return jnp.repeat(w, groups, axis=1)


def initial_mixer(attn: dict, fresh: dict, parent, model, target: str) -> tuple[dict, list, list]:
    """The new mixer's params from the attention's (`attn`) where shapes allow, the rest
    `fresh` (its init). Returns (params, names mapped, attention params dropped)."""
    g = parent.n_heads // parent.kv_heads
    out = dict(fresh)
    mapped: list[str] = []
    dropped = sorted(k for k in attn if k not in ("wq", "wk", "wv", "wo"))
    if target == "retention":
        out.update(wq=attn["wq"], wk=_heads(attn["wk"], g), wv=_heads(attn["wv"], g),
                   wo=attn["wo"])
        mapped = ["wq<-wq", "wk<-wk", "wv<-wv", "wo<-wo"]
    else:
        d, h, dh = parent.d_model, parent.n_heads, parent.dh
        m = model.mamba2
        if m.expand * d == h * dh:
            out["w_x"] = _heads(attn["wv"], g).reshape(d, h * dh)
            out["w_out"] = attn["wo"].reshape(h * dh, d)
            mapped += ["w_x<-wv", "w_out<-wo"]
        if m.state == dh:
            out["w_b"] = attn["wk"].mean(axis=1)
            out["w_c"] = attn["wq"].mean(axis=1)
            mapped += ["w_b<-mean_heads(wk)", "w_c<-mean_heads(wq)"]
        # Identity convolutions and no skip: the mapped projections reach the scan as
        # they are (silu aside).
        for name in ("conv_x", "conv_bc"):
            out[name] = jnp.zeros_like(fresh[name]).at[-1].set(1.0)
        out["skip"] = jnp.zeros_like(fresh["skip"])
        mapped += ["conv=identity", "skip=0"]
    out = {k: (v.astype(fresh[k].dtype) if hasattr(fresh[k], "dtype") else v)
           for k, v in out.items()}
    return out, mapped, dropped


def unstack_blocks(params: dict, model_cfg) -> dict:
    """Layer-scanned params (blocks stacked on a leading axis) -> one block per layer."""
    if not model_cfg.scan_layers:
        return params
    blocks = params["blocks"]
    return {**params, "blocks": {i: jax.tree.map(lambda x, i=i: x[i], blocks)
                                 for i in range(model_cfg.n_layers)}}


def stack_blocks(params: dict, model_cfg) -> dict:
    if not model_cfg.scan_layers:
        return params
    blocks = [params["blocks"][i] for i in range(model_cfg.n_layers)]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def _pure(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@dataclass
class Hybrid:
    """The linearized model before transfer: its config, its params (one block per
    layer), and what the construction mapped."""
    model: object  # ModelConfig (scan_layers as it will be saved)
    params: dict   # unscanned
    mapped: dict   # layer -> (mapped, dropped)


def build_hybrid(parent_model, parent_params: dict, layers, target: str, overrides=(),
                 seed: int = 0, keep_window: int = 0) -> Hybrid:
    """The hybrid model and its starting params: the parent's everywhere but the new
    mixers, which start from initial_mixer."""
    model = hybrid_model(parent_model, layers, target, overrides, keep_window)
    flat = dataclasses.replace(model, scan_layers=False)
    fresh = _pure(Transformer(flat, nnx.Rngs(params=seed)))
    parent_flat = unstack_blocks(parent_params, parent_model)
    params = {**parent_flat, "blocks": dict(parent_flat["blocks"])}
    mapped = {}
    for i in layers:
        mixer, m, dropped = initial_mixer(parent_flat["blocks"][i]["mixer"],
                                          fresh["blocks"][i]["mixer"], parent_model, model, target)
        params["blocks"][i] = {**parent_flat["blocks"][i], "mixer": mixer}
        mapped[i] = (m, dropped)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fresh)):  # (structure checked too)
        assert a.shape == b.shape, (a.shape, b.shape)
    return Hybrid(model, params, mapped)


# --------------------------------------------------------------------- attention transfer

def _mixer_graphdefs(model_cfg, layers) -> dict:
    """Layer -> the graphdef of the new mixer in it (built abstractly)."""
    flat = dataclasses.replace(model_cfg, scan_layers=False)
    abstract = nnx.eval_shape(lambda: Transformer(flat, nnx.Rngs(0)))
    return {i: nnx.split(abstract.blocks[i].mixer)[0] for i in layers}


def transfer_losses(parent_gd, parent_params, student_gds: dict, student: dict, batch,
                    layers: tuple[int, ...]):
    """Per-layer (MSE, mean square of the attention's output) of the new mixers against
    the frozen attention, on the parent's own layer inputs; padding (segment 0) left out."""
    parent = nnx.merge(parent_gd, parent_params)
    tokens, positions, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
    taps = tuple(i - 1 for i in layers)  # layer i's input is layer i-1's output (-1: embedding)
    _, aux = parent.hidden_states(tokens, positions, seg, taps=taps)
    mask = (seg != 0).astype(jnp.float32)[..., None]
    count = jnp.maximum(mask.sum(), 1.0) * parent.cfg.d_model
    mse, power = [], []
    for i, x in zip(layers, aux["taps"]):
        block = parent.blocks[i]
        h = jax.lax.stop_gradient(block.mixer_input(x, jnp.float32(i)))
        want = jax.lax.stop_gradient(block.mixer(h, positions, seg)[0]).astype(jnp.float32)
        got = nnx.merge(student_gds[i], student[i])(h, positions, seg)[0].astype(jnp.float32)
        mse.append(jnp.sum(jnp.square(got - want) * mask) / count)
        power.append(jnp.sum(jnp.square(want) * mask) / count)
    return jnp.stack(mse), jnp.stack(power)


def trainable_labels(student: dict, mapped: dict, which: str) -> dict:
    """"train" / "freeze" per leaf of the student: which="all" trains every param of the
    new mixers; "new" (LoLCATs) only those the construction did not take from the
    attention (e.g. retention's feature maps), the mapped projections stay frozen."""
    def label(layer, path):
        name = str(path[0].key)
        if which == "all" or not any(m.split("<-")[0] == name for m in mapped[layer][0]):
            return "train"
        return "freeze"
    return {i: jax.tree_util.tree_map_with_path(lambda p, _, i=i: label(i, p), params)
            for i, params in student.items()}


def make_transfer_step(parent_gd, student_gds, layers, tx):
    """One jitted step: (student, opt_state, parent params, batch) -> (student, opt_state,
    per-layer MSE). Only the student (the new mixers) gets gradients; the objective is
    the sum of the layers' MSEs."""
    def objective(student, parent_params, batch):
        mse, _ = transfer_losses(parent_gd, parent_params, student_gds, student, batch, layers)
        return jnp.sum(mse), mse

    @jax.jit
    def step(student, opt_state, parent_params, batch):
        (_, mse), grads = jax.value_and_grad(objective, has_aux=True)(student, parent_params,
                                                                       batch)
        updates, opt_state = tx.update(grads, opt_state, student)
        return optax.apply_updates(student, updates), opt_state, mse
    return step


def measure(fn, parent_params, student, batches, layers) -> dict:
    """Per-layer MSE and relative MSE (MSE / mean square of the attention output) over
    `batches`, averaged. `fn`: transfer_losses jitted, (student, parent, batch)."""
    mse, power = np.zeros(len(layers)), np.zeros(len(layers))
    for b in batches:
        m, p = fn(student, parent_params, b)
        mse += np.asarray(m) / len(batches)
        power += np.asarray(p) / len(batches)
    return {str(i): {"mse": float(mse[k]), "relative": float(mse[k] / max(power[k], 1e-30))}
            for k, i in enumerate(layers)}


def transfer(parent_model, parent_params: dict, hybrid: Hybrid, layers, calibration,
             held_out, steps: int, lr: float, train: str = "all",
             log=print) -> tuple[dict, dict]:
    """Attention transfer: train the new mixers of `hybrid` (`train`: trainable_labels)
    on `calibration` (an iterator of batches: inputs, positions, segment_ids) for `steps`
    steps. Returns (the hybrid's
    params with the trained mixers, {"before": per-layer, "after": per-layer} measured
    on `held_out` batches)."""
    flat = dataclasses.replace(parent_model, scan_layers=False)
    parent_gd = nnx.graphdef(nnx.eval_shape(lambda: Transformer(flat, nnx.Rngs(0))))
    # On the device once (host arrays would be copied in at every step).
    pparams = jax.device_put(unstack_blocks(parent_params, parent_model))
    gds = _mixer_graphdefs(hybrid.model, layers)
    student = jax.device_put({i: hybrid.params["blocks"][i]["mixer"] for i in layers})
    losses = jax.jit(lambda s, p, b: transfer_losses(parent_gd, p, gds, s, b, layers))
    before = measure(losses, pparams, student, held_out, layers)
    adamw = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10),
                                                           max(steps, 1)), weight_decay=0.0)
    tx = optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()},
                               trainable_labels(student, hybrid.mapped, train))
    opt_state = tx.init(student)
    step = make_transfer_step(parent_gd, gds, layers, tx)
    every = max(1, steps // 10)
    for s in range(steps):
        student, opt_state, mse = step(student, opt_state, pparams, next(calibration))
        if (s + 1) % every == 0 or s + 1 == steps:
            log(f"transfer step {s + 1}/{steps}: mse " + " ".join(
                f"{i}:{float(v):.3g}" for i, v in zip(layers, np.asarray(mse))))
    after = measure(losses, pparams, student, held_out, layers)
    params = {**hybrid.params, "blocks": dict(hybrid.params["blocks"])}
    for i in layers:
        params["blocks"][i] = {**params["blocks"][i], "mixer": student[i]}
    return params, {"before": before, "after": after}


# ------------------------------------------------------------------------ the command

def _as_batch(row: dict) -> dict:
    return {k: jnp.asarray(row[k]) for k in ("inputs", "positions", "segment_ids")}


def _copy_tokenizer(cfg: TrainConfig, out: Path) -> TrainConfig:
    """A tokenizer file of the parent's (and the files kept beside it) copied into the new
    run, which then names its own copy; a built-in tokenizer ("byte") stays named."""
    from lm.interop.hf_import import TOKENIZER_FILES
    src = Path(cfg.data.tokenizer)
    if not src.is_file():
        return cfg
    shutil.copyfile(src, out / src.name)
    if src.name == "tokenizer.json":
        for name in TOKENIZER_FILES:
            if (src.parent / name).is_file() and name != src.name:
                shutil.copyfile(src.parent / name, out / name)
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer=str((out / src.name).absolute())))


def linearize(run: str | Path, out: str | Path, target: str, layers: str = "",
              steps: int = 200, lr: float = 0.0, batch_size: int = 0, eval_batches: int = 4,
              overrides: list[str] = (), seed: int = 0, train: str = "",
              keep_window: int = 0, log=print) -> dict:
    """`lm linearize`: the run in `run` -> a linearized run in `out` (module doc).
    `lr` 0: 1e-2 when only the new params train (train="new"), else 1e-3. Returns the
    report (also written to out/linearize.json)."""
    from lm.data import eval_batches as make_eval_batches
    from lm.data import train_iterator
    from lm.interop.hf_import import save_state
    from lm.model import count_params, recursive
    from lm.peft.lora import LoRAConfig, merged_params
    from lm.train.loop import evaluate
    from lm.train.param_source import restore_for_inference
    from lm.train.setup import setup_run

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"lm linearize: --out {out} exists and is not empty (nothing is "
                          "overwritten)")
    if target not in TARGETS:
        raise ConfigError(f"lm linearize --to {target!r}: unknown target mixer (choose "
                          f"{' or '.join(TARGETS)})")
    train = train or ("new" if target == "retention" else "all")
    if train not in ("new", "all"):
        raise ConfigError(f"lm linearize --train {train!r}: choose new or all")
    if steps < 0 or lr < 0 or batch_size < 0 or eval_batches < 1:
        raise ConfigError("lm linearize: --transfer-steps >= 0, --lr >= 0, --batch-size >= 0 "
                          "and --eval-batches >= 1")
    # Feature maps alone (W near the identity) take a larger step than the projections
    # (LoLCATs trains its feature maps at 1e-2); measured on the tiny run, docs.
    lr = lr or (1e-2 if train == "new" else 1e-3)
    if not (Path(run) / "config.json").is_file():
        raise ConfigError(f"lm linearize: {run} is not a run directory (no config.json)")
    if not any(p.name.isdigit() for p in (Path(run) / "checkpoints").glob("*")):
        raise ConfigError(f"lm linearize: {run} has no checkpoint yet (nothing to linearize)")
    parent_cfg = config_lib.load_run_config(Path(run) / "config.json")
    if recursive.enabled(parent_cfg.model):
        raise ConfigError("lm linearize: the run's layers share blocks (model.recursion); "
                          "untie it first (lm train --init-from RUN --set "
                          "model.recursion.blocks=0)")
    chosen = parse_layers(parent_cfg.model, layers)
    hybrid_model(parent_cfg.model, chosen, target, overrides, keep_window)  # errors first
    setup, params, step = restore_for_inference(run)
    pcfg = setup.cfg
    batches_held_out = make_eval_batches(pcfg.data, setup.tokenizer, pcfg.batch_size, eval_batches)
    parent_eval = evaluate(setup.pieces, setup.pieces.eval_step(), params, batches_held_out,
                           setup.tokenizer)
    if pcfg.lora.rank:  # a LoRA run: its adapters folded in, as --init-from does
        params = jax.jit(lambda p: merged_params(pcfg.model, pcfg.lora, p))(params)
    params = jax.device_get(params)
    hybrid = build_hybrid(pcfg.model, params, chosen, target, overrides, seed, keep_window)
    log(f"linearizing layers {','.join(map(str, chosen))} of {run} (step {step}) into "
        f"{target}: pattern {hybrid.model.mixer_pattern}")

    rows = train_iterator(pcfg.data, setup.tokenizer, batch_size or pcfg.batch_size, seed)
    calibration = (_as_batch(r) for r in rows)
    held_out = [_as_batch(b) for b in batches_held_out]
    new_params, mse = transfer(pcfg.model, params, hybrid, chosen, calibration, held_out,
                               steps, lr, train, log)

    cfg = dataclasses.replace(pcfg, model=hybrid.model, lora=LoRAConfig(), init_from="",
                              name=out.name)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_lib.validate(_copy_tokenizer(cfg, out))
    new = setup_run(cfg)
    state = new.pieces.fresh_state(jax.device_put(stack_blocks(new_params, cfg.model),
                                                  new.pieces.state_shardings["params"]))
    linear_eval = evaluate(new.pieces, new.pieces.eval_step(), state["params"],
                           batches_held_out, new.tokenizer)
    (out / "config.json").write_text(config_lib.to_json(cfg))
    save_state(out, state)
    counts = count_params(cfg.model)
    report = {
        "source": str(Path(run).absolute()), "source_step": step, "target": target,
        "layers": list(chosen), "mixer_pattern": cfg.model.mixer_pattern,
        "keep_window": keep_window, "transfer_steps": steps, "lr": lr, "trained": train,
        "batch_size": batch_size or pcfg.batch_size,
        "mapped": {str(i): {"mapped": m, "dropped": d} for i, (m, d) in hybrid.mapped.items()},
        "mse_before": mse["before"], "mse_after": mse["after"],
        "eval_batches": len(batches_held_out),
        "eval_loss": {"parent": parent_eval["loss"], "linearized": linear_eval["loss"]},
        "eval_bpb": {"parent": parent_eval["bpb"], "linearized": linear_eval["bpb"]},
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    (out / "summary.json").write_text(json.dumps({
        "status": "linearized", "source": report["source"], "steps": 0,
        "params": counts["total"], "non_embedding_params": counts["non_embedding"],
        "active_params": counts["active"]}, indent=2))
    log(f"eval loss: parent {parent_eval['loss']:.4f}, linearized {linear_eval['loss']:.4f}; "
        f"wrote {out}")
    return report


__all__ = ["linearize", "parse_layers", "hybrid_model", "build_hybrid", "initial_mixer",
           "transfer", "transfer_losses", "TARGETS", "REPORT_FILE"]
