"""Strict STL reader: binary by exact size, else ASCII by grammar, else refused.

Binary when the file size is exactly ``84 + 50 * count`` (count: little-endian
uint32 at bytes 80-83; a header starting with "solid" does not matter), with at
least one triangle and only finite coordinates. Otherwise ASCII when it starts with
``solid``: ``solid [name]``, then per facet ``facet normal nx ny nz``, ``outer loop``,
three ``vertex x y z``, ``endloop``, ``endfacet``, then ``endsolid [name]``; keywords
are case-insensitive, tokens may be split over lines any way, several solids may
follow each other, and nothing but whitespace may follow the last. Numbers are
decimal and finite (no nan, inf, hex). Otherwise the file is refused, with the
binary size arithmetic and, if it starts with "solid", the ASCII problem and its line.

trimesh is not used to read STL: it repairs or guesses where this refuses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gateway.fidelity.mesh_readers import MeshData, MeshFormatError, bulk_numbers, parse_number

_STL_RECORD = np.dtype([("normal", "<f4", (3,)), ("v", "<f4", (3, 3)), ("attr", "<u2")])
_SOLID = re.compile(rb"\s*solid", re.IGNORECASE)


def read_stl(path: Path) -> MeshData:
    """Binary STL if the size matches its triangle count exactly, else strict ASCII."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(84)
    looks_ascii = bool(_SOLID.match(head))
    if size >= 84:
        count = int.from_bytes(head[80:84], "little")
        needed = 84 + 50 * count
        if size == needed:
            return _read_binary_stl(path, count)
        binary_problem = (
            f"triangle count {count} in the header needs {needed} bytes, file has {size}"
        )
    else:
        binary_problem = f"a binary STL has at least 84 bytes, file has {size}"
    if not looks_ascii:
        raise MeshFormatError(binary_problem)
    try:
        return _read_ascii_stl(path)
    except MeshFormatError as exc:
        raise MeshFormatError(
            f"as ASCII STL (it starts with 'solid'): {exc}; as binary STL: {binary_problem}"
        ) from exc


def _read_binary_stl(path: Path, count: int) -> MeshData:
    if count == 0:
        raise MeshFormatError("the header declares 0 triangles")
    records = np.memmap(path, dtype=_STL_RECORD, mode="r", offset=84, shape=(count,))
    corners = np.array(records["v"], dtype=np.float32).reshape(-1, 3)
    del records
    bad = ~np.isfinite(corners).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0]) // 3
        raise MeshFormatError(f"triangle {first} has a non-finite (NaN/infinite) coordinate")
    return MeshData("stl-binary", "unspecified", corners, None)


_N = r"(\S+)"
_FACET = re.compile(
    rf"\s+facet\s+normal\s+{_N}\s+{_N}\s+{_N}\s+outer\s+loop"
    rf"\s+vertex\s+{_N}\s+{_N}\s+{_N}\s+vertex\s+{_N}\s+{_N}\s+{_N}"
    rf"\s+vertex\s+{_N}\s+{_N}\s+{_N}\s+endloop\s+endfacet(?=\s|$)",
    re.IGNORECASE,
)
_SOLID_LINE = re.compile(r"\s*solid(?=\s|$)[^\n]*", re.IGNORECASE)
_ENDSOLID_LINE = re.compile(r"\s+endsolid(?=\s|$)[^\n]*", re.IGNORECASE)


def _read_ascii_stl(path: Path) -> MeshData:
    """Fast path (one regex match per facet) for well-formed files; anything it does
    not match is re-read by the token parser, which accepts exactly the same files
    and names the line and the problem."""
    text = path.read_bytes().decode("latin-1")
    pos, groups, closed = 0, [], True
    while closed and (solid := _SOLID_LINE.match(text, pos)) is not None:
        pos = solid.end()
        while (facet := _FACET.match(text, pos)) is not None:
            groups.append(" ".join(facet.groups()))
            pos = facet.end()
        end = _ENDSOLID_LINE.match(text, pos)
        closed = end is not None
        pos = end.end() if end is not None else pos
    values = bulk_numbers(" ".join(groups), 12 * len(groups))
    if not (groups and closed) or text[pos:].strip() or values is None:
        return _read_ascii_stl_tokens(path)  # raises with the reason, or agrees
    return MeshData("stl-ascii", "unspecified", values.reshape(-1, 12)[:, 3:].reshape(-1, 3), None)


def _tokens(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, lower-cased token) for every token; a solid's name is skipped."""
    with open(path, encoding="latin-1", newline=None) as fh:
        for number, line in enumerate(fh, 1):
            for token in line.split():
                word = token.lower()
                yield number, word
                if word in {"solid", "endsolid"}:
                    break  # the rest of the line is the solid's name


def _read_ascii_stl_tokens(path: Path) -> MeshData:
    tokens = _tokens(path)
    corners: list[tuple[float, float, float]] = []
    line = 0

    def expect(word: str) -> None:
        nonlocal line
        got = next(tokens, None)
        if got is None:
            raise MeshFormatError(f"file ends after line {line}, expected '{word}'")
        line = got[0]
        if got[1] != word:
            raise MeshFormatError(f"line {line}: expected '{word}', found {got[1][:20]!r}")

    def numbers(what: str) -> tuple[float, float, float]:
        nonlocal line
        out: list[float] = []
        for _ in range(3):
            got = next(tokens, None)
            if got is None:
                raise MeshFormatError(f"file ends in the {what} on line {line}")
            line = got[0]
            value = parse_number(got[1])
            if value is None:
                raise MeshFormatError(f"line {line}: {what} value {got[1][:20]!r} is not a number")
            out.append(value)
        return out[0], out[1], out[2]

    solids = 0
    while True:
        got = next(tokens, None)
        if got is None:
            if solids == 0:
                raise MeshFormatError("no 'solid' found")
            break
        line, word = got
        if word != "solid":
            raise MeshFormatError(f"line {line}: expected 'solid' or end of file, found {word!r}")
        solids += 1
        while True:
            got = next(tokens, None)
            if got is None:
                raise MeshFormatError(f"file ends after line {line} without 'endsolid'")
            line, word = got
            if word == "endsolid":
                break
            if word != "facet":
                raise MeshFormatError(
                    f"line {line}: expected 'facet' or 'endsolid', found {word[:20]!r}"
                )
            expect("normal")
            numbers("normal")
            expect("outer")
            expect("loop")
            for _ in range(3):
                expect("vertex")
                corners.append(numbers("vertex"))
            expect("endloop")
            expect("endfacet")
    if not corners:
        raise MeshFormatError("the file contains no facets")
    return MeshData("stl-ascii", "unspecified", np.asarray(corners, dtype=np.float64), None)
