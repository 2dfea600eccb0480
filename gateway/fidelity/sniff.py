"""What a file really is: content type detection, one module for every node.

:func:`sniff_file` reads a file's first bytes (and, for a ZIP, its directory) and
names its kind. A kind is *strong* when the bytes decide it (magic numbers, the
binary STL size rule, ``ISO-10303-21;``, ``ply``); *weak* when it is only a
plausible reading of text (``solid`` for ASCII STL, ``{`` for JSON, OBJ
statements).

:func:`resolve_media_type` is what :meth:`gateway.exchange.Exchange.submit` uses on
every node: an upload without a media type (or ``application/octet-stream``) gets the
type its content shows, else the one its file extension names (so a design file
sent without ``--media-type`` is format-checked as what it is); a declared type or an
extension the content contradicts is refused (:class:`~gateway.errors.ValidationError`).
The hospital's outbound gate (:mod:`hospital_node.outbound`) uses the same detection.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gateway.errors import ValidationError
from gateway.fidelity.dicom_raw import VR_BYTES, element_header
from gateway.fidelity.mesh import canonical_media_type

OCTET_STREAM = "application/octet-stream"
HEAD_BYTES = 4096

KIND_MEDIA_TYPES: dict[str, str] = {
    "dicom": "application/dicom",
    "pdf": "application/pdf",
    "png": "image/png",
    "jpeg": "image/jpeg",
    "zip": "application/zip",
    "3mf": "model/3mf",
    "gzip": "application/gzip",
    "tar": "application/x-tar",
    "7z": "application/x-7z-compressed",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "stl": "model/stl",
    "ply": "model/x-ply",
    "step": "model/step",
    "obj": "model/obj",
    "json": "application/json",
    "csv": "text/csv",
}
"""Kind → canonical media type."""

EXTENSION_MEDIA_TYPES: dict[str, str] = {
    ".pdf": "application/pdf",
    ".stl": "model/stl",
    ".3mf": "model/3mf",
    ".obj": "model/obj",
    ".ply": "model/x-ply",
    ".step": "model/step",
    ".stp": "model/step",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".json": "application/json",
    ".csv": "text/csv",
    ".dcm": "application/dicom",
    ".dicom": "application/dicom",
    ".zip": "application/zip",
    ".tar": "application/x-tar",
    ".gz": "application/gzip",
    ".tgz": "application/gzip",
    ".7z": "application/x-7z-compressed",
    ".bz2": "application/x-bzip2",
    ".xz": "application/x-xz",
}

_ALIASES = {
    "application/x-zip-compressed": "application/zip",
    "application/x-gzip": "application/gzip",
    "image/jpg": "image/jpeg",
    "application/x-tar": "application/x-tar",
    "application/vnd.ms-package.3dmanufacturing-3dmodel+xml": "model/3mf",
}

_DATASET_GROUPS = (0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028)


@dataclass(frozen=True)
class Sniffed:
    kind: str  # a key of KIND_MEDIA_TYPES, or "" when unknown
    strong: bool

    @property
    def media_type(self) -> str:
        return KIND_MEDIA_TYPES.get(self.kind, "")


UNKNOWN = Sniffed("", False)


def canonical(media_type: str) -> str:
    """Lower case, parameters dropped, known aliases folded."""
    mtype = canonical_media_type(media_type or "")
    return _ALIASES.get(mtype, mtype)


def looks_like_dicom(head: bytes) -> bool:
    """Whether the first bytes of an object are DICOM (Part 10, or a bare data set)."""
    if head[128:132] == b"DICM" or head[:4] == b"DICM":
        return True
    if len(head) < 8:
        return False
    # the tag and the 4-byte length of an implicit VR element (the VR bytes looked at apart)
    tag, _vr, length, _start = element_header(head, 0, len(head), implicit=True)
    group, element = tag >> 16, tag & 0xFFFF
    if group in _DATASET_GROUPS and head[4:6] in VR_BYTES:
        return True  # explicit VR little endian data set (or meta) without a preamble
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    return length < 0x400


def sniff_bytes(head: bytes, size: int) -> Sniffed:
    """The kind shown by the first bytes of a file of ``size`` bytes (no ZIP look-inside)."""
    if size == 0 or not head:
        return UNKNOWN
    if looks_like_dicom(head):
        return Sniffed("dicom", True)
    for magic, kind in (
        (b"%PDF-", "pdf"),
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff", "jpeg"),
        (b"PK\x03\x04", "zip"),
        (b"PK\x05\x06", "zip"),
        (b"\x1f\x8b", "gzip"),
        (b"7z\xbc\xaf\x27\x1c", "7z"),
        (b"BZh", "bzip2"),
        (b"\xfd7zXZ\x00", "xz"),
    ):
        if head.startswith(magic):
            return Sniffed(kind, True)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return Sniffed("tar", True)
    if size >= 84 and len(head) >= 84:
        (count,) = struct.unpack("<I", head[80:84])
        if size == 84 + 50 * count:
            return Sniffed("stl", True)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"ply\n", b"ply\r\n")):
        return Sniffed("ply", True)
    if text.startswith(b"ISO-10303-21;"):
        return Sniffed("step", True)
    if text[:5].lower() == b"solid" and text[5:6] in (b" ", b"\n", b"\r", b"\t", b""):
        return Sniffed("stl", False)
    if text.startswith((b"{", b"[")):
        return Sniffed("json", False)
    if text.startswith((b"v ", b"vn ", b"vt ", b"o ", b"g ", b"mtllib ", b"#")):
        if b"\nv " in b"\n" + text or b"\nf " in text:
            return Sniffed("obj", False)
    return UNKNOWN


def sniff_file(path: Path) -> Sniffed:
    """The kind of the file at ``path``; a ZIP holding a 3MF model is ``3mf``."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    found = sniff_bytes(head, size)
    if found.kind == "zip" and _is_3mf(path):
        return Sniffed("3mf", True)
    return found


