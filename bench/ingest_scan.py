"""Cost of one scan of containerd's ingest area (store/_ingest.py), by number of ingests.

Builds synthetic ingest directories (the layout containerd's local store writes) in a
temporary directory and times ``scan_ingests``: the first scan of each ingest (reads its
``ref`` and ``total``) and later scans (one stat per known ingest).

    .venv/bin/python bench/ingest_scan.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from spegeld.store._ingest import IngestMemo, scan_ingests

REPEATS = 2000  # scans timed per row (a tenth of that for first scans)


def build(root: Path, count: int) -> None:
    (root / "ingest").mkdir()
    for i in range(count):
        ingest = root / "ingest" / f"{i:064x}"
        ingest.mkdir()
        (ingest / "ref").write_text(f"k8s.io/{i}/layer-sha256:{i:064x}")
        (ingest / "total").write_text("1000000")
        (ingest / "data").write_bytes(b"x" * 100)
        (ingest / "startedat").write_text("2026-01-01T00:00:00Z")
        (ingest / "updatedat").write_text("2026-01-01T00:00:00Z")


def main() -> None:
    for count in (0, 1, 4, 16, 64):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build(root, count)
            start = time.perf_counter()
            for _ in range(REPEATS // 10):
                scan_ingests(root, "k8s.io")
            first = (time.perf_counter() - start) / (REPEATS // 10) * 1e6
            memo: IngestMemo = {}
            scan_ingests(root, "k8s.io", memo)
            start = time.perf_counter()
            for _ in range(REPEATS):
                scan_ingests(root, "k8s.io", memo)
            later = (time.perf_counter() - start) / REPEATS * 1e6
            print(f"{count:3d} ingests: first scan {first:8.1f} us, later scans {later:8.1f} us")


if __name__ == "__main__":
    main()
