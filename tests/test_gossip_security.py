"""Gossip packet security: framing, HMAC tags, key rotation, anti-replay, key files.

All of it is pure, so the tests feed bytes and counters straight in. Arbitrary
datagrams may only raise DroppedPacket, and the replay window is checked against
a plain reference model.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spegeld.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from spegeld.gossip._keyfile import MIN_FILE_SECRET_BYTES, load_credential, load_key_file
from spegeld.gossip._security import (
    DROP_REASONS,
    HEADER_SIZE,
    MAX_DATAGRAM,
    MAX_PAYLOAD,
    BadMac,
    DroppedPacket,
    Keyring,
    MalformedPacket,
    Opened,
    OversizePacket,
    ReplayWindow,
    UnknownKey,
    open_datagram,
    seal,
)

SECRET_A = bytes(range(32))
SECRET_B = bytes(range(100, 132))
RING_A = Keyring([(1, SECRET_A)])
RING_B = Keyring([(2, SECRET_B)])
INSECURE = Keyring.insecure()


def _reason(keyring: Keyring, datagram: bytes) -> str:
    with pytest.raises(DroppedPacket) as info:
        open_datagram(keyring, datagram)
    return info.value.reason


# --- framing ---------------------------------------------------------------------------------


def test_header_layout_byte_by_byte() -> None:
    payload = b"\x91\xa4node"
    datagram = seal(RING_A, 0x01020304, 0x0A0B0C0D, payload)
    assert HEADER_SIZE == 28
    assert MAX_PAYLOAD == MAX_DATAGRAM - HEADER_SIZE == 1172
    assert datagram[0:2] == b"SG"
    assert datagram[2] == 1
    assert datagram[3] == 1
    assert datagram[4:8] == b"\x01\x02\x03\x04"
    assert datagram[8:12] == b"\x0a\x0b\x0c\x0d"
    expected = hmac.new(SECRET_A, datagram[:12] + payload, hashlib.sha256).digest()[:16]
    assert datagram[12:28] == expected
    assert datagram[28:] == payload


def test_insecure_header_has_key_id_zero_and_zero_tag() -> None:
    datagram = seal(INSECURE, 7, 9, b"x")
    assert datagram[:12] == b"SG\x01\x00" + struct.pack(">II", 7, 9)
    assert datagram[12:28] == bytes(16)
    assert open_datagram(INSECURE, datagram) == Opened(0, 7, 9, b"x")


@given(
    incarnation=st.integers(0, 2**32 - 1),
    sequence=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=MAX_PAYLOAD),
)
def test_round_trip(incarnation: int, sequence: int, payload: bytes) -> None:
    for ring in (RING_A, INSECURE):
        datagram = seal(ring, incarnation, sequence, payload)
        assert len(datagram) == HEADER_SIZE + len(payload) <= MAX_DATAGRAM
        assert open_datagram(ring, datagram) == Opened(
            ring.primary_id, incarnation, sequence, payload
        )


def test_payload_of_exactly_max_payload_fits() -> None:
    datagram = seal(RING_A, 1, 1, bytes(MAX_PAYLOAD))
    assert len(datagram) == MAX_DATAGRAM
    assert open_datagram(RING_A, datagram).payload == bytes(MAX_PAYLOAD)


def test_seal_refuses_oversize_payload_and_counters_outside_u32() -> None:
    with pytest.raises(LocalProtocolError, match="MAX_PAYLOAD"):
        seal(RING_A, 1, 1, bytes(MAX_PAYLOAD + 1))
    for incarnation, sequence in [(-1, 0), (2**32, 0), (0, -1), (0, 2**32)]:
        with pytest.raises(LocalProtocolError):
            seal(RING_A, incarnation, sequence, b"")


def test_open_refuses_oversize_before_anything_else() -> None:
    datagram = seal(RING_A, 1, 1, bytes(MAX_PAYLOAD)) + b"\x00"
    assert _reason(RING_A, datagram) == "oversize"
    assert _reason(RING_A, bytes(MAX_DATAGRAM + 1)) == "oversize"
    with pytest.raises(OversizePacket):
        open_datagram(INSECURE, bytes(5000))


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"SG",
        seal(RING_A, 1, 1, b"")[:-1],  # one byte short of a header
        b"XG" + seal(RING_A, 1, 1, b"p")[2:],
        b"SG\x02" + seal(RING_A, 1, 1, b"p")[3:],
        b"SG\x00" + seal(RING_A, 1, 1, b"p")[3:],
    ],
    ids=["empty", "magic-only", "short", "bad-magic", "version-2", "version-0"],
)
def test_malformed(datagram: bytes) -> None:
    assert _reason(RING_A, datagram) == "malformed"
    assert _reason(INSECURE, datagram) == "malformed"


def test_truncating_or_extending_the_payload_breaks_the_tag() -> None:
    datagram = seal(RING_A, 3, 4, b"payload")
    assert _reason(RING_A, datagram[:-1]) == "bad_mac"
    assert _reason(RING_A, datagram + b"!") == "bad_mac"
    assert _reason(RING_A, datagram[:HEADER_SIZE]) == "bad_mac"


@given(data=st.data(), payload=st.binary(max_size=64))
def test_tampering_any_single_byte_is_caught(data: st.DataObject, payload: bytes) -> None:
    datagram = seal(RING_A, 41, 42, payload)
    position = data.draw(st.integers(0, len(datagram) - 1), label="position")
    flip = data.draw(st.integers(1, 255), label="xor")
    tampered = bytearray(datagram)
    tampered[position] ^= flip
    if position < 3:  # magic, version
        expected = "malformed"
    elif position == 3:  # key id: RING_A holds only id 1
        expected = "unknown_key"
    else:  # counters, tag, payload
        expected = "bad_mac"
    assert _reason(RING_A, bytes(tampered)) == expected


def test_tampering_a_counter_is_bad_mac_even_with_rotation_keys() -> None:
    ring = Keyring([(1, SECRET_A), (2, SECRET_B)])
    datagram = bytearray(seal(ring, 1, 1, b"hello"))
    datagram[3] = 2  # relabel as the other known key: the tag no longer matches
    assert _reason(ring, bytes(datagram)) == "bad_mac"


# --- keys ------------------------------------------------------------------------------------


def test_wrong_key() -> None:
    datagram = seal(RING_A, 1, 1, b"hi")
    assert _reason(RING_B, datagram) == "unknown_key"
    same_id_other_secret = Keyring([(1, SECRET_B)])
    assert _reason(same_id_other_secret, datagram) == "bad_mac"
    with pytest.raises(UnknownKey) as info:
        open_datagram(RING_B, datagram)
    assert info.value.key_id == 1
    with pytest.raises(BadMac):
        open_datagram(same_id_other_secret, datagram)


def test_rotation_old_and_new_accepted_primary_signs() -> None:
    old = Keyring([(1, SECRET_A)])
    step1 = Keyring([(1, SECRET_A), (2, SECRET_B)])  # new key added, old still primary
    step2 = Keyring([(2, SECRET_B), (1, SECRET_A)])  # new key primary (first by default)
    step2_explicit = Keyring([(1, SECRET_A), (2, SECRET_B)], primary=2)
    new = Keyring([(2, SECRET_B)])

    assert step1.primary_id == 1
    assert step2.primary_id == step2_explicit.primary_id == 2
    assert step1.key_ids == (1, 2)

    # Every neighbouring pair of steps understands each other in both directions.
    steps = [old, step1, step2, new]
    for a, b in itertools.pairwise(steps):
        for sender, receiver in [(a, b), (b, a)]:
            datagram = seal(sender, 5, 6, b"rotating")
            opened = open_datagram(receiver, datagram)
            assert opened.key_id == sender.primary_id
            assert opened.payload == b"rotating"
    assert seal(step2, 1, 1, b"")[3] == 2
    # Skipping a step partitions: the old-only node cannot read the new primary.
    assert _reason(old, seal(step2, 1, 1, b"")) == "unknown_key"


def test_insecure_and_secure_never_mix() -> None:
    assert INSECURE.is_insecure
    assert INSECURE.primary_id == 0
    assert INSECURE.key_ids == (0,)
    assert not RING_A.is_insecure

    with pytest.raises(UnknownKey) as info:
        open_datagram(RING_A, seal(INSECURE, 1, 1, b"lab"))
    assert info.value.key_id == 0
    with pytest.raises(UnknownKey) as info:
        open_datagram(INSECURE, seal(RING_A, 1, 1, b"prod"))
    assert info.value.key_id == 1


def test_insecure_demands_a_zero_tag() -> None:
    datagram = bytearray(seal(INSECURE, 1, 1, b"lab"))
    datagram[20] = 1
    assert _reason(INSECURE, bytes(datagram)) == "malformed"
    # Without a key nothing else is protected: altering the payload goes unnoticed.
    datagram = bytearray(seal(INSECURE, 1, 1, b"lab"))
    datagram[-1] = ord("g")
    assert open_datagram(INSECURE, bytes(datagram)).payload == b"lag"


@pytest.mark.parametrize(
    ("keys", "kwargs", "message"),
    [
        ([], {}, "at least one key"),
        ([(0, SECRET_A)], {}, "1..255"),
        ([(256, SECRET_A)], {}, "1..255"),
        ([(True, SECRET_A)], {}, "1..255"),
        ([("1", SECRET_A)], {}, "1..255"),
        ([(1, "a" * 32)], {}, "must be bytes"),
        ([(1, bytes(15))], {}, "15 bytes; need at least 16"),
        ([(1, SECRET_A), (1, SECRET_B)], {}, "appears twice"),
        ([(1, SECRET_A)], {"primary": 2}, "not in the keyring"),
    ],
)
def test_keyring_validation(
    keys: list[tuple[object, object]], kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Keyring(keys, **kwargs)  # type: ignore[arg-type]


def test_keyring_accepts_sixteen_byte_secret_and_hides_secrets() -> None:
    ring = Keyring([(9, b"s" * 16), (3, SECRET_A)])
    assert ring.key_ids == (9, 3)
    assert repr(ring) == "Keyring(key_ids=(9, 3), primary=9)"
    assert repr(INSECURE) == "Keyring.insecure()"
    assert SECRET_A.hex() not in repr(ring)


# --- never anything but DroppedPacket -------------------------------------------------------


def _near_valid() -> st.SearchStrategy[bytes]:
    """Valid-looking headers with arbitrary bodies, so fuzzing gets past the magic check."""
    return st.builds(
        lambda version, key_id, rest: b"SG" + bytes([version, key_id]) + rest,
        st.sampled_from([0, 1, 2, 255]),
        st.sampled_from([0, 1, 2, 255]),
        st.binary(max_size=MAX_DATAGRAM),
    )


@settings(max_examples=500)
@given(datagram=st.binary(max_size=MAX_DATAGRAM + 16) | _near_valid())
def test_arbitrary_bytes_only_raise_dropped_packet(datagram: bytes) -> None:
    for ring in (RING_A, Keyring([(1, SECRET_A), (2, SECRET_B)]), INSECURE):
        try:
            opened = open_datagram(ring, datagram)
        except DroppedPacket as exc:
            assert isinstance(exc, RemoteProtocolError)
            assert exc.reason in DROP_REASONS
        else:
            # Only the insecure ring accepts unsigned junk; forging a tag is out of reach.
            assert ring is INSECURE
            assert seal(INSECURE, opened.incarnation, opened.sequence, opened.payload) == datagram


def test_drop_classes_carry_their_reasons() -> None:
    assert MalformedPacket.reason == "malformed"
    assert OversizePacket.reason == "oversize"
    assert UnknownKey.reason == "unknown_key"
    assert BadMac.reason == "bad_mac"
    assert set(DROP_REASONS) == {"malformed", "oversize", "unknown_key", "bad_mac"}


# --- replay window ---------------------------------------------------------------------------


def test_replay_duplicates_and_reordering_within_the_window() -> None:
    window = ReplayWindow()
    assert window.check_and_record("a", 1, 10)
    assert not window.check_and_record("a", 1, 10)  # duplicate
    assert window.check_and_record("a", 1, 12)
    assert window.check_and_record("a", 1, 11)  # late but inside the window
    assert not window.check_and_record("a", 1, 11)
    assert not window.check_and_record("a", 1, 12)
    assert window.check_and_record("a", 1, 5)  # older than the first seen, still inside
    assert window.check_and_record("b", 1, 10)  # senders are independent


def test_replay_window_edges() -> None:
    window = ReplayWindow(window=64)
    assert window.check_and_record("a", 1, 100)
    assert window.check_and_record("a", 1, 37)  # age 63: the oldest slot
    assert not window.check_and_record("a", 1, 36)  # age 64: too old
    assert window.check_and_record("a", 1, 1000)  # a big jump clears the mask
    assert window.check_and_record("a", 1, 999)
    assert not window.check_and_record("a", 1, 100)
    assert not window.check_and_record("a", 1, 0)


def test_replay_sequence_zero_and_u32_max() -> None:
    window = ReplayWindow()
    assert window.check_and_record("a", 0, 0)
    assert not window.check_and_record("a", 0, 0)
    assert window.check_and_record("a", 0, 2**32 - 1)
    assert not window.check_and_record("a", 0, 2**32 - 1)
    assert not window.check_and_record("a", 0, 0)


def test_replay_incarnation_bump_resets_and_lower_is_rejected() -> None:
    window = ReplayWindow()
    assert window.check_and_record("a", 5, 1000)
    assert window.check_and_record("a", 6, 0)  # restarted: sequence starts over
    assert window.check_and_record("a", 6, 1)
    assert not window.check_and_record("a", 6, 0)
    assert not window.check_and_record("a", 5, 1001)  # the old incarnation is over
    assert not window.check_and_record("a", 4, 0)


def test_replay_lru_cap_and_forget() -> None:
    window = ReplayWindow(max_senders=3)
    for sender in "abc":
        assert window.check_and_record(sender, 1, 1)
    assert window.check_and_record("a", 1, 2)  # "a" is now the most recent
    assert window.check_and_record("d", 1, 1)  # evicts "b", the least recent
    assert len(window) == 3
    assert [s for s in "abcd" if s in window] == ["a", "c", "d"]
    assert window.check_and_record("b", 1, 1)  # forgotten: starts afresh
    assert "c" not in window
    window.forget("a")
    window.forget("nobody")
    assert "a" not in window
    assert window.check_and_record("a", 1, 2)


def test_rejected_packets_do_not_refresh_lru() -> None:
    window = ReplayWindow(max_senders=2)
    assert window.check_and_record("a", 2, 1)
    assert window.check_and_record("b", 1, 1)
    assert not window.check_and_record("a", 1, 1)  # stale incarnation: no refresh
    assert window.check_and_record("c", 1, 1)
    assert "a" not in window
    assert "b" in window


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"max_senders": 0}, {"window": True}])
def test_replay_window_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        ReplayWindow(**kwargs)


class _ReferenceReplay:
    """The obvious implementation: a set of every (incarnation, sequence) accepted."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.incarnation = -1
        self.highest = -1
        self.seen: set[int] = set()

    def check(self, incarnation: int, sequence: int) -> bool:
        if incarnation < self.incarnation:
            return False
        if incarnation > self.incarnation:
            self.incarnation, self.highest, self.seen = incarnation, sequence, {sequence}
            return True
        if sequence in self.seen or sequence <= self.highest - self.window:
            return False
        self.seen.add(sequence)
        self.highest = max(self.highest, sequence)
        return True


