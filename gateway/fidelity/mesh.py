"""Mesh fidelity: the figures of a design mesh, computed the same way on both nodes.

The sender (factory) and the receiver (hospital) both compute :class:`MeshFigures`
from the bytes they hold and the receiver puts them into its signed receipt
(:func:`figures_as_facts`); the sender compares them with its own
(:func:`compare_facts`). The SHA-256 already proves the bytes are identical; the
figures prove that both sides *read the same geometry* from them (same parser
verdict, same triangle count, area, volume, bounding box and closedness).

Reading is strict and our own (``trimesh`` is lenient: it silently reads a PLY whose
header lies, and reports an out-of-range OBJ index as a bare IndexError): STL
:mod:`gateway.fidelity.stl`, OBJ :mod:`gateway.fidelity.mesh_readers`, PLY
:mod:`gateway.fidelity.ply`, 3MF :mod:`gateway.fidelity.threemf`.

Figures are computed by ``trimesh`` with ``process=False`` (no merging, no repair) on
the geometry as read, after one step every format needs to have a topology at all:
vertices with bit-identical coordinates are joined (an STL has no shared vertices;
joining exactly equal coordinates is what "closed" means for it). ``vertices`` is
the number of distinct positions used by triangles, ``watertight`` is trimesh's test
(every edge shared by exactly two triangles), ``volume`` is the signed
divergence-theorem volume (negative for an inside-out mesh; meaningful only when
watertight), and the bounding box is that of the vertices used by triangles.
Lengths are millimetres: STL, OBJ and PLY carry no unit and are taken as mm
(``mesh.unit`` = ``unspecified``); a 3MF's declared unit is converted to mm.

Facts are strings with fixed formatting (6 decimals, mm). Both nodes compute them
from identical bytes with the same code, so they normally match exactly;
:func:`compare_facts` still accepts a difference of one unit in the 6th decimal plus
1e-9 relative in the real-valued figures, because the two nodes are separate
installations whose numpy builds may sum in a different order. Counts, the format and
watertightness must match exactly.

The whole mesh is held in memory, about 420 bytes per triangle at the peak (measured:
a 1.3-million-triangle binary STL of 62 MiB peaks at 650 MB RSS, 3.2 s). Files above
``max_bytes`` (:data:`DEFAULT_MAX_MESH_BYTES`) are refused before reading, meshes with
more than ``max_triangles`` (:data:`DEFAULT_MAX_TRIANGLES`) before measuring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.errors import ValidationError
from gateway.fidelity.mesh_readers import MeshData, MeshFormatError, read_obj
from gateway.fidelity.ply import read_ply
from gateway.fidelity.stl import read_stl
from gateway.fidelity.threemf import read_3mf

DEFAULT_MAX_MESH_BYTES = 128 * 1024 * 1024
"""Largest mesh file read (it is read whole)."""
DEFAULT_MAX_TRIANGLES = 3_000_000
"""Most triangles measured (peak memory about 420 bytes per triangle: 1.3 GB)."""

MESH_MEDIA_TYPES: dict[str, str] = {
    "model/stl": "STL",
    "model/obj": "OBJ",
    "model/x-ply": "PLY",
    "model/3mf": "3MF",
}
"""Canonical media type → format name of the meshes this module reads."""
MEDIA_TYPE_ALIASES: dict[str, str] = {"application/ply": "model/x-ply", "model/ply": "model/x-ply"}
"""PLY has no IANA-registered type; these spellings are accepted for ``model/x-ply``."""

FACT_FORMAT = "mesh.format"
FACT_UNIT = "mesh.unit"
FACT_TRIANGLES = "mesh.triangles"
FACT_VERTICES = "mesh.vertices"
FACT_AREA = "mesh.area_mm2"
FACT_VOLUME = "mesh.volume_mm3"
FACT_BBOX_MIN = "mesh.bbox_min_mm"
FACT_BBOX_MAX = "mesh.bbox_max_mm"
FACT_WATERTIGHT = "mesh.watertight"

DECIMALS = 6
ABS_TOLERANCE = 10.0**-DECIMALS
"""One unit in the last printed place: a rounding flip between two nodes."""
REL_TOLERANCE = 1e-9
"""Relative difference accepted in real-valued figures (summation order)."""
REAL_FACTS = frozenset({FACT_AREA, FACT_VOLUME, FACT_BBOX_MIN, FACT_BBOX_MAX})
COMPARED_PREFIXES = ("design.", "mesh.", "pdf.", "step.", "json.", "csv.", "3mf.")
"""Facts of these namespaces are compared; others (e.g. ``dicom.``) are not ours."""


@dataclass(frozen=True)
class MeshFigures:
    """What both nodes compute from a mesh file (lengths in mm)."""

    format: str
    unit: str
    triangles: int
    vertices: int
    area_mm2: float
    volume_mm3: float
    bbox_min: tuple[float, float, float]
    bbox_max: tuple[float, float, float]
    watertight: bool


def canonical_media_type(media_type: str) -> str:
    """``Model/STL; x=y`` → ``model/stl`` (parameters dropped, lower case, aliases mapped)."""
    mtype = media_type.split(";", 1)[0].strip().lower()
    return MEDIA_TYPE_ALIASES.get(mtype, mtype)


def mesh_figures(
    path: Path,
    media_type: str,
    *,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESH_BYTES,
    max_triangles: int = DEFAULT_MAX_TRIANGLES,
) -> MeshFigures:
    """Read ``path`` strictly as ``media_type`` and compute its figures.

    Raises :class:`ValidationError` naming the file (``name``, default the path's
    name), the declared type and why it is not a valid file of that type.
    """
    shown = name or Path(path).name
    data = read_mesh(path, media_type, name=shown, max_bytes=max_bytes)
    triangles = triangle_count(data)
    if triangles > max_triangles:
        raise ValidationError(
            f"{shown} declared {canonical_media_type(media_type)} and has {triangles} "
            f"triangles; meshes with more than {max_triangles} are not measured (memory)"
        )
    return figures_of(data)


def read_mesh(
    path: Path,
    media_type: str,
    *,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESH_BYTES,
) -> MeshData:
    """Read ``path`` strictly as ``media_type`` (the reader of its format), lengths in mm.

    Raises :class:`ValidationError` naming the file (``name``, default the path's
    name), the declared type and why it is not a valid file of that type, or that it
    is larger than ``max_bytes``.
    """
    path = Path(path)
    shown = name or path.name
    mtype = canonical_media_type(media_type)
    fmt = MESH_MEDIA_TYPES.get(mtype)
    if fmt is None:
        raise ValidationError(
            f"{shown} declared {media_type}, which is not a mesh type "
            f"(meshes: {', '.join(sorted(MESH_MEDIA_TYPES))})"
        )
    size = path.stat().st_size
    if size > max_bytes:
        raise ValidationError(
            f"{shown} declared {mtype} but is {size} bytes; meshes larger than {max_bytes} "
            "bytes are not checked (the whole mesh is read into memory)"
        )
    try:
        if fmt == "STL":
            return read_stl(path)
        if fmt == "OBJ":
            return read_obj(path)
        if fmt == "PLY":
            return read_ply(path)
        return read_3mf(path, max_bytes)
    except MeshFormatError as exc:
        raise ValidationError(
            f"{shown} declared {mtype} but is not a valid {_what(fmt)}: {exc}"
        ) from exc


def triangle_count(data: MeshData) -> int:
    """How many triangles ``data`` holds (a soup has three corners per triangle)."""
    return len(data.vertices) // 3 if data.faces is None else len(data.faces)


def _what(fmt: str) -> str:
    return {
        "STL": "binary or ASCII STL",
        "OBJ": "Wavefront OBJ mesh",
        "PLY": "PLY mesh",
        "3MF": "3MF package",
    }[fmt]


# -- figures -------------------------------------------------------------------------


def _join_identical(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows (sorted) and each row's index among them; -0.0 equals 0.0.

    Same result as ``np.unique(points, axis=0, return_inverse=True)``, about five
    times faster (one lexsort instead of a sort of opaque row records)."""
    points = points + 0.0  # -0.0 → 0.0
    order = np.lexsort((points[:, 2], points[:, 1], points[:, 0]))
    ordered = points[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    inverse = np.empty(len(points), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def joined(data: MeshData) -> tuple[np.ndarray, np.ndarray]:
    """Distinct vertex positions used by triangles (float64, n x 3) and the triangles as
    indices into them (int64, m x 3): bit-identical positions joined, unused dropped."""
    if data.faces is None:  # a triangle soup (STL): three corners per triangle
        unique, inverse = _join_identical(np.asarray(data.vertices, dtype=np.float64))
        return unique, inverse.reshape(-1, 3)
    verts = np.asarray(data.vertices, dtype=np.float64)
    used = np.unique(data.faces)
    unique, inverse = _join_identical(verts[used])
    remap = np.empty(len(verts), dtype=np.int64)
    remap[used] = inverse
    return unique, remap[data.faces]


def figures_of(data: MeshData) -> MeshFigures:
    """Join bit-identical vertices, then measure with trimesh (process=False)."""
    unique, faces = joined(data)
    import trimesh  # imported on first use: ~0.7 s and tens of MiB a node may never need

    mesh = trimesh.Trimesh(vertices=unique, faces=faces, process=False, validate=False)
    lo = unique.min(axis=0)
    hi = unique.max(axis=0)
    return MeshFigures(
        format=data.format,
        unit=data.unit,
        triangles=len(faces),
        vertices=len(unique),
        area_mm2=float(mesh.area),
        volume_mm3=float(mesh.volume),
        bbox_min=(float(lo[0]), float(lo[1]), float(lo[2])),
        bbox_max=(float(hi[0]), float(hi[1]), float(hi[2])),
        watertight=bool(mesh.is_watertight),
    )


def _fixed(value: float) -> str:
    text = f"{value:.{DECIMALS}f}"
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


def figures_as_facts(figures: MeshFigures) -> dict[str, str]:
    """The receipt facts of ``figures``: stable strings, lengths in mm, 6 decimals."""
    return {
        FACT_FORMAT: figures.format,
        FACT_UNIT: figures.unit,
        FACT_TRIANGLES: str(figures.triangles),
        FACT_VERTICES: str(figures.vertices),
        FACT_AREA: _fixed(figures.area_mm2),
        FACT_VOLUME: _fixed(figures.volume_mm3),
        FACT_BBOX_MIN: ",".join(_fixed(v) for v in figures.bbox_min),
        FACT_BBOX_MAX: ",".join(_fixed(v) for v in figures.bbox_max),
        FACT_WATERTIGHT: "true" if figures.watertight else "false",
    }


def _close(ours: str, theirs: str) -> bool:
    try:
        a = [float(v) for v in ours.split(",")]
        b = [float(v) for v in theirs.split(",")]
    except ValueError:
        return False
    if len(a) != len(b):
        return False
    return all(
        math.isfinite(x)
        and math.isfinite(y)
        and abs(x - y) <= ABS_TOLERANCE + REL_TOLERANCE * max(abs(x), abs(y))
        for x, y in zip(a, b, strict=True)
    )


def compare_facts(ours: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """The design facts that differ, one message each (empty when they agree).

    Only facts of :data:`COMPARED_PREFIXES` are compared; a fact present on one
    side only is a difference. Strings must be equal, except the real-valued mesh
    figures (:data:`REAL_FACTS`), which may differ by :data:`ABS_TOLERANCE` +
    :data:`REL_TOLERANCE` * magnitude per value.
    """
    keys = sorted(k for k in set(ours) | set(theirs) if k.startswith(COMPARED_PREFIXES))
    problems: list[str] = []
    for key in keys:
        a, b = ours.get(key), theirs.get(key)
        if a == b:
            continue
        if a is not None and b is not None and key in REAL_FACTS and _close(a, b):
            continue
        problems.append(
            f"{key}: ours {a[:120] if a is not None else '(missing)'!s}, "
            f"theirs {b[:120] if b is not None else '(missing)'!s}"
        )
    return problems
