"""The fast structural check of ingest (hospital_node.ingest_fast) can only make
acceptance faster, never different: on every malformed input of the DICOM malformed
corpus, on thousands of random corruptions of valid instances, and on valid instances
of several shapes, ``parse_instance`` gives exactly what the full pydicom checks give
(the same facts, or the same refusal with the same reason)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from hospital_node import ingest
from hospital_node.ingest import Parsed, _split, parse_instance, wrap_dataset
from hospital_node.ingest_fast import clean_elements
from tests.dicom_factory import StudyInfo, ct_series, enhanced_ct, to_part10
from tests.test_dicom_malformed import body_of, cases

Outcome = Parsed | tuple[str, str]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # corrupted character sets


def outcome(part10: bytes) -> Outcome:
    try:
        return parse_instance(part10)
    except ingest.ValidationError as exc:
        return type(exc).__name__, str(exc)


def both(part10: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Outcome, Outcome]:
    """(with the fast check, with the full pydicom checks only)."""
    fast = outcome(part10)
    with monkeypatch.context() as m:
        m.setattr(ingest, "clean_elements", lambda *_: None)
        full = outcome(part10)
    return fast, full


def wrap(
    body: bytes, uid: str, syntax: str = ExplicitVRLittleEndian,
    sop_class: str = "1.2.840.10008.5.1.4.1.1.2",
) -> bytes:  # fmt: skip
    return wrap_dataset(body, sop_class_uid=sop_class, sop_instance_uid=uid,
                        transfer_syntax=syntax)  # fmt: skip


def fast_accepts(part10: bytes) -> bool:
    _meta, body = _split(part10)
    return clean_elements(body) is not None


def test_every_malformed_input_gets_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    for name, body, syntax, uid in cases():
        part10 = wrap(body, uid, syntax)
        fast, full = both(part10, monkeypatch)
        assert fast == full, name
        assert not isinstance(full, Parsed), name  # the corpus is all refusals
        checked += 1
    assert checked >= 270


def _sequences(ds: Dataset, undefined: bool) -> Dataset:
    """``ds`` with nested sequences (two levels, empty items and values included)."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "X1", "99LOCAL", ""
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.PurposeOfReferenceCodeSequence = Sequence([inner, Dataset()])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.add_new(0x00091010, "LO", "PRIVATE VALUE")  # a private element, odd length padded
    ds.add_new(0x00091011, "SV", [-5, 7])
    for elem in (ds["ReferencedImageSequence"], item["PurposeOfReferenceCodeSequence"]):
        elem.is_undefined_length = undefined
    for seq_item in (item, inner):
        seq_item.is_undefined_length_sequence_item = undefined
    return ds


SHAPES: dict[str, Callable[[], Dataset]] = {
    "ct-slice": lambda: next(ct_series(1, rows=32, cols=32, study=StudyInfo())),
    "ct-defined-sequences": lambda: _sequences(next(ct_series(1, rows=16, cols=16)), False),
    "ct-undefined-sequences": lambda: _sequences(next(ct_series(1, rows=16, cols=16)), True),
    "enhanced-ct-functional-groups": lambda: enhanced_ct(3),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_valid_instances_take_the_fast_path_with_the_same_facts(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = SHAPES[shape]()
    part10 = wrap(body_of(ds), str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID))
    fast, full = both(part10, monkeypatch)
    assert isinstance(full, Parsed), full
    assert fast == full
    assert fast_accepts(part10)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_random_corruptions_get_the_same_answer(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes overwritten, inserted and deleted at random places (fixed seed)."""
    ds = SHAPES[shape]()
    body = body_of(ds)
    uid = str(ds.SOPInstanceUID)
    rng = random.Random(f"ingest-fast-{shape}")
    accepted = refused = 0
    for _ in range(400):
        at = rng.randrange(len(body) if rng.random() < 0.3 else min(len(body), 600))
        how = rng.randrange(3)
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
        if how == 0:
            mutated = body[:at] + junk + body[at + len(junk) :]
        elif how == 1:
            mutated = body[:at] + junk + body[at:]
        else:
            mutated = body[:at] + body[at + len(junk) :]
        fast, full = both(wrap(mutated, uid, sop_class=str(ds.SOPClassUID)), monkeypatch)
        assert fast == full, (at, how, junk)
        if isinstance(full, Parsed):
            accepted += 1
        else:
            refused += 1
    assert refused > 100  # the corruptions do break things (the test can fail)


def test_part10_built_by_pydicom_is_read_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole file as pydicom writes it, wrapped as the SCP does."""
    ds = next(ct_series(1, rows=16, cols=16))
    raw = to_part10(ds)
    start = 144 + int.from_bytes(raw[140:144], "little")
    fast, full = both(wrap(raw[start:], str(ds.SOPInstanceUID)), monkeypatch)
    assert isinstance(fast, Parsed) and fast == full


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_deferred_pixel_hash_is_the_same_hash(shape: str) -> None:
    """The spool leaves the pixel hash to its filer: the spans it gets must hash to
    exactly what pixel_hash gives on the parsed data set."""
    from gateway.fidelity.dicom import pixel_hash_of

    ds = SHAPES[shape]()
    part10 = wrap(body_of(ds), str(ds.SOPInstanceUID), sop_class=str(ds.SOPClassUID))
    deferred = parse_instance(part10, defer_pixel_hash=True)
    now = parse_instance(part10)
    assert deferred.pixel_sha256 == "" and now.pixel_spans == ()
    assert [tag for tag, _at, _n in deferred.pixel_spans] == [0x7FE00010]
    parts = [(tag, part10[at : at + n]) for tag, at, n in deferred.pixel_spans]
    assert pixel_hash_of(parts) == now.pixel_sha256
