"""Series geometry analysis: is a stack of slices complete and regular?

Pure analysis over what :func:`slice_geometry` reads from each instance (no network,
no pixel decoding). Both nodes can use it: the hospital before it confirms a study,
the factory when it checks a received study's suitability for implant design.

- :func:`slice_geometry` reads the attributes that place one slice in space, at top
  level or, for enhanced multi-frame instances, from the first frame's Per-frame and
  the Shared Functional Groups. A missing or malformed attribute becomes ``None``; it
  never raises.
- :func:`analyse_series` takes the slices of one series and reports orientation
  consistency, the slice positions along the stack normal, spacing (min / max /
  median, uniformity, gaps, an estimate of missing slices, duplicates), the distinct
  slice thicknesses, pixel spacings and matrix sizes, and the gantry tilt.

Conventions:

- ``normal`` is the unit normal of the image planes (row cosines x column cosines) of
  the dominant orientation; when no slice has a usable orientation it is the direction
  from the first to the farthest slice position (if any two positions differ).
- Positions are the projections of Image Position (Patient) on ``normal``, i.e. the
  distance between image planes, sorted ascending. Only slices of the dominant
  orientation (or, without any orientation, every slice with a position) take part.
- Positions closer than :data:`DUPLICATE_EPSILON_MM` count as duplicates and are not
  spacings. A gap is a spacing above :data:`GAP_FACTOR` x the median spacing; each gap
  is estimated to hide ``round(spacing / median) - 1`` (at least 1) slices.
- ``gantry_tilt_deg`` is the larger of the Gantry/Detector Tilt attributes (absolute)
  and the angle between the stack direction (first to last position) and ``normal``
  — a sheared stack is tilted whatever its attributes say.
- Floats in the report are rounded to 6 decimals so that reports compare and
  serialise stably.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

from pydicom.dataset import Dataset

__all__ = [
    "DUPLICATE_EPSILON_MM",
    "GAP_FACTOR",
    "ORIENTATION_TOLERANCE",
    "SeriesReport",
    "SliceGeometry",
    "analyse_series",
    "slice_geometry",
]

GAP_FACTOR = 1.5
"""A spacing above GAP_FACTOR x median spacing is a gap."""
DUPLICATE_EPSILON_MM = 1e-3
"""Slices whose positions along the normal differ by less than this are duplicates."""
ORIENTATION_TOLERANCE = 1e-3
"""Two orientations are the same when every direction cosine differs by at most this."""

Vec3 = tuple[float, float, float]
Orientation = tuple[float, float, float, float, float, float]

_PER_FRAME = 0x52009230  # Per-frame Functional Groups Sequence
_SHARED = 0x52009229  # Shared Functional Groups Sequence
_PLANE_POSITION = 0x00209113
_PLANE_ORIENTATION = 0x00209116
_PIXEL_MEASURES = 0x00289110
_CT_ACQUISITION_DETAILS = 0x00189304


@dataclass(frozen=True)
class SliceGeometry:
    """Where one slice (or the first frame of a multi-frame instance) lies in space."""

    sop_instance_uid: str
    series_uid: str
    position: Vec3 | None
    orientation: Orientation | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rows: int
    columns: int
    gantry_tilt: float | None
    instance_number: int | None


# --- reading -------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        items = list(value)
    except TypeError:
        return None
    if len(items) != count:
        return None
    numbers = [_float(v) for v in items]
    if any(n is None for n in numbers):
        return None
    return tuple(n for n in numbers if n is not None)


def _int(value: Any) -> int | None:
    number = _float(value)
    if number is None or number != int(number):
        return None
    return int(number)


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # malformed element: treat as absent
        return ""
    return "" if value is None else str(value).strip()


def _get(ds: Dataset, tag: int | str) -> Any:
    """``ds[tag].value`` or None; never raises on a malformed element."""
    try:
        if tag not in ds:
            return None
        return ds[tag].value
    except Exception:
        return None


def _macro_items(ds: Dataset, macro: int) -> list[Dataset]:
    """Items of functional-group macro ``macro``: first frame's first, then shared."""
    found: list[Dataset] = []
    for group_tag in (_PER_FRAME, _SHARED):
        groups = _get(ds, group_tag)
        if not groups:
            continue
        try:
            items = _get(groups[0], macro)
        except Exception:
            continue
        if items:
            found.extend(item for item in items if isinstance(item, Dataset))
    return found


