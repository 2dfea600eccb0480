"""DICOM ingest of malformed instances: hundreds of broken data sets over a real
association are each refused with a failure status and a logged reason (never patient
data), and the node keeps working."""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.audit import DICOM_INSTANCE_RECEIVED
from hospital_node.ingest import wrap_dataset
from hospital_node.studies import StudyCatalog
from tests.cluster import Federation, InProcessNode, write_config
from tests.dicom_factory import IDENTIFYING_STRINGS, StudyInfo, ct_series, to_part10

Case = tuple[str, bytes, str, str]  # (name, data set bytes, transfer syntax, SOP Instance UID)
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
INTERPRETED = {
    0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00180050, 0x00200013,
    0x00200032, 0x00200037, 0x00280010, 0x00280011, 0x00280100, 0x00280030,
}  # fmt: skip
REFUSALS = {0xA900, 0xC000}  # "does not match SOP class", "cannot understand": never retried


def base() -> Dataset:
    return next(ct_series(1, rows=16, cols=16, study=StudyInfo()))


def body_of(ds: Dataset) -> bytes:
    """The data set bytes of ``ds`` as a PACS would send them: after the File Meta group,
    whose length (0002,0000) is the UL value right after the preamble and its header."""
    raw = to_part10(ds)
    start = 144 + int.from_bytes(raw[140:144], "little")
    assert raw[128:132] == b"DICM" and raw[start : start + 2] == b"\x08\x00"
    return raw[start:]


def headers(body: bytes) -> list[tuple[int, int, int, str, int]]:
    """(start, header length, tag, VR, length) of every top-level element of ``body``."""
    out = []
    fp = io.BytesIO(body)
    for elem in data_element_generator(fp, False, True, defer_size=0):
        long = elem.VR in LONG_VRS
        size = 12 if long else 8
        out.append((elem.value_tell - size, size, int(elem.tag), str(elem.VR), elem.length))
    return out


def length_at(h: tuple[int, int, int, str, int]) -> tuple[int, int]:
    """(offset, byte count) of an element header's length field."""
    start, size = h[0], h[1]
    return (start + 8, 4) if size == 12 else (start + 6, 2)


def cases() -> Iterator[Case]:
    rng = random.Random(20240315)
    ds = base()
    uid, ts = ds.SOPInstanceUID, ExplicitVRLittleEndian
    body = body_of(ds)
    heads = headers(body)
    by_tag = {h[2]: h for h in heads}

    def put(data: bytes, at: int, new: bytes) -> bytes:
        return data[:at] + new + data[at + len(new) :]

    for i in range(50):  # truncated at many offsets
        yield f"truncated-{i}", body[: 1 + i * (len(body) - 2) // 49], ts, uid
    wrong = {"UI": ("LO", "SH"), "US": ("SS", "OW"), "DS": ("IS", "LO"), "IS": ("DS", "SL")}
    for tag, (start, _size, _t, vr, _len) in by_tag.items():  # wrong VRs where we look
        if tag in INTERPRETED:
            for other in wrong[vr]:
                if other not in LONG_VRS:
                    yield f"vr-{tag:08x}-{other}", put(body, start + 4, other.encode()), ts, uid
    for i, h in enumerate(rng.sample(heads, 20)):  # VR bytes that are no VR at all
        bad = rng.choice([b"\x00\x00", b"zz", b"QQ", b"1A", b"\xff\xfe", b"  "])
        yield f"vr-garbage-{i}", put(body, h[0] + 4, bad), ts, uid
    for i, h in enumerate(rng.sample(heads[:-1], 30)):  # lengths running past the end
        at, n = length_at(h)
        past = len(body) - (h[0] + h[1]) + 2 + i  # < 0xFFFF: the data set is small
        yield f"length-past-end-{i}", put(body, at, past.to_bytes(n, "little")), ts, uid
    for tag in (0x00280002, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102):
        start, size, _t, _vr, length = by_tag[tag]  # a US value of 3 bytes
        value_end = start + size + length
        grown = body[:value_end] + b"\x00" + body[value_end:]
        yield (
            f"length-odd-{tag:08x}",
            put(grown, start + 6, (length + 1).to_bytes(2, "little")),
            ts,
            uid,
        )
    part10 = to_part10(ds)
    prefixes = [part10[: len(part10) - len(body)]]
    prefixes += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(20)]
    for i, prefix in enumerate(prefixes):  # garbage (or a whole Part-10 preamble) in front
        yield f"garbage-prefix-{i}", prefix + body, ts, uid
    longs = [h for h in heads if h[1] == 12]
    for i, value in enumerate((0xFFFFFFF0, 0x7FFFFFFF, 0x10000000, 0x00100001, 0xFFFFFFFF)):
        for h in longs[:3]:  # huge declared lengths (0xFFFFFFFF: undefined, no delimiter)
            yield f"huge-{i}-{h[2]:08x}", put(body, h[0] + 8, value.to_bytes(4, "little")), ts, uid
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        for variant in ("missing", "empty", "1.2.abc", "1..2", "01.2", "1." + "2" * 70):
            broken = base()
            if variant == "missing":
                delattr(broken, keyword)
            else:
                setattr(broken, keyword, "" if variant == "empty" else variant)
            announced = uid if keyword == "SOPInstanceUID" else str(broken.SOPInstanceUID)
            yield f"uid-{keyword}-{variant[:8]}", body_of(broken), ts, announced
    other = base()
    yield "uid-instance-differs-from-request", body_of(other), ts, uid
    mr = base()
    mr.SOPClassUID = MRImageStorage
    yield "sop-class-mr-sent-as-ct", body_of(mr), ts, mr.SOPInstanceUID
    for i, junk in enumerate([
        b"hello world\n", b"\x89PNG\r\n\x1a\n" + bytes(64), b"%PDF-1.7\n" + bytes(40),
        bytes(1000), b"\xff" * 100, b'{"patient": "nobody"}', b"DICM" + bytes(12),
        *(bytes(rng.randrange(256) for _ in range(n)) for n in (1, 7, 8, 9, 100, 1000, 4096)),
        b"\x08\x00", b"\x08\x00\x16\x00UI",
    ]):  # fmt: skip
        yield f"not-dicom-{i}", junk, ts, uid
    # Random bit flips in element headers. Each flip is chosen to break the structure
    # (a flip inside a value may give a valid, different instance, rightly accepted):
    # a tag group below 0x0008 (and below the element before it), a VR turned to lower
    # case (no VR), or the top bit of a length (runs far past the end of the data set).
    for i in range(60):
        h = rng.choice(heads[1:-1])
        field = ("tag", "vr", "length")[i % 3]
        if field == "tag":
            flipped = put(body, h[0], rng.randrange(0, 8).to_bytes(2, "little"))
        elif field == "vr":
            flipped = put(body, h[0] + 4, bytes(b ^ 0x20 for b in body[h[0] + 4 : h[0] + 6]))
        else:
            at, n = length_at(h)
            flipped = put(body, at + n - 1, bytes([body[at + n - 1] ^ 0x80]))
        yield f"flip-{field}-{i}", flipped, ts, uid
    short = base()
    short.PixelData = short.PixelData[:-2]
    yield "pixels-short", body_of(short), ts, short.SOPInstanceUID
    tall = base()
    tall.Rows = 64
    yield "pixels-rows-too-many", body_of(tall), ts, tall.SOPInstanceUID
    none = base()
    del none.PixelData
    yield "pixels-missing", body_of(none), ts, none.SOPInstanceUID
    zero = base()
    zero.BitsAllocated = 0
    yield "pixels-bits-zero", body_of(zero), ts, zero.SOPInstanceUID
    enc = base()
    enc.compress(RLELossless, np.frombuffer(enc.PixelData, "<u2").reshape(16, 16),
                 encoding_plugin="pydicom")  # fmt: skip
    rle = body_of(enc)
    at = rle.index(b"\xfe\xff\x00\xe0", rle.index(b"\xe0\x7f\x10\x00") + 12)
    yield "rle-bad-item-tag", put(rle, at, b"\xfe\xff\x0d\xe0"), RLELossless, enc.SOPInstanceUID
    yield "rle-cut", rle[: at + 20], RLELossless, enc.SOPInstanceUID


