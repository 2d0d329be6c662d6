"""One HTTP byte range per request (RFC 9110 §14), as the blob endpoint needs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import OciError

# Positions may have any number of digits: RFC 9110 §14.1.2 reads a last-pos or a
# suffix-length past the end as "to the end". Each is clamped to the size (all that matters
# about it), so a long one is never converted: int() refuses strings past 4300 digits.
_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def unsatisfiable(size: int) -> OciError:
    """416, with ``Content-Range: bytes */SIZE`` as RFC 9110 §15.5.17 asks."""
    return OciError(
        416,
        "RANGE_NOT_SATISFIABLE",
        f"range not satisfiable: bytes */{size}",
        ((b"content-range", f"bytes */{size}".encode()),),
    )


def parse_range(header: bytes | None, size: int) -> ByteRange | None:
    """None for the whole blob; a ByteRange; or OciError(416) for a bad range."""
    if header is None:
        return None
    text = header.decode("latin-1").strip()
    unit, eq, spec = text.partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in spec:
        raise unsatisfiable(size)
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise unsatisfiable(size)
    first, last = match.group(1), match.group(2)
    if first is None:  # suffix: the last N bytes
        suffix = _position(match.group(3), size)
        if suffix == 0 or size == 0:
            raise unsatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = _position(first, size)
    end = _position(last, size) if last else size - 1
    if start >= size or end < start:
        raise unsatisfiable(size)
    return ByteRange(start, min(end, size - 1))


def _position(digits: str, size: int) -> int:
    """A position from the header, clamped to ``size``."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(size)):
        return size  # larger than the blob, however long
    return min(int(digits), size)


_OPEN_ENDED = re.compile(rb"\s*bytes\s*=\s*([0-9]{1,19})\s*-\s*")


def open_ended_start(range_header: bytes | None) -> int | None:
    """N for ``Range: bytes=N-`` (from N to the end), else None."""
    if range_header is None:
        return None
    match = _OPEN_ENDED.fullmatch(range_header)
    return int(match.group(1)) if match else None


def content_range_start(content_range: bytes | None) -> int:
    """The first byte a ``Content-Range: bytes A-B/T`` names; -1 if unreadable."""
    text = (content_range or b"").decode("latin-1")
    try:
        return int(text.removeprefix("bytes ").partition("-")[0])
    except ValueError:
        return -1


def answers_range(
    content_range: bytes | None, length: int, range_header: bytes, *, check_length: bool
) -> bool:
    """Whether a 206's ``Content-Range`` is exactly the range asked for (and its length)."""
    text = (content_range or b"").decode("latin-1")
    unit, _, spec = text.partition(" ")
    first, _, total = spec.partition("/")
    start, _, end = first.partition("-")
    if unit != "bytes" or not (start.isdigit() and end.isdigit() and total.isdigit()):
        return False
    if max(len(start), len(end), len(total)) > 20:  # past any real blob size
        return False
    try:
        wanted = parse_range(range_header, int(total))
    except OciError:  # the peer should have said 416
        return False
    return (
        wanted is not None
        and (int(start), int(end)) == (wanted.start, wanted.end)
        and (length == wanted.length or not check_length)
    )
