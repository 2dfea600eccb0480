"""A design mesh as the web console's 3D viewer draws it (``static/mesh-viewer.js``).

:func:`mesh_view_json` reads a mesh file with the same strict readers and the same
limits as the receipt figures (:func:`gateway.fidelity.mesh.read_mesh`: a file that
fails its format check there fails here with the same message), joins bit-identical
vertices (:func:`gateway.fidelity.mesh.joined`) and returns a JSON-ready dict::

    {
      "positions": [x0, y0, z0, x1, ...],   # float, 3 per vertex, mm
      "indices":   [i0, j0, k0, i1, ...],   # int, 3 per triangle, 0-based into vertices
      "bbox":      [[minx, miny, minz], [maxx, maxy, maxz]],   # of positions, mm
      "format": "stl" | "obj" | "ply" | "3mf",
      "unit": "mm",
      "vertices": n, "triangles": m,
      "source_triangles": m0,   # triangles in the file
      "decimated": false        # true: simplified for display, m < m0
    }

Only ``positions``, ``indices`` and ``bbox`` are needed by the viewer; the others let it
say what it shows. Positions are rounded to float32 (what the browser's
``Float32Array`` holds) and written with the decimals float32 can carry at the mesh's
largest coordinate (7 significant digits), so the JSON holds no float64 digit noise.

Size: a mesh with more than ``max_triangles`` (:data:`DEFAULT_MAX_VIEW_TRIANGLES`) is
simplified by vertex clustering (vertices in one grid cell merged into their mean,
collapsed and repeated triangles dropped; the grid is coarsened until the mesh fits)
and marked ``decimated``: the review must then say it is not showing every triangle.
``decimate=False`` refuses it instead. A file the receipt figures would not read
(above ``max_bytes`` or :data:`~gateway.fidelity.mesh.DEFAULT_MAX_TRIANGLES`) is
refused with :class:`~gateway.errors.ValidationError`, as are files that are not
valid meshes of their declared format.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import ValidationError
from gateway.fidelity.mesh import (
    DEFAULT_MAX_MESH_BYTES,
    DEFAULT_MAX_TRIANGLES,
    MESH_MEDIA_TYPES,
    canonical_media_type,
    joined,
    read_mesh,
    triangle_count,
)

DEFAULT_MAX_VIEW_TRIANGLES = 2_000_000
"""Most triangles sent to a browser (JSON of about 40 bytes per triangle)."""

FORMAT_NAMES: dict[str, str] = {name.lower(): mtype for mtype, name in MESH_MEDIA_TYPES.items()}
"""``stl``, ``obj``, ``ply``, ``3mf`` → media type (a leading dot is also accepted)."""

FLOAT32_DIGITS = 7
"""Significant digits float32 carries (24-bit mantissa: 7.2 decimal digits)."""


def mesh_media_type(format: str) -> str:
    """The mesh media type for ``format``: a media type or a format name (``STL``, ``.obj``)."""
    name = format.strip().lower().lstrip(".")
    if name in FORMAT_NAMES:
        return FORMAT_NAMES[name]
    mtype = canonical_media_type(format)
    if mtype in MESH_MEDIA_TYPES:
        return mtype
    raise ValidationError(
        f"{format[:80]!r} is not a mesh format (meshes: {', '.join(FORMAT_NAMES)} or "
        f"{', '.join(MESH_MEDIA_TYPES)})"
    )


def mesh_view_json(
    source: Path | str | bytes,
    format: str,
    *,
    name: str | None = None,
    max_triangles: int = DEFAULT_MAX_VIEW_TRIANGLES,
    decimate: bool = True,
    max_bytes: int = DEFAULT_MAX_MESH_BYTES,
    max_read_triangles: int = DEFAULT_MAX_TRIANGLES,
) -> dict[str, Any]:
    """The viewer's dict (module docstring) of a mesh file, or ValidationError.

    ``source`` is a path or the file's bytes; ``format`` a media type (``model/stl``)
    or a format name (``stl``). ``name`` is how messages name the file (default: the
    path's name, or ``mesh`` for bytes): never pass a file name that may carry
    patient data into something that is logged.
    """
    mtype = mesh_media_type(format)
    if isinstance(source, bytes | bytearray | memoryview):
        shown = name or "mesh"
        data_bytes = bytes(source)
        if len(data_bytes) > max_bytes:
            raise ValidationError(
                f"{shown} declared {mtype} but is {len(data_bytes)} bytes; meshes larger "
                f"than {max_bytes} bytes are not read (the whole mesh is held in memory)"
            )
        if not data_bytes:
            raise ValidationError(f"{shown} declared {mtype} but is empty")
        with tempfile.TemporaryDirectory(prefix="mesh-view-") as tmp:
            path = Path(tmp) / "mesh"
            path.write_bytes(data_bytes)
            return _view(path, mtype, shown, max_triangles, decimate, max_bytes, max_read_triangles)
    path = Path(source)
    shown = name or path.name
    if path.stat().st_size == 0:
        raise ValidationError(f"{shown} declared {mtype} but is empty")
    return _view(path, mtype, shown, max_triangles, decimate, max_bytes, max_read_triangles)


def _view(
    path: Path,
    mtype: str,
    shown: str,
    max_triangles: int,
    decimate: bool,
    max_bytes: int,
    max_read_triangles: int,
) -> dict[str, Any]:
    if max_triangles < 1:
        raise ValueError("max_triangles must be at least 1")
    data = read_mesh(path, mtype, name=shown, max_bytes=max_bytes)
    source_triangles = triangle_count(data)
    if source_triangles > max_read_triangles:
        raise ValidationError(
            f"{shown} declared {mtype} and has {source_triangles} triangles; meshes with more "
            f"than {max_read_triangles} are not read for display (memory)"
        )
    vertices, faces = joined(data)
    decimated = False
    if len(faces) > max_triangles:
        if not decimate:
            raise ValidationError(
                f"{shown} has {len(faces)} triangles; at most {max_triangles} are shown "
                "(decimation was not allowed)"
            )
        vertices, faces = _cluster(vertices, faces, max_triangles)
        decimated = True
        if not len(faces):
            raise ValidationError(f"{shown}: nothing is left of it at {max_triangles} triangles")
    positions = _float32_rounded(vertices)
    lo = positions.min(axis=0)
    hi = positions.max(axis=0)
    return {
        "positions": positions.reshape(-1).tolist(),
        "indices": faces.reshape(-1).tolist(),
        "bbox": [lo.tolist(), hi.tolist()],
        "format": data.format,
        "unit": "mm",
        "vertices": len(positions),
        "triangles": len(faces),
        "source_triangles": source_triangles,
        "decimated": decimated,
    }


def _float32_rounded(vertices: np.ndarray) -> np.ndarray:
    """float32 values, as float64 rounded to the decimals float32 carries at the largest
    coordinate (so that JSON prints ``12.5``, not ``12.500000953674316``)."""
    values = vertices.astype(np.float32).astype(np.float64)
    largest = float(np.abs(values).max()) if values.size else 0.0
    if largest == 0.0:
        return values
    decimals = max(0, FLOAT32_DIGITS - 1 - math.floor(math.log10(largest)))
    rounded: np.ndarray = np.round(values, decimals) + 0.0  # -0.0 → 0.0
    return rounded


def _cluster(
    vertices: np.ndarray, faces: np.ndarray, max_triangles: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vertex-clustering simplification to at most ``max_triangles`` triangles.

    Vertices in the same cell of a cubic grid over the bounding box become one, at
    their mean; triangles that collapse (two corners in one cell) or repeat an earlier
    triangle (same three cells, any order) are dropped. A surface crosses about
    ``cells²`` cells and keeps about twice as many triangles, so the grid starts at
    ``sqrt(max_triangles / 2)`` cells along the longest side and is coarsened by 30 %
    until the result fits.
    """
    lo = vertices.min(axis=0)
    extent = float((vertices.max(axis=0) - lo).max())
    cells = max(2, int(math.sqrt(max_triangles / 2)))
    while True:
        cell = extent / cells if extent > 0 else 1.0
        grid = np.minimum(np.floor((vertices - lo) / cell).astype(np.int64), cells - 1)
        keys = (grid[:, 0] * (cells + 1) + grid[:, 1]) * (cells + 1) + grid[:, 2]
        _, cluster = np.unique(keys, return_inverse=True)
        cluster = cluster.reshape(-1)
        tri = cluster[faces]
        keep = (tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])
        tri = tri[keep]
        _, first = np.unique(np.sort(tri, axis=1), axis=0, return_index=True)
        tri = tri[np.sort(first)]
        if len(tri) <= max_triangles or cells <= 2:
            break
        cells = max(2, int(cells * 0.7))
    if len(tri) > max_triangles:  # a 2x2x2 grid keeps at most 8 choose 3 = 56 triangles
        tri = tri[:max_triangles]
    # keep only clusters still used by a triangle, renumbered 0..n-1, each at its mean
    count = int(cluster.max()) + 1
    members = np.bincount(cluster, minlength=count).astype(np.float64)
    means = (
        np.column_stack(
            [np.bincount(cluster, weights=vertices[:, axis], minlength=count) for axis in range(3)]
        )
        / members[:, None]
    )
    used = np.unique(tri)
    remap = np.empty(count, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return means[used], remap[tri]
