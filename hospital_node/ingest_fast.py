"""Fast structural check of an Explicit VR Little Endian data set, for ingest.

:func:`hospital_node.ingest.parse_instance` checks every element of a received data
set (structure, VRs, value lengths, UID and text bytes, sequences) with pydicom:
three passes (``_walk``, ``read_dataset``, ``_check_items``) that cost about 1.4 ms
of a 512x512 CT's 2.4 ms — CPU time on every C-STORE. :func:`clean_elements` does the
same checks in one pass over the raw bytes and returns the top-level elements as
pydicom ``RawDataElement``\\ s (what ``read_dataset`` would hold), or ``None`` as soon
as anything is unusual or wrong. It never refuses: on ``None`` the caller runs the
full pydicom checks, which accept or refuse with their own reasons. So this module
can only make acceptance faster, never different; ``tests/test_ingest_fast.py``
holds it to that on the malformed-input corpus and on valid instances.

Accepted here only (anything else → ``None``): elements complete and inside their
parent, tags strictly ascending at every level, no group 0000-0007 or FFFE/FFFF at
top level, known explicit VRs, undefined lengths only on sequences and items, items
and delimiters where they belong, nesting at most 16 sequences deep, value lengths a
multiple of the VR's size, UI values of digits and dots (padded), text values
without control bytes, and for the elements this node interprets the dictionary's
VR (or UN).

The walking itself (element and item headers, lengths, sequences, File Meta) and the
VR table are :mod:`gateway.fidelity.dicom_raw`'s; this module adds ingest's policy.
"""

from __future__ import annotations

import struct

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from gateway.fidelity.dicom_raw import (
    CONTROL,
    TEXT_VRS,
    UID_BYTES,
    UNDEFINED_LENGTH,
    VALUE_SIZES,
    VRS,
    elements,
    read_file_meta,
)

__all__ = [
    "CHECKED_VR_TAGS", "CONTROL", "TEXT_VRS", "UID_BYTES", "VALUE_SIZES", "VRS",
    "clean_elements", "meta_elements",
]  # fmt: skip

CHECKED_VR_TAGS: frozenset[int] = frozenset((
    0x00080016, 0x00080018, 0x0020000D, 0x0020000E,  # SOP Class/Instance, Study, Series UID
    0x00180050, 0x00181120, 0x00200013, 0x00200032, 0x00200037,  # thickness, tilt, geometry
    0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280030,  # pixel module
    0x00280100, 0x00280101, 0x00280102, 0x00280103, 0x7FE00010,
))  # fmt: skip
"""Elements ingest interprets: in explicit VR their VR must be the dictionary's (or UN).
These definitions are shared with the full checks in :mod:`hospital_node.ingest`."""

_ALLOWED = {t: frozenset((*str(dictionary_VR(t)).split(" or "), "UN")) for t in CHECKED_VR_TAGS}
_NOT_HERE = (0xFFFE, 0xFFFF)
_SIZES = VALUE_SIZES
_UID_MATCH = UID_BYTES.fullmatch
_CONTROL_SEARCH = CONTROL.search


class _Unusual(Exception):
    """Anything the fast check does not accept: the full check decides."""


def clean_elements(data: bytes) -> dict[BaseTag, RawDataElement] | None:
    """The top-level elements of ``data`` (Explicit VR Little Endian) if it passes every
    check; None when the full check must decide."""
    out: dict[BaseTag, RawDataElement] = {}
    try:
        _check(data, 0, len(data), 0, False, out)
    except (_Unusual, ValueError, struct.error, KeyError):
        return None
    return out


def meta_elements(part10: bytes) -> tuple[dict[BaseTag, RawDataElement], int] | None:
    """The File Meta elements (group 0002, Explicit VR Little Endian, right after
    ``DICM``) and where the data set starts; None when the full reading must decide.
    Checked as :func:`clean_elements` checks, sequences not allowed."""
    try:
        meta, pos = read_file_meta(part10)
        for raw in meta.values():
            value = raw.value
            assert isinstance(value, bytes)
            if not _value_ok(str(raw.VR), value, 0, len(value)):
                return None
    except (ValueError, struct.error, KeyError):
        return None
    return meta, pos


def _value_ok(vr: str, data: bytes, start: int, stop: int) -> bool:
    """A whole number of the VR's items, a UID's bytes, text without control bytes."""
    if (stop - start) % VALUE_SIZES.get(vr, 1):
        return False
    if vr == "UI" and not UID_BYTES.fullmatch(data, start, stop):
        return False
    return not (vr in TEXT_VRS and CONTROL.search(data[start:stop].rstrip(b"\x00")))


def _check(
    data: bytes, pos: int, end: int, depth: int, undefined: bool,
    top: dict[BaseTag, RawDataElement] | None,
) -> None:  # fmt: skip
    """Check the data set in ``data[pos:end]`` (``undefined``: an undefined-length item,
    ``end`` after its delimiter); top level (``top`` given): collect the elements."""
    for tag, vr, length, start, stop, items in elements(
        data, pos, end, undefined_item=undefined, depth=depth
    ):
        group = tag >> 16
        if group in _NOT_HERE:
            raise _Unusual
        if top is not None and (group < 8 or (tag in _ALLOWED and vr not in _ALLOWED[tag])):
            raise _Unusual
        if items is not None:  # a sequence
            for item_start, item_stop, item_undefined in items:
                _check(data, item_start, item_stop, depth + 1, item_undefined, None)
            if length == UNDEFINED_LENGTH:
                stop -= 8  # the value is the items, without the Sequence Delimitation Item
        else:  # _value_ok, inlined (once per element of every instance received)
            if length % _SIZES.get(vr, 1):
                raise _Unusual
            if vr == "UI" and not _UID_MATCH(data, start, stop):
                raise _Unusual
            if vr in TEXT_VRS and _CONTROL_SEARCH(data[start:stop].rstrip(b"\x00")):
                raise _Unusual
        if top is not None:
            btag = BaseTag(tag)
            top[btag] = RawDataElement(btag, vr, stop - start, data[start:stop], start, False, True)
