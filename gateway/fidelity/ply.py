"""Strict PLY reader (``ascii``, ``binary_little_endian``, ``binary_big_endian`` 1.0).

The header must declare a ``vertex`` element with scalar ``x y z`` and a ``face``
element with a ``vertex_indices`` (or ``vertex_index``) list; other elements and
properties are read (to find where the next one starts) and ignored. The data must
have exactly what the header declares: for binary files, exactly its byte size (a
header that lies about a count is caught because the sizes no longer add up); for
ASCII, exactly one line per element with exactly the values its properties need.
Face indices must be in range; polygons are fan-triangulated. trimesh is not used to
read PLY: it reads an ASCII PLY whose header lies without complaint.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.fidelity.mesh_readers import (
    INT_RE,
    MeshData,
    MeshFormatError,
    bulk_numbers,
    parse_number,
)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_PLY_FORMATS = {"ascii": "", "binary_little_endian": "<", "binary_big_endian": ">"}
MAX_PLY_HEADER = 64 * 1024


@dataclass
class _Prop:
    name: str
    kind: str  # numpy type code
    count_kind: str | None = None  # list properties: type of the count


@dataclass
class _Element:
    name: str
    count: int
    props: list[_Prop] = field(default_factory=list)


def _ply_header(data: bytes) -> tuple[str, list[_Element], int]:
    end = data.find(b"end_header", 0, MAX_PLY_HEADER)
    if not data.startswith((b"ply\n", b"ply\r\n")) or end < 0:
        raise MeshFormatError("no 'ply' magic line or no 'end_header' in the first 64 KiB")
    stop = data.find(b"\n", end)
    if stop < 0:
        raise MeshFormatError("'end_header' is not followed by a line end")
    lines = data[:end].decode("latin-1").replace("\r", "").split("\n")[1:]
    fmt: str | None = None
    elements: list[_Element] = []
    for number, line in enumerate(lines, 2):
        parts = line.split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format" and fmt is None and len(parts) == 3:
            if parts[1] not in _PLY_FORMATS or parts[2] != "1.0":
                raise MeshFormatError(f"header line {number}: unsupported format {line[:60]!r}")
            fmt = parts[1]
        elif parts[0] == "element" and len(parts) == 3 and parts[2].isdigit():
            elements.append(_Element(parts[1], int(parts[2])))
        elif parts[0] == "property" and elements and len(parts) == 3 and parts[1] in _PLY_TYPES:
            elements[-1].props.append(_Prop(parts[2], _PLY_TYPES[parts[1]]))
        elif (
            parts[0] == "property"
            and elements
            and len(parts) == 5
            and parts[1] == "list"
            and parts[2] in _PLY_TYPES
            and parts[3] in _PLY_TYPES
            and parts[2][0] in "ciu"
        ):
            elements[-1].props.append(_Prop(parts[4], _PLY_TYPES[parts[3]], _PLY_TYPES[parts[2]]))
        else:
            raise MeshFormatError(f"header line {number} is not valid PLY: {line[:60]!r}")
    if fmt is None:
        raise MeshFormatError("the header has no 'format' line")
    return fmt, elements, stop + 1


def read_ply(path: Path) -> MeshData:
    data = path.read_bytes()
    fmt, elements, offset = _ply_header(data)
    by_name = {e.name: e for e in elements}
    vertex, face = by_name.get("vertex"), by_name.get("face")
    if vertex is None or face is None:
        raise MeshFormatError("the header declares no 'vertex' or no 'face' element")
    names = {p.name: p for p in vertex.props}
    if any(n not in names or names[n].count_kind for n in "xyz"):
        raise MeshFormatError("the 'vertex' element has no scalar x, y and z properties")
    lists = [p for p in face.props if p.name in ("vertex_indices", "vertex_index")]
    if len(lists) != 1 or lists[0].count_kind is None:
        raise MeshFormatError("the 'face' element has no 'vertex_indices' list property")
    try:
        if fmt == "ascii":
            columns = _ply_ascii(data[offset:], elements)
        else:
            columns = _ply_binary(data, offset, elements, _PLY_FORMATS[fmt])
        faces = _triangulate(columns["face"][lists[0].name], vertex.count)
    except MeshFormatError as exc:
        declared = ", ".join(f"{e.count} '{e.name}'" for e in elements)
        raise MeshFormatError(f"the data does not match the header ({declared}): {exc}") from None
    xyz = np.column_stack([np.asarray(columns["vertex"][n], dtype=np.float64) for n in "xyz"])
    if not np.isfinite(xyz).all():
        raise MeshFormatError("a vertex coordinate is not finite (NaN or infinite)")
    return MeshData(f"ply-{fmt}", "unspecified", xyz, faces)


def _triangulate(polygons: Any, n_vertices: int) -> np.ndarray:
    if isinstance(polygons, np.ndarray):  # all polygons of one size, read in one go
        k = polygons.shape[1]
        if k < 3:
            raise MeshFormatError(f"faces have {k} vertices; at least 3 are needed")
        p = polygons.astype(np.int64)
        tris = np.concatenate([p[:, [0, i, i + 1]] for i in range(1, k - 1)])
    else:
        out: list[tuple[int, int, int]] = []
        for i, poly in enumerate(polygons):
            if len(poly) < 3:
                raise MeshFormatError(f"face {i} has {len(poly)} vertices; at least 3 are needed")
            out.extend((poly[0], poly[k], poly[k + 1]) for k in range(1, len(poly) - 1))
        tris = np.asarray(out, dtype=np.int64).reshape(-1, 3)
    if len(tris) == 0:
        raise MeshFormatError("the file contains no faces")
    bad = (tris < 0) | (tris >= n_vertices)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise MeshFormatError(
            f"a face refers to vertex {int(tris[row][bad[row]][0])}, but the header declares "
            f"{n_vertices} vertices (indices 0..{n_vertices - 1})"
        )
    return tris


def _ply_ascii(body: bytes, elements: list[_Element]) -> dict[str, dict[str, Any]]:
    """Bulk pass for the common layouts; anything else or wrong: line by line."""
    text = body.decode("latin-1")
    fast = _ply_ascii_bulk(text, elements)
    return fast if fast is not None else _ply_ascii_lines(text, elements)


def _ply_ascii_bulk(text: str, elements: list[_Element]) -> dict[str, dict[str, Any]] | None:
    """Elements of all-float or all-int scalars, or of one int list, parsed by numpy."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) != sum(e.count for e in elements):
        return None
    columns: dict[str, dict[str, Any]] = {}
    start = 0
    for element in elements:
        chunk = lines[start : start + element.count]
        start += element.count
        kinds = {p.kind[0] == "f" for p in element.props}
        if len(kinds) != 1 or not chunk:
            return None
        scalar = all(p.count_kind is None for p in element.props)
        if not scalar and (len(element.props) != 1 or kinds == {True}):
            return None
        width = len(chunk[0].split())
        if any(len(line.split()) != width for line in chunk):
            return None
        if scalar and width != len(element.props):
            return None
        dtype: type = np.float64 if kinds == {True} else np.int64
        values = bulk_numbers(" ".join(chunk), width * element.count, dtype)
        if values is None:
            return None
        table = values.reshape(element.count, width)
        if scalar:
            columns[element.name] = {p.name: table[:, i] for i, p in enumerate(element.props)}
        elif (table[:, 0] == width - 1).all():
            columns[element.name] = {element.props[0].name: table[:, 1:]}
        else:
            return None
    return columns


