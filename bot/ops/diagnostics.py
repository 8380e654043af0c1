"""What a doctor check reports (`Check`), and the table `python -m bot doctor` prints."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warn", "FAIL", "off"]


@dataclass(frozen=True)
class Check:
    """One line of the table: FAIL is a problem (exit code 1), warn a risk, off not configured."""

    status: Status
    name: str
    detail: str
    fix: str = ""


def render(checks: Iterable[Check]) -> str:
    rows = list(checks)
    width = max([len(c.name) for c in rows] + [5])
    lines = [f"{'STATUS':<6}  {'CHECK':<{width}}  DETAIL"]
    for check in rows:
        lines.append(f"{check.status:<6}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.status in ("FAIL", "warn"):
            lines.append(f"{'':<6}  {'':<{width}}  fix: {check.fix}")
    failed = sum(c.status == "FAIL" for c in rows)
    warned = sum(c.status == "warn" for c in rows)
    if failed:
        lines.append(f"\n{failed} problem(s) to fix, {warned} warning(s).")
    else:
        lines.append(f"\nReady to run ({warned} warning(s)).")
    return "\n".join(lines) + "\n"
