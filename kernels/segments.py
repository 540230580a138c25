"""Packed documents: where each one starts, from per-token segment ids."""

from __future__ import annotations

import jax.numpy as jnp


def document_starts(segment_ids, batch: int, length: int):
    """bool [B, T]: True at t = 0 and wherever the segment id differs from the previous
    token's (a document is a maximal run of equal consecutive ids). segment_ids=None:
    the row is one document."""
    starts = jnp.zeros((batch, length), bool).at[:, 0].set(True)
    if segment_ids is None:
        return starts
    seg = jnp.asarray(segment_ids)
    return starts.at[:, 1:].set(seg[:, 1:] != seg[:, :-1])
