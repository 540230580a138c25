"""A hybrid: Mamba-2 layers with attention every 4th layer (layers 4 and 8 of 8), the
pattern of Jamba-style models."""

import dataclasses

from lm.model.mixers.mamba2 import Mamba2Config
from default import config as default_config


def config():
    cfg = default_config()
    model = dataclasses.replace(cfg.model, n_layers=8, mixer_pattern="mmma",
                                mamba2=Mamba2Config(state=32, chunk=32))
    return dataclasses.replace(cfg, name="shakespeare-hybrid", model=model)
