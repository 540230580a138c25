"""The page pool: which pages of the engine's K/V pool are free, how many sequences hold
each (a shared prefix is held by several), and an index of the prompt pages in use, so a
new prompt that starts like a running one takes its pages instead of prefilling them
again (lm/model/paged.py holds the pages themselves). Page 0 is the trash page and is
never handed out.

The index is exact, not hashed: a page is found by (the page before it, the tokens in
it), so equal keys mean equal prefixes. Only full pages of a prompt are indexed (a
sequence never writes into them again); a page leaves the index when its last holder
gives it back (its children have then gone too: every holder of a page holds the pages
before it).
"""

from __future__ import annotations

from lm.model.paged import TRASH_PAGE

_ROOT = -1  # the "page before" the first page of a prompt


class PagePool:
    def __init__(self, pages: int, page_size: int):
        if pages < 2:
            raise ValueError("a page pool needs at least 2 pages (page 0 is the trash page)")
        self.pages, self.page_size = pages, page_size
        # Lowest ids first: a drained pool hands out the same pages again.
        self._free = [p for p in range(pages - 1, -1, -1) if p != TRASH_PAGE]
        self.refs = [0] * pages
        self._index: dict[tuple, int] = {}  # (page before, tokens) -> page
        self._key_of: dict[int, tuple] = {}

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
        """n free pages, held once each; the caller checked `free` first."""
        if n > len(self._free):
            raise RuntimeError(f"page pool: {n} pages asked, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for p in out:
            self.refs[p] = 1
        return out

    def share(self, pages: list[int]) -> None:
        """One more holder of each of `pages` (found by `lookup`)."""
        for p in pages:
            self.refs[p] += 1

    def give_back(self, pages: list[int]) -> None:
        for p in reversed(pages):
            if self.refs[p] < 1:
                raise RuntimeError("page pool: a page was given back twice")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                key = self._key_of.pop(p, None)
                if key is not None:
                    del self._index[key]
                self._free.append(p)

    # ---------------------------------------------------------------- prompt index

    def lookup(self, tokens: list[int], most: int) -> list[int]:
        """The pages holding the longest indexed prefix of `tokens`, at most `most`."""
        ps, out, before = self.page_size, [], _ROOT
        for i in range(min(most, len(tokens) // ps)):
            page = self._index.get((before, tuple(tokens[i * ps:(i + 1) * ps])))
            if page is None:
                break
            out.append(page)
            before = page
        return out

    def index(self, tokens: list[int], pages: list[int], first: int) -> None:
        """Index the full pages of a prompt from page `first` on (those before it came
        from `lookup`)."""
        ps = self.page_size
        for i in range(first, len(tokens) // ps):
            key = (pages[i - 1] if i else _ROOT, tuple(tokens[i * ps:(i + 1) * ps]))
            if key not in self._index:  # (an equal page already indexed: keep that one)
                self._index[key] = pages[i]
                self._key_of[pages[i]] = key

    @property
    def indexed(self) -> int:
        return len(self._index)
