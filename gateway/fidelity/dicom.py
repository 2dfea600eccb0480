"""DICOM fidelity: hashes of what an implant is designed from (invariant 4).

Both the hospital node (before and after de-identification, before sending) and the
factory node (on receipt) compute these two hashes over the same attributes, so a
change to geometry or pixels anywhere on the path is detected.

- :func:`geometry_hash` covers exactly the attributes that place pixels in space and
  give them meaning (:data:`GEOMETRY_TAGS`), at top level and inside the per-frame and
  shared functional groups' Pixel Measures, Plane Position, Plane Orientation and
  Pixel Value Transformation sequences. Frame of Reference UIDs are not included:
  the de-identifier replaces them, consistently, by design.
- :func:`pixel_hash` covers the pixel data elements' bytes exactly as stored —
  for encapsulated (compressed) data the whole encapsulated stream including the
  Basic Offset Table and every fragment. Nothing is ever decompressed.

Values are encoded canonically as text (the value as stored for DS/IS/CS/LO strings,
decimal for binary integers and floats, ``\\`` between multiple values), so the hash
does not depend on the transfer syntax or on whether an element was parsed yet.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from gateway.hashing import StreamHasher, sha256_hex

# Facts about a DICOM object that a receiver signs into its receipt and the sender
# compares with its own (names shared by hospital and factory).
FACT_SOP_INSTANCE_UID = "dicom.sop_instance_uid"
FACT_PIXEL_SHA256 = "dicom.pixel_sha256"
FACT_GEOMETRY_SHA256 = "dicom.geometry_sha256"
FACT_STUDY_UID = "dicom.study_uid"
FACT_SERIES_UID = "dicom.series_uid"
FACT_PARSE_ERROR = "dicom.parse_error"

# pydicom warns about invalid values *with the value in the message*, which may be
# patient data (invariant: never log patient data). Every node that parses DICOM
# imports this module, so switch that validation off here, once, for the process.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

GEOMETRY_ENCODING_VERSION = "yigong.geometry.v1"
PIXEL_ENCODING_VERSION = b"yigong.pixels.v1\n"

GEOMETRY_TAGS: tuple[tuple[int, str], ...] = (
    (0x00180050, "SliceThickness"),
    (0x00180088, "SpacingBetweenSlices"),
    (0x00181120, "GantryDetectorTilt"),
    (0x00200032, "ImagePositionPatient"),
    (0x00200037, "ImageOrientationPatient"),
    (0x00280002, "SamplesPerPixel"),
    (0x00280004, "PhotometricInterpretation"),
    (0x00280006, "PlanarConfiguration"),
    (0x00280008, "NumberOfFrames"),
    (0x00280010, "Rows"),
    (0x00280011, "Columns"),
    (0x00280030, "PixelSpacing"),
    (0x00280100, "BitsAllocated"),
    (0x00280101, "BitsStored"),
    (0x00280102, "HighBit"),
    (0x00280103, "PixelRepresentation"),
    (0x00281052, "RescaleIntercept"),
    (0x00281053, "RescaleSlope"),
    (0x00281054, "RescaleType"),
)
"""Geometry attributes (tag, keyword), in tag order."""

FUNCTIONAL_GROUP_TAGS: tuple[int, ...] = (
    0x52009229,  # Shared Functional Groups Sequence
    0x52009230,  # Per-frame Functional Groups Sequence
)
GEOMETRY_MACRO_TAGS: tuple[int, ...] = (
    0x00209113,  # Plane Position Sequence
    0x00209116,  # Plane Orientation Sequence
    0x00289110,  # Pixel Measures Sequence
    0x00289145,  # Pixel Value Transformation Sequence
)
PIXEL_DATA_TAGS: tuple[int, ...] = (
    0x7FE00008,  # Float Pixel Data
    0x7FE00009,  # Double Float Pixel Data
    0x7FE00010,  # Pixel Data
)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _encode_level(ds: Dataset, prefix: str, out: list[str]) -> None:
    for tag, _keyword in GEOMETRY_TAGS:
        if tag in ds:
            out.append(f"{prefix}{tag:08X}={_text(ds[tag].value)}")


def canonical_geometry(ds: Dataset) -> bytes:
    """The canonical text encoding that :func:`geometry_hash` hashes."""
    lines: list[str] = [GEOMETRY_ENCODING_VERSION]
    _encode_level(ds, "", lines)
    for fg_tag in FUNCTIONAL_GROUP_TAGS:
        if fg_tag not in ds:
            continue
        groups = ds[fg_tag].value or Sequence()
        lines.append(f"{fg_tag:08X}#{len(groups)}")
        for i, group in enumerate(groups):
            for macro_tag in GEOMETRY_MACRO_TAGS:
                if macro_tag not in group:
                    continue
                macro_items = group[macro_tag].value or Sequence()
                lines.append(f"{fg_tag:08X}[{i}]/{macro_tag:08X}#{len(macro_items)}")
                for j, item in enumerate(macro_items):
                    _encode_level(item, f"{fg_tag:08X}[{i}]/{macro_tag:08X}[{j}]/", lines)
    return "\n".join(lines).encode("utf-8")


def geometry_hash(ds: Dataset) -> str:
    """SHA-256 hex over the canonical encoding of the geometry attributes of ``ds``."""
    return sha256_hex(canonical_geometry(ds))


def _pixel_elements(ds: Dataset) -> Iterable[tuple[int, bytes]]:
    for tag in PIXEL_DATA_TAGS:
        if tag in ds:
            value = ds[tag].value
            yield tag, bytes(value) if value is not None else b""


def pixel_hash(ds: Dataset) -> str:
    """SHA-256 hex over the raw pixel data bytes of ``ds`` as stored (never decoded)."""
    return pixel_hash_of(_pixel_elements(ds))


def pixel_hash_of(elements: Iterable[tuple[int, bytes]]) -> str:
    """:func:`pixel_hash` of the pixel data elements ``(tag, value bytes)`` present, in
    :data:`PIXEL_DATA_TAGS` order (for callers that hold the raw bytes, not a data set)."""
    hasher = PixelHasher()
    for tag, data in elements:
        hasher.element(tag, len(data))
        hasher.update(data)
    return hasher.hexdigest()


class PixelHasher:
    """:func:`pixel_hash` fed piece by piece: :meth:`element` (tag, value length) before
    each element's value, then its value in any number of :meth:`update` calls."""

    def __init__(self) -> None:
        self._hasher = StreamHasher()
        self._hasher.update(PIXEL_ENCODING_VERSION)

    def element(self, tag: int, length: int) -> None:
        self._hasher.update(struct.pack(">IQ", tag, length))

    def update(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)  # type: ignore[arg-type]  # hashlib takes any buffer

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()
