"""Paged K/V: the cache type an attention layer decodes from in the batched engine
(lm/infer). Keys and values live in a pool of fixed-size pages shared by every sequence;
a sequence's page table row lists its pages in order, so position p of row b is slot
p % page_size of page table[b, p // page_size].

Page 0 is the trash page: never handed to a sequence, it takes the writes of padding
and of idle rows, and unused table entries point to it (what a row reads from it is
masked out by position). This is the one cache type besides a mixer's own dense cache
that a mixer may be given; a mixer that understands it returns one from
`SequenceMixer.init_slot_cache` (lm/model/mixers/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

TRASH_PAGE = 0


@jax.tree_util.register_dataclass
@dataclass
class PagedKV:
    """k, v: [pages, page_size, kv_heads, head_dim] (a leading layer axis when the
    layers are scanned); table: [rows, max_pages] int32 page ids, or None while the
    cache is stored between steps (the engine attaches the step's table)."""
    k: jax.Array
    v: jax.Array
    table: jax.Array | None = None

    @property
    def page_size(self) -> int:
        return self.k.shape[-3]

    def write(self, k_BTKD, v_BTKD, positions_BT, valid_BT) -> "PagedKV":
        """The new keys/values written at their positions through the table; tokens that
        are not `valid` (padding, idle rows) go to the trash page."""
        ps = self.page_size
        page = jnp.take_along_axis(self.table, positions_BT // ps, axis=1)
        page = jnp.where(valid_BT, page, TRASH_PAGE).reshape(-1)
        slot = jnp.where(valid_BT, positions_BT % ps, 0).reshape(-1)
        kd, dh = k_BTKD.shape[2:]
        k = self.k.at[page, slot].set(k_BTKD.reshape(-1, kd, dh).astype(self.k.dtype))
        v = self.v.at[page, slot].set(v_BTKD.reshape(-1, kd, dh).astype(self.v.dtype))
        return PagedKV(k, v, self.table)

    def view(self):
        """Each row's keys and values as a dense [rows, max_pages * page_size, KV, Dh]
        (index = position): the XLA path's gather of a sequence's pages."""
        b, m = self.table.shape
        kd, dh = self.k.shape[-2:]
        k = self.k[self.table].reshape(b, m * self.page_size, kd, dh)
        v = self.v[self.table].reshape(b, m * self.page_size, kd, dh)
        return k, v
