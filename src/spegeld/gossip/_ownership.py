"""Versioned key sets: this node's own (the ledger), and what we know of each peer's.

Versions start at ``incarnation << 20``, so a restarted node (which starts with
a higher incarnation) always counts above its earlier life: peers notice the
jump and pull its whole state rather than mixing two lives' deltas.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._codec import key_size as encoded_size
from ._messages import Delta, StateChunk

DELTA_BUDGET = 600  # encoded bytes of keys per delta: it must ride piggyback on a datagram
CHUNK_BUDGET = 1000  # encoded bytes of keys per state chunk, at most (the core may ask less)
MAX_PENDING = 256  # early deltas held per peer; beyond this a whole-state pull is cheaper
BIG_GAP = 32  # a gap this wide pulls at once instead of waiting for gossip to fill it
CHUNK_TIMEOUT = 5.0  # seconds an incomplete state transfer is kept after its last chunk

__all__ = ["CHUNK_BUDGET", "DELTA_BUDGET", "KeyLedger", "PeerKeys", "encoded_size"]


def _batches(keys: Iterable[str], budget: int) -> list[list[str]]:
    batches: list[list[str]] = [[]]
    room = budget
    for key in keys:
        size = encoded_size(key)
        if size > room and batches[-1]:
            batches.append([])
            room = budget
        batches[-1].append(key)
        room -= size
    return batches


class KeyLedger:
    """This node's own keys and their version."""

    def __init__(self, version_base: int = 0) -> None:
        self.version = version_base
        self.own_keys: set[str] = set()

    def change(self, node: str, added: Iterable[str], removed: Iterable[str]) -> list[Delta]:
        new = [k for k in dict.fromkeys(added) if k not in self.own_keys]
        gone = [k for k in dict.fromkeys(removed) if k in self.own_keys]
        self.own_keys.update(new)
        self.own_keys.difference_update(gone)
        deltas = []
        for batch in _batches(gone, DELTA_BUDGET) if gone else []:
            self.version += 1
            deltas.append(Delta(node, self.version, (), tuple(batch)))
        for batch in _batches(new, DELTA_BUDGET) if new else []:
            self.version += 1
            deltas.append(Delta(node, self.version, tuple(batch), ()))
        return deltas

    def jump(self, above: int) -> None:
        """Count past ``above``: a version an earlier life of this node reached."""
        self.version = max(self.version, above) + 1

    @staticmethod
    def chunk_state(
        node: str, version: int, keys: list[str], budget: int = CHUNK_BUDGET
    ) -> list[StateChunk]:
        batches = _batches(keys, min(budget, CHUNK_BUDGET))
        return [StateChunk(node, version, i, len(batches), tuple(b)) for i, b in enumerate(batches)]


class PeerKeys:
    """What we hold of one peer's keys: applied up to ``version``, plus early deltas."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.version = 0
        self.complete = True
        self.claimed = 0
        self.pending: dict[int, Delta] = {}
        self.gap_since: float | None = None
        self.last_pull = float("-inf")
        self._assembling: tuple[int, int, float, dict[int, tuple[str, ...]]] | None = None

    def note_claim(self, version: int, now: float) -> bool:
        """Someone holds ``version``; True if that is more than we have."""
        if version <= self.version:
            return False
        self.claimed = max(self.claimed, version)
        if self.gap_since is None:
            self.gap_since = now
        return True

    def should_pull(self, now: float, gap_timeout: float) -> bool:
        if self.gap_since is None or now - self.last_pull < gap_timeout:
            return False
        waited = now - self.gap_since >= gap_timeout
        if waited or self.claimed - self.version > BIG_GAP or self.version == 0:
            self.last_pull = now
            return True
        return False

    def offer(self, delta: Delta, now: float) -> list[Delta] | None:
        """Take a delta: the deltas now applicable in order, or None for old news."""
        if delta.version <= self.version or delta.version in self.pending:
            return None
        self.note_claim(delta.version, now)
        if delta.version != self.version + 1:
            if len(self.pending) < MAX_PENDING:
                self.pending[delta.version] = delta
            return []
        self.version = delta.version
        return [delta, *self.drain()]

    def drain(self) -> list[Delta]:
        applied = []
        for version in sorted(self.pending):
            if version <= self.version:
                del self.pending[version]
            elif version == self.version + 1:
                applied.append(self.pending.pop(version))
                self.version = version
        if self.claimed <= self.version:
            self.gap_since = None
        return applied

    def assemble(self, chunk: StateChunk, now: float) -> set[str] | None:
        """Collect a whole-state transfer; the full key set once every chunk is in."""
        if chunk.version <= self.version or chunk.count == 0 or chunk.index >= chunk.count:
            return None
        current = self._assembling
        if current is None or chunk.version > current[0] or now - current[2] > CHUNK_TIMEOUT:
            current = (chunk.version, chunk.count, now, {})
        elif chunk.version < current[0] or chunk.count != current[1]:
            return None
        current[3][chunk.index] = chunk.keys
        # The timeout runs from the last chunk, not the first: a big state over a lossy
        # link takes several pulls, and each one fills in what the last one lost.
        current = (current[0], current[1], now, current[3])
        self._assembling = current
        if len(current[3]) < current[1]:
            return None
        self._assembling = None
        self.version = chunk.version
        self.claimed = max(self.claimed, chunk.version)
        return {key for part in current[3].values() for key in part}
