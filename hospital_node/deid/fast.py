"""Fast path of :meth:`Deidentifier.deidentify_part10` for Explicit VR Little Endian.

The engine parses the whole file with pydicom, walks it and writes it again; most of
that time goes into parsing and re-encoding elements that are kept unchanged. This
module walks the raw data set bytes element by element instead and asks the SAME
decision function (``profile.treatment`` with the same in-clean propagation as
``engine._Pass.walk``) for every element:

- KEEP elements are copied verbatim (pydicom also writes unparsed elements verbatim);
- REMOVE elements (private groups included) are dropped;
- sequences that are recursed into are rebuilt (defined lengths) from their walked items;
- every other element is decoded with pydicom, changed by ``engine._Pass.apply`` (the
  engine's own code: map_uid, date shift, clean_text, dummies, pseudonym, emptying,
  well-formedness) and encoded again with pydicom's element writer;
- the finishing attributes and the file meta come from ``Deidentifier._finish`` run on
  a small data set, so they are exactly what the engine sets.

Anything the fast path does not fully understand raises :class:`FastPathUnsupported`
and the caller falls back to the engine: another transfer syntax (only 1.2.840.10008.1.2.1
is handled), no "DICM" prefix, unsorted or duplicate tags, an unknown VR, a VR of UN
on an element that is not removed, an odd or overrunning length, an undefined length
on anything but a sequence, a Specific Character Set inside a sequence item or one
that is not kept, malformed items or delimiters, an existing finishing attribute with
an unexpected VR, and any error while decoding or encoding a value.

Geometry and pixel hashes are computed with :mod:`gateway.fidelity.dicom` on data sets
made of the input's and the output's raw top-level elements (functional groups: on a
pydicom read of only those elements), and any difference raises ``IntegrityError``.
Values are never logged.
"""

from __future__ import annotations

import io
import logging
import struct
import weakref
from collections import Counter
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from gateway.fidelity.dicom import (
    FUNCTIONAL_GROUP_TAGS,
    GEOMETRY_TAGS,
    PIXEL_DATA_TAGS,
    geometry_hash,
    pixel_hash,
)
from hospital_node.deid.profile import (
    RECURSE_TREATMENTS,
    Treatment,
    child_context,
    dictionary_vr,
)

if TYPE_CHECKING:
    from hospital_node.deid.engine import Deidentifier, DeidResult, _Pass

log = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
SUPPORTED_TRANSFER_SYNTAXES = frozenset({EXPLICIT_VR_LITTLE_ENDIAN})

_LONG_VRS = frozenset(
    {"OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV", "SV", "UV"}
)
_SHORT_VRS = frozenset(
    {
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT",
        "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US",
    }
)  # fmt: skip
_VR_BY_BYTES = {vr.encode("ascii"): vr for vr in _LONG_VRS | _SHORT_VRS}
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_CHARSET_TAG = 0x00080005
_SOP_CLASS_TAG = 0x00080016
_SOP_INSTANCE_TAG = 0x00080018
_BURNED_IN_TAGS = (0x00280301, 0x00080060, _SOP_CLASS_TAG)
_FINISH_TAGS = (
    0x00100010,  # Patient's Name
    0x00100020,  # Patient ID
    0x00120062,  # Patient Identity Removed
    0x00120063,  # De-identification Method
    0x00120064,  # De-identification Method Code Sequence
    0x00280303,  # Longitudinal Temporal Information Modified
)
_GEOMETRY_TAG_SET = frozenset(tag for tag, _kw in GEOMETRY_TAGS)
_RECORDED = (
    _GEOMETRY_TAG_SET
    | frozenset(PIXEL_DATA_TAGS)
    | frozenset(_BURNED_IN_TAGS)
    | {_CHARSET_TAG, _SOP_INSTANCE_TAG}
)
_ITEM_HEADER = struct.Struct("<HHI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")
_PREAMBLE = b"\x00" * 128


class FastPathUnsupported(Exception):
    """The input is outside what the fast path handles; use the engine."""


def _header(tag: int, vr: str, length: int) -> bytes:
    head = _TAG.pack(tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + _U32.pack(length)
    if length > 0xFFFF:
        raise FastPathUnsupported("value too long for a 2-byte length")
    return head + _U16.pack(length)


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True, True, False)


