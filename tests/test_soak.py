"""The chaos soak's short variant, as the suite runs it: ``bench/soak.py --quick --duration 45``.

A real 4-node cluster (namespaces, containerd, spegeld, a Distribution upstream behind
tc tbf) rolls small images out while every fault kind is injected at least once: kill -9
and restart of containerd, SIGKILL and SIGSTOP of spegeld, a node cut from its peers by
nft, a peer whose responses are corrupted, garbage UDP at gossip, slowloris connections
and the hostile HTTP set. The script's JSON summary is the evidence.

It runs once with every node on containerd 1.6 and once on 2.3 (``--containerd 2.3``,
marked ``containerd2``): on 2.x the pulls go through the transfer service and blobs are
advertised as they land, so a killed containerd, a cut pull and a lying peer meet other
code. The 2.3 run found that a failed pull's blobs, GC'd without an event, were still
served (a 200 cut at its first byte) until the resync: every retry failed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from spegeld_harness import clean_leftovers

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

SOAK = Path(__file__).parents[1] / "bench" / "soak.py"
# Seconds of faults and pulls, shorter than --quick's 60 s: the quick plan spreads its 8
# faults over (duration - 25) s, so the last starts at 20.5 s and the longest (corrupt-peer,
# 20 s) ends by 40.5 s. The suite runs the soak twice (containerd 1.6 and 2.3).
SOAK_SECONDS = 45
SOAK_TIMEOUT = 480  # seconds; the quick soak takes about 60 s on 2 idle cores
CLEANUP_TIMEOUT = 120  # seconds the soak gets to tear its cluster down after SIGTERM
KINDS = {
    "containerd-kill",
    "spegeld-kill",
    "spegeld-stop",
    "link-cut",
    "corrupt-peer",
    "udp-flood",
    "slowloris",
    "hostile-http",
}


def run_soak(tmp_path: Path, containerd: str) -> tuple[int, str, dict[str, Any]]:
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(SOAK), "--quick", "--seed", "11", "--json-out", str(out),
            "--work-dir", str(tmp_path), "--containerd", containerd,
            "--duration", str(SOAK_SECONDS)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=SOAK_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the soak restores every fault and tears down
        try:
            output, _ = proc.communicate(timeout=CLEANUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            clean_leftovers()
        pytest.fail(f"the quick soak did not finish in {SOAK_TIMEOUT} s:\n{output[-6000:]}")
    assert out.exists(), f"no summary (exit {proc.returncode}):\n{output[-6000:]}"
    return proc.returncode, output, json.loads(out.read_text())


def test_the_quick_chaos_soak_keeps_every_daemon_and_every_blob_whole(
    tmp_path: Path, containerd_bin_dir: Path | None
) -> None:
    version = "1.6" if containerd_bin_dir is None else "2.3"
    code, output, summary = run_soak(tmp_path, version)
    print(output[output.find("\ncontainerd ") :])
    report = output[-8000:]
    assert summary["containerd_version"].lstrip("v").startswith(version + "."), report
    assert summary["unexpected_exits"] == [], report
    assert summary["restart_failures"] == [], report
    assert summary["corrupt_blobs"] == [], report
    assert summary["blobs_verified"] > 0
    injected = {f["kind"] for f in summary["faults"] if "error" not in f["detail"]}
    assert injected >= KINDS, f"not injected: {sorted(KINDS - injected)}\n{report}"
    corrupted = sum(f["detail"].get("corrupted", 0) for f in summary["faults"])
    assert corrupted > 0, f"the corrupting proxy relayed no response body\n{report}"
    failed = [p for p in summary["pulls"] if not p["ok"]]
    assert not failed, report
    assert summary["rounds"] >= 1 and summary["rollout_error"] is None, report
    assert all(status == 200 for status in summary["healthz"].values()), report
    assert summary["passed"] and code == 0, report
