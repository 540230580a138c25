"""The model: a decoder stack (transformer.py) of blocks whose sequence and channel
mixers are plug-ins (mixers/); its config section is config.py (ModelConfig)."""

from lm.model.config import ModelConfig  # noqa: F401
from lm.model.mixers import logit_layers  # noqa: F401
from lm.model.transformer import Transformer, count_params, flops_per_token, param_axes  # noqa: F401

__all__ = ["ModelConfig", "Transformer", "count_params", "flops_per_token", "param_axes",
           "logit_layers"]
