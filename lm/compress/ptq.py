"""Weight-only post-training quantization: `lm quantize RUN --out NEW --weights int8|int4
[--group-size G] [--calib-batches N]`.

Our own symmetric absmax quantization of every mixer's matrices (the ones a mixer
declares `adaptable`: attention's and Mamba-2's projections, the MLP's), per output channel
or per group of `group_size` rows along the fan-in: q = round(w / s), s =
max|w| / qmax over the group, qmax = 127 (int8) or 7 (int4), so |w - s q| <= s / 2.
The embedding, the readout, norms (and mixers that declare no adaptable matrices:
retention, MoE) stay as they are. Not qwix's PtqProvider:
it replaces parameters in the model's state by qwix arrays (a different parameter tree),
which lmlab's checkpoints, restore, export and inference engine do not read; a plain
tree of dequantized weights keeps NEW an ordinary run that every command reads. NEW
holds: the checkpoint with the dequantized weights (exactly s * q, so eval / sample /
generate / export compute with the quantized values; dequantized when written, which
costs nothing on CPU where no int8 / int4 kernel would be faster),
`quantized.safetensors` (q as int8, int4 packed two per byte, and the float32 scales:
the compact form), and `quantize.json` (bytes and loss before / after).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import ConfigError

QMAX = {8: 127, 4: 7}


def quantize_matrix(w_KN: np.ndarray, bits: int, group: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax quantization of [K, N] (K: the fan-in) per output column and per
    group of `group` rows (0 = all K): (q int8 [K, N], scale float32 [K // group, N])."""
    k, n = w_KN.shape
    g = group or k
    w = np.asarray(w_KN, np.float32).reshape(k // g, g, n)
    scale = np.abs(w).max(axis=1) / QMAX[bits]
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None, :]), -QMAX[bits], QMAX[bits]).astype(np.int8)
    return q.reshape(k, n), scale


