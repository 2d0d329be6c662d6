"""Who holds which key, compactly: interned keys, and bits instead of pair objects.

Every key string is interned once and gets a small index. Each key's holders
are one Python int used as a bitmask over member slots, and each member's keys
are one ``array('I')`` of key indices, in no particular order (the bitmask
answers "does this slot hold it", so adding is O(keys added)). No object exists
per (key, holder) pair, so 1000 members with 2000 keys each stays small. A
lookup is a dict read plus a walk over set bits.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator


class HolderTable:
    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        self._holders: list[int] = []  # key index → bitmask of member slots
        self._free: list[int] = []  # key indices with no holder, for reuse
        self._keys: dict[int, array[int]] = {}  # member slot → its key indices, unordered

    def __len__(self) -> int:
        return len(self._index)

    def holders(self, key: str) -> Iterator[int]:
        """Member slots that hold ``key``."""
        index = self._index.get(key)
        if index is None:
            return
        # The positions of the 1s in the binary string, least significant first: about
        # twice as fast as peeling bits off a 1000-bit int one at a time.
        binary = bin(self._holders[index])[:1:-1]
        slot = binary.find("1")
        while slot >= 0:
            yield slot
            slot = binary.find("1", slot + 1)

    def keys_of(self, slot: int) -> list[str]:
        return [self._names[i] for i in self._keys.get(slot, ())]

    def count_of(self, slot: int) -> int:
        return len(self._keys.get(slot, ()))

    def add(self, slot: int, keys: Iterable[str]) -> None:
        """Add ``keys`` to ``slot``'s: O(len(keys)), whatever the slot holds already."""
        mine = self._keys.get(slot)
        if mine is None:
            mine = array("I")
        bit = 1 << slot
        holders = self._holders
        for key in keys:
            index = self._intern(key)
            if not holders[index] & bit:
                holders[index] |= bit
                mine.append(index)
        if mine:
            self._keys[slot] = mine

    def remove(self, slot: int, keys: Iterable[str]) -> None:
        bit = 1 << slot
        gone = set()
        for key in keys:
            index = self._index.get(key)
            if index is not None and self._holders[index] & bit:
                gone.add(index)
                self._unhold(index, slot)
        if gone:
            self._store(slot, {i for i in self._keys.get(slot, ()) if i not in gone})

    def replace(self, slot: int, keys: Iterable[str]) -> None:
        """Set ``slot``'s keys to exactly ``keys``."""
        wanted = {self._intern(key) for key in keys}
        current = set(self._keys.get(slot, ()))
        for index in current - wanted:
            self._unhold(index, slot)
        bit = 1 << slot
        for index in wanted - current:
            self._holders[index] |= bit
        self._store(slot, wanted)

    def drop(self, slot: int) -> None:
        """Forget every key of ``slot`` (a dead member)."""
        for index in self._keys.pop(slot, ()):
            self._unhold(index, slot)

    def _store(self, slot: int, indices: set[int]) -> None:
        if indices:
            self._keys[slot] = array("I", indices)
        else:
            self._keys.pop(slot, None)

    def _intern(self, key: str) -> int:
        index = self._index.get(key)
        if index is None:
            if self._free:
                index = self._free.pop()
                self._names[index] = key
                self._holders[index] = 0
            else:
                index = len(self._names)
                self._names.append(key)
                self._holders.append(0)
            self._index[key] = index
        return index

    def _unhold(self, index: int, slot: int) -> None:
        self._holders[index] &= ~(1 << slot)
        if not self._holders[index]:
            del self._index[self._names[index]]
            self._names[index] = ""
            self._free.append(index)
