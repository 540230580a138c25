"""The default run with RetNet multi-scale retention in place of attention."""

import dataclasses

from lm.model.mixers.retention import RetentionConfig
from default import config as default_config


def config():
    cfg = default_config()
    model = dataclasses.replace(cfg.model, mixer_pattern="r", retention=RetentionConfig(chunk=32))
    return dataclasses.replace(cfg, name="shakespeare-retnet", model=model)