def _ply_ascii_lines(text: str, elements: list[_Element]) -> dict[str, dict[str, Any]]:
    lines = (line for line in text.splitlines() if line.strip())
    columns: dict[str, dict[str, Any]] = {}
    for element in elements:
        values: dict[str, list[Any]] = {p.name: [] for p in element.props}
        for i in range(element.count):
            line = next(lines, None)
            if line is None:
                raise MeshFormatError(
                    f"the header declares {element.count} '{element.name}' lines, "
                    f"the data ends after {i}"
                )
            tokens, pos = line.split(), 0
            for prop in element.props:
                if prop.count_kind is None:
                    values[prop.name].append(_ascii_value(tokens, pos, prop.kind, element, i))
                    pos += 1
                else:
                    n = int(_ascii_value(tokens, pos, "i8", element, i))
                    items = [_ascii_value(tokens, pos + 1 + k, prop.kind, element, i)
                             for k in range(n)]  # fmt: skip
                    values[prop.name].append(items)
                    pos += 1 + n
            if pos != len(tokens):
                raise MeshFormatError(
                    f"'{element.name}' line {i} has {len(tokens)} values, "
                    f"the header's properties need {pos}"
                )
        columns[element.name] = values
    if next(lines, None) is not None:
        raise MeshFormatError("the data has more lines than the header declares")
    return columns