@settings(max_examples=300)
@given(
    window_size=st.sampled_from([1, 2, 8, 64, 100]),
    packets=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 200)),
        max_size=200,
    ),
)
def test_replay_window_matches_reference(window_size: int, packets: list[tuple[int, int]]) -> None:
    window = ReplayWindow(window=window_size)
    reference = _ReferenceReplay(window_size)
    for incarnation, sequence in packets:
        assert window.check_and_record("s", incarnation, sequence) == reference.check(
            incarnation, sequence
        ), (incarnation, sequence)


# --- key files -------------------------------------------------------------------------------

KEY_1 = bytes(range(1, 33))
KEY_2 = bytes(range(50, 90))  # 40 bytes
KEY_1_B64 = base64.b64encode(KEY_1).decode()
KEY_2_HEX = KEY_2.hex()


def _write(tmp_path: Path, text: str | bytes, mode: int = 0o600, name: str = "gossip.key") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    path.chmod(mode)
    return path


def _config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_key_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_key_file_with_comments_rotation_and_formats(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"# spegeld gossip keys\n\n  7:{KEY_2_HEX}  # new, primary\n1:{KEY_1_B64}\n",
    )
    ring, warnings = load_key_file(path)
    assert warnings == []
    assert ring.key_ids == (7, 1)
    assert ring.primary_id == 7
    assert open_datagram(Keyring([(7, KEY_2)]), seal(ring, 1, 1, b"x")).payload == b"x"
    assert open_datagram(ring, seal(Keyring([(1, KEY_1)]), 1, 1, b"y")).payload == b"y"


