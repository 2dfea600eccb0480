"""Is a received study suitable for designing an implant from it? (standard §9.3.4)

:func:`check_study` groups a study's slices by series, analyses each series with
:func:`gateway.fidelity.series.analyse_series` and applies the thresholds of the
node's ``[suitability]`` section. A study passes when at least one of its series
passes every criterion. Each failed criterion is one finding naming the series and
the measured value against the threshold, e.g.
``series 2.25.1...: slice thickness 2.5 mm > 1.0 mm``.

:class:`SuitabilityMonitor` runs the check when a study has been quiet (no new
instance) for :data:`QUIET_SECONDS`, records each result in the factory tables and
audits it as ``fidelity.result`` (UIDs, case ids and counts only).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from factory_node.studies import ReceivedInstance, StudyStore, StudySummary, SuitabilityRecord
from gateway.audit import FIDELITY_RESULT, AuditLog
from gateway.catalog import utcnow
from gateway.config import SuitabilitySection
from gateway.errors import YigongError
from gateway.fidelity.series import (
    DUPLICATE_EPSILON_MM,
    GAP_FACTOR,
    SeriesReport,
    SliceGeometry,
    analyse_series,
)

log = logging.getLogger(__name__)

QUIET_SECONDS = 2.0
"""A study is checked when no new instance of it arrived for this long."""
TILT_TOLERANCE_DEG = 0.05
"""Tilts up to this count as none (rounding of positions and direction cosines)."""
THICKNESS_EPSILON_MM = 1e-6


@dataclass(frozen=True)
class SeriesVerdict:
    report: SeriesReport
    passed: bool
    findings: tuple[str, ...]


@dataclass(frozen=True)
class StudyVerdict:
    passed: bool
    findings: tuple[str, ...]
    series: tuple[SeriesVerdict, ...]


def thresholds_of(cfg: SuitabilitySection) -> dict[str, Any]:
    """The thresholds a check applies, as recorded with its result."""
    return {**dataclasses.asdict(cfg), "gantry_tilt_tolerance_deg": TILT_TOLERANCE_DEG}


def mm(value: float) -> str:
    """1.0 -> "1.0", 0.625 -> "0.625", 2.50 -> "2.5"."""
    text = f"{value:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _spacing_without_gaps(report: SeriesReport) -> tuple[float, float] | None:
    """(min, max) spacing between distinct positions, gaps left out."""
    positions = report.positions_mm
    steps = [b - a for a, b in itertools.pairwise(positions) if b - a >= DUPLICATE_EPSILON_MM]
    median = report.spacing_median_mm
    if median is not None:
        steps = [s for s in steps if s <= GAP_FACTOR * median]
    return (min(steps), max(steps)) if steps else None


def check_series(report: SeriesReport, cfg: SuitabilitySection) -> SeriesVerdict:
    """Apply the thresholds to one series' analysis."""
    found: list[str] = []
    if report.instance_count < cfg.min_slices:
        found.append(f"{report.instance_count} slices < minimum {cfg.min_slices}")
    if not report.slice_thickness_mm:
        found.append("slice thickness unknown (no Slice Thickness)")
    else:
        thickest = max(report.slice_thickness_mm)
        if thickest > cfg.max_slice_thickness_mm + THICKNESS_EPSILON_MM:
            found.append(f"slice thickness {mm(thickest)} mm > {mm(cfg.max_slice_thickness_mm)} mm")
    if cfg.require_single_orientation and not report.orientation_consistent:
        found.append(
            "image orientation not consistent: slices differ in or lack Image Orientation "
            "(Patient); one orientation required"
        )
    if not report.positions_mm:
        found.append("slice positions unknown (no Image Position (Patient))")
    if report.missing_slices_estimate and not cfg.allow_missing_slices:
        gaps = ", ".join(f"{mm(a)} to {mm(b)} mm" for a, b in report.gaps)
        found.append(
            f"{report.missing_slices_estimate} missing slice(s) estimated: gap(s) at {gaps} "
            f"with median spacing {mm(report.spacing_median_mm or 0.0)} mm (none allowed)"
        )
    spread = (
        _spacing_without_gaps(report)
        if cfg.allow_missing_slices
        else (
            (report.spacing_min_mm, report.spacing_max_mm)
            if report.spacing_min_mm is not None and report.spacing_max_mm is not None
            else None
        )
    )
    if spread is not None and spread[1] - spread[0] > cfg.spacing_tolerance_mm:
        found.append(
            f"slice spacing not uniform: {mm(spread[0])} to {mm(spread[1])} mm, range "
            f"{mm(spread[1] - spread[0])} mm > tolerance {mm(cfg.spacing_tolerance_mm)} mm"
        )
    if report.duplicate_positions:
        found.append(f"{report.duplicate_positions} slice(s) at a duplicate position")
    if not cfg.allow_gantry_tilt and report.gantry_tilt_deg > TILT_TOLERANCE_DEG:
        found.append(
            f"gantry tilt {report.gantry_tilt_deg:.2f} deg > {TILT_TOLERANCE_DEG} deg "
            "(no tilt allowed)"
        )
    label = report.series_uid or "(no Series Instance UID)"
    return SeriesVerdict(report, not found, tuple(f"series {label}: {f}" for f in found))


