"""Sequence mixers and channel mixers as plug-ins.

A block is `x + seq_mixer(norm(x))` then `x + channel_mixer(norm(x))` (lm/model/
transformer.py wires the norms). Each mixer lives in one file of this package with:

- its module (an `nnx.Module` subclass of `SequenceMixer` or `ChannelMixer`, from
  lm/model/mixers/base.py),
- its config section, a frozen dataclass that becomes `model.<name>` of ModelConfig
  (`--set model.attention.window=64`); its fields are `lm.schema.knob`s with their doc
  and roles (e.g. "free_init", "eval_time" for a kernel choice); `legacy` maps the flat
  ModelConfig keys of earlier releases to its fields, so old config.json files keep
  loading,
- `adaptable`: the matrices LoRA and recursion's relaxations may adapt,
- its FLOPs beyond the parameter matmuls (`extra_flops_per_token`), its decoding
  cache (`init_cache`; for the batched engine, lm/infer, `init_slot_cache`: pages or a
  state per slot) and its validation (`validate`, raising ConfigError),

and registers itself with `@register`. Layers pick mixers by the one-letter `code` in
`model.mixer_pattern` (sequence) and `model.channel_pattern` (channel), cycled over the
layers. Adding a mixer = one new file (here, or anywhere: a plug-in imported before or
after lm.config) + its import line below; a built-in one also gets a declared field in
lm/model/config.py, so that editors and type checkers see `cfg.<name>`.

A removed sublayer (depth pruning, lm/compress/prune.py) is the "-" mixer of skip.py, in
either pattern: no parameters, zero output, and the block leaves out its norms (`empty`).

Nothing outside this package branches on a mixer's name: the block, the sampler's
and the engine's caches, FLOPs per token, parameter counts and validation all ask the mixer.
"""

from lm.model.mixers.base import (  # noqa: F401  (the plug-in API)
    CHANNEL_MIXERS, SEQUENCE_MIXERS, ChannelMixer, SequenceMixer, adaptable_matrices,
    all_mixers, channel_mixer, describe_adaptable, extra_flops_per_token, inactive_params,
    layer_configs,
    logit_layers, register, scan_flops_per_token, sequence_mixer, sharded_linear_scan,
    used_mixers, validate, validate_mesh)
# The registrations: one import per mixer file.
from lm.model.mixers import attention, mamba2, mlp, moe, retention, skip  # noqa: F401, E402