def _attribute(ds: Dataset, keyword: str, macro: int) -> Any:
    """Top-level ``keyword``, else from functional-group macro ``macro``."""
    value = _get(ds, keyword)
    if value is not None and value != "":
        return value
    for item in _macro_items(ds, macro):
        value = _get(item, keyword)
        if value is not None and value != "":
            return value
    return None


def slice_geometry(ds: Dataset) -> SliceGeometry:
    """The geometry of ``ds`` (its first frame, for enhanced multi-frame instances)."""
    position = _floats(_attribute(ds, "ImagePositionPatient", _PLANE_POSITION), 3)
    orientation = _floats(_attribute(ds, "ImageOrientationPatient", _PLANE_ORIENTATION), 6)
    spacing = _floats(_attribute(ds, "PixelSpacing", _PIXEL_MEASURES), 2)
    # _floats returned exactly 3, 6 and 2 values (or None).
    return SliceGeometry(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        position=cast("Vec3 | None", position),
        orientation=cast("Orientation | None", orientation),
        pixel_spacing=cast("tuple[float, float] | None", spacing),
        slice_thickness=_float(_attribute(ds, "SliceThickness", _PIXEL_MEASURES)),
        rows=_int(_get(ds, "Rows")) or 0,
        columns=_int(_get(ds, "Columns")) or 0,
        gantry_tilt=_float(_attribute(ds, "GantryDetectorTilt", _CT_ACQUISITION_DETAILS)),
        instance_number=_int(_get(ds, "InstanceNumber")),
    )


# --- analysis ------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesReport:
    """The geometry of one series as a whole (see the module docstring)."""

    series_uid: str
    instance_count: int
    orientation_consistent: bool
    normal: Vec3 | None
    positions_mm: tuple[float, ...]
    spacing_min_mm: float | None
    spacing_max_mm: float | None
    spacing_median_mm: float | None
    spacing_uniform: bool
    gaps: tuple[tuple[float, float], ...]
    missing_slices_estimate: int
    duplicate_positions: int
    slice_thickness_mm: tuple[float, ...]
    pixel_spacing_mm: tuple[tuple[float, float], ...]
    gantry_tilt_deg: float
    rows_columns: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists), keys in field order."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _r(value: float) -> float:
    rounded = round(value, 6)
    return 0.0 if rounded == 0 else rounded  # no "-0.0"


def _sub(a: Vec3, b: Vec3) -> Vec3:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _dot(a: Vec3, b: Vec3) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _unit(v: Vec3) -> Vec3 | None:
    norm = math.sqrt(_dot(v, v))
    if norm < 1e-9:
        return None
    return (v[0] / norm, v[1] / norm, v[2] / norm)


def _plane_normal(o: Orientation) -> Vec3 | None:
    r, c = o[:3], o[3:]
    cross = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return _unit(cross)


def _same_orientation(a: Orientation, b: Orientation) -> bool:
    return all(abs(x - y) <= ORIENTATION_TOLERANCE for x, y in zip(a, b, strict=True))


def _orientation_groups(slices: Sequence[SliceGeometry]) -> list[list[SliceGeometry]]:
    """Slices with a usable orientation, grouped by orientation, largest group first."""
    groups: list[list[SliceGeometry]] = []
    for s in slices:
        if s.orientation is None or _plane_normal(s.orientation) is None:
            continue
        for group in groups:
            reference = group[0].orientation
            if reference is not None and _same_orientation(reference, s.orientation):
                group.append(s)
                break
        else:
            groups.append([s])
    # Stable sort: on a tie the orientation seen first wins.
    return sorted(groups, key=len, reverse=True)


