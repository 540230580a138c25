"""Attention kernels: a Pallas flash-attention kernel and its dense jnp reference."""

from lm.kernels.attention.flash import attention, flash_attention
from lm.kernels.attention.reference import attention_reference

__all__ = ["attention", "attention_reference", "flash_attention"]