def _ascii_value(tokens: list[str], pos: int, kind: str, element: _Element, i: int) -> Any:
    if pos >= len(tokens):
        raise MeshFormatError(f"'{element.name}' line {i} has too few values")
    token = tokens[pos]
    value: float | None = parse_number(token) if kind[0] == "f" else None
    if kind[0] != "f" and INT_RE.fullmatch(token):
        return int(token)
    if value is None:
        raise MeshFormatError(f"'{element.name}' line {i}: {token[:20]!r} is not a valid value")
    return value


def _ply_binary(
    data: bytes, offset: int, elements: list[_Element], endian: str
) -> dict[str, dict[str, Any]]:
    columns: dict[str, dict[str, Any]] = {}
    for element in elements:
        lists = [p for p in element.props if p.count_kind is not None]
        if not lists:
            dtype = np.dtype([(p.name, endian + p.kind) for p in element.props])
            need = element.count * dtype.itemsize
            if offset + need > len(data):
                raise MeshFormatError(_short(element, offset, need, len(data)))
            arr = np.frombuffer(data, dtype, element.count, offset)
            columns[element.name] = {p.name: arr[p.name] for p in element.props}
            offset += need
        else:
            columns[element.name], offset = _ply_binary_lists(data, offset, element, endian)
    if offset != len(data):
        raise MeshFormatError(
            f"{len(data) - offset} bytes follow the last element the header declares"
        )
    return columns


def _short(element: _Element, offset: int, need: int, size: int) -> str:
    return (
        f"the header declares {element.count} '{element.name}' elements needing {need} bytes "
        f"from byte {offset}, but only {max(0, size - offset)} remain"
    )


def _ply_binary_lists(
    data: bytes, offset: int, element: _Element, endian: str
) -> tuple[dict[str, Any], int]:
    """Fast path when every list has the length of the first instance; else one by one."""
    if element.count == 0:
        return {p.name: [] for p in element.props}, offset
    first, pos = [], offset
    try:
        for p in element.props:
            if p.count_kind is None:
                pos += np.dtype(p.kind).itemsize
            else:
                (n,) = struct.unpack_from(endian + _STRUCT[p.count_kind], data, pos)
                first.append(n)
                pos += np.dtype(p.count_kind).itemsize + n * np.dtype(p.kind).itemsize
    except struct.error:
        raise MeshFormatError(_short(element, offset, pos - offset + 1, len(data))) from None
    fields: list[Any] = []
    lengths = iter(first)
    for p in element.props:
        if p.count_kind is None:
            fields.append((p.name, endian + p.kind))
        else:
            fields.append((p.name + "#n", endian + p.count_kind))
            fields.append((p.name, endian + p.kind, (next(lengths),)))
    dtype = np.dtype(fields)
    need = element.count * dtype.itemsize
    if element.count and offset + need <= len(data):
        arr = np.frombuffer(data, dtype, element.count, offset)
        lengths = iter(first)
        if all((arr[p.name + "#n"] == next(lengths)).all() for p in element.props if p.count_kind):
            return {p.name: arr[p.name] for p in element.props}, offset + need
    values: dict[str, list[Any]] = {p.name: [] for p in element.props}
    for _ in range(element.count):
        for p in element.props:
            try:
                if p.count_kind is None:
                    (v,) = struct.unpack_from(endian + _STRUCT[p.kind], data, offset)
                    offset += np.dtype(p.kind).itemsize
                    values[p.name].append(v)
                else:
                    (n,) = struct.unpack_from(endian + _STRUCT[p.count_kind], data, offset)
                    offset += np.dtype(p.count_kind).itemsize
                    values[p.name].append(
                        list(struct.unpack_from(f"{endian}{n}{_STRUCT[p.kind]}", data, offset))
                    )
                    offset += n * np.dtype(p.kind).itemsize
            except struct.error:
                raise MeshFormatError(
                    f"the data ends inside a '{element.name}' element; the header declares "
                    f"{element.count} of them"
                ) from None
    return values, offset


_STRUCT = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "f4": "f", "f8": "d"}
