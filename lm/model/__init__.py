"""The model: a decoder stack (transformer.py) of blocks whose sequence and channel
mixers are plug-ins (mixers/). Imported lazily: lm.config imports the mixers' config
sections from here, and the transformer imports lm.config."""

_EXPORTS = {
    "Transformer": "lm.model.transformer", "count_params": "lm.model.transformer",
    "flops_per_token": "lm.model.transformer", "param_axes": "lm.model.transformer",
    "logit_layers": "lm.model.mixers",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lm.model' has no attribute {name!r}")


__all__ = list(_EXPORTS)
