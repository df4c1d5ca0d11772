"""KV page accounting, and the prefix cache over full pages. The scheduler owns page ids;
the workers own the pages' tensors.

A page is taken as a sequence grows into it and given back when the sequence ends. A full
page whose K/V are in the cache gets a key: a digest chained from the page before it, the
adapter the K/V were computed under and the page's tokens (`page_keys`), so equal keys mean
equal K/V. Given back, a keyed page stays where it is (evictable, least recently used
first) until its memory is wanted; a later sequence whose context starts with the same
pages under the same adapter takes them instead of computing them again. The digest is
cryptographic: a prompt crafted to collide with another tenant's key would read its K/V.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def page_keys(root: bytes, token_ids: list[int], block_size: int, known: list[bytes]
              ) -> list[bytes]:
    """The keys of the full pages of `token_ids` under `root` (the adapter's identity),
    extending `known` (the keys of its first pages, computed before) in place."""
    for start in range(len(known) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = known[-1] if known else root
        page = array("q", token_ids[start:start + block_size]).tobytes()
        known.append(hashlib.blake2b(parent + page, digest_size=16).digest())
    return known


def root_key(identity: object) -> bytes:
    """The root of a key chain: what the K/V were computed under (base model, an adapter's
    load)."""
    return hashlib.blake2b(repr(identity).encode(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # page -> key, for pages whose K/V are known
        self._page_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # keyed, unused; LRU first

    @property
    def num_free(self) -> int:
        """Pages a sequence can take: never used, or cached and unused."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Unused pages kept for the prefix cache."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"KV cache exhausted: {n} pages wanted, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:  # the least recently used cached page
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def free(self, block_ids: list[int], *, keep: bool = True) -> list[int]:
        """Give pages back. `keep=False`: their K/V are not to be trusted (a failed
        sequence), so they leave the prefix cache. Returns the pages no sequence uses any
        more."""
        released = []
        for page in reversed(block_ids):
            if not keep:
                self._forget(page)
            self._refs[page] -= 1
            if self._refs[page] == 0:
                released.append(page)
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        return released

    # -- the prefix cache ----------------------------------------------------------------------

    def cached_prefix(self, keys: list[bytes]) -> int:
        """How many of these leading page keys the cache holds."""
        if not self.prefix_caching:
            return 0
        n = 0
        for key in keys:
            if key not in self._page_of:
                break
            n += 1
        return n

    def take_cached(self, keys: list[bytes]) -> list[int]:
        """The pages of these keys (all cached: see cached_prefix), now used once more."""
        pages = []
        for key in keys:
            page = self._page_of[key]
            self._evictable.pop(page, None)
            self._refs[page] += 1
            pages.append(page)
        return pages

    def register(self, page: int, key: bytes) -> None:
        """`page` now holds the K/V that `key` names. When another page holds them already
        (two sequences computed the same prefix at once), this one stays unkeyed."""
        if self.prefix_caching and key not in self._page_of and page not in self._key_of:
            self._key_of[page] = key
            self._page_of[key] = page

    def forget_cached(self) -> None:
        """The workers' cache is gone (they were replaced): no key holds any more."""
        for page in list(self._key_of):
            self._forget(page)

    def _forget(self, page: int) -> None:
        key = self._key_of.pop(page, None)
        if key is None:
            return
        del self._page_of[key]
        if page in self._evictable:
            del self._evictable[page]
            self._free.append(page)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0
