"""Attention kernels: a Pallas flash-attention kernel and its dense jnp reference."""

from kernels.attention.flash import attention, flash_attention
from kernels.attention.reference import attention_reference

__all__ = ["attention", "attention_reference", "flash_attention"]
