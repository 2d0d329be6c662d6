"""The soak's measurements and verdict: resource samples, content checks, distributions.

Definitions (also printed with the report):

* **mirror wait**: for every probe, the seconds from ``connect()`` to the status line of a
  ``HEAD`` sent to the node's own mirror, from inside the node's namespace, to the same
  address containerd uses. That is what containerd's resolver waits on its mirror before
  it gets an answer (or a refusal, and goes to the upstream). Probes alternate a miss (a
  random digest) and the manifest of the image being rolled out. Each probe is grouped by
  the faults on at the moment it started: ``kind@self`` (done to this node, or aimed at
  it), ``kind@peer`` (done to another node), ``none`` (no fault anywhere). A probe not
  answered in 30 s counts as 30 s and outcome ``timeout``.
* **pull time**: a ``ctr images pull`` from its first attempt's start to its success,
  grouped the same way by the faults that overlapped it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from _faults import Injected
from spegeld_harness import Cluster, Node

MiB = 1 << 20
HASH_CHUNK = 4 * MiB
MAX_LISTED = 15  # failed pulls listed one by one in the report (the JSON has them all)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def distribution(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": round(percentile(values, 0.5), 3),
        "p90": round(percentile(values, 0.9), 3),
        "p99": round(percentile(values, 0.99), 3),
        "max": round(max(values), 3),
    }


def groups(node: str, start: float, end: float, faults: Iterable[Injected]) -> list[str]:
    """``kind@self`` / ``kind@peer`` for every fault on during [start, end]; else none."""
    found = sorted(
        {
            f"{f.kind}@{'self' if f.node == node else 'peer'}"
            for f in faults
            if f.start <= end and f.end >= start
        }
    )
    return found or ["none"]


class Resources:
    """Peak RSS (VmHWM), open fds and threads of every spegeld incarnation, from /proc."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.peak_rss_kib: dict[str, int] = defaultdict(int)
        self.peak_fds: dict[str, int] = defaultdict(int)
        self.peak_threads: dict[str, int] = defaultdict(int)  # what systemd's TasksMax= counts
        self.last_rss_kib: dict[str, int] = {}
        self.samples = 0

    def sample(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            pid = node.spegeld.pid if node.spegeld is not None else None
            if pid is None:
                continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue  # it just exited: the exit check sees it
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            hwm = int(fields.get("VmHWM", "0 kB").split()[0])
            rss = int(fields.get("VmRSS", "0 kB").split()[0])
            threads = int(fields.get("Threads", "0").strip() or 0)
            with self.lock:
                self.peak_rss_kib[node.name] = max(self.peak_rss_kib[node.name], hwm)
                self.peak_fds[node.name] = max(self.peak_fds[node.name], fds)
                self.peak_threads[node.name] = max(self.peak_threads[node.name], threads)
                self.last_rss_kib[node.name] = rss
                self.samples += 1

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                name: {
                    "peak_rss_mib": round(self.peak_rss_kib[name] / 1024, 1),
                    "last_rss_mib": round(self.last_rss_kib.get(name, 0) / 1024, 1),
                    "peak_fds": self.peak_fds[name],
                    "peak_threads": self.peak_threads[name],
                }
                for name in sorted(self.peak_rss_kib)
            }