_CacheKey = tuple[str, tuple[str, ...], int, str, bytes, Treatment, int]
_CacheValue = tuple[bytes, int, tuple[tuple[str, int], ...]]
_CACHE_LIMIT = 4096
_caches: weakref.WeakKeyDictionary[Deidentifier, dict[_CacheKey, _CacheValue]] = (
    weakref.WeakKeyDictionary()
)
"""Per de-identifier: (pseudonym, encodings, tag, VR, raw value, treatment, in-clean) ->
(encoded element, header length, count changes). The change of a value is a pure function
of these (and of the de-identifier's key and options), so an instance repeating its
series' values (names, UIDs, dates, descriptions) costs one dictionary look-up each.
Bounded, in memory only, dropped with the de-identifier; values are never logged."""


class _Walk:
    """One walk over the raw data set of one Explicit VR Little Endian file."""

    def __init__(self, data: bytes, run: _Pass) -> None:
        self.data = data
        self.run = run
        self.profile = run.profile
        self.encodings: list[str] = [default_encoding]
        self.source: dict[int, RawDataElement] = {}  # recorded input top-level elements
        self.output: dict[int, RawDataElement] = {}  # every output top-level element
        self.refused: tuple[int, int] | None = None  # (tag, items) of a D sequence with items
        cache = _caches.get(run.deid)
        if cache is None:
            cache = _caches[run.deid] = {}
        self.cache = cache

    # -- structure ------------------------------------------------------------------
    def element_header(self, pos: int, end: int) -> tuple[int, str, int, int]:
        """(tag, VR, value length, value start) of the element at ``pos``."""
        data = self.data
        if pos + 8 > end:
            raise FastPathUnsupported("truncated element header")
        group, elem = _TAG.unpack_from(data, pos)
        vr = _VR_BY_BYTES.get(data[pos + 4 : pos + 6])
        if vr is None:
            raise FastPathUnsupported("unknown VR or delimiter in data set")
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise FastPathUnsupported("truncated element header")
            return (group << 16) | elem, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
        return (group << 16) | elem, vr, _U16.unpack_from(data, pos + 6)[0], pos + 8

    def items(self, start: int, length: int, end: int) -> tuple[list[tuple[int, int, bool]], int]:
        """Items of a sequence value at ``start``: ([(start, end, undefined)], end of value)."""
        data = self.data
        found: list[tuple[int, int, bool]] = []
        limit = end if length == _UNDEFINED else start + length
        if limit > end:
            raise FastPathUnsupported("sequence overruns its container")
        pos = start
        while True:
            if length != _UNDEFINED and pos == limit:
                return found, pos
            if pos + 8 > limit:
                raise FastPathUnsupported("truncated item")
            group, elem, ilen = _ITEM_HEADER.unpack_from(data, pos)
            tag = (group << 16) | elem
            if tag == _SEQ_DELIM and length == _UNDEFINED:
                if ilen != 0:
                    raise FastPathUnsupported("bad sequence delimiter")
                return found, pos + 8
            if tag != _ITEM:
                raise FastPathUnsupported("unexpected tag in sequence")
            if ilen == _UNDEFINED:
                item_end = self.skip_dataset(pos + 8, limit, undefined=True)
                found.append((pos + 8, item_end, True))
                pos = item_end
            else:
                if ilen & 1 or pos + 8 + ilen > limit:
                    raise FastPathUnsupported("bad item length")
                found.append((pos + 8, pos + 8 + ilen, False))
                pos += 8 + ilen

    def at_item_delimiter(self, pos: int, end: int) -> bool:
        """Whether an Item Delimitation Item (with its zero length) starts at ``pos``."""
        if pos + 8 > end:
            return False
        group, elem, ilen = _ITEM_HEADER.unpack_from(self.data, pos)
        if (group << 16) | elem != _ITEM_DELIM:
            return False
        if ilen != 0:
            raise FastPathUnsupported("bad item delimiter")
        return True

    def skip_dataset(self, pos: int, end: int, *, undefined: bool) -> int:
        """End of a data set (after its item delimiter when ``undefined``), structure only."""
        while pos < end:
            if undefined and self.at_item_delimiter(pos, end):
                return pos + 8
            tag, vr, length, vstart = self.element_header(pos, end)
            pos = self.value_end(tag, vr, length, vstart, end)
        if undefined:
            raise FastPathUnsupported("item without delimiter")
        if pos != end:
            raise FastPathUnsupported("item length mismatch")
        return pos

    def value_end(self, tag: int, vr: str, length: int, vstart: int, end: int) -> int:
        if length == _UNDEFINED:
            if vr != "SQ":
                raise FastPathUnsupported("undefined length outside a sequence")
            return self.items(vstart, length, end)[1]
        if length & 1 or vstart + length > end:
            raise FastPathUnsupported("odd or overrunning length")
        if vr == "SQ":
            self.items(vstart, length, end)  # validate the structure
        return vstart + length

    # -- de-identification -----------------------------------------------------------
    def dataset(
        self, pos: int, end: int, *, in_clean: int, top: bool, undefined: bool = False
    ) -> list[tuple[int, bytes]]:
        """The de-identified elements (tag, encoding) of the data set in ``data[pos:end]``."""
        data = self.data
        out: list[tuple[int, bytes]] = []
        profile = self.profile
        run = self.run
        counts = run.counts
        last = -1
        while pos < end:
            if undefined and self.at_item_delimiter(pos, end):
                return out
            tag, vr, length, vstart = self.element_header(pos, end)
            if tag <= last:
                raise FastPathUnsupported("tags not in ascending order")
            last = tag
            vend = self.value_end(tag, vr, length, vstart, end)
            decision_vr = dictionary_vr(tag) if vr == "UN" else vr
            treatment, _code = profile.treatment(tag, decision_vr, in_clean_sequence=in_clean)
            if treatment is Treatment.REMOVE:
                counts["private" if (tag >> 16) & 1 else treatment.value] += 1
                if top and tag in _RECORDED:
                    self.source[tag] = _raw(tag, vr, data[vstart:vend])
                pos = vend
                continue
            if vr == "UN":
                raise FastPathUnsupported("UN element that is not removed")
            if tag == _CHARSET_TAG and (not top or treatment is not Treatment.KEEP):
                raise FastPathUnsupported("character set in an item or changed")
            value: bytes | None = None
            if top and tag in _RECORDED:
                value = data[vstart:vend]
                self.source[tag] = _raw(tag, vr, value)
            if vr == "SQ":
                chunk = self.sequence(tag, treatment, length, vstart, end, in_clean)
                hdr = 12
            elif treatment is Treatment.KEEP:
                chunk = data[pos:vend]
                hdr = vstart - pos
                if tag == _CHARSET_TAG:
                    elem_cs = convert_raw_data_element(_raw(tag, vr, data[vstart:vend]))
                    values = elem_cs.value
                    self.encodings = convert_encodings(values) if values else [default_encoding]
            else:
                chunk, hdr = self.changed(tag, vr, data[vstart:vend], treatment, in_clean)
            out.append((tag, chunk))
            if top:
                # a kept value is the very bytes object recorded from the input (the
                # chunk written is a copy of the same input range); others are re-read
                kept = value is not None and treatment is Treatment.KEEP and vr != "SQ"
                self.output[tag] = _raw(tag, vr, value if kept and value else chunk[hdr:])
            pos = vend
        if undefined:
            raise FastPathUnsupported("item without delimiter")
        return out

    def sequence(
        self, tag: int, treatment: Treatment, length: int, vstart: int, end: int, in_clean: int
    ) -> bytes:
        if treatment is Treatment.EMPTY:
            self.run.counts[treatment.value] += 1
            return _header(tag, "SQ", 0)
        if treatment is Treatment.REFUSE:
            found, _end = self.items(vstart, length, end)
            if found and self.refused is None:
                self.refused = (tag, len(found))  # raised where the engine raises it
            return _header(tag, "SQ", 0)
        if treatment not in RECURSE_TREATMENTS:
            raise FastPathUnsupported("unexpected treatment of a sequence")
        clean = child_context(in_clean, treatment)
        found, _end = self.items(vstart, length, end)
        parts: list[bytes] = []
        for start, stop, undefined in found:
            elements = self.dataset(start, stop, in_clean=clean, top=False, undefined=undefined)
            body = b"".join(chunk for _tag, chunk in elements)
            parts.append(_ITEM_HEADER.pack(0xFFFE, 0xE000, len(body)))
            parts.append(body)
        value = b"".join(parts)
        return _header(tag, "SQ", len(value)) + value

    def changed(
        self, tag: int, vr: str, value: bytes, treatment: Treatment, in_clean: int
    ) -> tuple[bytes, int]:
        """Decode one element with pydicom, apply the engine's change, encode it again."""
        key = (self.run.pseudonym, tuple(self.encodings), tag, vr, value, treatment, in_clean)
        hit = self.cache.get(key)
        if hit is None:
            elem = convert_raw_data_element(_raw(tag, vr, value), encoding=self.encodings)
            before = Counter(self.run.counts)
            self.run.apply(elem, treatment, in_clean)
            delta = Counter(self.run.counts)
            delta.subtract(before)
            chunk, hdr = self.encode(elem)
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache.clear()
            self.cache[key] = (chunk, hdr, tuple((k, n) for k, n in delta.items() if n))
            return chunk, hdr
        chunk, hdr, changes = hit
        for name, n in changes:
            self.run.counts[name] += n
        return chunk, hdr

    def encode(self, elem: DataElement) -> tuple[bytes, int]:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem, self.encodings)
        chunk = fp.getvalue()
        return chunk, (12 if elem.VR in _LONG_VRS else 8)


