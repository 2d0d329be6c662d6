"""What a check says: a status, a one-line verdict, evidence and a remedy."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class CheckResult:
    check: str  # "api.tcp", "containerd.socket", ...: stable, for --json consumers
    title: str  # what a person reads in the table
    status: Status
    verdict: str  # one line
    evidence: tuple[str, ...] = ()  # addresses, timings, codes
    remedy: str = ""  # may span lines (YAML to apply, commands to run)
    seconds: float = 0.0

    def line(self) -> str:
        """One log line: the verdict, its first evidence, the remedy's first line."""
        text = f"{self.title}: {self.verdict}"
        if self.evidence:
            text += f" ({self.evidence[0]})"
        first = self.remedy.strip().splitlines()[0] if self.remedy.strip() else ""
        return f"{text}; fix: {first}" if first else text


@dataclass(frozen=True, slots=True)
class Report:
    results: tuple[CheckResult, ...] = field(default_factory=tuple)

    @property
    def exit_code(self) -> int:
        """0 when everything is ok, warn or skipped; 1 when a check failed."""
        return 1 if any(r.status is Status.FAIL for r in self.results) else 0

    def to_json(self) -> dict[str, Any]:
        counts = {s.value: sum(r.status is s for r in self.results) for s in Status}
        return {
            "ok": self.exit_code == 0,
            "summary": counts,
            "checks": [
                {**asdict(r), "status": r.status.value, "evidence": list(r.evidence)}
                for r in self.results
            ],
        }


def skipped(check: str, title: str, because: str) -> CheckResult:
    return CheckResult(check, title, Status.SKIP, because)


def first_failure(results: Sequence[CheckResult]) -> CheckResult | None:
    for wanted in (Status.FAIL, Status.WARN):
        for result in results:
            if result.status is wanted:
                return result
    return None
