"""Fast path of :meth:`Deidentifier.deidentify_part10` for Explicit VR Little Endian.

The engine parses the whole file with pydicom, walks it and writes it again; most of
that time goes into parsing and re-encoding elements that are kept unchanged. This
module walks the raw data set bytes element by element instead and asks the SAME
decision function (``profile.treatment`` with the same in-clean propagation as
:meth:`hospital_node.deid.transform.Pass.walk`) for every element:

- KEEP elements are copied verbatim (pydicom also writes unparsed elements verbatim);
- REMOVE elements (private groups included) are dropped;
- sequences that are recursed into are rebuilt (defined lengths) from their walked items;
- every other element is decoded with pydicom, changed by ``Pass.apply`` (the
  engine's own code in :mod:`hospital_node.deid.transform`: map_uid, date shift,
  clean_text, dummies, pseudonym, emptying, well-formedness) and encoded again with
  pydicom's element writer;
- the finishing attributes come from ``transform.finish_attributes`` run on a small
  data set, so they are exactly what the engine sets; the file meta has the engine's
  values, encoded by :func:`gateway.fidelity.dicom_raw.encode_file_meta`.

The bytes are walked by :func:`gateway.fidelity.dicom_raw.elements` (element and item
headers, lengths, sequences; odd lengths refused) and the File Meta group read by
:func:`gateway.fidelity.dicom_raw.read_file_meta`.

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
import weakref
from collections import Counter

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
from gateway.fidelity.dicom_raw import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    LONG_VRS,
    PREAMBLE,
    Item,
    elements,
    encode_file_meta,
    encode_header,
    encode_item,
    raw_element,
    read_file_meta,
)
from hospital_node.deid.profile import (
    RECURSE_TREATMENTS,
    Treatment,
    child_context,
    dictionary_vr,
)
from hospital_node.deid.transform import (
    IMPLEMENTATION_VERSION_NAME,
    DeidResult,
    Keys,
    Pass,
    burned_in_reason,
    check_pseudonym,
    check_unchanged,
    finish_attributes,
    hold_burned_in,
    refused_sequence,
)

log = logging.getLogger(__name__)

SUPPORTED_TRANSFER_SYNTAXES = frozenset({EXPLICIT_VR_LITTLE_ENDIAN})

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


class FastPathUnsupported(Exception):
    """The input is outside what the fast path handles; use the engine."""


_CacheKey = tuple[str, tuple[str, ...], int, str, bytes, Treatment, int]
_CacheValue = tuple[bytes, int, tuple[tuple[str, int], ...]]
_CACHE_LIMIT = 4096
_caches: weakref.WeakKeyDictionary[Keys, dict[_CacheKey, _CacheValue]] = weakref.WeakKeyDictionary()
"""Per de-identifier: (pseudonym, encodings, tag, VR, raw value, treatment, in-clean) ->
(encoded element, header length, count changes). The change of a value is a pure function
of these (and of the de-identifier's key and options), so an instance repeating its
series' values (names, UIDs, dates, descriptions) costs one dictionary look-up each.
Bounded, in memory only, dropped with the de-identifier; values are never logged."""


class _Walk:
    """One walk over the raw data set of one Explicit VR Little Endian file."""

    def __init__(self, data: bytes, run: Pass) -> None:
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

    # -- de-identification -----------------------------------------------------------
    def dataset(
        self, pos: int, end: int, *, in_clean: int, top: bool, undefined: bool = False,
        depth: int = 0,
    ) -> list[tuple[int, bytes]]:  # fmt: skip
        """The de-identified elements (tag, encoding) of the data set in ``data[pos:end]``
        (``undefined``: an undefined-length item's, ending with its delimiter)."""
        data = self.data
        out: list[tuple[int, bytes]] = []
        profile = self.profile
        run = self.run
        counts = run.counts
        for tag, vr, _length, vstart, vend, items in elements(
            data, pos, end, undefined_item=undefined, depth=depth, even=True
        ):
            decision_vr = dictionary_vr(tag) if vr == "UN" else vr
            treatment, _code = profile.treatment(tag, decision_vr, in_clean_sequence=in_clean)
            if treatment is Treatment.REMOVE:
                counts["private" if (tag >> 16) & 1 else treatment.value] += 1
                if top and tag in _RECORDED:
                    self.source[tag] = raw_element(tag, vr, data[vstart:vend])
                pos = vend
                continue
            if vr == "UN":
                raise FastPathUnsupported("UN element that is not removed")
            if tag == _CHARSET_TAG and (not top or treatment is not Treatment.KEEP):
                raise FastPathUnsupported("character set in an item or changed")
            value: bytes | None = None
            if top and tag in _RECORDED:
                value = data[vstart:vend]
                self.source[tag] = raw_element(tag, vr, value)
            if items is not None:  # a sequence
                chunk = self.sequence(tag, treatment, items, in_clean, depth)
                hdr = 12
            elif treatment is Treatment.KEEP:
                chunk = data[pos:vend]
                hdr = vstart - pos
                if tag == _CHARSET_TAG:
                    elem_cs = convert_raw_data_element(raw_element(tag, vr, data[vstart:vend]))
                    values = elem_cs.value
                    self.encodings = convert_encodings(values) if values else [default_encoding]
            else:
                chunk, hdr = self.changed(tag, vr, data[vstart:vend], treatment, in_clean)
            out.append((tag, chunk))
            if top:
                # a kept value is the very bytes object recorded from the input (the
                # chunk written is a copy of the same input range); others are re-read
                kept = value is not None and treatment is Treatment.KEEP and vr != "SQ"
                self.output[tag] = raw_element(tag, vr, value if kept and value else chunk[hdr:])
            pos = vend
        return out

    def sequence(
        self, tag: int, treatment: Treatment, items: list[Item], in_clean: int, depth: int
    ) -> bytes:
        if treatment is Treatment.EMPTY:
            self.run.counts[treatment.value] += 1
            return encode_header(tag, "SQ", 0)
        if treatment is Treatment.REFUSE:
            if items and self.refused is None:
                self.refused = (tag, len(items))  # raised where the engine raises it
            return encode_header(tag, "SQ", 0)
        if treatment not in RECURSE_TREATMENTS:
            raise FastPathUnsupported("unexpected treatment of a sequence")
        clean = child_context(in_clean, treatment)
        parts: list[bytes] = []
        for start, stop, undefined in items:
            walked = self.dataset(
                start, stop, in_clean=clean, top=False, undefined=undefined, depth=depth + 1
            )
            parts.append(encode_item(b"".join(chunk for _tag, chunk in walked)))
        value = b"".join(parts)
        return encode_header(tag, "SQ", len(value)) + value

    def changed(
        self, tag: int, vr: str, value: bytes, treatment: Treatment, in_clean: int
    ) -> tuple[bytes, int]:
        """Decode one element with pydicom, apply the engine's change, encode it again."""
        key = (self.run.pseudonym, tuple(self.encodings), tag, vr, value, treatment, in_clean)
        hit = self.cache.get(key)
        if hit is None:
            elem = convert_raw_data_element(raw_element(tag, vr, value), encoding=self.encodings)
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
        return chunk, (12 if elem.VR in LONG_VRS else 8)


def _meta_elements(data: bytes) -> tuple[dict[int, RawDataElement], int]:
    """The raw file meta elements after "DICM" and the offset of the data set."""
    try:
        meta, pos = read_file_meta(data)
        return dict[int, RawDataElement](meta.items()), pos
    except ValueError as exc:
        raise FastPathUnsupported(f"file meta not handled: {exc}") from None


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
    deid: Keys, data: bytes, pseudonym: str, *, allow_burned_in: bool
) -> tuple[bytes, DeidResult]:
    """The fast path; raises FastPathUnsupported when the engine must do it instead.

    Raises the engine's exceptions (ValidationError for a bad pseudonym,
    BurnedInAnnotationHeld, IntegrityError) exactly where the engine would.
    """
    meta_raw, body = _meta_elements(data)
    ts_raw = meta_raw.get(0x00020010)
    if ts_raw is None or ts_raw.VR != "UI":
        raise FastPathUnsupported("no transfer syntax")
    syntax = bytes(ts_raw.value or b"").decode("ascii", "replace").strip(" \x00")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise FastPathUnsupported("transfer syntax not handled")
    check_pseudonym(pseudonym)

    run = Pass(deid, pseudonym)
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
    out = b"".join([PREAMBLE, b"DICM", meta_bytes, *(chunks[tag] for tag in sorted(chunks))])

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
    check_unchanged((geo_before, pix_before), (geo_after, pix_after), new_sop)

    log.debug("de-identified instance %s (%d changes)", new_sop, sum(run.counts.values()))
    elements: dict[BaseTag, DataElement | RawDataElement] = {
        BaseTag(t): output[t] for t in sorted(output)
    }
    result_ds = FileDataset(
        io.BytesIO(out),
        elements,
        preamble=PREAMBLE,
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
    Keys, dict[tuple[str, tuple[str, ...]], dict[int, tuple[bytes, RawDataElement]]]
] = weakref.WeakKeyDictionary()


def _finish_elements(
    deid: Keys, pseudonym: str, encodings: list[str]
) -> dict[int, tuple[bytes, RawDataElement]]:
    """The attributes :func:`~hospital_node.deid.transform.finish_attributes` sets,
    encoded (they depend only on the pseudonym, the options and the character set, so
    they are made once per pair)."""
    cache = _finish_caches.get(deid)
    if cache is None:
        cache = _finish_caches[deid] = {}
    key = (pseudonym, tuple(encodings))
    found = cache.get(key)
    if found is not None:
        return found
    tail = Dataset()  # no file meta: _finish sets the attributes only
    finish_attributes(tail, deid.profile.options, pseudonym)
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
        hdr = 12 if elem.VR in LONG_VRS else 8
        made[tag] = (chunk, raw_element(tag, str(elem.VR), chunk[hdr:]))
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


def _file_meta(
    output: dict[int, RawDataElement], meta_raw: dict[int, RawDataElement]
) -> tuple[FileMetaDataset, bytes, str]:
    """The file meta the engine builds in ``_finish`` as ``dcmwrite`` writes it.

    Media Storage SOP Class UID = the output's SOP Class UID (the input meta's when the
    data set has none), Media Storage SOP Instance UID = the output's SOP Instance UID,
    the input's transfer syntax, pydicom's implementation class UID and our
    implementation version name. Anything ``dcmwrite`` would refuse falls back.
    """
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

    meta_bytes = encode_file_meta(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax=syntax,
        implementation_class_uid=str(PYDICOM_IMPLEMENTATION_UID),
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
    )
    meta.FileMetaInformationGroupLength = len(meta_bytes) - 12
    return meta, meta_bytes, sop_instance