def dequantize_matrix(q_KN: np.ndarray, scale: np.ndarray) -> np.ndarray:
    k, n = q_KN.shape
    groups = scale.shape[0]
    return (q_KN.reshape(groups, k // groups, n).astype(np.float32)
            * scale[:, None, :]).reshape(k, n)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two signed 4-bit values per byte (low nibble first), flattened."""
    flat = q.reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nib = (flat & 0xF).astype(np.uint8)
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed: np.ndarray, size: int) -> np.ndarray:
    lo, hi = packed & 0xF, packed >> 4
    nib = np.stack([lo, hi], axis=1).reshape(-1)[:size].astype(np.int8)
    return np.where(nib > 7, nib - 16, nib).astype(np.int8)


def matmul_weights(model_cfg, params: dict) -> dict[tuple, tuple[int, int]]:
    """{path in params: (leading stacked axes, fan-in axes)} of every mixer's matrices."""
    from lm.model import mixers
    blocks = params["blocks"]
    out = {}
    if model_cfg.scan_layers:
        for (slot, name), fan_in in mixers.adaptable_matrices(model_cfg, blocks, 0).items():
            out[("blocks", slot, name)] = (1, fan_in)
        return out
    for key in sorted(blocks, key=lambda k: int(k)):
        first = int(key)
        for (slot, name), fan_in in mixers.adaptable_matrices(model_cfg, blocks[key], first).items():
            out[("blocks", key, slot, name)] = (0, fan_in)
    return out


def check_group(shape, lead: int, fan_in: int, bits: int, group: int, name: str) -> None:
    k = int(np.prod(shape[lead:lead + fan_in]))
    if group and (group < 0 or k % group):
        raise ConfigError(f"lm quantize: --group-size {group} does not divide the fan-in "
                          f"{k} of {name}")
    if bits == 4 and group % 2:
        raise ConfigError(f"lm quantize: int4 packs two values per byte: --group-size must "
                          f"be even (got {group})")


def quantize_params(model_cfg, params: dict, bits: int, group: int = 0):
    """(params with every mixer matrix replaced by its dequantized quantization, {name:
    stored array} for quantized.safetensors, {"bytes_before", "bytes_after"} of the whole
    parameter set)."""
    weights = matmul_weights(model_cfg, params)
    for path, (lead, fan_in) in weights.items():
        check_group(get(params, path).shape, lead, fan_in, bits, group, ".".join(map(str, path)))
    new = jax.tree.map(lambda x: x, params)
    stored, before, after = {}, 0, 0
    for leaf in jax.tree.leaves(params):
        before += leaf.size * leaf.dtype.itemsize
    after = before
    for path, (lead, fan_in) in weights.items():
        w = np.asarray(jax.device_get(get(params, path)), np.float32)
        shape = w.shape
        stack = int(np.prod(shape[:lead]))
        k = int(np.prod(shape[lead:lead + fan_in]))
        w3 = w.reshape(stack, k, -1)
        qs, scales = zip(*(quantize_matrix(m, bits, group) for m in w3))
        q, scale = np.stack(qs), np.stack(scales)
        deq = np.stack([dequantize_matrix(a, s) for a, s in zip(q, scale)]).reshape(shape)
        old = get(params, path)
        set_(new, path, jnp.asarray(deq, old.dtype))
        name = ".".join(map(str, path))
        stored[name + ".q"] = pack_int4(q) if bits == 4 else q.reshape(shape)
        stored[name + ".scale"] = scale.reshape(*shape[:lead], *scale.shape[1:])
        after += (stored[name + ".q"].nbytes + scale.nbytes) - old.size * old.dtype.itemsize
    return new, stored, {"bytes_before": int(before), "bytes_after": int(after),
                         "matrices": len(weights)}


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def set_(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def parse_weights(weights: str) -> int:
    if weights not in ("int8", "int4"):
        raise ConfigError(f"lm quantize: --weights must be int8 or int4, got {weights!r}")
    return int(weights[3:])


def quantize_run(run_dir: str | Path, out: str | Path, weights: str, group_size: int = 0,
                 calib_batches: int = 4) -> dict:
    """`lm quantize`: RUN's newest checkpoint -> NEW, an ordinary run dir holding the
    weight-only PTQ of its mixers' matrices. Returns the report (quantize.json)."""
    from lm import config as config_lib
    from lm.data import eval_batches
    from lm.interop.hf_import import TOKENIZER_FILES, save_state
    from lm.train.loop import evaluate
    from lm.train.param_source import restore_for_inference

    bits = parse_weights(weights)
    run, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"lm quantize: --out {out} exists and is not empty (nothing is "
                          "overwritten)")
    if calib_batches < 1:
        raise ConfigError(f"lm quantize: --calib-batches must be >= 1, got {calib_batches}")
    setup, params, step = restore_for_inference(run)
    cfg = setup.cfg
    if cfg.lora.rank:
        raise ConfigError("lm quantize: a LoRA run; export or merge its adapters first")
    if cfg.quant.ptq:
        raise ConfigError(f"lm quantize: {run} is already quantized ({cfg.quant.ptq})")
    new_params, stored, sizes = quantize_params(cfg.model, params, bits, group_size)
    batches = eval_batches(cfg.data, setup.tokenizer, cfg.batch_size, calib_batches)
    eval_step = setup.pieces.eval_step()
    loss = lambda p: evaluate(setup.pieces, eval_step, p, batches, setup.tokenizer)["loss"]  # noqa: E731
    before, after = float(loss(params)), float(loss(new_params))
    method = weights + (f"/g{group_size}" if group_size else "")

    saved = config_lib.load_run_config(run / "config.json")
    data = saved.data
    tok = Path(data.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    if tok.is_file() and tok.resolve().parent == run.resolve():
        data = dataclasses.replace(data, tokenizer=str((out / tok.name).absolute()))
        if not (out / tok.name).exists():
            shutil.copyfile(tok, out / tok.name)
    new_cfg = dataclasses.replace(saved, data=data,
                                  quant=dataclasses.replace(saved.quant, ptq=method))
    (out / "config.json").write_text(config_lib.to_json(new_cfg))
    from safetensors.numpy import save_file
    save_file(stored, str(out / "quantized.safetensors"),
              metadata={"method": method, "symmetric": "absmax",
                        "layout": "q [K, N] per matrix (int4: packed, low nibble first); "
                                  "scale [groups, N] float32; w = scale * q"})
    save_state(out, setup.pieces.fresh_state(new_params), step=step)
    report = {"source": str(run.absolute()), "step": step, "weights": weights,
              "group_size": group_size, "method": "symmetric absmax, per output channel" +
              (f" and per {group_size} fan-in rows" if group_size else ""),
              "matrices": sizes["matrices"], "bytes_before": sizes["bytes_before"],
              "bytes_after": sizes["bytes_after"],
              "quantized_file_bytes": (out / "quantized.safetensors").stat().st_size,
              "calib_batches": len(batches), "loss_before": before, "loss_after": after}
    (out / "quantize.json").write_text(json.dumps(report, indent=2))
    (out / "summary.json").write_text(json.dumps(
        {"status": "quantized", "source": str(run.absolute()), "steps": step,
         "quant": method}, indent=2))
    return report