def _is_3mf(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.lower() for n in zf.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    return "[content_types].xml" in names and any(
        n.startswith("3d/") and n.endswith(".model") for n in names
    )


def media_type_for_name(name: str) -> str:
    """The media type a file name's extension names, or "" (``.tar.gz`` is gzip)."""
    return EXTENSION_MEDIA_TYPES.get(PurePosixPath(name.replace("\\", "/")).suffix.lower(), "")


def describe(kind: str) -> str:
    return {
        "dicom": "DICOM",
        "pdf": "PDF",
        "png": "PNG image",
        "jpeg": "JPEG image",
        "zip": "ZIP archive",
        "3mf": "3MF package",
        "gzip": "gzip stream",
        "tar": "tar archive",
        "7z": "7-Zip archive",
        "bzip2": "bzip2 stream",
        "xz": "xz stream",
        "stl": "STL mesh",
        "ply": "PLY mesh",
        "step": "STEP model",
        "obj": "OBJ mesh",
        "json": "JSON",
        "csv": "CSV",
    }.get(kind, "of unknown type")


def agrees(media_type: str, found: Sniffed) -> bool:
    """Whether ``media_type`` may describe content of kind ``found``.

    Only strong kinds contradict: text that merely looks like JSON may be a CSV.
    """
    mtype = canonical(media_type)
    if not found.strong or not mtype or mtype == OCTET_STREAM:
        return True
    if found.kind == "3mf" and mtype == "application/zip":
        return True
    return mtype == found.media_type


def resolve_media_type(path: Path, name: str, declared: str) -> str:
    """The media type to record for an upload (see the module doc).

    Returns ``application/dicom`` for DICOM content whatever was declared (so the
    hospital's guard sees it for what it is); ``declared`` unchanged when it is given
    and the content agrees; the detected or extension type when it is missing; raises
    ValidationError naming the file, the declared type or extension, and what the
    content is.
    """
    found = sniff_file(path)
    if found.kind == "dicom":
        return found.media_type  # DICOM has one door; whatever it is called, it is DICOM
    by_name = media_type_for_name(name)
    given = canonical(declared)
    if given and given != OCTET_STREAM:
        if not agrees(given, found):
            raise ValidationError(
                f"{name} is declared {given} but its content is "
                f"{describe(found.kind)} ({found.media_type}); send it with the right "
                "--media-type, or check that it is the file you meant"
            )
        return declared
    if found.strong:
        if by_name and not agrees(by_name, found):
            raise ValidationError(
                f"{name}: its extension says {by_name} but its content is "
                f"{describe(found.kind)} ({found.media_type}); rename it or check that it "
                "is the file you meant"
            )
        return found.media_type
    if by_name:
        return by_name
    return OCTET_STREAM
