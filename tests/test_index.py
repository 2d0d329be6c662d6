"""The local index: reference-counted per-image key sets, and the MemoryStore over it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from spegeld.errors import NotFound
from spegeld.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Descriptor, Digest
from spegeld.store import KeysChanged, MemoryStore, OpenBlob, Snapshot
from spegeld.store._index import ImageEntry, Index, LooseBlob, merge_changes
from spegeld.store.memory import CHUNK_SIZE, sha256_digest


def dg(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def desc(n: int, media_type: str = OCI_LAYER_GZIP) -> Descriptor:
    return Descriptor(media_type, dg(n), 100 + n)


def entry(digests: Iterable[int], tags: Mapping[str, int] | None = None) -> ImageEntry:
    return ImageEntry(
        digests={dg(n): desc(n) for n in digests},
        tags={key: dg(n) for key, n in (tags or {}).items()},
    )


def changed(added: Iterable[str] = (), removed: Iterable[str] = ()) -> KeysChanged:
    return KeysChanged(frozenset(added), frozenset(removed))


def apply(keys: frozenset[str], change: KeysChanged) -> frozenset[str]:
    return (keys - change.removed) | change.added


KA = "example.com/a:v1"
KB = "example.com/b:v1"


# --- Index: reference counting ----------------------------------------------------------


def test_put_into_empty_index_adds_every_key() -> None:
    index = Index()
    change = index.put("a", entry([1, 2, 3], {KA: 1}))
    assert change == changed(added={dg(1), dg(2), dg(3), KA})
    assert index.snapshot() == Snapshot(
        digests={dg(1): desc(1), dg(2): desc(2), dg(3): desc(3)}, tags={KA: dg(1)}
    )
    assert index.image_names() == {"a"}
    assert index.resolve(KA) == dg(1)
    assert index.descriptor(dg(2)) == desc(2)


def test_shared_layers_stay_until_the_last_image_goes() -> None:
    index = Index()
    index.put("a", entry([1, 2, 3], {KA: 1}))  # 1: manifest, 2: shared base layer, 3: own layer
    change_b = index.put("b", entry([4, 2, 5], {KB: 4}))
    # The shared layer was already advertised: only b's own keys are new.
    assert change_b == changed(added={dg(4), dg(5), KB})
    assert sorted(index.images_with(dg(2))) == ["a", "b"]

    change_a = index.remove("a")
    assert change_a == changed(removed={dg(1), dg(3), KA})
    assert index.descriptor(dg(2)) == desc(2)
    assert index.descriptor(dg(1)) is None
    assert index.resolve(KA) is None
    assert index.resolve(KB) == dg(4)
    assert index.images_with(dg(2)) == ["b"]

    change_last = index.remove("b")
    assert change_last == changed(removed={dg(4), dg(2), dg(5), KB})
    assert index.snapshot() == Snapshot()
    assert index.image_names() == frozenset()


def test_three_images_sharing_a_layer() -> None:
    index = Index()
    for name, own in (("a", 1), ("b", 2), ("c", 3)):
        index.put(name, entry([own, 9]))
    assert index.remove("b") == changed(removed={dg(2)})
    assert index.remove("a") == changed(removed={dg(1)})
    assert index.descriptor(dg(9)) == desc(9)
    assert index.remove("c") == changed(removed={dg(3), dg(9)})


def test_shared_tag_key_survives_until_both_holders_go() -> None:
    # "example.com/a:v1" and "example.com/a:v1@sha256:…" both carry the tag key.
    index = Index()
    assert index.put("a:v1", entry([1], {KA: 1})) == changed(added={dg(1), KA})
    assert index.put("a:v1@pinned", entry([1], {KA: 1})) == changed()
    assert index.remove("a:v1") == changed()
    assert index.resolve(KA) == dg(1)
    assert index.remove("a:v1@pinned") == changed(removed={dg(1), KA})


def test_removing_an_unknown_image_changes_nothing() -> None:
    index = Index()
    index.put("a", entry([1]))
    assert index.remove("nope") == changed()
    assert index.snapshot().keys() == {dg(1)}


def test_put_of_an_identical_entry_changes_nothing() -> None:
    index = Index()
    index.put("a", entry([1, 2], {KA: 1}))
    assert index.put("a", entry([1, 2], {KA: 1})) == changed()
    # Reference counts did not double: one removal empties the index.
    assert index.remove("a") == changed(removed={dg(1), dg(2), KA})
    assert index.snapshot() == Snapshot()


def test_put_replaces_an_images_entry() -> None:
    index = Index()
    index.put("a", entry([1, 2, 3], {KA: 1}))
    change = index.put("a", entry([4, 2, 5], {KA: 4}))  # re-tagged to a new manifest
    assert change == changed(added={dg(4), dg(5)}, removed={dg(1), dg(3)})
    assert index.resolve(KA) == dg(4)
    assert index.image_names() == {"a"}
    assert set(index.snapshot().digests) == {dg(2), dg(4), dg(5)}
    assert index.remove("a") == changed(removed={dg(2), dg(4), dg(5), KA})


def test_put_replacement_keeps_keys_another_image_holds() -> None:
    index = Index()
    index.put("a", entry([1, 2]))
    index.put("b", entry([2, 3]))
    assert index.put("b", entry([4])) == changed(added={dg(4)}, removed={dg(3)})
    assert index.descriptor(dg(2)) == desc(2)
    assert index.put("a", entry([4])) == changed(removed={dg(1), dg(2)})


def test_tag_keys_resolve_and_leave_with_their_image() -> None:
    index = Index()
    index.put("a", entry([1, 2], {"registry.local:5000/x/y:1.0": 1}))
    assert index.resolve("registry.local:5000/x/y:1.0") == dg(1)
    assert index.resolve("registry.local:5000/x/y:2.0") is None
    assert index.snapshot().tags == {"registry.local:5000/x/y:1.0": dg(1)}
    assert index.put("a", entry([1, 2])) == changed(removed={"registry.local:5000/x/y:1.0"})
    assert index.resolve("registry.local:5000/x/y:1.0") is None


def test_snapshot_is_a_copy() -> None:
    index = Index()
    index.put("a", entry([1], {KA: 1}))
    snap = index.snapshot()
    index.remove("a")
    assert snap.digests == {dg(1): desc(1)}
    assert snap.tags == {KA: dg(1)}
    assert snap.keys() == {dg(1), KA}


def test_removing_an_image_restores_the_remaining_holders_tag() -> None:
    index = Index()
    index.put("app:v1@pinned", entry([1], {KA: 1}))  # pinned to the old manifest
    index.put("app:v1", entry([2], {KA: 2}))  # v1 re-pulled: a new manifest
    index.remove("app:v1")
    # Only the pinned image is left, so the tag must resolve to its digest (1), and
    # must never point at a digest the index no longer holds. Actual: dg(2).
    assert index.resolve(KA) == dg(1)
    snap = index.snapshot()
    assert set(snap.tags.values()) <= set(snap.digests)


def test_put_replacement_restores_the_remaining_holders_tag() -> None:
    index = Index()
    index.put("pinned", entry([1], {KA: 1}))
    index.put("floating", entry([2], {KA: 2}))
    index.put("floating", entry([2]))  # the floating image lost its tag
    assert index.resolve(KA) == dg(1)


def test_replace_all_reports_only_the_net_difference() -> None:
    index = Index()
    index.put("a", entry([1, 2], {KA: 1}))
    index.put("b", entry([2, 3], {KB: 3}))
    change = index.replace_all(
        {
            "b": entry([2, 3], {KB: 3}),  # unchanged
            "c": entry([1, 4]),  # takes over digest 1 from a
        }
    )
    assert change == changed(added={dg(4)}, removed={KA})
    assert index.image_names() == {"b", "c"}
    assert index.snapshot() == Snapshot(
        digests={dg(1): desc(1), dg(2): desc(2), dg(3): desc(3), dg(4): desc(4)},
        tags={KB: dg(3)},
    )


def test_replace_all_rebuilds_reference_counts() -> None:
    index = Index()
    index.put("a", entry([1]))
    index.replace_all({"a": entry([1, 2]), "b": entry([2, 3])})
    assert index.remove("a") == changed(removed={dg(1)})
    assert index.remove("b") == changed(removed={dg(2), dg(3)})
    assert index.snapshot() == Snapshot()


def test_replace_all_with_nothing_removes_everything() -> None:
    index = Index()
    index.put("a", entry([1, 2], {KA: 1}))
    assert index.replace_all({}) == changed(removed={dg(1), dg(2), KA})
    assert index.snapshot() == Snapshot()
    assert index.image_names() == frozenset()


def test_replace_all_with_the_same_entries_changes_nothing() -> None:
    index = Index()
    entries = {"a": entry([1, 2], {KA: 1}), "b": entry([2])}
    index.replace_all(entries)
    assert index.replace_all(dict(entries)) == changed()


# --- merge_changes ----------------------------------------------------------------------


def test_merge_changes_of_nothing() -> None:
    assert merge_changes([]) == changed()


def test_merge_changes_later_events_win() -> None:
    merged = merge_changes(
        [changed(added={"x", "y"}), changed(removed={"x"}), changed(added={"z"}, removed={"y"})]
    )
    assert merged == changed(added={"z"}, removed={"x", "y"})
    merged = merge_changes([changed(removed={"x"}), changed(added={"x"})])
    assert merged == changed(added={"x"})


key_sets = st.frozensets(st.sampled_from("abcdef"), max_size=6)


@settings(max_examples=200, deadline=None)
@given(key_sets, st.lists(st.builds(KeysChanged, key_sets, key_sets), max_size=6))
def test_merge_changes_equals_applying_in_order(
    start: frozenset[str], changes: list[KeysChanged]
) -> None:
    sequential = start
    for change in changes:
        sequential = apply(sequential, change)
    assert apply(start, merge_changes(changes)) == sequential


# --- Index: loose blobs (containerd 2.1+ content events) ------------------------------


def loose(n: int, at: float = 0.0) -> LooseBlob:
    return LooseBlob(Descriptor("application/octet-stream", dg(n), 100 + n), committed_at=at)


def test_a_loose_blob_is_held_by_digest_at_once() -> None:
    index = Index()
    assert index.add_loose(loose(1)) == changed(added={dg(1)})
    assert index.descriptor(dg(1)) == loose(1).descriptor
    assert index.snapshot() == Snapshot(digests={dg(1): loose(1).descriptor}, tags={})
    assert index.loose() == [loose(1)]
    assert index.add_loose(loose(1, at=5.0)) == changed(), "a second commit adds nothing"


def test_an_image_takes_over_a_loose_blob_and_its_descriptor() -> None:
    index = Index()
    index.add_loose(loose(1))
    index.add_loose(loose(2))
    assert index.put("a", entry([1, 3], {KA: 3})) == changed(added={dg(3), KA})
    assert index.descriptor(dg(1)) == desc(1), "the image's media type replaces the placeholder"
    assert index.loose() == [loose(2)]
    # Once the image goes, so does the blob it took over: the GC takes it silently.
    assert index.remove("a") == changed(removed={dg(1), dg(3), KA})
    assert index.snapshot().keys() == {dg(2)}


def test_a_blob_an_image_holds_is_not_made_loose() -> None:
    index = Index()
    index.put("a", entry([1]))
    assert index.add_loose(loose(1)) == changed()
    assert index.loose() == []
    assert index.descriptor(dg(1)) == desc(1)
    assert index.remove_loose(dg(1)) == changed(), "the image decides, not a loose delete"
    assert index.remove("a") == changed(removed={dg(1)})


def test_removing_a_loose_blob_withdraws_it() -> None:
    index = Index()
    index.add_loose(loose(1))
    assert index.remove_loose(dg(1)) == changed(removed={dg(1)})
    assert index.descriptor(dg(1)) is None
    assert index.remove_loose(dg(1)) == changed()
    assert index.remove_loose(dg(9)) == changed()


def test_replace_all_keeps_only_the_loose_blobs_carried_over() -> None:
    index = Index()
    index.add_loose(loose(1))
    index.add_loose(loose(2))
    change = index.replace_all({"a": entry([3])}, [loose(2), loose(3)])
    assert change == changed(added={dg(3)}, removed={dg(1)})
    assert index.loose() == [loose(2)], "a carried blob an image now reaches is the image's"
    assert index.descriptor(dg(3)) == desc(3)


# --- Index: the state machine -----------------------------------------------------------

NAMES = ["a", "b", "c", "d"]
DIGEST_POOL = list(range(1, 9))
TAG_POOL = [f"example.com/app{n}:v{n}" for n in range(1, 5)]

# Two images may carry one tag key with different digests (``app:v1`` and
# ``app:v1@sha256:…``), so tag values vary freely.
entries = st.builds(
    entry,
    st.frozensets(st.sampled_from(DIGEST_POOL), max_size=5),
    st.dictionaries(st.sampled_from(TAG_POOL), st.sampled_from(DIGEST_POOL)),
)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index = Index()
        self.model: dict[str, ImageEntry] = {}
        self.initial: frozenset[str] = frozenset()
        self.keys: frozenset[str] = frozenset()  # initial, with each event applied in turn
        self.history: list[KeysChanged] = []
        self.loose: set[int] = set()  # digests held loose: committed, reached by no image

    def _image_digests(self) -> set[int]:
        return {n for n in DIGEST_POOL for e in self.model.values() if dg(n) in e.digests}

    @initialize(start=st.dictionaries(st.sampled_from(NAMES), entries, max_size=3))
    def start(self, start: dict[str, ImageEntry]) -> None:
        change = self.index.replace_all(start)
        assert change == KeysChanged(frozenset(self._model_keys(start)), frozenset())
        self.model = dict(start)
        self.initial = self.keys = self.index.snapshot().keys()

    @staticmethod
    def _model_keys(model: Mapping[str, ImageEntry]) -> set[str]:
        return set().union(*(e.keys() for e in model.values()))

    def _record(self, change: KeysChanged) -> None:
        assert not change.added & change.removed
        assert not change.added & self.keys, "added a key that was already advertised"
        assert change.removed <= self.keys, "removed a key that was not advertised"
        self.history.append(change)
        self.keys = apply(self.keys, change)

    @rule(name=st.sampled_from(NAMES), new=entries)
    def put(self, name: str, new: ImageEntry) -> None:
        change = self.index.put(name, new)
        self._record(change)
        self.model[name] = new
        self.loose -= self._image_digests()

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name: str) -> None:
        change = self.index.remove(name)
        self._record(change)
        self.model.pop(name, None)

    @rule(
        new=st.dictionaries(st.sampled_from(NAMES), entries, max_size=4),
        carry=st.frozensets(st.sampled_from(DIGEST_POOL)),
    )
    def replace_all(self, new: dict[str, ImageEntry], carry: frozenset[int]) -> None:
        before = self.index.snapshot().keys()
        change = self.index.replace_all(new, [loose(n) for n in sorted(carry)])
        self._record(change)
        self.model = dict(new)
        self.loose = set(carry) - self._image_digests()
        after = self.index.snapshot().keys()
        assert change == KeysChanged(after - before, before - after)

    @rule(n=st.sampled_from(DIGEST_POOL))
    def add_loose(self, n: int) -> None:
        self._record(self.index.add_loose(loose(n)))
        if n not in self._image_digests():
            self.loose.add(n)

    @rule(n=st.sampled_from(DIGEST_POOL))
    def remove_loose(self, n: int) -> None:
        self._record(self.index.remove_loose(dg(n)))
        self.loose.discard(n)

    @invariant()
    def snapshot_is_the_union_of_entries(self) -> None:
        snap = self.index.snapshot()
        want_digests = {d: ds for e in self.model.values() for d, ds in e.digests.items()}
        assert not self.loose & self._image_digests()
        want_digests |= {dg(n): loose(n).descriptor for n in self.loose}
        assert {b.descriptor.digest for b in self.index.loose()} == {dg(n) for n in self.loose}
        tag_holders: dict[str, set[str]] = {}
        for e in self.model.values():
            for k, d in e.tags.items():
                tag_holders.setdefault(k, set()).add(d)
        assert snap.digests == want_digests
        assert set(snap.tags) == set(tag_holders)
        for key, digest in snap.tags.items():
            assert digest in tag_holders[key], "a tag resolves to a digest no holder names"
        assert self.index.image_names() == set(self.model)
        for n in DIGEST_POOL:
            holders = sorted(name for name, e in self.model.items() if dg(n) in e.digests)
            assert sorted(self.index.images_with(dg(n))) == holders
            assert self.index.descriptor(dg(n)) == want_digests.get(dg(n))
        for key in TAG_POOL:
            assert self.index.resolve(key) == snap.tags.get(key)

    @invariant()
    def events_reproduce_the_key_set(self) -> None:
        keys = self.index.snapshot().keys()
        assert self.keys == keys
        assert apply(self.initial, merge_changes(self.history)) == keys


IndexMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIndexMachine = IndexMachine.TestCase


# --- MemoryStore ------------------------------------------------------------------------


def _blobs(*parts: tuple[str, bytes]) -> dict[Digest, tuple[str, bytes]]:
    return {sha256_digest(data): (mt, data) for mt, data in parts}


MANIFEST_A = (OCI_MANIFEST, b'{"a": 1}')
MANIFEST_B = (OCI_MANIFEST, b'{"b": 2}')
CONFIG_A = (OCI_CONFIG, b'{"config": "a"}')
BASE = (OCI_LAYER_GZIP, bytes(range(256)) * 1000)  # 256 000 bytes: several chunks
OWN_B = (OCI_LAYER_GZIP, b"layer of b")


def _store_with_two_images() -> MemoryStore:
    store = MemoryStore()
    store.add_image("a", _blobs(MANIFEST_A, CONFIG_A, BASE), {KA: sha256_digest(MANIFEST_A[1])})
    store.add_image("b", _blobs(MANIFEST_B, BASE, OWN_B), {KB: sha256_digest(MANIFEST_B[1])})
    return store


async def _read(
    store: MemoryStore, digest: Digest, offset: int = 0, length: int | None = None
) -> tuple[OpenBlob, bytes]:
    blob = await store.open(digest, offset, length)
    chunks = [chunk async for chunk in blob.chunks]
    assert all(0 < len(c) <= CHUNK_SIZE for c in chunks)
    return blob, b"".join(chunks)


def test_sha256_digest_matches_hashlib() -> None:
    assert sha256_digest(b"") == "sha256:" + hashlib.sha256(b"").hexdigest()


def test_memory_store_lists_resolves_and_describes() -> None:
    store = _store_with_two_images()
    snap = store.list()
    base = sha256_digest(BASE[1])
    assert snap.tags == {KA: sha256_digest(MANIFEST_A[1]), KB: sha256_digest(MANIFEST_B[1])}
    assert len(snap.digests) == 5  # the shared base layer once
    assert store.descriptor(base) == Descriptor(OCI_LAYER_GZIP, base, len(BASE[1]))
    assert store.resolve(KA) == sha256_digest(MANIFEST_A[1])


def test_memory_store_not_found() -> None:
    store = _store_with_two_images()
    with pytest.raises(NotFound):
        store.resolve("example.com/a:v2")
    with pytest.raises(NotFound):
        store.descriptor(dg(12345))


async def test_memory_store_open_unknown_digest_is_not_found() -> None:
    store = _store_with_two_images()
    with trio.fail_after(5), pytest.raises(NotFound):
        await store.open(sha256_digest(b"never added"))


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, None),
        (0, 0),
        (0, 1),
        (1, None),
        (100, 50),
        (CHUNK_SIZE - 1, 2),  # straddles a chunk boundary
        (CHUNK_SIZE, CHUNK_SIZE),
        (10, CHUNK_SIZE * 3),
        (255_999, None),
        (255_999, 10),  # clipped at the end
        (256_000, None),  # at the end: nothing
        (256_000, 5),
        (300_000, None),  # past the end: nothing
    ],
)
async def test_memory_store_open_range(offset: int, length: int | None) -> None:
    store = _store_with_two_images()
    data = BASE[1]
    with trio.fail_after(5):
        blob, got = await _read(store, sha256_digest(data), offset, length)
    end = len(data) if length is None else offset + length
    assert got == data[offset:end]
    assert blob.descriptor == store.descriptor(sha256_digest(data))
    assert blob.path is None


async def test_memory_store_removal_keeps_shared_blobs_readable() -> None:
    store = _store_with_two_images()
    base, own_a = sha256_digest(BASE[1]), sha256_digest(CONFIG_A[1])
    store.remove_image("a")
    with trio.fail_after(5):
        _, got = await _read(store, base)
        assert got == BASE[1]
        with pytest.raises(NotFound):
            await store.open(own_a)
    with pytest.raises(NotFound):
        store.resolve(KA)
    store.remove_image("b")
    assert store.list() == Snapshot()
    with trio.fail_after(5), pytest.raises(NotFound):
        await store.open(base)


async def test_watch_gives_the_snapshot_and_every_later_change() -> None:
    store = MemoryStore()
    store.add_image("a", _blobs(MANIFEST_A, BASE), {KA: sha256_digest(MANIFEST_A[1])})
    base = sha256_digest(BASE[1])
    with trio.fail_after(5):
        async with store.watch() as (snapshot, changes):
            assert snapshot.keys() == {sha256_digest(MANIFEST_A[1]), base, KA}

            store.add_image("b", _blobs(MANIFEST_B, BASE), {KB: sha256_digest(MANIFEST_B[1])})
            assert await changes.receive() == changed(added={sha256_digest(MANIFEST_B[1]), KB})

            store.add_image("b", _blobs(MANIFEST_B, BASE), {KB: sha256_digest(MANIFEST_B[1])})
            store.remove_image("nobody")  # neither publishes an empty change
            with pytest.raises(trio.WouldBlock):
                changes.receive_nowait()

            store.remove_image("a")
            assert await changes.receive() == changed(removed={sha256_digest(MANIFEST_A[1]), KA})
            store.remove_image("b")
            assert await changes.receive() == changed(
                removed={sha256_digest(MANIFEST_B[1]), base, KB}
            )
    # The watch is closed: later changes must not fail for want of a reader.
    store.add_image("c", _blobs(OWN_B), {})
    assert store.list().keys() == {sha256_digest(OWN_B[1])}


def _drain(keys: frozenset[str], changes: trio.MemoryReceiveChannel[KeysChanged]) -> frozenset[str]:
    while True:
        try:
            keys = apply(keys, changes.receive_nowait())
        except trio.WouldBlock:
            return keys


async def test_every_watcher_sees_every_change() -> None:
    layers = [(OCI_LAYER_GZIP, f"layer {i}".encode()) for i in range(20)]

    def churn(store: MemoryStore) -> None:
        for i, layer in enumerate(layers):
            store.add_image(f"img{i}", _blobs(layer, BASE), {f"example.com/img:{i}": dg(i)})
            if i % 3 == 0:
                store.remove_image(f"img{i // 2}")

    expected = MemoryStore()
    churn(expected)
    final = expected.list().keys()
    assert final  # the churn leaves something behind

    store = MemoryStore()
    with trio.fail_after(5):
        async with store.watch() as (first_snapshot, first):
            store.add_image("early", _blobs(OWN_B), {})
            async with store.watch() as (second_snapshot, second):
                assert second_snapshot.keys() == {sha256_digest(OWN_B[1])}
                churn(store)
                store.remove_image("early")
                await trio.lowlevel.checkpoint()
                assert _drain(second_snapshot.keys(), second) == final
            assert _drain(first_snapshot.keys(), first) == final
    assert first_snapshot == Snapshot()
    assert store.list().keys() == final
