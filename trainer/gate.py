"""The quality gate: a version may become LATEST only if its warp score (cleandift.warps)
is not below the live version's by more than a margin.

Scores are compared only when they were measured the same way (same images, protocol,
size, precision and layer: the report's fingerprint). The trainer holds its images, so it
re-scores the live version on them when the live report was measured otherwise (or is
missing). What still cannot be compared is let through with a warning rather than
blocked, so weights published without a score (the official ones) still go live.
`--force` lets a refused version through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleandift import registry as reg
from cleandift.warps import GATE_ALPHA, gate_score

EPSILON = 1e-9  # a score exactly at the margin passes


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str  # one line: why it was refused, what could not be compared, or the comparison
    warning: bool = False  # let through without a comparison


def _comparable(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    return (gate_score(a) is not None and gate_score(b) is not None and a is not None
            and b is not None and (a.get("fingerprint"), a.get("layer"))
            == (b.get("fingerprint"), b.get("layer")))


def check(registry: Path, name: str, candidate: dict[str, Any], margin: float,
          label: str, rescore: Callable[[str], dict[str, Any] | None] | None = None) -> Verdict:
    """May the version whose manifest is `candidate` (called `label` in messages) replace
    the live one of REGISTRY/NAME? `rescore(live)` scores the live version the candidate's
    way when their reports do not compare."""
    live = reg.latest_version(Path(registry) / name)
    if live is None or live == candidate.get("version"):
        return Verdict(True, f"{label}: no other live version to compare with")
    try:
        live_report = reg.read_manifest(Path(registry) / name / live, verify=False).get("warps")
    except reg.RegistryError:
        live_report = None
    report = candidate.get("warps")
    rescored = ""
    if rescore is not None and gate_score(report) is not None and not _comparable(
            report, live_report):
        live_report, rescored = rescore(live), " (re-scored on the same images)"
        if live_report is None:
            return Verdict(True, f"the live {live} could not be scored on {label}'s images "
                           "(the log says why): not compared", warning=True)
        if not _comparable(report, live_report):
            return Verdict(True, f"the live {live}, re-scored on {label}'s images, was still "
                           "measured otherwise (size, precision, protocol or layer): not "
                           "compared", warning=True)
    new, old = gate_score(report), gate_score(live_report)
    if new is None or old is None:
        missing = label if new is None else f"the live {live}"
        return Verdict(True, f"{missing} has no warp score (cleandift eval-warps): {label} "
                       f"is not compared with the live {live}", warning=True)
    assert report is not None and live_report is not None
    if (report.get("fingerprint"), report.get("layer")) != (
            live_report.get("fingerprint"), live_report.get("layer")):
        return Verdict(True, f"{label} and the live {live} were scored on different images, "
                       "protocol or layer: not compared", warning=True)
    figures = (f"{label}'s warp {GATE_ALPHA.upper()} on {report['layer']} is {new:.4f}, the "
               f"live {live}'s {old:.4f}{rescored}")
    if old - new > margin + EPSILON:
        return Verdict(False, f"{figures}: more than the margin {margin} below "
                       "(--force to make it LATEST anyway)")
    return Verdict(True, f"{figures}: within the margin {margin}")