def test_key_file_bare_secret_is_key_one(tmp_path: Path) -> None:
    ring, _ = load_key_file(_write(tmp_path, f"{KEY_1_B64}\n"))
    assert ring.key_ids == (1,)
    assert open_datagram(Keyring([(1, KEY_1)]), seal(ring, 1, 1, b"z")).key_id == 1


@pytest.mark.parametrize(
    "secret",
    [
        KEY_1.hex(),
        KEY_1.hex().upper(),
        base64.b64encode(KEY_1).decode(),
        base64.b64encode(KEY_1).decode().rstrip("="),
        base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),
    ],
    ids=["hex", "HEX", "base64", "base64-unpadded", "urlsafe"],
)
def test_key_file_secret_encodings(tmp_path: Path, secret: str) -> None:
    ring, _ = load_key_file(_write(tmp_path, f"3:{secret}\n"))
    assert ring.key_ids == (3,)


def test_key_file_made_the_documented_way(tmp_path: Path) -> None:
    # (umask 077; head -c 32 /dev/urandom | base64 > gossip.key)
    secret = os.urandom(32)
    path = _write(tmp_path, base64.encodebytes(secret))
    ring, warnings = load_key_file(path)
    assert warnings == []
    assert open_datagram(Keyring([(1, secret)]), seal(ring, 1, 2, b"ok")).payload == b"ok"


