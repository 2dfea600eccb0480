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
"""

from __future__ import annotations

import re
import struct

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.valuerep import VR

VRS = frozenset(v.value for v in VR if " or " not in v.value)
"""Every VR an explicit-VR element may carry."""
VALUE_SIZES = {"AT": 4, "FD": 8, "FL": 4, "OD": 8, "OF": 4, "OL": 4, "OV": 8, "OW": 2, "SL": 4,
               "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}  # fmt: skip
"""A value of these VRs is a whole number of items of this many bytes."""
TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UR UT".split())
CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")  # TAB LF FF CR ESC are allowed
UID_BYTES = re.compile(rb"[0-9.]*[\x00 ]?")
CHECKED_VR_TAGS: frozenset[int] = frozenset((
    0x00080016, 0x00080018, 0x0020000D, 0x0020000E,  # SOP Class/Instance, Study, Series UID
    0x00180050, 0x00181120, 0x00200013, 0x00200032, 0x00200037,  # thickness, tilt, geometry
    0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280030,  # pixel module
    0x00280100, 0x00280101, 0x00280102, 0x00280103, 0x7FE00010,
))  # fmt: skip
"""Elements ingest interprets: in explicit VR their VR must be the dictionary's (or UN).
These definitions are shared with the full checks in :mod:`hospital_node.ingest`."""

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VRS = {vr.encode(): vr for vr in VRS}
_SIZES = {vr.encode(): size for vr, size in VALUE_SIZES.items()}
_TEXT = frozenset(vr.encode() for vr in TEXT_VRS)
_ALLOWED = {t: frozenset((*str(dictionary_VR(t)).split(" or "), "UN")) for t in CHECKED_VR_TAGS}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16
_TAG = struct.Struct("<HH")
_SHORT = struct.Struct("<H")
_LONG = struct.Struct("<I")


class _Unusual(Exception):
    """Anything the fast check does not accept: the full check decides."""


def clean_elements(data: bytes) -> dict[BaseTag, RawDataElement] | None:
    """The top-level elements of ``data`` (Explicit VR Little Endian) if it passes every
    check; None when the full check must decide."""
    out: dict[BaseTag, RawDataElement] = {}
    try:
        end = _walk(data, 0, len(data), 0, out)
    except (_Unusual, struct.error, KeyError):
        return None
    return out if end == len(data) else None


def meta_elements(part10: bytes) -> tuple[dict[BaseTag, RawDataElement], int] | None:
    """The File Meta elements (group 0002, Explicit VR Little Endian, right after
    ``DICM``) and where the data set starts; None when the full reading must decide.
    Checked as :func:`clean_elements` checks, sequences not allowed."""
    out: dict[BaseTag, RawDataElement] = {}
    try:
        pos = _walk(part10, 132, len(part10), 0, out, meta=True)
    except (_Unusual, struct.error, KeyError):
        return None
    return (out, pos) if out else None


def _walk(
    data: bytes, pos: int, end: int, depth: int,
    top: dict[BaseTag, RawDataElement] | None, *, meta: bool = False,
) -> int:  # fmt: skip
    """Check the elements in ``data[pos:end]``; inside an undefined-length item, stop
    after its Item Delimitation Item (``end`` is then the parent's end). Top level
    (``top`` given): collect the elements. ``meta``: the File Meta group (group 0002
    only, no sequences), which ends at the first element of another group. Returns
    where it stopped."""
    lowest_group = 2 if meta else 8
    previous = -1
    while pos < end:
        if pos + 8 > end:
            raise _Unusual
        group, element = _TAG.unpack_from(data, pos)
        if meta and group != 2:
            return pos
        tag = group << 16 | element
        if tag == _ITEM_END:
            if top is not None or _LONG.unpack_from(data, pos + 4)[0] != 0:
                raise _Unusual
            return -(pos + 8)  # negative: stopped at a delimiter
        if (
            tag <= previous
            or group in (0xFFFE, 0xFFFF)
            or (top is not None and group < lowest_group)
        ):
            raise _Unusual
        previous = tag
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise _Unusual
            length = _LONG.unpack_from(data, pos + 8)[0]
            start = pos + 12
        else:
            length = _SHORT.unpack_from(data, pos + 6)[0]
            start = pos + 8
        name = _VRS[vr]  # KeyError: unknown VR
        if top is not None and tag in _ALLOWED and name not in _ALLOWED[tag]:
            raise _Unusual
        if vr == b"SQ":
            if meta:
                raise _Unusual
            stop, value_end = _sequence(data, start, end, length, depth + 1)
        else:
            if length == _UNDEFINED:
                raise _Unusual
            stop = value_end = start + length
            if stop > end or length % _SIZES.get(vr, 1):
                raise _Unusual
            if vr == b"UI" and not UID_BYTES.fullmatch(data, start, stop):
                raise _Unusual
            if vr in _TEXT and CONTROL.search(data[start:stop].rstrip(b"\x00")):
                raise _Unusual
        if top is not None:
            btag = BaseTag(tag)
            top[btag] = RawDataElement(
                btag, name, value_end - start, data[start:value_end], start, False, True
            )
        pos = stop
    return pos


def _sequence(data: bytes, start: int, end: int, length: int, depth: int) -> tuple[int, int]:
    """Check a sequence's items; (where the element ends, where its items end)."""
    if depth > _MAX_DEPTH:
        raise _Unusual
    limit = end if length == _UNDEFINED else start + length
    if limit > end:
        raise _Unusual
    pos = start
    while pos < limit:
        if pos + 8 > limit:
            raise _Unusual
        group, element = _TAG.unpack_from(data, pos)
        item_length = _LONG.unpack_from(data, pos + 4)[0]
        tag = group << 16 | element
        if tag == _SEQ_END and length == _UNDEFINED:
            if item_length != 0:
                raise _Unusual
            return pos + 8, pos
        if tag != _ITEM:
            raise _Unusual
        body = pos + 8
        if item_length == _UNDEFINED:
            stopped = _walk(data, body, limit, depth, None)
            if stopped >= 0:  # ran to the end without an Item Delimitation Item
                raise _Unusual
            pos = -stopped
        else:
            if (
                body + item_length > limit
                or _walk(data, body, body + item_length, depth, None) != body + item_length
            ):
                raise _Unusual
            pos = body + item_length
    if length == _UNDEFINED:
        raise _Unusual  # no Sequence Delimitation Item
    return pos, pos
