"""The one home of raw DICOM bytes: the VR table, element and item headers, walking a
Little Endian data set (sequences, items, undefined lengths, encapsulated pixel data),
File Meta reading and encoding.

Two hot paths read DICOM bytes without pydicom's parser: the one-pass ingest check
(:mod:`hospital_node.ingest_fast`, on every C-STORE) and the byte path of the
de-identifier (:mod:`hospital_node.deid.fast`); the content sniffer
(:mod:`gateway.fidelity.sniff`) recognises a bare data set by its VR bytes. All of them
take their DICOM knowledge from here, so a VR added to the standard or a rule about
items is changed in one place. ``tests/test_dicom_raw.py`` holds this module to pydicom
(the same elements, offsets and File Meta bytes) and checks that no other module keeps
a VR table or walks element headers itself.

Nothing here decides what is acceptable for a caller: anything that is not well-formed
raises ``ValueError`` (with a short reason, never a value), and the callers step aside
for pydicom, which accepts or refuses with its own reasons. Policies stay with the
callers (which groups may appear, which VRs ingest interprets, de-identification's
treatment of each element). Values are never decoded or logged here.

Walking (:func:`elements`): Explicit VR Little Endian by default, Implicit VR Little
Endian with ``implicit=True`` (VRs from the data dictionary, ``UN`` for unknown tags,
``SQ`` for an unknown tag of undefined length, as pydicom reads it). Tags must ascend
strictly within each data set; sequences nest at most :data:`MAX_DEPTH` deep;
undefined lengths only on sequences, items and — with ``encapsulated=True`` — pixel
data fragments.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

# -- the VR table (PS3.5 6.2 and 7.1.2) ----------------------------------------------------
LONG_VRS = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
"""Explicit VR: two reserved bytes and a 4-byte value length (PS3.5 Table 7.1-1)."""
SHORT_VRS = frozenset("AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
"""Explicit VR: a 2-byte value length (PS3.5 Table 7.1-2)."""
VRS = LONG_VRS | SHORT_VRS
"""Every VR an explicit-VR element may carry (PS3.5 Table 6.2-1)."""
VR_BYTES: dict[bytes, str] = {vr.encode("ascii"): vr for vr in VRS}
"""The VR of the two VR bytes of an explicit-VR element header."""
VALUE_SIZES = {"AT": 4, "FD": 8, "FL": 4, "OD": 8, "OF": 4, "OL": 4, "OV": 8, "OW": 2, "SL": 4,
               "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}  # fmt: skip
"""A value of these VRs is a whole number of items of this many bytes."""
TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UR UT".split())
"""Character-string VRs: no control bytes but TAB, LF, FF, CR and ESC (PS3.5 6.1.2)."""
CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")
"""A control byte a text value may not hold (TAB LF FF CR ESC are allowed)."""
UID_BYTES = re.compile(rb"[0-9.]*[\x00 ]?")
"""What a UI value's bytes may be: digits and dots, padded (PS3.5 9.1)."""

# -- delimiters, lengths, offsets ----------------------------------------------------------
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
MAX_DEPTH = 16
"""Sequences nested deeper than this are not walked (ValueError)."""
PREAMBLE = b"\x00" * 128
DICM_END = 132
"""Where the File Meta group of a Part-10 object starts (after preamble and ``DICM``)."""
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