def test_key_file_missing(tmp_path: Path) -> None:
    assert "does not exist" in _config_error(tmp_path / "absent.key")


def test_key_file_secret_length_floor() -> None:
    assert MIN_FILE_SECRET_BYTES == 32  # the keyring's own floor is 16


def test_key_file_is_a_directory(tmp_path: Path) -> None:
    assert "is a directory" in _config_error(tmp_path)


def test_key_file_not_regular(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in _config_error(fifo)


def test_key_file_unreadable(tmp_path: Path) -> None:
    """For real: a process without root's override capabilities meets the file's mode."""
    import subprocess
    import sys

    path = _write(tmp_path, f"{KEY_1_B64}\n", mode=0o000)
    os.chown(path, 65534, 65534)  # someone else's file, like a Secret mounted for another user
    no_dac = "-dac_override,-dac_read_search"
    code = (
        "import sys\nfrom spegeld.gossip._keyfile import load_key_file\n"
        "from spegeld.errors import ConfigError\n"
        "try:\n    load_key_file(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n"
    )
    argv = [sys.executable, "-c", code, str(path)]
    if os.geteuid() == 0:
        argv = ["setpriv", f"--bounding-set={no_dac}", f"--inh-caps={no_dac}", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert "permission denied" in result.stdout, result.stderr


def test_key_file_unreadable_as_root_is_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same branch, reachable when the suite runs as root.
    path = _write(tmp_path, f"{KEY_1_B64}\n")
    real_open = os.open

    def deny(target: object, *args: object, **kwargs: object) -> int:
        if Path(str(target)) == path:
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
    assert "permission denied" in _config_error(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "holds no key"),
        ("# only a comment\n\n   \n", "holds no key"),
        ("\xff\xfe".encode("latin-1"), "not UTF-8"),
        (f"1:{KEY_1_B64}\n{KEY_1_B64}\n", "line 2: expected <id>:<secret>"),
        (f"0:{KEY_1_B64}\n", "line 1: the key id must be a number 1..255"),
        (f"256:{KEY_1_B64}\n", "line 1: the key id must be a number 1..255"),
        (f"x:{KEY_1_B64}\n", "line 1: the key id must be a number 1..255"),
        (f":{KEY_1_B64}\n", "line 1: the key id must be a number 1..255"),
        (
            f"# c\n1:{KEY_1_B64}\n2:{KEY_2_HEX}\n1:{KEY_2_HEX}\n",
            "line 4: key id 1 is already defined on line 2",
        ),
        ("1:not*base64*at*all\n", "line 1: key 1's secret is neither hex nor base64"),
        ("1:\n", "line 1: key 1's secret is neither hex nor base64"),
        ("1:abcde\n", "line 1: key 1's secret is neither hex nor base64"),
        (f"1:{bytes(31).hex()}\n", "line 1: key 1's secret decodes to 31 bytes; need at least 32"),
        (f"{base64.b64encode(bytes(16)).decode()}\n", "key 1's secret decodes to 16 bytes"),
    ],
    ids=[
        "empty",
        "comments-only",
        "not-utf8",
        "bare-among-many",
        "id-zero",
        "id-too-big",
        "id-not-number",
        "id-missing",
        "duplicate-id",
        "bad-alphabet",
        "empty-secret",
        "bad-base64-length",
        "short-hex",
        "short-bare",
    ],
)
def test_key_file_errors(tmp_path: Path, text: str | bytes, problem: str) -> None:
    assert problem in _config_error(_write(tmp_path, text))


