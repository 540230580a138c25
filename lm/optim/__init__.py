"""Optimizers: one shared optax chain around a pluggable update direction.

    clip (optim.clip_norm) -> direction (optim.name: adamw, ...) -> LR schedule x muP
    multipliers, plus weight decay (coupled or independent), masked to matrices

Each direction lives in one file of this package: its config section (a frozen
dataclass, `optim.<name>`), `transform(section, axes_tree)` returning the optax
transformation that turns gradients into unit-scale update directions (the logical axes
let a direction treat hidden matrices, stacked layers or experts differently: Muon,
SGD-SaI), and its muP rule: `mup_rule(section)` (one line saying which rule and where it
comes from; None = no rule, and model.init=mup is refused) and `mup_lr_scale(...)`, the
per-parameter LR multiplier under muP. It registers itself with `@register` (from
lm/optim/direction.py), which gives every config an `optim.<name>` section, whenever the file is
imported (a plug-in may be imported after lm.config). Adding a built-in one = one file +
its import line at the bottom + its declared, typed field in lm/optim/config.py. The
schedule is built here only (`schedule`).

What muP treats as a hidden matrix (`is_hidden_matrix`), mixer by mixer: attention and
the MLP's projections; MoE experts (each expert's [embed, expert_mlp] slice: "experts" is
a stack of independent blocks, like "layers") and the router (its fan-in is embed);
Mamba-2's and retention's projections. Vector-like (multiplier 1): norms, biases, Mamba-2's
dt_bias / a_log / skip and its depthwise conv (fixed fan-in, the conv width). No logit
rule is needed beyond attention's 1/head_dim: Mamba-2's B.C contraction runs over the
fixed state size and retention's per-head norm cancels the scale of q.k.
"""

from lm.optim.direction import (  # noqa: F401  (the plug-in API)
    BLOCK_AXES, DIRECTIONS, Direction, all_directions, is_hidden_matrix, register)
# The registrations: one import per direction file.
from lm.optim import adamw, lion, adafactor, muon, sgd_sai  # noqa: F401, E402
from lm.optim.config import OptimConfig  # noqa: F401, E402
from lm.optim.chain import (  # noqa: F401, E402  (the shared chain)
    decay_mask, describe, lr_multipliers, make_optimizer, mup_rule, schedule,
    state_bytes_per_param, state_shardings, validate, validate_mup)
