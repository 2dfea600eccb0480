"""Where inside a file patient data may hide: one reader per format.

Each reader yields ``(location, data)`` views of a file — the place named for a
person ("PDF page 2 text", "PNG text chunk #1 (tEXt)", "STL header (80 bytes)") and
the bytes found there, decompressed or decoded. The gate searches every view and, in
addition, the file's own bytes (:func:`raw_views`, streamed with overlap). Anything
that cannot be read is :class:`Unscannable`: a file that cannot be checked does not
leave. Decompressed bytes are charged to a :class:`Budget` (``outbound.max_expanded_bytes``).
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.fidelity.sniff import looks_like_dicom

log = logging.getLogger(__name__)

RAW_CHUNK = 4 * 1024 * 1024
RAW_BYTES = "the file's bytes"
DECODED_STREAM = "(decoded stream)"
BINARY_PLACES = (RAW_BYTES, DECODED_STREAM)
"""Locations whose data is binary (see IdentifierMatcher.search)."""
MAX_PDF_OBJECT_DEPTH = 32
MAX_TEXT_LINES = 2_000_000


class Unscannable(Exception):
    """A file (or part of one) cannot be read to the end; ``check`` says why."""

    def __init__(self, message: str, check: str = "unreadable") -> None:
        super().__init__(message)
        self.check = check


class Budget:
    """Decompressed bytes one check may expand (zip bombs, PDF streams, zTXt)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, n: int, where: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise Unscannable(
                f"{where} expands beyond outbound.max_expanded_bytes ({self.limit} bytes; "
                "a compression bomb?)",
                "expansion-limit",
            )


def raw_views(path: Path, overlap: int) -> Iterator[tuple[str, bytes]]:
    """The file's bytes in chunks that overlap by ``overlap`` bytes."""
    tail = b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(RAW_CHUNK)
            if not chunk:
                return
            yield RAW_BYTES, tail + chunk
            tail = chunk[-overlap:] if overlap else b""


# -- PDF ----------------------------------------------------------------------------


def pdf_views(path: Path, budget: Budget) -> Iterator[tuple[str, bytes]]:
    """Metadata, XMP, page text, every object's strings and every decoded stream."""
    from pypdf import PdfReader
    from pypdf.generic import IndirectObject, StreamObject

    try:
        reader = PdfReader(str(path), strict=False)
        if reader.is_encrypted:
            raise Unscannable("it is an encrypted PDF, which cannot be checked", "encrypted")
        for key, value in (reader.metadata or {}).items():
            yield f"PDF metadata field {_pdf_key(key)}", str(value).encode("utf-8", "replace")
        for n, page in enumerate(reader.pages, 1):
            text = page.extract_text() or ""
            budget.charge(len(text), f"PDF page {n}")
            yield f"PDF page {n} text", text.encode("utf-8", "replace")
        ids: list[tuple[int, int]] = [
            (idnum, gen) for gen, table in reader.xref.items() for idnum in table
        ]
        ids += [(idnum, 0) for idnum in getattr(reader, "xref_objStm", {})]
        for idnum, gen in sorted(set(ids)):
            obj = reader.get_object(IndirectObject(idnum, gen, reader))
            strings = b"\n".join(_pdf_strings(obj, 0))
            if strings:
                yield f"PDF object {idnum} (strings)", strings
            if isinstance(obj, StreamObject):
                data = obj.get_data()
                if looks_like_dicom(data[:132]):
                    raise Unscannable(
                        f"PDF object {idnum} is an embedded DICOM data set", "dicom"
                    )
                if "/Filter" in obj:  # an unfiltered stream is searched as the file's bytes
                    budget.charge(len(data), f"PDF object {idnum}")
                    yield f"PDF object {idnum} {DECODED_STREAM}", data
    except Unscannable:
        raise
    except Exception as exc:  # pypdf raises many kinds; each means: cannot be checked
        raise Unscannable(
            f"the PDF cannot be read to the end ({type(exc).__name__}), so it cannot be checked"
        ) from exc


def _pdf_key(key: Any) -> str:
    text = str(key)
    return text if re.fullmatch(r"/?[A-Za-z0-9_.-]{1,40}", text) else "(unnamed)"


def _pdf_strings(obj: Any, depth: int) -> Iterator[bytes]:
    from pypdf.generic import ArrayObject, ByteStringObject, DictionaryObject, TextStringObject

    if depth > MAX_PDF_OBJECT_DEPTH:
        return
    if isinstance(obj, TextStringObject):
        yield str(obj).encode("utf-8", "replace")
        yield bytes(obj.get_original_bytes())
    elif isinstance(obj, ByteStringObject):
        yield bytes(obj)
    elif isinstance(obj, DictionaryObject):
        for value in obj.values():
            yield from _pdf_strings(value, depth + 1)
    elif isinstance(obj, ArrayObject):
        for value in obj:
            yield from _pdf_strings(value, depth + 1)


# -- PNG ----------------------------------------------------------------------------

_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"iCCP"}


