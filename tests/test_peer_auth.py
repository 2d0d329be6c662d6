"""Node authentication's sans-I/O core (``spegeld.mirror._auth``): signing, every refusal
reason, key rotation, the bounded nonce memory, and malformed headers (hypothesis)."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spegeld.errors import ConfigError
from spegeld.gossip import Keyring
from spegeld.mirror import AUTH_KEY_LABEL, NonceMemory, PeerKeys, Refused, Verified, sign, verify

NOW = 1_800_000_000.0
TARGET = b"/v2/team/app/blobs/sha256:" + b"ab" * 32 + b"?ns=example.com"
KEY_1 = (1, b"\x01" * 32)
KEY_2 = (2, b"\x02" * 32)


def keys(*pairs: tuple[int, bytes], node: str = "node-a") -> PeerKeys:
    return PeerKeys(node, tuple(pairs))


def check(
    header: bytes | None,
    receiver: PeerKeys,
    *,
    now: float = NOW,
    method: bytes = b"GET",
    target: bytes = TARGET,
    nonces: NonceMemory | None = None,
) -> Verified | Refused:
    return verify(
        method, target, header, now, receiver, NonceMemory() if nonces is None else nonces
    )


def test_a_signed_request_verifies_and_names_its_sender() -> None:
    header = sign(b"GET", TARGET, NOW, keys(KEY_1, node="node-b"))
    assert header is not None and header.startswith(b"v1 key=1 node=node-b ts=1800000000 ")
    assert check(header, keys(KEY_1)) == Verified("node-b", 1)


def test_insecure_mode_signs_nothing() -> None:
    assert sign(b"GET", TARGET, NOW, keys()) is None
    assert not keys().secure


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        (b"", "malformed"),
        (b"Bearer abc", "malformed"),
        (b"v1 key=1 node=a ts=1 nonce=00 sig=00", "malformed"),
        ("v1 key=1 node=nöde".encode(), "malformed"),
        (b"x" * 600, "malformed"),
    ],
)
def test_missing_and_malformed_headers_are_refused(header: bytes | None, reason: str) -> None:
    verdict = check(header, keys(KEY_1))
    assert isinstance(verdict, Refused) and verdict.reason == reason


def test_a_key_the_receiver_does_not_hold_is_unknown_key() -> None:
    verdict = check(sign(b"GET", TARGET, NOW, keys(KEY_2)), keys(KEY_1))
    assert isinstance(verdict, Refused) and verdict.reason == "unknown_key"


def test_another_secret_under_the_same_id_is_bad_signature() -> None:
    verdict = check(sign(b"GET", TARGET, NOW, keys((1, b"\x09" * 32))), keys(KEY_1))
    assert isinstance(verdict, Refused) and verdict.reason == "bad_signature"


@pytest.mark.parametrize(
    ("method", "target"),
    [(b"HEAD", TARGET), (b"GET", TARGET.replace(b"ab", b"cd", 1)), (b"GET", TARGET + b"&x=1")],
)
def test_a_signature_covers_the_method_and_the_whole_target(method: bytes, target: bytes) -> None:
    header = sign(b"GET", TARGET, NOW, keys(KEY_1))
    verdict = check(header, keys(KEY_1), method=method, target=target)
    assert isinstance(verdict, Refused) and verdict.reason == "bad_signature"


def test_a_changed_node_name_or_time_breaks_the_signature() -> None:
    header = sign(b"GET", TARGET, NOW, keys(KEY_1))
    assert header is not None
    for forged in (header.replace(b"node=node-a", b"node=node-x"),
                   header.replace(b"ts=1800000000", b"ts=1800000001")):  # fmt: skip
        verdict = check(forged, keys(KEY_1))
        assert isinstance(verdict, Refused) and verdict.reason == "bad_signature"


@pytest.mark.parametrize(("offset", "ok"), [(-30, True), (30, True), (-31, False), (31.5, False)])
def test_the_timestamp_is_good_for_thirty_seconds_either_way(offset: float, ok: bool) -> None:
    header = sign(b"GET", TARGET, NOW + offset, keys(KEY_1))
    verdict = check(header, keys(KEY_1))
    if ok:
        assert isinstance(verdict, Verified)
    else:
        assert isinstance(verdict, Refused) and verdict.reason == "stale"


def test_a_request_is_good_once() -> None:
    memory = NonceMemory()
    header = sign(b"GET", TARGET, NOW, keys(KEY_1))
    assert isinstance(check(header, keys(KEY_1), nonces=memory), Verified)
    verdict = check(header, keys(KEY_1), now=NOW + 5, nonces=memory)
    assert isinstance(verdict, Refused) and verdict.reason == "replay"
    # Past the window it is stale, not a replay: the nonce could be forgotten safely.
    verdict = check(header, keys(KEY_1), now=NOW + 31, nonces=memory)
    assert isinstance(verdict, Refused) and verdict.reason == "stale"


def test_a_refused_request_leaves_no_nonce_behind() -> None:
    memory = NonceMemory()
    check(sign(b"GET", TARGET, NOW, keys((1, b"\x09" * 32))), keys(KEY_1), nonces=memory)
    check(sign(b"GET", TARGET, NOW - 100, keys(KEY_1)), keys(KEY_1), nonces=memory)
    assert len(memory) == 0


def test_rotation_every_key_verifies_the_first_signs() -> None:
    old, rolling, new = keys(KEY_1), keys(KEY_2, KEY_1), keys(KEY_2)
    # A node that already signs with key 2 is accepted by one that still signs with 1
    # once that one holds both, and the other way round.
    assert isinstance(check(sign(b"GET", TARGET, NOW, rolling), keys(KEY_1, KEY_2)), Verified)
    assert isinstance(check(sign(b"GET", TARGET, NOW, old), rolling), Verified)
    assert check(sign(b"GET", TARGET, NOW, rolling), new) == Verified("node-a", 2)


def test_the_keys_come_from_the_cluster_keyring_but_are_not_its_secret() -> None:
    secret = secrets.token_bytes(32)
    ring = Keyring([(3, secret), (1, secrets.token_bytes(32))], primary=3)
    derived = ring.derive(AUTH_KEY_LABEL)
    assert [key_id for key_id, _ in derived] == [3, 1]
    assert all(value != secret for _, value in derived)
    assert ring.derive(AUTH_KEY_LABEL) == derived  # every node derives the same keys
    assert Keyring.insecure().derive(AUTH_KEY_LABEL) == ()


def test_the_nonce_memory_is_bounded_and_refuses_when_full() -> None:
    memory = NonceMemory(capacity=3)
    ring = keys(KEY_1)
    for i in range(3):
        assert isinstance(check(sign(b"GET", TARGET, NOW + i, ring), ring, nonces=memory), Verified)
    # Full of live nonces: a new one is refused rather than an old one forgotten (which
    # would let that one be replayed).
    verdict = check(sign(b"GET", TARGET, NOW, ring), ring, now=NOW + 2, nonces=memory)
    assert isinstance(verdict, Refused) and verdict.reason == "replay"
    assert len(memory) == 3
    # Once the first has expired (its ts + 30 s passed), there is room again.
    later = NOW + 30.5
    assert isinstance(
        check(sign(b"GET", TARGET, later, ring), ring, now=later, nonces=memory), Verified
    )


@pytest.mark.parametrize("node", ["", "has space", "a\nb", "-lead", "x" * 254, "nöde"])
def test_a_node_name_that_cannot_travel_in_the_header_is_a_config_error(node: str) -> None:
    with pytest.raises(ConfigError, match="node name"):
        PeerKeys(node, (KEY_1,))


@given(st.binary(max_size=700))
def test_any_bytes_as_a_header_are_refused_never_raised(header: bytes) -> None:
    verdict = check(header, keys(KEY_1))
    assert isinstance(verdict, Refused)


_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120)


@given(_TEXT, _TEXT, _TEXT, _TEXT)
def test_header_shaped_garbage_is_refused(key: str, node: str, ts: str, rest: str) -> None:
    header = f"v1 key={key} node={node} ts={ts} nonce={rest} sig={rest}".encode()
    assert isinstance(check(header, keys(KEY_1)), Refused)


@given(st.integers(min_value=0), st.binary(min_size=1, max_size=1))
def test_any_one_byte_changed_in_a_signed_header_is_refused(index: int, byte: bytes) -> None:
    header = sign(b"GET", TARGET, NOW, keys(KEY_1))
    assert header is not None
    i = index % len(header)
    forged = header[:i] + byte + header[i + 1 :]
    verdict = check(forged, keys(KEY_1))
    assert isinstance(verdict, Refused) or forged == header
