"""Raw DICOM bytes have one home (gateway/fidelity/dicom_raw.py) reading them as pydicom.

It reads what pydicom reads: the same elements at the same offsets (Explicit and Implicit VR Little
Endian, sequences of defined and undefined length, encapsulated pixel data), the same
File Meta group read and byte-identical File Meta written; malformed bytes give
ValueError and nothing else. No other module of the node keeps a VR table, unpacks
element headers or names the item delimiters, and the two paths of the de-identifier
share their transform without importing each other's private names."""

from __future__ import annotations

import ast
import copy
import io
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from gateway.fidelity import dicom_raw
from gateway.fidelity.dicom_raw import (
    Element,
    elements,
    encode_file_meta,
    read_file_meta,
    sequence_items,
)
from hospital_node.deid import Deidentifier
from tests.dicom_factory import StudyInfo, ct_series, encapsulated_ct, enhanced_ct, to_part10

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "hospital_node", "factory_node")
HOME = ROOT / "gateway" / "fidelity" / "dicom_raw.py"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- the VR table is the standard's -------------------------------------------------------


def test_the_vr_table_is_pydicoms_vr_list_and_length_rule() -> None:
    """The VR table is pydicom's VR list, long VRs exactly its 4-byte-length ones.

    So the table changes when the standard (and pydicom) does."""
    assert dicom_raw.VRS == {v.value for v in VR if " or " not in v.value}
    assert {str(v) for v in EXPLICIT_VR_LENGTH_32} == dicom_raw.LONG_VRS
    assert dicom_raw.LONG_VRS.isdisjoint(dicom_raw.SHORT_VRS)
    assert set(dicom_raw.VR_BYTES.values()) == dicom_raw.VRS
    assert dicom_raw.TEXT_VRS <= dicom_raw.VRS and set(dicom_raw.VALUE_SIZES) <= dicom_raw.VRS


# --- the walk reads what pydicom reads -----------------------------------------------------


def _sequences(ds: Dataset, undefined: bool) -> Dataset:
    """``ds`` with two levels of sequences (empty items and values included)."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "X1", "99LOCAL", ""
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.PurposeOfReferenceCodeSequence = Sequence([inner, Dataset()])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.add_new(0x00091010, "LO", "PRIVATE VALUE")
    for elem in (ds["ReferencedImageSequence"], item["PurposeOfReferenceCodeSequence"]):
        elem.is_undefined_length = undefined
    for seq_item in (item, inner):
        seq_item.is_undefined_length_sequence_item = undefined
    return ds


SHAPES: dict[str, Callable[[], Dataset]] = {
    "ct-slice": lambda: next(ct_series(1, rows=16, cols=16, study=StudyInfo())),
    "defined-sequences": lambda: _sequences(next(ct_series(1, rows=8, cols=8)), False),
    "undefined-sequences": lambda: _sequences(next(ct_series(1, rows=8, cols=8)), True),
    "enhanced-ct-functional-groups": lambda: enhanced_ct(2),
}


def encoded(ds: Dataset, implicit: bool) -> bytes:
    """The data set bytes of ``ds`` (no File Meta) as pydicom writes them."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, copy.deepcopy(ds))
    return fp.getvalue()


def same_as_pydicom(data: bytes, start: int, stop: int, undefined: bool, implicit: bool) -> int:
    """Walk ``data[start:stop]`` with both readers and compare every element (recursing
    into sequence items); returns how many elements were compared."""
    ours = list(elements(data, start, stop, undefined_item=undefined, implicit=implicit))
    fp = io.BytesIO(data)
    fp.seek(start)
    theirs = []
    body_end = stop - 8 if undefined else stop  # an undefined item: before its delimiter
    for raw in data_element_generator(fp, implicit, True, defer_size=None):
        if fp.tell() > body_end:
            break
        theirs.append(raw)
        if fp.tell() == body_end:
            break
    assert [tag for tag, *_rest in ours] == [int(raw.tag) for raw in theirs]
    level = read_dataset(io.BytesIO(data[start:body_end]), implicit, True)
    compared = 0
    for (tag, vr, length, value_start, _end, items), raw in zip(ours, theirs, strict=True):
        if not implicit:
            assert vr == raw.VR, hex(tag)
        elif not (tag >> 16 & 1 and tag & 0xFFFF > 0xFF):  # public, or a private creator
            assert vr == level[tag].VR or (tag == 0x7FE00010 and vr == "OB"), hex(tag)
        compared += 1
        if items is None:
            assert length == raw.length and value_start == raw.value_tell, hex(tag)
            assert (raw.value or b"") == data[value_start : value_start + length], hex(tag)
            continue
        assert len(items) == len(level[tag].value), hex(tag)
        for item_start, item_stop, item_undefined in items:
            compared += same_as_pydicom(data, item_start, item_stop, item_undefined, implicit)
    return compared


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_walk_finds_the_elements_pydicom_reads(shape: str, implicit: bool) -> None:
    """Same tags, VRs, lengths, value offsets, bytes and item counts at every level."""
    data = encoded(SHAPES[shape](), implicit)
    assert same_as_pydicom(data, 0, len(data), False, implicit) > 20


