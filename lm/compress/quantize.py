"""Quantized training through qwix (`quant.mode=train`; the section and its rules:
lm/compress/quant_rules.py). `tag`
writes every module's path (qwix's `qwix_path`) and the run's qwix rules into the model
graph that lm/train/state.py builds, so the graphdef every jitted function merges
carries them; `intercepted` runs the model's forward (lm/train/step.py token_losses:
training, evaluation and `lm compile` all pass there) under qwix's QtProvider, which
replaces each `jax.lax.dot_general` / `jnp.einsum` / `jax.lax.ragged_dot` of a matched
module by its quantized version: operands quantized to int8 / fp8 (absmax scales per
channel or per tensor), the product taken in that dtype, a straight-through backward
(in the compute dtype, or with the incoming gradient quantized to `bwd`). Only the
forward is intercepted: qwix patches those functions globally while active, and JAX's
own transpose rules call them too. The rules are matched against module paths before
anything runs: a rule that matches no module is a ConfigError.

Why not `qwix.quantize_model`: it intercepts one method (`__call__`) of the root, and
the step calls `hidden_states` and `readout` (chunked loss); it also runs the model once
to create state, which the dynamic-range QT here does not need.

Post-training quantization (`lm quantize`): lm/compress/ptq.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax.numpy as jnp
from flax import nnx

from lm.compress.quant_rules import QuantConfig, kept_paths, parse_rules, tracing_quantized
from lm.errors import ConfigError

QTYPES = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2,
          "none": None}


def qwix_rules(q: QuantConfig, n_layers: int, prefix: str = "") -> tuple:
    """qwix QtRules: the kept paths first (a rule without a weight dtype leaves its
    matmuls alone), then the user's. `prefix`: the Transformer's own path in the model
    (a LoRA model's base)."""
    import qwix
    kept = [qwix.QtRule(module_path=prefix + p) for p in kept_paths(q, n_layers)]
    user = [qwix.QtRule(module_path=r.path, weight_qtype=QTYPES[r.weight],
                        act_qtype=QTYPES[r.act], bwd_qtype=QTYPES[r.bwd],
                        disable_channelwise_axes=q.scales == "tensor")
            for r in parse_rules(q)]
    return tuple(kept + user)


def tag(model: nnx.Module, q: QuantConfig, n_layers: int) -> nnx.Module:
    """Mark `model` (an abstract one, before nnx.split) for quantized training: module
    paths for qwix's rule matching, the rules on the root. Raises ConfigError for a rule
    that matches no module. A no-op when quant.mode is off."""
    if q.mode == "off":
        return model
    modules = list(nnx.iter_modules(model))
    paths = ["/".join(map(str, p)) for p, _ in modules]
    for rule in parse_rules(q):
        if not any(re.fullmatch(rule.path, p) for p in paths):
            shown = ", ".join(repr(p) for p in paths if p.count("/") <= 2)
            raise ConfigError(f"quant.rules: {rule.path!r} matches no module (the modules: "
                              f"{shown[:300]})")
    # The Transformer's own path where it is not the root (a LoRA model's base).
    prefix = next((p + "/" for p, (_, m) in zip(paths, modules)
                   if type(m).__name__ == "Transformer" and p), "")
    for path, module in modules:
        module.qwix_path = tuple(path)
        module.disable_quant_stats_update = True  # dynamic-range scales: no statistics
        module.qwix_rngs = None
    model.quant_rules = qwix_rules(q, n_layers, prefix)
    model.quant_act_products = q.act_products
    return model


@functools.lru_cache(maxsize=16)
def _provider(rules: tuple, act_products: bool):
    """One provider per rule set: its id keys qwix's interception (and jit's caches)."""
    import qwix
    from qwix._src.utils import flax_util

    from qwix._src.core.dot_general_qt import DotGeneralQtConfig

    def activation_product(rule) -> DotGeneralQtConfig:
        both = dict(qtype=rule.act_qtype, calibration_method=rule.act_calibration_method,
                    disable_channelwise_axes=rule.disable_channelwise_axes)
        grads = dict(grad_qtype=rule.bwd_qtype, grad_calibration_method=rule.bwd_calibration_method,
                     grad_disable_channelwise_axes=rule.disable_channelwise_axes)
        return DotGeneralQtConfig(
            **{f"{side}_{k}": v for side in ("lhs", "rhs") for k, v in both.items()},
            **{f"{side}_{k}": v for side in ("dlhs", "drhs") for k, v in grads.items()},
            use_original_residuals=rule.act_qtype is not None and rule.bwd_qtype is None)

    class Provider(qwix.QtProvider):
        def _create_dot_general_qt_config(self, rule, op_id, lhs, rhs):
            try:
                weighted = bool(flax_util.find_param(lhs) or flax_util.find_param(rhs))
                config = super()._create_dot_general_qt_config(rule, op_id, lhs, rhs)
            except ValueError:
                # qwix's last resort matches operands to parameters by shape and gives up
                # at several same-shaped ones (Mamba-2's w_x / w_z / w_b / w_c against a
                # scan's chunk product): a parameter is found by tracing it first, so
                # this operand is an activation.
                weighted, config = False, activation_product(rule)
            if act_products or weighted:
                return config
            return dataclasses.replace(config, lhs_qtype=None, rhs_qtype=None,
                                       dlhs_grad_qtype=None, drhs_grad_qtype=None,
                                       use_original_residuals=True)

    return Provider(list(rules))


def intercepted(model: nnx.Module, fn):
    """fn (which runs `model` forward; not its backward) under the model's quantization
    rules; fn itself for a model without them."""
    rules = getattr(model, "quant_rules", None)
    if not rules:
        return fn
    from qwix._src import interception
    provider = _provider(rules, model.quant_act_products)

    def run(*args, **kwargs):
        provider.process_model_inputs(model, args, kwargs)  # op counters from zero
        with tracing_quantized():
            return interception.wrap_func_intercepted(
                fn, provider.get_interceptors()[0], disable_jit=False)(*args, **kwargs)
    return run


def matmul_precision(q: QuantConfig) -> str:
    """The dtype the selected matmuls run in on hardware: "int8" / "fp8" when weights
    and activations are both quantized to it, else "bf16" (weight-only fake quant
    multiplies in the compute dtype)."""
    if q.mode != "train" or q.act == "none" or q.weight == "none":
        return "bf16"
    if q.weight == q.act == "int8":
        return "int8"
    if q.weight.startswith("fp8") and q.act.startswith("fp8"):
        return "fp8"
    return "bf16"
