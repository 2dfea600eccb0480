"""What the mesh readers share, and the strict Wavefront OBJ reader.

Readers: STL :mod:`gateway.fidelity.stl`, OBJ here, PLY :mod:`gateway.fidelity.ply`,
3MF :mod:`gateway.fidelity.threemf`.

Each reader returns :class:`MeshData` (vertices and triangle indices, lengths in mm)
or raises :class:`MeshFormatError` with the reason, never naming the file (the caller,
:func:`gateway.fidelity.mesh.mesh_figures`, adds the name and the declared type).
Nothing is repaired: an index out of range, a header that does not match the data, a
number that is not a finite decimal number, an unknown statement, a missing package
part, is refused with the line, element or part where it was found.

Text formats are read in two ways that accept exactly the same files: a bulk pass
(regular expressions and numpy over the whole text) for the common, well-formed
case, and, when the bulk pass sees anything unusual or wrong, a line-by-line pass
that names the line and the problem.

OBJ: ``v x y z [w | r g b [a]]``, ``f`` with ``v``, ``v/vt``, ``v//vn``, ``v/vt/vn``
references (1-based, negative = relative), polygons fan-triangulated; every other
statement of the OBJ specification is accepted and ignored (normals, texture
coordinates, groups, materials, free-form geometry, which is not measured); an
unknown statement is refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.errors import MeshFormatError


@dataclass(frozen=True)
class MeshData:
    """Geometry as read. ``faces`` None: ``vertices`` holds three corners per triangle."""

    format: str
    unit: str
    vertices: np.ndarray
    faces: np.ndarray | None


NUMBER_PATTERN = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
"""A decimal number as the text formats write it (no nan, inf, hex or underscores)."""
_NUMBER = re.compile(NUMBER_PATTERN)
INT_RE = re.compile(r"[+-]?\d+")


_NOT_NUMERIC = re.compile(r"[^0-9eE+\-. ]")


def bulk_numbers(text: str, count: int, dtype: type = np.float64) -> np.ndarray | None:
    """``count`` space-separated finite numbers parsed in C, or None.

    None means "not all of them are numbers as :func:`parse_number` accepts them":
    the caller then re-reads token by token to say where. Only digits, ``eE+-.``
    and spaces get this far (so no nan, inf, hex or underscores), and numpy's
    parser refuses what strtod cannot read whole ("1.2.3", "1e", ".", "--1").
    """
    if _NOT_NUMERIC.search(text):
        return None
    try:
        values: np.ndarray = np.fromstring(text, dtype=dtype, sep=" ")
    except ValueError:
        return None
    if values.size != count or (values.dtype.kind == "f" and not np.isfinite(values).all()):
        return None
    return values


def parse_number(token: str) -> float | None:
    """A finite decimal number, or None (no 'nan', 'inf', '1_0', hex, ...)."""
    if not _NUMBER.fullmatch(token):
        return None
    value = float(token)
    return value if math.isfinite(value) else None


# -- OBJ ------------------------------------------------------------------------------

OBJ_STATEMENTS = frozenset(
    "v vt vn vp f l p g o s mg usemtl mtllib cstype deg bmat step curv curv2 surf parm "
    "trim hole scrv sp end con bevel c_interp d_interp lod shadow_obj trace_obj ctech "
    "stech maplib usemap".split()
)


_FIRST_WORDS = re.compile(r"^[ \t]*(\S+)", re.MULTILINE)
_V_LINES = re.compile(r"^[ \t]*v[ \t]+([^\n]*)", re.MULTILINE)
_F_LINES = re.compile(r"^[ \t]*f[ \t]+([^\n]*)", re.MULTILINE)
_THREE_SLASHES = re.compile(r"/[0-9]*/[0-9]*/")
_REF_CHARS = str.maketrans("", "", "0123456789/ ")


def read_obj(path: Path) -> MeshData:
    """Bulk parse (regular expressions and numpy over the whole text) of the common
    case: 3-value ``v``, ``f`` with unsigned references, comments. Anything else, or
    anything wrong, is re-read line by line, which accepts exactly the same files and
    says where a problem is."""
    fast = _read_obj_bulk(path.read_bytes().decode("latin-1"))
    return fast if fast is not None else _read_obj_lines(path)


def _read_obj_bulk(text: str) -> MeshData | None:
    if "\\" in text or "\r" in text:
        return None
    text = re.sub(r"#[^\n]*", "", text)
    if not set(_FIRST_WORDS.findall(text)) <= OBJ_STATEMENTS:
        return None
    verts = _V_LINES.findall(text)
    if any(len(v.split()) != 3 for v in verts):
        return None
    faces = [" ".join(line.split()) for line in _F_LINES.findall(text)]
    refs = " ".join(faces)
    if not faces or refs.translate(_REF_CHARS) or _THREE_SLASHES.search(refs):
        return None
    vertices = bulk_numbers(" ".join(verts), 3 * len(verts))
    counts = np.asarray([f.count(" ") + 1 for f in faces], dtype=np.int64)
    index = bulk_numbers(re.sub(r"/\S*", "", refs), int(counts.sum()), np.int64)
    if vertices is None or index is None or counts.min() < 3 or not index.all():
        return None
    index = index - 1
    if index.min() < 0 or index.max() >= len(verts):
        return None
    return MeshData("obj", "unspecified", vertices.reshape(-1, 3), fan_triangles(index, counts))


def fan_triangles(index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Triangles (first, i, i + 1) of each polygon; ``index`` holds all polygons' vertex
    indices one after the other, ``counts`` each polygon's size (at least 3)."""
    starts = np.cumsum(counts) - counts
    per = counts - 2
    polygon = np.repeat(np.arange(len(counts)), per)
    step = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per) + 1
    first = starts[polygon]
    return np.column_stack([index[first], index[first + step], index[first + step + 1]])