def _meta_elements(data: bytes) -> tuple[dict[int, RawDataElement], int]:
    """The raw file meta elements after "DICM" and the offset of the data set."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise FastPathUnsupported("no DICM prefix")
    pos = 132
    meta: dict[int, RawDataElement] = {}
    end = len(data)
    while pos + 8 <= end and _U16.unpack_from(data, pos)[0] == 0x0002:
        group, elem = _TAG.unpack_from(data, pos)
        vr = _VR_BY_BYTES.get(data[pos + 4 : pos + 6])
        if vr is None:
            raise FastPathUnsupported("file meta not explicit VR")
        if vr in _LONG_VRS:
            length, vstart = _U32.unpack_from(data, pos + 8)[0], pos + 12
        else:
            length, vstart = _U16.unpack_from(data, pos + 6)[0], pos + 8
        if length == _UNDEFINED or vstart + length > end:
            raise FastPathUnsupported("bad file meta element")
        tag = (group << 16) | elem
        if tag in meta:
            raise FastPathUnsupported("duplicate file meta element")
        meta[tag] = _raw(tag, vr, data[vstart : vstart + length])
        pos = vstart + length
    return meta, pos


def _dataset_of(elements: dict[int, RawDataElement], tags: object) -> Dataset:
    ds = Dataset()
    for tag, raw in elements.items():
        if tag in tags:  # type: ignore[operator]
            ds[tag] = raw
    ds.set_original_encoding(False, True, None)
    return ds


def _geometry(data: bytes, recorded: dict[int, RawDataElement], has_groups: bool) -> str:
    if not has_groups:
        return geometry_hash(_dataset_of(recorded, _GEOMETRY_TAG_SET | {_CHARSET_TAG}))
    wanted = [tag for tag, _kw in GEOMETRY_TAGS] + list(FUNCTIONAL_GROUP_TAGS) + [_CHARSET_TAG]
    partial = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=wanted)
    return geometry_hash(partial)


def _pixels(recorded: dict[int, RawDataElement]) -> tuple[tuple[int, bytes], ...]:
    return tuple((tag, recorded[tag].value or b"") for tag in PIXEL_DATA_TAGS if tag in recorded)


def deidentify_part10_fast(
    deid: Deidentifier, data: bytes, pseudonym: str, *, allow_burned_in: bool
) -> tuple[bytes, DeidResult]:
    """The fast path; raises FastPathUnsupported when the engine must do it instead.

    Raises the engine's exceptions (ValidationError for a bad pseudonym,
    BurnedInAnnotationHeld, IntegrityError) exactly where the engine would.
    """
    from hospital_node.deid.engine import (
        DeidResult,
        _Pass,
        burned_in_reason,
        check_pseudonym,
        hold_burned_in,
        refused_sequence,
    )

    meta_raw, body = _meta_elements(data)
    ts_raw = meta_raw.get(0x00020010)
    if ts_raw is None or ts_raw.VR != "UI":
        raise FastPathUnsupported("no transfer syntax")
    syntax = bytes(ts_raw.value or b"").decode("ascii", "replace").strip(" \x00")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise FastPathUnsupported("transfer syntax not handled")
    check_pseudonym(pseudonym)

    run = _Pass(deid, pseudonym)
    walk = _Walk(data, run)
    try:
        walked = walk.dataset(body, len(data), in_clean=False, top=True)
    except FastPathUnsupported:
        raise
    except Exception as exc:  # a value pydicom cannot decode or encode: let the engine say
        raise FastPathUnsupported(f"value not handled: {type(exc).__name__}") from exc

    source = walk.source
    try:
        probe = _dataset_of(source, set(_BURNED_IN_TAGS) | {_SOP_INSTANCE_TAG, _CHARSET_TAG})
        original_sop = str(probe.get("SOPInstanceUID", "") or "")
        reason = burned_in_reason(probe)
    except Exception as exc:
        raise FastPathUnsupported(f"value not handled: {type(exc).__name__}") from exc
    hold_burned_in(reason, original_sop, allow_burned_in)
    if walk.refused is not None:
        raise refused_sequence(walk.refused[0], walk.refused[1], original_sop)

    # finishing attributes (the engine's own _finish) and the file meta
    try:
        finish = _finish_elements(deid, pseudonym, walk.encodings)
        for tag, (_chunk, raw_elem) in finish.items():
            existing = walk.output.get(tag)
            if existing is not None and existing.VR != raw_elem.VR:
                raise FastPathUnsupported("finishing attribute with an unexpected VR")
        meta, meta_bytes, new_sop = _file_meta(walk.output, meta_raw)
    except FastPathUnsupported:
        raise
    except Exception as exc:
        raise FastPathUnsupported(f"finish not handled: {type(exc).__name__}") from exc

    # merge the finishing attributes at their sorted positions
    output = walk.output
    for tag, (_chunk, raw) in finish.items():
        output[tag] = raw
    chunks = dict(walked)
    for tag, (chunk, _raw_elem) in finish.items():
        chunks[tag] = chunk
    out = b"".join([_PREAMBLE, b"DICM", meta_bytes, *(chunks[tag] for tag in sorted(chunks))])

    has_groups = any(tag in source or tag in output for tag in FUNCTIONAL_GROUP_TAGS)
    try:
        geo_after = _geometry(out, output, has_groups)
        same_geometry = not has_groups and all(
            (source[t].VR, source[t].value) == (output[t].VR, output[t].value)
            if t in source
            else t not in output
            for t in _GEOMETRY_TAG_SET | {_CHARSET_TAG}
        )
        # identical raw elements give identical hashes; otherwise hash the input too
        geo_before = geo_after if same_geometry else _geometry(data, source, has_groups)
        pix_in, pix_out = _pixels(source), _pixels(output)
        pix_after = pixel_hash(_dataset_of(output, frozenset(PIXEL_DATA_TAGS)))
        pix_before = (
            pix_after
            if pix_in == pix_out
            else pixel_hash(_dataset_of(source, frozenset(PIXEL_DATA_TAGS)))
        )
    except Exception as exc:
        raise FastPathUnsupported(f"hash input not handled: {type(exc).__name__}") from exc
    from hospital_node.deid.engine import check_unchanged  # engine imports this module lazily

    check_unchanged((geo_before, pix_before), (geo_after, pix_after), new_sop)

    log.debug("de-identified instance %s (%d changes)", new_sop, sum(run.counts.values()))
    elements: dict[BaseTag, DataElement | RawDataElement] = {
        BaseTag(t): output[t] for t in sorted(output)
    }
    result_ds = FileDataset(
        io.BytesIO(out),
        elements,
        preamble=_PREAMBLE,
        file_meta=meta,
        is_implicit_VR=False,
        is_little_endian=True,
    )
    result_ds.set_original_encoding(False, True, None)
    result = DeidResult(
        dataset=result_ds,
        original_sop_uid=original_sop,
        new_sop_uid=new_sop,
        geometry_hash=geo_after,
        pixel_hash=pix_after,
        actions_applied=dict(run.counts),
    )
    return out, result


_finish_caches: weakref.WeakKeyDictionary[
    Deidentifier, dict[tuple[str, tuple[str, ...]], dict[int, tuple[bytes, RawDataElement]]]
] = weakref.WeakKeyDictionary()


def _finish_elements(
    deid: Deidentifier, pseudonym: str, encodings: list[str]
) -> dict[int, tuple[bytes, RawDataElement]]:
    """The attributes ``Deidentifier._finish`` sets, encoded (they depend only on the
    pseudonym, the options and the character set, so they are made once per pair)."""
    cache = _finish_caches.get(deid)
    if cache is None:
        cache = _finish_caches[deid] = {}
    key = (pseudonym, tuple(encodings))
    found = cache.get(key)
    if found is not None:
        return found
    tail = Dataset()  # no file meta: _finish sets the attributes only
    deid._finish(tail, pseudonym)
    if sorted(tail.keys()) != sorted(_FINISH_TAGS):
        raise FastPathUnsupported("the engine's finishing step changed")
    made: dict[int, tuple[bytes, RawDataElement]] = {}
    for tag in _FINISH_TAGS:
        elem = tail[tag]
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem, encodings)
        chunk = fp.getvalue()
        hdr = 12 if elem.VR in _LONG_VRS else 8
        made[tag] = (chunk, _raw(tag, str(elem.VR), chunk[hdr:]))
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = made
    return made


def _uid(raw: RawDataElement | None) -> str | None:
    """A single UID value as pydicom reads it (None when absent or multi-valued)."""
    if raw is None:
        return None
    value = convert_raw_data_element(raw).value
    return str(value) if isinstance(value, str) else None


def _meta_element(tag: int, vr: str, value: bytes) -> bytes:
    return _header(tag, vr, len(value)) + value


def _file_meta(
    output: dict[int, RawDataElement], meta_raw: dict[int, RawDataElement]
) -> tuple[FileMetaDataset, bytes, str]:
    """The file meta the engine builds in ``_finish`` as ``dcmwrite`` writes it.

    Media Storage SOP Class UID = the output's SOP Class UID (the input meta's when the
    data set has none), Media Storage SOP Instance UID = the output's SOP Instance UID,
    the input's transfer syntax, pydicom's implementation class UID and our
    implementation version name. Anything ``dcmwrite`` would refuse falls back.
    """
    from hospital_node.deid.engine import IMPLEMENTATION_VERSION_NAME

    if _SOP_CLASS_TAG in output:
        sop_class = _uid(output[_SOP_CLASS_TAG])
    else:
        sop_class = _uid(meta_raw.get(0x00020002))
    sop_instance = _uid(output.get(_SOP_INSTANCE_TAG))
    syntax = _uid(meta_raw.get(0x00020010))
    if not sop_class or not sop_instance or not syntax:
        raise FastPathUnsupported("file meta would be invalid")
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    def ui(text: str) -> bytes:
        raw = text.encode("ascii")
        return raw + b"\x00" if len(raw) & 1 else raw

    def sh(text: str) -> bytes:
        raw = text.encode("ascii")
        return raw + b" " if len(raw) & 1 else raw

    body = b"".join(
        (
            _meta_element(0x00020001, "OB", b"\x00\x01"),
            _meta_element(0x00020002, "UI", ui(sop_class)),
            _meta_element(0x00020003, "UI", ui(sop_instance)),
            _meta_element(0x00020010, "UI", ui(syntax)),
            _meta_element(0x00020012, "UI", ui(str(PYDICOM_IMPLEMENTATION_UID))),
            _meta_element(0x00020013, "SH", sh(IMPLEMENTATION_VERSION_NAME)),
        )
    )
    meta.FileMetaInformationGroupLength = len(body)
    return meta, _meta_element(0x00020000, "UL", _U32.pack(len(body))) + body, sop_instance