def png_views(path: Path, budget: Budget) -> Iterator[tuple[str, bytes]]:
    """Text chunks (tEXt, zTXt and iTXt decompressed), EXIF and the ICC profile name."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            raise Unscannable("it does not start with the PNG signature")
        n = 0
        while True:
            head = fh.read(8)
            if not head:
                raise Unscannable("the PNG ends without an IEND chunk (truncated?)")
            if len(head) < 8:
                raise Unscannable("the PNG ends inside a chunk header (truncated?)")
            length, kind = struct.unpack(">I4s", head)
            n += 1
            if kind == b"IEND":
                return
            if kind not in _PNG_TEXT:
                fh.seek(length + 4, 1)
                continue
            data = fh.read(length)
            fh.read(4)
            if len(data) != length:
                raise Unscannable(f"PNG chunk #{n} is truncated")
            where = f"PNG chunk #{n} ({kind.decode('ascii')})"
            yield where, data
            if kind in (b"zTXt", b"iCCP"):
                _, _, rest = data.partition(b"\x00")
                yield where, _inflate(rest[1:], budget, where)
            elif kind == b"iTXt":
                keyword, _, rest = data.partition(b"\x00")
                if rest[:1] == b"\x01":
                    text = rest[2:].split(b"\x00", 2)[-1]
                    yield where, keyword + b"\x00" + _inflate(text, budget, where)


def _inflate(data: bytes, budget: Budget, where: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, budget.limit - budget.used + 1)
    except zlib.error as exc:
        raise Unscannable(f"{where}: its compressed text does not inflate") from exc
    budget.charge(len(out), where)
    return out


# -- JPEG ---------------------------------------------------------------------------


def jpeg_views(path: Path) -> Iterator[tuple[str, bytes]]:
    """Every APPn segment (EXIF, XMP, ...) and every comment before the image data."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            raise Unscannable("it does not start with a JPEG SOI marker")
        while True:
            marker = fh.read(2)
            if len(marker) < 2 or marker[0] != 0xFF:
                raise Unscannable("the JPEG's segment structure is broken before the image data")
            code = marker[1]
            if code in (0xD9, 0xDA):  # end of image, start of scan: no more metadata
                return
            if 0xD0 <= code <= 0xD7 or code in (0x01, 0xFF):
                continue
            raw = fh.read(2)
            if len(raw) < 2:
                raise Unscannable("the JPEG ends inside a segment header (truncated?)")
            (length,) = struct.unpack(">H", raw)
            data = fh.read(max(0, length - 2))
            if 0xE0 <= code <= 0xEF:
                if data.startswith(b"Exif\x00"):
                    where = f"JPEG EXIF (APP{code - 0xE0})"
                elif b"ns.adobe.com/xap" in data[:64]:
                    where = f"JPEG XMP (APP{code - 0xE0})"
                else:
                    where = f"JPEG APP{code - 0xE0} segment"
                yield where, data
            elif code == 0xFE:
                yield "JPEG comment", data


# -- meshes -------------------------------------------------------------------------


def stl_views(path: Path) -> Iterator[tuple[str, bytes]]:
    """The 80-byte header of a binary STL; the solid names of an ASCII STL."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(84)
        if len(head) == 84 and size == 84 + 50 * struct.unpack("<I", head[80:84])[0]:
            yield "STL header (80 bytes)", head[:80]
            return
        fh.seek(0)
        for n, line in enumerate(fh, 1):
            stripped = line.strip().lower()
            if stripped.startswith((b"solid", b"endsolid")):
                yield f"STL solid name (line {n})", line
            if n > MAX_TEXT_LINES:
                return


def text_mesh_views(path: Path, what: str) -> Iterator[tuple[str, bytes]]:
    """OBJ comments and object/group/material names; PLY header comments."""
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            word = line.lstrip().split(b" ", 1)[0].strip().lower()
            if what == "ply":
                if word in (b"comment", b"obj_info"):
                    yield f"PLY header comment (line {n})", line
                if word == b"end_header" or n > MAX_TEXT_LINES:
                    return
            elif word.startswith(b"#"):
                yield f"OBJ comment (line {n})", line
            elif word in (b"o", b"g", b"mtllib", b"usemtl"):
                yield f"OBJ {word.decode()} name (line {n})", line
            if n > MAX_TEXT_LINES:
                return


_3MF_METADATA = re.compile(rb"<(?:\w+:)?metadata\b([^>]*)>(.*?)</(?:\w+:)?metadata>", re.S)
_3MF_NAME = re.compile(rb'name\s*=\s*"([A-Za-z0-9:_.-]{1,40})"')


def threemf_metadata_views(data: bytes, part: str) -> Iterator[tuple[str, bytes]]:
    """The ``<metadata name="...">`` values of a 3MF model part."""
    for match in _3MF_METADATA.finditer(data):
        named = _3MF_NAME.search(match.group(1))
        name = named.group(1).decode() if named else "(unnamed)"
        yield f"3MF metadata {name!r} in part {part}", match.group(2)