def test_key_file_too_large(tmp_path: Path) -> None:
    path = _write(tmp_path, "#" * (64 * 1024 + 1))
    assert "larger than" in _config_error(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o601])
def test_key_file_permission_warning(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path, f"{KEY_1_B64}\n", mode=mode)
    ring, warnings = load_key_file(path)
    assert ring.key_ids == (1,)
    assert len(warnings) == 1
    assert str(path) in warnings[0]
    assert f"{mode:04o}" in warnings[0]
    assert KEY_1_B64 not in warnings[0]


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_key_file_private_modes_draw_no_warning(tmp_path: Path, mode: int) -> None:
    _, warnings = load_key_file(_write(tmp_path, f"{KEY_1_B64}\n", mode=mode))
    assert warnings == []


def test_symlinked_key_file_is_judged_by_its_target(tmp_path: Path) -> None:
    # Kubernetes mounts Secrets as symlinks into a ..data directory.
    target = _write(tmp_path, f"{KEY_1_B64}\n", mode=0o644)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    ring, warnings = load_key_file(link)
    assert ring.key_ids == (1,)
    assert len(warnings) == 1


SECRET_TEXTS = [
    KEY_1_B64,
    KEY_1_B64.rstrip("="),
    KEY_2_HEX,
    "c2VjcmV0LXRoYXQtaXMtdG9vLXNob3J0",  # decodes to 24 bytes
    "sup3r-s3cret-typo*",
]