def test_encapsulated_pixel_data_gives_pydicoms_fragments() -> None:
    """Encapsulated pixel data gives pydicom's fragments; unasked, it is a ValueError.

    Without ``encapsulated=True`` an undefined length outside a sequence is refused."""
    ds = encapsulated_ct()
    data = encoded(ds, False)
    walk = elements(data, 0, len(data), encapsulated=True)
    walked = {tag: items for tag, _vr, _n, _s, _e, items in walk}
    fragments = walked[0x7FE00010]
    assert fragments is not None
    ours = [data[start:stop] for start, stop, _undefined in fragments]  # the BOT first
    assert ours == list(generate_fragments(ds.PixelData)) and len(ours) > 1
    with pytest.raises(ValueError, match="undefined length"):
        list(elements(data, 0, len(data)))


def test_sequences_nested_deeper_than_the_limit_are_refused() -> None:
    """Sixteen nested sequences walk; seventeen give ValueError (no recursion error)."""

    def nested(levels: int) -> bytes:
        ds = Dataset()
        ds.CodeValue = "X"
        for _ in range(levels):
            outer = Dataset()
            outer.ContentSequence = Sequence([ds])
            outer["ContentSequence"].is_undefined_length = True
            ds.is_undefined_length_sequence_item = True  # its end is found by walking it
            ds = outer
        return encoded(ds, False)

    data = nested(dicom_raw.MAX_DEPTH)
    assert len(list(elements(data, 0, len(data)))) == 1
    data = nested(dicom_raw.MAX_DEPTH + 1)
    with pytest.raises(ValueError, match="too deep"):
        list(elements(data, 0, len(data)))


def test_malformed_bytes_give_value_error_and_nothing_else() -> None:
    """Truncated and corrupted bytes end as a complete walk or a ValueError, nothing else.

    Every truncation of a data set with nested undefined-length sequences, and 600
    random corruptions (fixed seed): never struct.error, IndexError or RecursionError,
    never an element past the end."""
    data = encoded(SHAPES["undefined-sequences"](), False)

    def walk(body: bytes) -> list[Element] | None:
        try:
            found = list(elements(body, 0, len(body), even=True))
        except ValueError:
            return None
        assert all(stop <= len(body) for *_head, stop, _items in found)
        return found

    complete = [n for n in range(len(data)) if walk(data[:n]) is not None]
    assert 0 < len(complete) < len(data) // 4  # only cuts between top-level elements walk
    rng = random.Random("dicom-raw")
    refused = 0
    for _ in range(600):
        at = rng.randrange(len(data))
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
        refused += walk(data[:at] + junk + data[at + len(junk) :]) is None
    assert refused > 100


def test_sequence_items_checks_delimiters_and_lengths() -> None:
    """Wrong item tags, delimiter lengths, overrunning items, missing delimiters: ValueError."""
    item = b"\xfe\xff\x00\xe0" + (10).to_bytes(4, "little") + b"\x08\x00\x00\x01CS\x02\x00AB"
    end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert sequence_items(item + end, 0, 0xFFFFFFFF, len(item) + 8) == ([(8, 18, False)], 26)
    assert sequence_items(item, 0, len(item), len(item)) == ([(8, 18, False)], 18)
    for bad, length in (
        (b"\xfe\xff\x0d\xe0" + item[4:] + end, 0xFFFFFFFF),  # not an item
        (item + b"\xfe\xff\xdd\xe0\x01\x00\x00\x00", 0xFFFFFFFF),  # delimiter with a length
        (item, len(item) - 2),  # the item runs past its sequence
        (item, 0xFFFFFFFF),  # no Sequence Delimitation Item
    ):
        with pytest.raises(ValueError):
            sequence_items(bad, 0, length, len(bad))