def _stack_direction(points: list[Vec3]) -> Vec3 | None:
    """Direction from the first point to the one farthest from it (no orientation known)."""
    if len(points) < 2:
        return None
    first = points[0]
    farthest = max(points, key=lambda p: _dot(_sub(p, first), _sub(p, first)))
    return _unit(_sub(farthest, first))


def _distinct(values: list[Any]) -> tuple[Any, ...]:
    return tuple(sorted(set(values)))


def analyse_series(
    slices: Sequence[SliceGeometry], spacing_tolerance_mm: float = 0.05
) -> SeriesReport:
    """Analyse the slices of one series (order does not matter).

    ``spacing_tolerance_mm``: the spacing is uniform when the largest and the smallest
    spacing between consecutive distinct positions differ by at most this.
    """
    uids = Counter(s.series_uid for s in slices if s.series_uid)
    series_uid = uids.most_common(1)[0][0] if uids else ""

    groups = _orientation_groups(slices)
    orientation_consistent = bool(slices) and len(groups) == 1 and len(groups[0]) == len(slices)

    normal: Vec3 | None = None
    members: list[SliceGeometry]
    if groups:
        dominant = groups[0][0].orientation
        assert dominant is not None
        normal = _plane_normal(dominant)
        members = groups[0]
    else:
        members = list(slices)
    placed = [s.position for s in members if s.position is not None]
    if normal is None:
        normal = _stack_direction(placed)

    if normal is not None:
        projected = sorted(((_dot(p, normal), p) for p in placed), key=lambda t: t[0])
    else:  # no orientation and at most one distinct position
        projected = [(0.0, p) for p in placed]
    positions = [t[0] for t in projected]

    distinct_positions: list[float] = []
    for p in positions:
        if not distinct_positions or p - distinct_positions[-1] >= DUPLICATE_EPSILON_MM:
            distinct_positions.append(p)
    duplicates = len(positions) - len(distinct_positions)
    spacings = [cur - prev for prev, cur in itertools.pairwise(distinct_positions)]

    median = statistics.median(spacings) if spacings else None
    gaps: list[tuple[float, float]] = []
    missing = 0
    if median is not None:
        for prev, cur in itertools.pairwise(distinct_positions):
            step = cur - prev
            if step > GAP_FACTOR * median:
                gaps.append((_r(prev), _r(cur)))
                missing += max(1, round(step / median) - 1)

    if spacings:
        uniform = max(spacings) - min(spacings) <= spacing_tolerance_mm
    else:
        uniform = bool(positions)  # one distinct position: trivially uniform; none: unknown

    tilt = 0.0
    attribute_tilts = [abs(s.gantry_tilt) for s in slices if s.gantry_tilt is not None]
    if attribute_tilts:
        tilt = max(attribute_tilts)
    if normal is not None and len(projected) >= 2:
        direction = _unit(_sub(projected[-1][1], projected[0][1]))
        if direction is not None:
            cosine = min(1.0, abs(_dot(direction, normal)))
            tilt = max(tilt, math.degrees(math.acos(cosine)))

    return SeriesReport(
        series_uid=series_uid,
        instance_count=len(slices),
        orientation_consistent=orientation_consistent,
        normal=None if normal is None else (_r(normal[0]), _r(normal[1]), _r(normal[2])),
        positions_mm=tuple(_r(p) for p in positions),
        spacing_min_mm=_r(min(spacings)) if spacings else None,
        spacing_max_mm=_r(max(spacings)) if spacings else None,
        spacing_median_mm=_r(median) if median is not None else None,
        spacing_uniform=uniform,
        gaps=tuple(gaps),
        missing_slices_estimate=missing,
        duplicate_positions=duplicates,
        slice_thickness_mm=_distinct(
            [_r(s.slice_thickness) for s in slices if s.slice_thickness is not None]
        ),
        pixel_spacing_mm=_distinct(
            [(_r(s.pixel_spacing[0]), _r(s.pixel_spacing[1])) for s in slices if s.pixel_spacing]
        ),
        gantry_tilt_deg=_r(tilt),
        rows_columns=_distinct([(s.rows, s.columns) for s in slices]),
    )
