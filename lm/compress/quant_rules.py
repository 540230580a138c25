"""The `quant` config section: which matmuls quantized training runs in low precision
(through qwix, lm/compress/quantize.py), and the record `lm quantize` leaves in a
post-training-quantized run.

A rule is a regular expression over module paths, as `nnx.iter_modules` spells them
joined by "/": "blocks/0/mixer" (layer 0's sequence mixer: attention, Mamba-2,
retention), "blocks/3/channel" (its MLP / MoE), "" (the root: the readout). With
`model.scan_layers=true` the layers share one module, "blocks/mixer". A matmul belongs
to the innermost module whose method runs it (qwix's rule), and the first rule whose
expression matches that module's whole path decides it. Each rule may override the
section's dtypes: `rules="blocks/[0-9]+/mixer(/.*)?=fp8_e4m3,fp8_e4m3,none;..."`
(weight, activation, backward).

This module imports nothing of lmlab beyond the schema and errors: lm.config imports it.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass
from typing import Literal, NamedTuple

from lm.errors import ConfigError
from lm.schema import knob

DTYPE_NAMES = ("int8", "fp8_e4m3", "fp8_e5m2", "none")
Dtype = Literal["int8", "fp8_e4m3", "fp8_e5m2", "none"]
#: Every block's mixers (and anything under them), the default target.
ALL_MIXERS = r"blocks/([0-9]+/)?(mixer|channel)(/.*)?"


@dataclass(frozen=True)
class QuantConfig:
    """Quantized training (qwix) and the post-training quantization record
    (lm/compress/quant_rules.py, quantize.py, ptq.py)."""
    mode: Literal["off", "train"] = knob(
        "off", doc="train = the matmuls the rules select run quantized (fake quant with a "
                   "straight-through backward, qwix QtProvider) in training, evaluation and "
                   "`lm compile`; off = full precision.")
    weight: Dtype = knob(
        "int8", doc="Weights' dtype in the selected matmuls (int8, fp8_e4m3, fp8_e5m2; none "
                    "= leave those matmuls alone).")
    act: Dtype = knob(
        "int8", doc="Activations' dtype in the selected matmuls (both operands of an "
                    "activation x activation product, e.g. attention scores, unless "
                    "act_products=false); none = weight-only fake quant (no low-precision "
                    "matmul in the HLO).")
    bwd: Dtype = knob(
        "none", doc="Incoming gradients' dtype in the backward matmuls; none = the "
                    "backward runs in the compute dtype (on the forward's quantized "
                    "residuals where the forward quantized).")
    scales: Literal["channel", "tensor"] = knob(
        "channel", doc="Scales per channel (per row / column of each operand, the "
                       "non-contracting axes) or one per tensor.")
    act_products: bool = knob(
        True, doc="Also quantize matmuls of two activations (attention's scores and "
                  "values); false = only matmuls with a weight operand.")
    rules: str = knob(
        "", doc="\"REGEX[=WEIGHT,ACT,BWD];...\": module-path rules in order, first match "
                "wins, each optionally with its own dtypes (else the section's); \"\" = "
                "every block's sequence and channel mixer. A rule matching no module is an "
                "error.")
    keep_last_blocks: int = knob(
        0, doc="The last N blocks stay in high precision whatever the rules say "
               "(torchtitan keeps the last blocks and the head in bf16). Needs "
               "model.scan_layers=false.")
    keep_readout: bool = knob(
        True, doc="The readout (logits) matmul stays in high precision whatever the "
                  "rules say.")
    ptq: str = knob(
        "", doc="Set by `lm quantize`: the weights of this run are post-training "
                "quantized (\"int8\", \"int4/g32\"); they are stored dequantized in the "
                "checkpoint and quantized in quantized.safetensors.")


class Rule(NamedTuple):
    path: str
    weight: str
    act: str
    bwd: str


def parse_rules(q: QuantConfig) -> list[Rule]:
    """The user's rules (the default one when `rules` is empty), dtypes filled in."""
    text = q.rules.strip() or ALL_MIXERS
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        path, _, dtypes = part.partition("=")
        names = [d.strip() for d in dtypes.split(",")] if dtypes else []
        if len(names) > 3:
            raise ConfigError(f"quant.rules: {part!r}: at most WEIGHT,ACT,BWD after '='")
        names += [q.weight, q.act, q.bwd][len(names):]
        for name in names:
            if name not in DTYPE_NAMES:
                raise ConfigError(f"quant.rules: unknown dtype {name!r} in {part!r} (one of "
                                  f"{', '.join(DTYPE_NAMES)})")
        try:
            re.compile(path)
        except re.error as e:
            raise ConfigError(f"quant.rules: {path!r} is not a regular expression ({e})") from None
        out.append(Rule(path.strip(), *names))
    return out


def kept_paths(q: QuantConfig, n_layers: int) -> list[str]:
    """Module-path expressions kept in high precision ahead of every rule."""
    kept = [rf"blocks/{i}(/.*)?" for i in range(n_layers - q.keep_last_blocks, n_layers)]
    return ([""] if q.keep_readout else []) + kept


def validate(q: QuantConfig, scan_layers: bool) -> None:
    if q.mode == "off":
        return
    parse_rules(q)
    if q.keep_last_blocks < 0:
        raise ConfigError(f"quant.keep_last_blocks must be >= 0, got {q.keep_last_blocks}")
    if q.keep_last_blocks and scan_layers:
        raise ConfigError("quant.keep_last_blocks needs model.scan_layers=false (scanned "
                          "layers are one module: one rule for all)")


_TRACING = threading.local()


@contextlib.contextmanager
def tracing_quantized():
    """Marks the trace of a forward under qwix rules (lm/compress/quantize.py)."""
    previous = getattr(_TRACING, "on", False)
    _TRACING.on = True
    try:
        yield
    finally:
        _TRACING.on = previous


def quantized_trace() -> bool:
    """Whether a forward under qwix rules is being traced. A mixer whose matmuls sit
    inside a function JAX caches by input shapes (a custom_vjp, a jitted jnp.matmul)
    takes a plain path then: qwix rewrites the calls as they are traced, and a cached
    trace would carry the quantization into an unquantized model (or miss it)."""
    return getattr(_TRACING, "on", False)
