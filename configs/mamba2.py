"""The default run with Mamba-2 (SSD) mixers in place of attention: every layer is a
Mamba-2 block (state 32 per head, expand 2) plus the usual MLP."""

import dataclasses

from lm.model.mixers.mamba2 import Mamba2Config
from default import config as default_config


def config():
    cfg = default_config()
    model = dataclasses.replace(cfg.model, mixer_pattern="m",
                                mamba2=Mamba2Config(state=32, chunk=32))
    return dataclasses.replace(cfg, name="shakespeare-mamba2", model=model)