# --- File Meta ------------------------------------------------------------------------------


def test_file_meta_is_read_as_pydicom_reads_it() -> None:
    """The File Meta group read from the bytes equals pydicom's; no DICM is a ValueError."""
    part10 = to_part10(next(ct_series(1, rows=8, cols=8)))
    meta, start = read_file_meta(part10)
    reference = dcmread(io.BytesIO(part10), stop_before_pixels=True).file_meta
    ours = Dataset(meta)  # type: ignore[arg-type]  # RawDataElements, as pydicom holds them
    assert sorted(ours.keys()) == sorted(reference.keys())
    assert all(ours[tag].value == reference[tag].value for tag in reference.keys())
    assert start == 144 + int.from_bytes(part10[140:144], "little")
    for bad in (part10[:131], b"\x00" * 132 + part10[132:], part10[:132] + b"\x08\x00"):
        with pytest.raises(ValueError):
            read_file_meta(bad)


@pytest.mark.parametrize("version", ["YIGONG_INGEST_1", "ODD_LEN"])
def test_file_meta_is_encoded_byte_for_byte_as_pydicom_writes_it(version: str) -> None:
    """The one File Meta encoder writes exactly write_file_meta_info's bytes (padding too)."""
    values = {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": "1.2.3.4.55",  # odd length: padded with NUL
        "transfer_syntax": ExplicitVRLittleEndian,
        "implementation_class_uid": "1.2.826.0.1.3680043.8.498.1",
        "implementation_version_name": version,
    }
    meta = Dataset()
    meta.MediaStorageSOPClassUID = UID(values["sop_class_uid"])
    meta.MediaStorageSOPInstanceUID = UID(values["sop_instance_uid"])
    meta.TransferSyntaxUID = UID(values["transfer_syntax"])
    meta.ImplementationClassUID = UID(values["implementation_class_uid"])
    meta.ImplementationVersionName = version
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
    assert encode_file_meta(**values) == fp.getvalue()


def test_implicit_vr_headers_take_pydicoms_dictionary_vr() -> None:
    """Implicit VR: the dictionary's VR; an unknown element of undefined length is an SQ."""
    assert dicom_raw.implicit_vr(0x00091099, 0xFFFFFFFF) == "SQ"
    assert dicom_raw.implicit_vr(0x00090010, 16) == "LO"  # a private creator
    assert dicom_raw.implicit_vr(0x00280010, 2) == "US"
    assert dicom_raw.implicit_vr(0x00091099, 4) == "UN"
    assert str(ImplicitVRLittleEndian) == dicom_raw.IMPLICIT_VR_LITTLE_ENDIAN


# --- one home -------------------------------------------------------------------------------

_VR_NAMES = frozenset(dicom_raw.VRS)
_LENGTH_RULE = frozenset({"OB", "OW", "SQ", "UN", "UT"})
"""VRs any table of the explicit-VR length rule (or of every VR) must name together."""
_DELIMITERS = {dicom_raw.ITEM, dicom_raw.ITEM_DELIMITER, dicom_raw.SEQUENCE_DELIMITER}
_HEADER_FORMAT = re.compile(r"^[<=]?HH")


def _vr_names(node: ast.AST) -> set[str]:
    """The VR names a literal collection (or a whitespace-split VR string) spells out."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
        words = text.split()
        return set(words) if len(words) > 1 and set(words) <= _VR_NAMES else set()
    items: list[ast.expr | None] = []
    if isinstance(node, ast.Set | ast.List | ast.Tuple):
        items = list(node.elts)
    elif isinstance(node, ast.Dict):
        items = list(node.keys)
    found = set()
    for item in items:
        if isinstance(item, ast.Constant) and isinstance(item.value, str | bytes):
            value = item.value.decode("latin-1") if isinstance(item.value, bytes) else item.value
            if value in _VR_NAMES:
                found.add(value)
    return found


def raw_dicom_problems(path: Path, tree: ast.AST) -> list[str]:
    """What in module ``path`` does the raw-DICOM module's work (empty: nothing)."""
    problems = []
    for node in ast.walk(tree):
        names = _vr_names(node)
        if len(names) >= 20 or _LENGTH_RULE <= names:
            problems.append(
                f"{path}:{getattr(node, 'lineno', '?')}: a VR table ({len(names)} VRs); "
                "use gateway.fidelity.dicom_raw (VRS, LONG_VRS, VR_BYTES, ...)"
            )
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            if node.value in _DELIMITERS:
                problems.append(
                    f"{path}:{node.lineno}: item/delimiter tag {node.value:#010x}: walk "
                    "sequences with gateway.fidelity.dicom_raw (elements, sequence_items)"
                )
        if isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            func = ast.unparse(node.func)
            if (
                re.search(r"(^|\.)(Struct|unpack|unpack_from|pack|iter_unpack)$", func)
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str | bytes)
                and _HEADER_FORMAT.match(
                    first.value if isinstance(first.value, str) else first.value.decode()
                )
            ):
                problems.append(
                    f"{path}:{node.lineno}: packs or unpacks a DICOM tag ({first.value!r}); "
                    "read element headers with gateway.fidelity.dicom_raw.element_header"
                )
    return problems