@pytest.fixture(scope="module")
def hospital(
    federation: Federation, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessNode]:
    tmp = tmp_path_factory.mktemp("dicom-malformed")
    node = InProcessNode(
        write_config(
            federation, tmp, "hospital-fuzz", "hospital", dicom={"quiet_period_seconds": 3600.0}
        )
    )
    yield node
    node.stop()


def test_malformed_instances_are_refused_and_the_node_carries_on(
    hospital: InProcessNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
) -> None:
    """Truncations, wrong VRs, bad and huge lengths, garbage prefixes, missing or invalid
    UIDs, SOP Class mismatch, non-DICOM bytes, header bit flips, broken pixel data."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send bytes as they are
    caplog.set_level(logging.DEBUG)
    all_cases = list(cases())
    assert len(all_cases) >= 200 and len({c[0] for c in all_cases}) == len(all_cases)
    files = []
    for n, (name, data, syntax, uid) in enumerate(all_cases):
        path = tmp_path / f"{n:03d}-{name}.dcm"
        path.write_bytes(wrap_dataset(data, sop_class_uid=CTImageStorage, sop_instance_uid=uid,
                                      transfer_syntax=syntax))  # fmt: skip
        files.append(path)
    port: int = hospital.node.hooks.dicom_port  # type: ignore[attr-defined]
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, RLELossless)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="YIGONG")
    assert assoc.is_established
    try:
        answers = [assoc.send_c_store(path) for path in files]
        statuses = {
            case[0]: rsp.get("Status") for case, rsp in zip(all_cases, answers, strict=True)
        }
        accepted = {k: v for k, v in statuses.items() if v not in REFUSALS}
        assert accepted == {}
        assert all(rsp.ErrorComment for rsp in answers)
        good = base()
        good_path = tmp_path / "good.dcm"
        good_path.write_bytes(to_part10(good))
        assert assoc.send_c_store(good_path).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()

    hospital.settle()
    refused = [r for r in caplog.records if "refused with 0x" in r.getMessage()]
    assert len(refused) == len(all_cases)
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    assert not [s for s in IDENTIFYING_STRINGS if any(s in line for line in said)]
    failures = [
        e for e in hospital.node.audit.events(event=DICOM_INSTANCE_RECEIVED, limit=100_000)
        if e.outcome == "failure"
    ]  # fmt: skip
    assert len(failures) == len(all_cases) and all(e.details["reason"] for e in failures)
    assert not [s for s in IDENTIFYING_STRINGS if s in json.dumps([e.details for e in failures])]
    studies: StudyCatalog = hospital.node.hooks.studies  # type: ignore[attr-defined]
    stored = studies.list_studies(limit=1000)
    assert [(s.instance_count, s.study_uid) for s in stored] == [(1, good.StudyInstanceUID)]