class ContentCheck:
    """Hash every committed blob (``blobs/sha256/<hex>``) of every node's containerd."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[tuple[str, str, int, int, int]] = set()
        self.corrupt: list[dict[str, Any]] = []
        self.verified = 0
        self.bytes = 0

    def check(self, node: Node) -> None:
        root = node.containerd.content_path / "blobs" / "sha256"
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # garbage-collected since the listing
            key = (node.name, entry.name, st.st_ino, st.st_size, st.st_mtime_ns)
            with self.lock:
                if key in self.seen:
                    continue
            digest = hashlib.sha256()
            try:
                with open(entry.path, "rb") as blob:
                    while chunk := blob.read(HASH_CHUNK):
                        digest.update(chunk)
            except FileNotFoundError:
                continue
            with self.lock:
                self.seen.add(key)
                self.verified += 1
                self.bytes += st.st_size
                if digest.hexdigest() != entry.name:
                    self.corrupt.append(
                        {
                            "node": node.name,
                            "digest": f"sha256:{entry.name}",
                            "size": st.st_size,
                            "hashes_to": digest.hexdigest(),
                        }
                    )


def final_checks(cluster: Cluster, resources: Resources, content: ContentCheck) -> dict[str, Any]:
    """The end state: each daemon's /healthz (30 s to answer 200), its error counters, the
    resource peaks, and a last hash of every blob in every content store."""
    health: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    for node in cluster.nodes:
        assert node.spegeld is not None
        deadline = time.monotonic() + 30
        status: Any = None
        while time.monotonic() < deadline:
            try:
                status = node.spegeld.get("/healthz")[0]
            except OSError as exc:
                status = f"{type(exc).__name__}: {exc}"
            if status == 200:
                break
            time.sleep(0.5)
        health[node.name] = status
        if status == 200:
            metrics[node.name] = metric_lines(node.spegeld.get("/metrics")[2].decode())
        content.check(node)
    return {
        "healthz": health,
        "counters": metrics,
        "resources": resources.summary(),
        "blobs_verified": content.verified,
        "blob_bytes_verified": content.bytes,
        "corrupt_blobs": content.corrupt,
    }


def mirror_waits(probe_files: dict[str, Path], faults: list[Injected]) -> dict[str, Any]:
    by_group: dict[str, list[float]] = defaultdict(list)
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for node, path in probe_files.items():
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                probe = json.loads(line)
            except ValueError:
                continue  # the last line, cut by the probe's SIGKILL
            t, seconds = float(probe["t"]), float(probe["s"])
            for group in groups(node, t, t, faults):
                by_group[group].append(seconds)
                outcomes[group][str(probe["o"])] += 1
    return {
        g: {**distribution(v), "outcomes": dict(outcomes[g])} for g, v in sorted(by_group.items())
    }


def pull_times(pulls: list[dict[str, Any]], faults: list[Injected]) -> dict[str, Any]:
    by_group: dict[str, list[float]] = defaultdict(list)
    for pull in pulls:
        if not pull["ok"]:
            continue
        for group in groups(pull["node"], pull["start"], pull["end"], faults):
            by_group[group].append(pull["seconds"])
    return {g: distribution(v) for g, v in sorted(by_group.items())}


def hostile_answers(faults: list[Injected]) -> dict[str, dict[str, int]]:
    """Each hostile case → how often each answer (status line, or what happened) came."""
    found: dict[str, Counter[str]] = defaultdict(Counter)
    for fault in faults:
        for case, answer in fault.detail.get("answers", {}).items():
            found[case][answer.strip()] += 1
    return {case: dict(answers) for case, answers in sorted(found.items())}


def error_lines(logs: dict[str, Path], top: int = 15) -> dict[str, Any]:
    """Error-level lines in the daemons' JSON logs, grouped by logger and message start."""
    counts: Counter[str] = Counter()
    tracebacks: dict[str, str] = {}
    for path in logs.values():
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if '"level": "error"' not in line and '"level": "critical"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            key = f"{entry.get('logger')}: {str(entry.get('msg'))[:100]}"
            counts[key] += 1
            if "error" in entry and key not in tracebacks:
                tracebacks[key] = str(entry["error"])[-1500:]
    return {
        "total": sum(counts.values()),
        "top": [
            {"count": n, "line": k, "traceback": tracebacks.get(k)}
            for k, n in counts.most_common(top)
        ],
    }


def metric_lines(text: str) -> dict[str, float]:
    """Counters worth reading after a soak: errors, bad peers, refused or aborted work."""
    words = ("error", "bad", "reject", "abort", "drop", "refus", "timeout", "invalid")
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        if any(w in name.split("{", 1)[0] for w in words):
            try:
                found[name] = float(value)
            except ValueError:
                continue
    return found


