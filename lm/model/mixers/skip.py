"""The missing sublayer (code "-" in model.mixer_pattern and in model.channel_pattern): no
parameters, output zero, no decoding state. A depth-pruned model (`lm prune --method
depth`, lm/compress/prune.py) is an ordinary config whose per-layer patterns name the
sublayers that were removed, e.g. mixer_pattern="aa-a" (layer 2 has no attention) and
channel_pattern="f-ff" (layer 1 has no MLP); a sublayer may go without its partner.

The block (lm/model/transformer.py) asks `empty` and leaves out the removed sublayer's
own norms: its input norm (pre / peri placement; a parallel block's shared input norm
stays while the other sublayer uses it) and its output norm (peri / out). With
norm_position=post the norms sit on the residual stream after each add, so they stay:
`norm(x + 0)` is what the parent computes with that sublayer's output zeroed.

scan_layers needs one mixer per kind, so a pattern with "-" and another code runs with
model.scan_layers=false (config validation says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax.numpy as jnp
from flax import nnx

from lm.model.mixers.base import ChannelMixer, SequenceMixer, register

if TYPE_CHECKING:
    from lm.model.config import ModelConfig

NO_LOGIT = jnp.nan  # no attention here: the max-logit diagnostic does not apply


@dataclass(frozen=True)
class SkipConfig:
    """A removed sequence mixer (mixer code "-"): nothing to configure."""


@dataclass(frozen=True)
class SkipChannelConfig:
    """A removed channel mixer (channel code "-"): nothing to configure."""


@register
class SkipMixer(SequenceMixer):
    name, code, Config = "skip", "-", SkipConfig
    empty = True

    def __init__(self, cfg: "ModelConfig", rngs: nnx.Rngs):
        del cfg, rngs

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_index=None):
        del positions_BT, segment_ids_BT, cache_index
        return jnp.zeros_like(x_BTD), cache, jnp.float32(NO_LOGIT)

    def init_cache(self, batch: int, length: int) -> dict:
        return {}  # nothing carried from token to token

    def init_slot_cache(self, slots: int, pages: int, page_size: int) -> dict:
        return {}  # an (empty) state per slot: the engine runs the layer as it is


@register
class SkipChannel(ChannelMixer):
    name, code, Config = "skip_channel", "-", SkipChannelConfig
    empty = True

    def __init__(self, cfg: "ModelConfig", rngs: nnx.Rngs):
        del cfg, rngs

    def __call__(self, x_BTD):
        return jnp.zeros_like(x_BTD)
