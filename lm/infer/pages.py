"""The page pool: which pages of the engine's K/V pool are free (lm/model/paged.py holds
the pages themselves). Page 0 is the trash page and is never handed out."""

from __future__ import annotations

from lm.model.paged import TRASH_PAGE


class PagePool:
    def __init__(self, pages: int, page_size: int):
        if pages < 2:
            raise ValueError("a page pool needs at least 2 pages (page 0 is the trash page)")
        self.pages, self.page_size = pages, page_size
        # Lowest ids first: a drained pool hands out the same pages again.
        self._free = [p for p in range(pages - 1, -1, -1) if p != TRASH_PAGE]

    @property
    def capacity(self) -> int:
        """Pages a sequence may hold at most (all but the trash page)."""
        return self.pages - 1

    @property
    def free(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def take(self, n: int) -> list[int]:
        """n free pages; the caller checked `free` first."""
        if n > len(self._free):
            raise RuntimeError(f"page pool: {n} pages asked, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        return out

    def give_back(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        if len(self._free) > self.capacity or len(set(self._free)) != len(self._free):
            raise RuntimeError("page pool: a page was given back twice")