def render(summary: dict[str, Any]) -> list[str]:
    """The report, for people; the JSON summary has everything."""
    out: list[str] = []
    say = out.append
    pulls = summary["pulls"]
    retried = [p for p in pulls if p.get("retried_because")]
    say("")
    say(f"containerd {summary.get('containerd_version', '?')} on every node")
    say(
        f"pulls: {len(pulls)} ({sum(1 for p in pulls if p.get('ok'))} completed, "
        f"{len(retried)} retried after a kill on their node), {summary['rounds']} rounds, "
        f"{summary['images_rolled']} image rollouts"
    )
    for p in retried:
        say(f"  retried {p['image']} on {p['node']}: {p['retried_because']}")
    failed = [p for p in pulls if not p.get("ok")]
    for p in failed[:MAX_LISTED]:
        again = "completed" if p.get("recovered_on_retry") else "failed too"
        say(
            f"  FAILED {p['image']} on {p['node']} at {p['start']} s after {p['attempts']} "
            f"attempt(s) (a diagnostic re-pull {again}): {p.get('error', '')[-400:]}"
        )
    if failed:
        causes: Counter[str] = Counter()
        for p in failed:
            on = [
                f
                for f in summary["faults"]
                if f["start"] <= p["end"] and f["start"] + f["seconds"] >= p["start"]
            ]
            causes.update(
                {f"{f['kind']}@{'self' if f['node'] == p['node'] else 'peer'}" for f in on}
                or {"none"}
            )
        rest = len(failed) - MAX_LISTED
        say(
            f"  {'... and ' + str(rest) + ' more; ' if rest > 0 else ''}failed pulls by the "
            f"faults on during them: {dict(causes.most_common())}"
        )
    kinds: dict[str, int] = {}
    for f in summary["faults"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    say(f"faults injected: {kinds}; skipped: {len(summary['skipped_faults'])}")
    corrupted = sum(f["detail"].get("corrupted", 0) for f in summary["faults"])
    detected = sum(
        v
        for c in summary["counters"].values()
        for k, v in c.items()
        if k.startswith("spegeld_bad_peers_total")
    )
    say(
        f"responses corrupted by the proxy: {corrupted}; peers marked bad for it (counters "
        f"since each daemon's last start): {detected:.0f}"
    )
    say(
        f"blobs verified: {summary['blobs_verified']} "
        f"({summary['blob_bytes_verified'] / MiB:.0f} MiB), corrupt: {summary['corrupt_blobs']}"
    )
    for exit_ in summary["unexpected_exits"]:
        say(
            f"UNEXPECTED EXIT {exit_['node']} pid {exit_['pid']} code {exit_['code']}:\n"
            f"{exit_['log_tail']}"
        )
    say("daemons (peak RSS = VmHWM over every incarnation):")
    for name, r in summary["resources"].items():
        say(
            f"  {name}: peak RSS {r['peak_rss_mib']} MiB, last {r['last_rss_mib']} MiB, "
            f"peak fds {r['peak_fds']}, peak threads {r['peak_threads']}, "
            f"healthz {summary['healthz'].get(name)}"
        )
    say("mirror wait (s): connect() to the status line of a HEAD to the node's own mirror, from")
    say("inside its namespace (what containerd waits before an answer, a refusal or the upstream);")
    say("every 0.5 s per node, a miss and the rolling image's manifest in turn; grouped by the")
    say("faults on when the probe started (kind@self: on this node; kind@peer: on another node);")
    say("unanswered after 30 s = 30 s 'timeout'.   [count p50 p90 p99 max] outcomes:")
    for group, d in summary["mirror_wait"].items():
        say(
            f"  {group:24} {d['count']:5} {d.get('p50', '-'):>7} {d.get('p90', '-'):>7} "
            f"{d.get('p99', '-'):>7} {d.get('max', '-'):>7}  {d['outcomes']}"
        )
    say("pull time (s): ctr images pull, first attempt's start to success, grouped by the")
    say("faults that overlapped it.   [count p50 p90 max]:")
    for group, d in summary["pull_seconds"].items():
        say(
            f"  {group:24} {d['count']:5} {d.get('p50', '-'):>7} {d.get('p90', '-'):>7} "
            f"{d.get('max', '-'):>7}"
        )
    say("hostile HTTP set (answer: times):")
    for case, answers in summary["hostile_answers"].items():
        flag = "  <-- 500: an unhandled error" if any(" 500" in a[:12] for a in answers) else ""
        say(f"  {case:26} {answers}{flag}")
    say(f"daemon error-level log lines: {summary['log_errors']['total']}")
    for line in summary["log_errors"]["top"][:8]:
        say(f"  {line['count']:5} {line['line']}")
    say("")
    for name, ok in summary["verdict"].items():
        say(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return out