def check_study(slices: Sequence[SliceGeometry], cfg: SuitabilitySection) -> StudyVerdict:
    """Group ``slices`` by series (first seen first) and check each series."""
    by_series: dict[str, list[SliceGeometry]] = {}
    for s in slices:
        by_series.setdefault(s.series_uid, []).append(s)
    verdicts = tuple(
        check_series(analyse_series(group, cfg.spacing_tolerance_mm), cfg)
        for group in by_series.values()
    )
    if not verdicts:
        return StudyVerdict(False, ("no readable DICOM instances in the study",), ())
    findings = tuple(f for v in verdicts for f in v.findings)
    return StudyVerdict(any(v.passed for v in verdicts), findings, verdicts)


class SuitabilityMonitor:
    """Checks studies once they are quiet; records and audits every result."""

    def __init__(
        self,
        store: StudyStore,
        audit: AuditLog,
        cfg: SuitabilitySection,
        node_id: str,
        quiet_seconds: float = QUIET_SECONDS,
    ) -> None:
        self.store = store
        self.audit = audit
        self.cfg = cfg
        self.node_id = node_id
        self.quiet_seconds = quiet_seconds
        self._due: dict[tuple[str, str], float] = {}
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- scheduling -------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="factory-suitability", daemon=True
            )
            self._thread.start()

    def stop(self, flush: bool = True) -> None:
        """Stop the timer thread; with ``flush``, check what is still pending now."""
        with self._cond:
            self._stopping = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=30)
        if flush:
            with self._cond:
                keys, self._due = list(self._due), {}
            for key in keys:
                self._check_logged(*key)

    def touch(self, case_id: str, study_uid: str) -> None:
        """A new instance of the study arrived: (re)start its quiet period."""
        with self._cond:
            self._due[(case_id, study_uid)] = time.monotonic() + self.quiet_seconds
            self._cond.notify_all()

    def pending(self) -> list[tuple[str, str]]:
        with self._cond:
            return sorted(self._due)

    def _run(self) -> None:
        while True:
            due: list[tuple[str, str]] = []
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    due = [k for k, t in self._due.items() if t <= now]
                    if due:
                        for key in due:
                            del self._due[key]
                        break
                    wait = min(self._due.values(), default=now + 3600) - now
                    self._cond.wait(timeout=max(0.01, wait))
                if self._stopping:
                    return
            for key in due:
                self._check_logged(*key)

    def _check_logged(self, case_id: str, study_uid: str) -> None:
        try:
            self.check(case_id, study_uid)
        except YigongError:
            log.exception("suitability check of study %s (case %s) failed", study_uid, case_id)

    # -- checking ---------------------------------------------------------
    def is_current(self, summary: StudySummary) -> bool:
        """The latest result saw every instance and applied the configured thresholds."""
        latest = summary.latest
        return (
            summary.result_current
            and latest is not None
            and latest.thresholds == thresholds_of(self.cfg)
        )

    def evaluate(self, case_id: str, study_uid: str) -> tuple[list[ReceivedInstance], StudyVerdict]:
        """The study's instances and their verdict now (nothing recorded)."""
        instances = self.store.instances(case_id, study_uid)
        slices = [i.geometry for i in instances if i.geometry is not None]
        return instances, check_study(slices, self.cfg)

    def check(self, case_id: str, study_uid: str) -> tuple[SuitabilityRecord, StudyVerdict]:
        """Check the study now, record the result and audit it."""
        with self._run_lock:
            with self._cond:
                self._due.pop((case_id, study_uid), None)
            instances, verdict = self.evaluate(case_id, study_uid)
            record = SuitabilityRecord(
                case_id=case_id,
                study_uid=study_uid,
                checked_at=utcnow(),
                passed=verdict.passed,
                thresholds=thresholds_of(self.cfg),
                findings=verdict.findings,
                instance_count=len(instances),
                last_seq=max((i.seq for i in instances), default=0),
            )
            self.store.record_result(record)
            self.audit.record(
                FIDELITY_RESULT,
                actor=f"node:{self.node_id}",
                outcome="success" if verdict.passed else "failure",
                case_id=case_id or None,
                details={
                    "check": "suitability",
                    "study_uid": study_uid,
                    "passed": verdict.passed,
                    "instances": len(instances),
                    "series": len(verdict.series),
                    "series_passed": sum(1 for v in verdict.series if v.passed),
                    "findings": len(verdict.findings),
                },
            )
        log.info(
            "suitability of study %s (case %s): %s, %d instance(s), %d finding(s)",
            study_uid,
            case_id,
            "passed" if verdict.passed else "failed",
            len(instances),
            len(verdict.findings),
        )
        return record, verdict
