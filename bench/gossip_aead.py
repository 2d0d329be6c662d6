"""Per-datagram cost of gossip sealing: version 1's HMAC tag against version 2's AEAD choices.

``python bench/gossip_aead.py`` seals and opens one full 1172-byte payload (with a
32-byte header as associated data and a fresh ``os.urandom(12)`` nonce for the AEADs)
and prints the best per-datagram time of 5 runs of 20 000. docs/protocol.md §1 quotes it
for the choice of AES-256-GCM.
"""

from __future__ import annotations

import hmac
import os
import timeit
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV, ChaCha20Poly1305

ROUNDS = 20_000
REPEATS = 5
KEY = os.urandom(32)
PAYLOAD = os.urandom(1172)  # MAX_PAYLOAD
HEADER = os.urandom(32)


def _hmac_v1() -> None:
    tag = hmac.digest(KEY, HEADER[:12] + PAYLOAD, "sha256")[:16]
    expected = hmac.digest(KEY, HEADER[:12] + PAYLOAD, "sha256")[:16]
    hmac.compare_digest(tag, expected)


def _aead(cls: type[AESGCM] | type[ChaCha20Poly1305] | type[AESGCMSIV]) -> Callable[[], None]:
    cipher = cls(KEY)

    def seal_and_open() -> None:
        nonce = os.urandom(12)
        cipher.decrypt(nonce, cipher.encrypt(nonce, PAYLOAD, HEADER), HEADER)

    return seal_and_open


def _nonce() -> None:
    os.urandom(12)


def main() -> None:
    cases: list[tuple[str, Callable[[], None]]] = [
        ("v1 HMAC-SHA256/128", _hmac_v1),
        ("ChaCha20-Poly1305", _aead(ChaCha20Poly1305)),
        ("AES-256-GCM", _aead(AESGCM)),
        ("AES-256-GCM-SIV", _aead(AESGCMSIV)),
        ("os.urandom(12) alone", _nonce),
    ]
    for name, case in cases:
        best = min(timeit.repeat(case, number=ROUNDS, repeat=REPEATS)) / ROUNDS
        print(f"{name:22s} {best * 1e6:6.2f} µs per datagram (seal + open)")


if __name__ == "__main__":
    main()