_TAG = struct.Struct("<HH")
_ITEM_HEADER = struct.Struct("<HHI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_VR_GET = VR_BYTES.get

Item = tuple[int, int, bool]
"""(start, end, undefined length) of an item's data set; for an undefined-length item
``end`` is after its Item Delimitation Item."""
Element = tuple[int, str, int, int, int, "list[Item] | None"]
"""(tag, VR, value length as encoded, value start, value end, items): ``items`` for a
sequence (and for encapsulated pixel data: its fragments), else None. For an undefined
length the value end is after the Sequence Delimitation Item."""


# -- headers ------------------------------------------------------------------------------
def implicit_vr(tag: int, length: int) -> str:
    """The VR pydicom gives an Implicit VR element: the dictionary's (the first of "US or
    SS" and the like), ``UL`` for a group length, ``LO`` for a private creator, ``UN``
    when unknown — and ``SQ`` for an unknown element of undefined length."""
    if tag & 0xFFFF == 0:
        return "UL"
    if tag >> 16 & 1 and 0x10 <= tag & 0xFFFF <= 0xFF:
        return "LO"
    try:
        vr = str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        vr = "UN"
    return "SQ" if vr == "UN" and length == UNDEFINED_LENGTH else vr


def element_header(
    data: bytes, pos: int, end: int, implicit: bool = False
) -> tuple[int, str, int, int]:
    """(tag, VR, value length, value start) of the element header at ``pos``."""
    if pos + 8 > end:
        raise ValueError("truncated element header")
    group, elem = _TAG.unpack_from(data, pos)
    tag = group << 16 | elem
    if implicit:
        length = _U32.unpack_from(data, pos + 4)[0]
        return tag, implicit_vr(tag, length), length, pos + 8
    vr = VR_BYTES.get(data[pos + 4 : pos + 6])
    if vr is None:
        raise ValueError("unknown VR (or a delimiter) in a data set")
    if vr in LONG_VRS:
        if pos + 12 > end:
            raise ValueError("truncated element header")
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    return tag, vr, _U16.unpack_from(data, pos + 6)[0], pos + 8


def at_item_delimiter(data: bytes, pos: int, end: int) -> bool:
    """Whether an Item Delimitation Item (with its zero length) starts at ``pos``."""
    if pos + 8 > end:
        return False
    group, elem, length = _ITEM_HEADER.unpack_from(data, pos)
    if group << 16 | elem != ITEM_DELIMITER:
        return False
    if length != 0:
        raise ValueError("item delimiter with a length")
    return True


def encode_header(tag: int, vr: str, length: int) -> bytes:
    """An Explicit VR Little Endian element header."""
    head = _TAG.pack(tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in LONG_VRS:
        return head + b"\x00\x00" + _U32.pack(length)
    if length > 0xFFFF:
        raise ValueError("value too long for a 2-byte length")
    return head + _U16.pack(length)


def encode_element(tag: int, vr: str, value: bytes) -> bytes:
    """An Explicit VR Little Endian element (``value`` already padded to even length)."""
    return encode_header(tag, vr, len(value)) + value


def encode_item(body: bytes) -> bytes:
    """An item of defined length holding ``body`` (an encoded data set)."""
    return _ITEM_HEADER.pack(0xFFFE, 0xE000, len(body)) + body


def raw_element(tag: int, vr: str, value: bytes, value_tell: int = 0) -> RawDataElement:
    """The pydicom ``RawDataElement`` of an Explicit VR Little Endian element (what
    ``read_dataset`` holds before a value is converted)."""
    return RawDataElement(BaseTag(tag), vr, len(value), value, value_tell, False, True)


# -- walking ------------------------------------------------------------------------------
def elements(
    data: bytes, pos: int, end: int, *, undefined_item: bool = False, depth: int = 0,
    even: bool = False, implicit: bool = False, encapsulated: bool = False,
) -> Iterator[Element]:  # fmt: skip
    """The elements of the data set in ``data[pos:end]``, each checked to be complete and
    inside ``end``, tags strictly ascending, every sequence's items well-formed (their
    data sets are walked only where needed to find an undefined length's end).

    ``undefined_item``: the data set of an undefined-length item, which must end with
    its Item Delimitation Item. ``depth``: how many sequences deep this data set is.
    ``even``: odd value and item lengths are errors too. ``encapsulated``: an undefined
    length is allowed on pixel data (its items are the fragments). Raises ValueError."""
    previous = -1
    tag_at, vr_of, u16_at, u32_at = _TAG.unpack_from, _VR_GET, _U16.unpack_from, _U32.unpack_from
    while pos < end:
        if undefined_item and at_item_delimiter(data, pos, end):
            return
        if implicit:
            element = _element(data, pos, end, depth, even, implicit, encapsulated)
        else:  # _element's plain case inlined: this runs once per element received
            if pos + 8 > end:
                raise ValueError("truncated element header")
            group, elem = tag_at(data, pos)
            vr = vr_of(data[pos + 4 : pos + 6])
            if vr is None:
                raise ValueError("unknown VR (or a delimiter) in a data set")
            if vr in LONG_VRS:
                if vr == "SQ" or pos + 12 > end:
                    element = _element(data, pos, end, depth, even, implicit, encapsulated)
                else:
                    length, start = u32_at(data, pos + 8)[0], pos + 12
                    stop = start + length
                    if length == UNDEFINED_LENGTH or stop > end or (even and length & 1):
                        element = _element(data, pos, end, depth, even, implicit, encapsulated)
                    else:
                        element = (group << 16 | elem, vr, length, start, stop, None)
            else:
                length, start = u16_at(data, pos + 6)[0], pos + 8
                stop = start + length
                if stop > end or (even and length & 1):
                    raise ValueError("odd or overrunning value length")
                element = (group << 16 | elem, vr, length, start, stop, None)
        if element[0] <= previous:
            raise ValueError("tags not in ascending order")
        previous = element[0]
        yield element
        pos = element[4]
    if undefined_item:
        raise ValueError("item without a delimiter")


def data_set_end(
    data: bytes, pos: int, end: int, *, undefined_item: bool = False, depth: int = 0,
    even: bool = False, implicit: bool = False, encapsulated: bool = False,
) -> int:  # fmt: skip
    """Where the data set at ``pos`` ends (after the Item Delimitation Item of an
    undefined-length item), checked as :func:`elements` checks it."""
    previous = -1
    while pos < end:
        if undefined_item and at_item_delimiter(data, pos, end):
            return pos + 8
        element = _element(data, pos, end, depth, even, implicit, encapsulated)
        if element[0] <= previous:
            raise ValueError("tags not in ascending order")
        previous = element[0]
        pos = element[4]
    if undefined_item:
        raise ValueError("item without a delimiter")
    return pos


def _element(
    data: bytes, pos: int, end: int, depth: int, even: bool, implicit: bool, encapsulated: bool
) -> Element:
    if implicit:
        tag, vr, length, start = element_header(data, pos, end, True)
    else:  # element_header inlined: this is once per element of every instance received
        if pos + 8 > end:
            raise ValueError("truncated element header")
        group, elem = _TAG.unpack_from(data, pos)
        tag = group << 16 | elem
        vr = _VR_GET(data[pos + 4 : pos + 6])  # type: ignore[assignment]
        if vr is None:
            raise ValueError("unknown VR (or a delimiter) in a data set")
        if vr in LONG_VRS:
            if pos + 12 > end:
                raise ValueError("truncated element header")
            length, start = _U32.unpack_from(data, pos + 8)[0], pos + 12
        else:
            length, start = _U16.unpack_from(data, pos + 6)[0], pos + 8
    if vr == "SQ":
        found, stop = sequence_items(
            data, start, length, end, depth + 1, even=even, implicit=implicit,
            encapsulated=encapsulated,
        )  # fmt: skip
        return tag, vr, length, start, stop, found
    if length == UNDEFINED_LENGTH:
        if not encapsulated or tag != PIXEL_DATA:
            raise ValueError("undefined length outside a sequence")
        fragments, stop = encapsulated_fragments(data, start, end)
        return tag, vr, length, start, stop, fragments
    stop = start + length
    if stop > end or (even and length & 1):
        raise ValueError("odd or overrunning value length")
    return tag, vr, length, start, stop, None


def sequence_items(
    data: bytes, start: int, length: int, end: int, depth: int = 1, *,
    even: bool = False, implicit: bool = False, encapsulated: bool = False,
) -> tuple[list[Item], int]:  # fmt: skip
    """The items of a sequence value at ``start`` (of ``length``, maybe undefined, inside
    ``end``) and where the value ends (after its Sequence Delimitation Item when the
    length is undefined). ``depth``: the sequence's own depth (a top-level one is 1)."""
    if depth > MAX_DEPTH:
        raise ValueError("sequences nested too deep")
    undefined = length == UNDEFINED_LENGTH
    limit = end if undefined else start + length
    if limit > end:
        raise ValueError("sequence overruns its container")
    found: list[Item] = []
    pos = start
    while True:
        if not undefined and pos == limit:
            return found, pos
        if pos + 8 > limit:
            raise ValueError("truncated item")
        group, elem, item_length = _ITEM_HEADER.unpack_from(data, pos)
        tag = group << 16 | elem
        if tag == SEQUENCE_DELIMITER and undefined:
            if item_length != 0:
                raise ValueError("sequence delimiter with a length")
            return found, pos + 8
        if tag != ITEM:
            raise ValueError("not an item in a sequence")
        body = pos + 8
        if item_length == UNDEFINED_LENGTH:
            pos = data_set_end(
                data, body, limit, undefined_item=True, depth=depth, even=even,
                implicit=implicit, encapsulated=encapsulated,
            )  # fmt: skip
            found.append((body, pos, True))
        else:
            pos = body + item_length
            if pos > limit or (even and item_length & 1):
                raise ValueError("odd or overrunning item length")
            found.append((body, pos, False))


def encapsulated_fragments(data: bytes, start: int, end: int) -> tuple[list[Item], int]:
    """The items of encapsulated pixel data at ``start`` (Basic Offset Table first, then
    the fragments, each of defined length) and where the value ends (after its Sequence
    Delimitation Item), PS3.5 A.4."""
    found: list[Item] = []
    pos = start
    while True:
        if pos + 8 > end:
            raise ValueError("truncated fragment")
        group, elem, length = _ITEM_HEADER.unpack_from(data, pos)
        tag = group << 16 | elem
        if tag == SEQUENCE_DELIMITER:
            if length != 0:
                raise ValueError("sequence delimiter with a length")
            if not found:
                raise ValueError("encapsulated pixel data without a Basic Offset Table")
            return found, pos + 8
        if tag != ITEM or length == UNDEFINED_LENGTH or pos + 8 + length > end:
            raise ValueError("bad fragment")
        found.append((pos + 8, pos + 8 + length, False))
        pos += 8 + length


# -- File Meta (PS3.10 7.1) ----------------------------------------------------------------
def read_file_meta(part10: bytes) -> tuple[dict[BaseTag, RawDataElement], int]:
    """The File Meta elements of a Part-10 object (group 0002, Explicit VR Little Endian,
    right after ``DICM``; no sequences, no undefined lengths, tags ascending) and where
    the data set starts. ValueError when there is none or it is not plain."""
    if len(part10) < DICM_END or part10[128:DICM_END] != b"DICM":
        raise ValueError("no DICM prefix")
    out: dict[BaseTag, RawDataElement] = {}
    pos, end, previous = DICM_END, len(part10), -1
    while pos < end:
        if pos + 8 > end:
            raise ValueError("truncated element header")
        if _U16.unpack_from(part10, pos)[0] != 0x0002:
            break
        tag, vr, length, start = element_header(part10, pos, end)
        stop = start + length
        if tag <= previous or vr == "SQ" or length == UNDEFINED_LENGTH or stop > end:
            raise ValueError("File Meta element out of order, a sequence or overrunning")
        previous = tag
        out[BaseTag(tag)] = raw_element(tag, vr, part10[start:stop], start)
        pos = stop
    if not out:
        raise ValueError("no File Meta elements")
    return out, pos


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) & 1 else raw


def encode_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
    implementation_class_uid: str, implementation_version_name: str,
) -> bytes:  # fmt: skip
    """The File Meta group (its group length first) with these values, byte for byte as
    pydicom's ``write_file_meta_info`` writes it (``tests/test_dicom_raw.py``)."""
    body = b"".join((
        encode_element(0x00020001, "OB", b"\x00\x01"),
        encode_element(0x00020002, "UI", _padded(sop_class_uid, b"\x00")),
        encode_element(0x00020003, "UI", _padded(sop_instance_uid, b"\x00")),
        encode_element(0x00020010, "UI", _padded(transfer_syntax, b"\x00")),
        encode_element(0x00020012, "UI", _padded(implementation_class_uid, b"\x00")),
        encode_element(0x00020013, "SH", _padded(implementation_version_name, b" ")),
    ))  # fmt: skip
    return encode_element(0x00020000, "UL", _U32.pack(len(body))) + body