def _read_obj_lines(path: Path) -> MeshData:
    vertices: list[tuple[float, float, float]] = []
    faces: list[tuple[int, int, int]] = []
    face_lines: list[int] = []
    with open(path, encoding="latin-1", newline=None) as fh:
        pending = ""
        for number, raw in enumerate(fh, 1):
            line = pending + raw.split("#", 1)[0].strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            parts = line.split()
            if not parts:
                continue
            word = parts[0]
            if word == "v":
                if len(parts) not in (4, 5, 7, 8):
                    raise MeshFormatError(
                        f"line {number}: 'v' needs 3 coordinates (plus w or a colour), "
                        f"has {len(parts) - 1} values"
                    )
                values = [parse_number(t) for t in parts[1:]]
                if any(v is None for v in values):
                    raise MeshFormatError(f"line {number}: vertex value is not a finite number")
                vertices.append((values[0], values[1], values[2]))  # type: ignore[arg-type]
            elif word == "f":
                refs = [_obj_ref(t, len(vertices), number) for t in parts[1:]]
                if len(refs) < 3:
                    raise MeshFormatError(f"line {number}: a face needs at least 3 vertices")
                for i in range(1, len(refs) - 1):
                    faces.append((refs[0], refs[i], refs[i + 1]))
                    face_lines.append(number)
            elif word not in OBJ_STATEMENTS:
                raise MeshFormatError(f"line {number}: unknown statement {word[:20]!r}")
    if not faces:
        raise MeshFormatError("the file contains no faces ('f' statements)")
    face_array = np.asarray(faces, dtype=np.int64)
    bad = face_array >= len(vertices)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise MeshFormatError(
            f"line {face_lines[row]}: face refers to vertex {int(face_array[row].max()) + 1}, "
            f"but the file defines only {len(vertices)} vertices"
        )
    return MeshData("obj", "unspecified", np.asarray(vertices, dtype=np.float64), face_array)


def _obj_ref(token: str, defined: int, number: int) -> int:
    """0-based vertex index of one face reference (``v``, ``v/vt``, ``v//vn``, ``v/vt/vn``)."""
    fields = token.split("/")
    if len(fields) > 3 or not INT_RE.fullmatch(fields[0]):
        raise MeshFormatError(f"line {number}: face reference {token[:20]!r} is malformed")
    if any(f and not INT_RE.fullmatch(f) for f in fields[1:]):
        raise MeshFormatError(f"line {number}: face reference {token[:20]!r} is malformed")
    index = int(fields[0])
    if index == 0:
        raise MeshFormatError(f"line {number}: vertex index 0 (OBJ indices start at 1)")
    if index < 0:
        if -index > defined:
            raise MeshFormatError(
                f"line {number}: relative vertex index {index} reaches before the first vertex"
            )
        return defined + index
    return index - 1
