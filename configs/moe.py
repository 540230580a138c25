"""The default run with a mixture of experts in every layer: 8 experts of twice the
model width, top-2, so a token's expert compute equals the default dense MLP's (4 x
width) while the channel parameters are 4x. Softmax router, Switch load-balancing loss
0.01, router z-loss 0.001, dropless (`--set model.moe.capacity_factor=1.25` for capacity
mode, `--set model.moe.bias_rate=0.001 --set model.moe.aux_loss=0` for auxiliary-loss-
free balancing). Trains in a few minutes on 2 CPU cores."""

import dataclasses

from lm.model.mixers.moe import MoEConfig
from default import config as default_config


def config():
    cfg = default_config()
    model = dataclasses.replace(cfg.model, channel_pattern="e",
                                moe=MoEConfig(n_experts=8, top_k=2, ratio=2.0))
    return dataclasses.replace(cfg, name="shakespeare-moe", model=model, steps=400,
                               eval_every=100, checkpoint_every=100)