def _modules() -> list[Path]:
    return sorted(p for name in PACKAGES for p in (ROOT / name).rglob("*.py") if p != HOME)


def test_no_other_module_keeps_a_vr_table_or_walks_element_headers() -> None:
    """No module but gateway/fidelity/dicom_raw.py has a VR table or reads element headers.

    The item delimiters too: every other module of the three packages asks it."""
    problems = []
    for path in _modules():
        problems += raw_dicom_problems(path.relative_to(ROOT), ast.parse(path.read_text()))
    assert problems == [], "\n".join(problems)


def test_the_one_home_check_finds_what_it_forbids() -> None:
    """The one-home check catches a copied VR table, an item tag and a struct-read header.

    As text, set or dict; a de-identification policy set of VRs is not a table."""
    source = (
        'A = frozenset(b"OB OW OF SQ UT UN".split())\n'
        'B = {"OB", "OW", "SQ", "UN", "UT", "UC"}\n'
        'C = {vr: 1 for vr in ()} or {"AE": 1, "AS": 1, "AT": 1, "CS": 1, "DA": 1, "DS": 1, '
        '"DT": 1, "FL": 1, "FD": 1, "IS": 1, "LO": 1, "LT": 1, "PN": 1, "SH": 1, "SL": 1, '
        '"SS": 1, "ST": 1, "TM": 1, "UI": 1, "UL": 1, "US": 1}\n'
        "D = 0xFFFEE0DD\n"
        'E = struct.Struct("<HHI")\n'
        'F = struct.unpack_from("<HH", b"", 0)\n'
        'G = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "CS"})  # a policy, not a table\n'
    )
    problems = raw_dicom_problems(Path("x.py"), ast.parse(source))
    assert sorted(int(p.split(":")[1]) for p in problems) == [1, 2, 3, 4, 5, 6]
    assert raw_dicom_problems(HOME, ast.parse(HOME.read_text())) != []  # it is all there


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from X import name`` in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, alias.name) for alias in node.names]
    return out


def test_engine_and_fast_share_the_transform_not_private_names() -> None:
    """De-identification's two paths share deid/transform.py, not each other's privates.

    deid/fast.py imports nothing from deid/engine.py; engine imports only fast's public
    names; raw DICOM comes from gateway/fidelity/dicom_raw.py."""
    deid = ROOT / "hospital_node" / "deid"
    fast = _imports(deid / "fast.py")
    engine = _imports(deid / "engine.py")
    assert not [m for m, _n in fast if m == "hospital_node.deid.engine"]
    assert [(m, n) for m, n in fast + engine if n.startswith("_")] == []
    for imports in (fast, engine):
        assert ("hospital_node.deid.transform", "Pass") in imports or (
            "hospital_node.deid.transform",
            "finish_attributes",
        ) in imports
    assert any(m == "gateway.fidelity.dicom_raw" for m, _n in fast)
    ingest_fast = _imports(ROOT / "hospital_node" / "ingest_fast.py")
    assert any(m == "gateway.fidelity.dicom_raw" for m, _n in ingest_fast)


def test_the_deidentifier_pickles_for_a_process_pool() -> None:
    """A pickled Deidentifier de-identifies byte-identically (for a process pool)."""
    deid = Deidentifier(b"federation-test-key-0123456789abcdef").for_recipient(b"p|factory-1")
    data = to_part10(next(ct_series(1, rows=8, cols=8)))
    copy_ = pickle.loads(pickle.dumps(deid))
    assert (
        copy_.deidentify_part10(data, "YG-0123456789AB")[0]
        == deid.deidentify_part10(data, "YG-0123456789AB")[0]
    )