@pytest.mark.parametrize(
    "text",
    [
        f"1:{SECRET_TEXTS[0]}\n{SECRET_TEXTS[2]}\n",  # bare line among keys
        f"1:{SECRET_TEXTS[0]}\n1:{SECRET_TEXTS[2]}\n",  # duplicate id
        f"1:{SECRET_TEXTS[3]}\n",  # too short
        f"1:{SECRET_TEXTS[4]}\n",  # bad alphabet
        f"{SECRET_TEXTS[4]}:{SECRET_TEXTS[1]}\n",  # secret where the id goes
        f"{SECRET_TEXTS[3]}\n",  # bare and too short
    ],
)
def test_secrets_never_appear_in_messages(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text, mode=0o644)
    message = _config_error(path)
    for secret in SECRET_TEXTS:
        assert secret not in message
        assert secret[:12] not in message


def test_secrets_never_appear_in_warnings_or_reprs(tmp_path: Path) -> None:
    ring, warnings = load_key_file(_write(tmp_path, f"1:{KEY_1_B64}\n2:{KEY_2_HEX}\n", mode=0o666))
    shown = " ".join([*warnings, repr(ring), str(ring)])
    for text in (KEY_1_B64, KEY_2_HEX, KEY_1.hex(), repr(KEY_1), repr(KEY_2)):
        assert text not in shown


# --- systemd credentials ---------------------------------------------------------------------


def test_credential_read_from_credentials_directory(tmp_path: Path) -> None:
    _write(tmp_path, f"4:{KEY_1_B64}\n", mode=0o400, name="gossip-key")
    loaded = load_credential(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert loaded is not None
    ring, warnings = loaded
    assert ring.key_ids == (4,)
    assert warnings == []


def test_credential_named(tmp_path: Path) -> None:
    _write(tmp_path, f"{KEY_1_B64}\n", name="other")
    loaded = load_credential("other", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert loaded is not None
    assert loaded[0].key_ids == (1,)


def test_credential_absent_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_credential(environ={}) is None
    assert load_credential(environ={"CREDENTIALS_DIRECTORY": ""}) is None
    assert load_credential(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert load_credential() is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    _write(tmp_path, f"{KEY_1_B64}\n", name="gossip-key")
    assert load_credential() is not None


def test_credential_broken_is_config_error(tmp_path: Path) -> None:
    _write(tmp_path, "1:short\n", name="gossip-key")
    with pytest.raises(ConfigError, match="gossip-key, line 1"):
        load_credential(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})


@pytest.mark.parametrize("name", ["", ".", "..", "../etc/passwd", "a/b"])
def test_credential_name_must_be_a_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="not a plain file name"):
        load_credential(name, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
