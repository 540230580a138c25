from lm.model.transformer import Transformer, count_params, flops_per_token, param_axes

__all__ = ["Transformer", "count_params", "flops_per_token", "param_axes"]
