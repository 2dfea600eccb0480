"""Nothing identifying leaves a hospital by any door (issue #16): the outbound gate.

Real nodes over mTLS (a hospital and a factory), the patient's study entering the
hospital through its DICOM SCP and confirmed for the case, so the pseudonym vault knows
the patient; hostile and clean files built here byte by byte and submitted with a
clinician's certificate and with the node's own certificate.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from gateway.catalog import ObjectRecord
from gateway.errors import OutboundRefused, ValidationError, YigongError
from gateway.fidelity.sniff import resolve_media_type, sniff_file
from gateway.storage.base import ChunkReader, ObjectStore
from gateway.storage.filesystem import FilesystemStore
from hospital_node.outbound import OutboundGate, OutboundLimits
from hospital_node.outbound.identifiers import (
    ACCESSION,
    BIRTH_DATE,
    NAME,
    PATIENT_ID,
    IdentifierMatcher,
    patient_needles,
)
from tests.cluster import Federation, InProcessNode, write_config
from tests.dicom_factory import (
    ACCESSION as STUDY_ACCESSION,
)
from tests.dicom_factory import (
    IDENTIFYING_STRINGS,
    PATIENT_BIRTH_DATE,
    to_part10,
)
from tests.dicom_factory import (
    PATIENT_ID as STUDY_PATIENT_ID,
)
from tests.outbound_files import (
    binary_stl,
    clean_pdf,
    jpeg_with_exif,
    pdf_document,
    png,
    stream,
    text_content,
    threemf,
)
from tests.test_hospital_release import (
    CASE,
    confirm,
    hospital_stub,
    person,
    push,
    series,
    settle,
    wait_done,
)

Pair = tuple[InProcessNode, InProcessNode]
LIMIT = 4 * 1024 * 1024


@pytest.fixture
def gated(federation: Federation, tmp_path: Path) -> Iterator[Pair]:
    """Hospital + factory; the hospital's patient study confirmed for CASE."""
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    hospital = InProcessNode(
        write_config(
            federation,
            tmp_path,
            "hospital-1",
            "hospital",
            peers={"factory-1": factory.address},
            extra=f"[outbound]\nmax_expanded_bytes = {LIMIT}\nmax_archive_depth = 5\n",
        )
    )
    try:
        datasets = series(3)
        push(hospital, datasets)
        settle(hospital)
        stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
        wait_done(hospital, confirm(stub, datasets[0].StudyInstanceUID).transfer_ids, 60)
        yield hospital, factory
    finally:
        hospital.stop()
        factory.stop()


# --- hostile files -----------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("plan.pdf", b"\x00" * (4 * LIMIT))
    return buf.getvalue()


def _nested(depth: int) -> bytes:
    data = clean_pdf()
    name = "inner.pdf"
    for level in range(depth):
        data, name = _zip({name: data}), f"level{level}.zip"
    return data


def _hostile() -> list[tuple[str, bytes, str, str]]:
    """(file name, bytes, expected message fragment, audited check)."""
    instances = [to_part10(ds) for ds in series(3)]
    part10 = instances[0]
    meta_end = 144 + int.from_bytes(part10[140:144], "little")
    name_pdf = pdf_document([stream(text_content("Patient: DOE JANE, knee"), flate=True)])
    return [
        ("ct20.zip", _zip({f"IM{n:04d}": d for n, d in enumerate(instances)}), "is DICOM", "dicom"),
        ("report.pdf", part10, "yigong study confirm", ""),
        ("slice.bin", part10[meta_end:], "yigong study confirm", ""),
        ("study.tar.gz", _tar_gz({"CT/1.dcm": part10}), "is DICOM", "dicom"),
        ("summary.pdf", name_pdf, f"{NAME} was found in PDF page 1 text", "identifier"),
        (
            "photo.png",
            png({"Comment": f"id {STUDY_PATIENT_ID}"}),
            f"{PATIENT_ID} was found in PNG chunk #2 (tEXt)",
            "identifier",
        ),
        (
            "guide.stl",
            binary_stl(b"patient born " + PATIENT_BIRTH_DATE.encode()),
            f"{BIRTH_DATE} was found in STL header (80 bytes)",
            "identifier",
        ),
        (
            "cam.jpg",
            jpeg_with_exif(b"ImageDescription\x00" + STUDY_ACCESSION.encode()),
            f"{ACCESSION} was found in JPEG EXIF (APP1)",
            "identifier",
        ),
        ("bomb.zip", _bomb(), "outbound.max_expanded_bytes", "expansion-limit"),
        ("deep.zip", _nested(20), "outbound.max_archive_depth (5)", "depth-limit"),
        ("notes.bin", b"free text notes\n" * 10, "may not leave the hospital", "type-not-allowed"),
        ("model.7z", b"7z\xbc\xaf\x27\x1c" + b"\x00" * 64, "7-Zip", "archive-type"),
    ]


def _refused_and_audited(
    hospital: InProcessNode, client: object, tmp_path: Path, actor: str
) -> None:
    submit = client.submit  # type: ignore[attr-defined]
    for name, data, fragment, check in _hostile():
        path = tmp_path / name
        path.write_bytes(data)
        before = len(hospital.node.audit.events(event="security.alert", limit=100_000))
        with pytest.raises(YigongError) as err:
            submit(path, ["factory-1"], case_id=CASE)
        text = str(err.value)
        assert "FAILED_PRECONDITION" in text, (name, text)
        assert fragment in text, (name, text)
        assert not [s for s in IDENTIFYING_STRINGS if s in text], (name, text)
        alerts = hospital.node.audit.events(event="security.alert", limit=100_000)[before:]
        assert len(alerts) == 1, name
        (alert,) = alerts
        assert alert.actor == actor and alert.details["action"] == "submission refused"
        assert alert.object_id == hashlib.sha256(data).hexdigest()
        if check:
            assert alert.details["check"] == check, (name, alert.details)
        audit_text = repr(alert.details)
        assert not [s for s in IDENTIFYING_STRINGS if s in audit_text]


def _clean_ones_arrive(
    hospital: InProcessNode, factory: InProcessNode, client: object, tmp_path: Path
) -> None:
    submit = client.submit  # type: ignore[attr-defined]
    sent = {}
    for name, data in (
        ("review.pdf", clean_pdf(b"wall thickness 2.0 mm", "Design review case " + CASE)),
        ("guide.stl", binary_stl()),
        ("guide.3mf", threemf()),
        ("bundle.zip", _zip({"a/review.pdf": clean_pdf(), "a/guide.stl": binary_stl()})),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        reply = submit(path, ["factory-1"], case_id=CASE)  # no --media-type: inferred
        wait_done(hospital, [t.transfer_id for t in reply.queued], 60)
        sent[hashlib.sha256(data).hexdigest()] = data
    for oid, data in sent.items():
        assert b"".join(factory.node.store.open_read(oid)) == data
    types = {o.object_id: o.media_type for o in factory.node.catalog.list_objects()}
    assert [types[oid] for oid in sent] == [
        "application/pdf",
        "model/stl",
        "model/3mf",
        "application/zip",
    ]


def test_hostile_files_refused_and_audited_clean_ones_arrive_clinician(
    gated: Pair, federation: Federation, tmp_path: Path
) -> None:
    hospital, factory = gated
    client = hospital.client(person(federation, "dr-x", "clinician"))
    _refused_and_audited(hospital, client, tmp_path, "clinician:dr-x@hospital-1")
    before = {o.object_id for o in factory.node.catalog.list_objects()}
    assert all(o.media_type == "application/dicom" for o in factory.node.catalog.list_objects())
    _clean_ones_arrive(hospital, factory, client, tmp_path)
    assert before < {o.object_id for o in factory.node.catalog.list_objects()}


def test_hostile_files_refused_with_the_nodes_own_certificate(
    gated: Pair, tmp_path: Path
) -> None:
    hospital, factory = gated
    with hospital.self_client() as client:
        _refused_and_audited(hospital, client, tmp_path, "node:hospital-1")
        _clean_ones_arrive(hospital, factory, client, tmp_path)


def test_gate_rechecks_before_every_send_attempt(gated: Pair) -> None:
    """A PDF holding the name, queued bypassing Submit, fails at send time."""
    from tests.cluster import wait_for

    hospital, factory = gated
    n = hospital.node
    data = pdf_document([stream(text_content("DOE JANE"), flate=True)])
    digest = hashlib.sha256(data).hexdigest()
    n.store.put_stream(digest, [data])
    obj = n.catalog.add_object(
        object_id=digest,
        size=len(data),
        name="x.pdf",
        media_type="application/pdf",
        case_id=CASE,
        origin_node="hospital-1",
    )
    transfer = n.outbox.queue(obj, "factory-1", actor="test")
    wait_for(lambda: n.catalog.get_transfer(transfer.transfer_id, "outbound").status == "failed")
    t = n.catalog.get_transfer(transfer.transfer_id, "outbound")
    assert NAME in t.last_error and "DOE" not in t.last_error
    assert digest not in {o.object_id for o in factory.node.catalog.list_objects()}
    alerts = n.audit.events(event="security.alert", transfer_id=transfer.transfer_id)
    assert [a.details["check"] for a in alerts] == ["identifier"]


def test_factory_design_without_media_type_is_typed_and_checked(
    pair: Pair, tmp_path: Path
) -> None:
    """#11.7: on any node a design file sent without --media-type gets its real type
    (and so its format check); a declared type the content contradicts is refused."""
    _, factory = pair
    path = tmp_path / "guide.stl"
    path.write_bytes(binary_stl())
    with factory.self_client() as client:
        reply = client.submit(path, [])
        assert reply.object.media_type == "model/stl"
        bad = tmp_path / "broken.stl"
        bad.write_bytes(b"solid x\nfacet normal 0 0 0\n")
        with pytest.raises(YigongError, match=r"INVALID_ARGUMENT.*broken\.stl"):
            client.submit(bad, [])
        picture = tmp_path / "p.png"
        picture.write_bytes(png())
        with pytest.raises(YigongError, match="declared application/pdf but its content is PNG"):
            client.submit(picture, [], media_type="application/pdf")


# --- the scanners and the sniffing, without nodes ------------------------------------


def test_matcher_finds_every_written_form_never_a_substring_of_a_longer_word() -> None:
    m = IdentifierMatcher(
        patient_needles(
            "Zhang^San=张^三=ちょう^さん", "MRN0012345", "19770412", ["OID-77"], ["A123"]
        )
    )
    hits = {
        "报告 张三 男".encode(): NAME,
        "张三".encode("utf-16-le"): NAME,
        "张三".encode("utf-16-be"): NAME,
        "张三".encode("gb18030"): NAME,
        "ちょう".encode(): NAME,
        b"zhang^san": NAME,
        b"SAN ZHANG": NAME,
        "zhang".encode("utf-16-le"): NAME,
        b"id mrn0012345.": PATIENT_ID,
        "1977年04月12日".encode(): BIRTH_DATE,
        "1977年4月12日".encode(): BIRTH_DATE,
        b"12/04/1977": BIRTH_DATE,
        b"1977-04-12": BIRTH_DATE,
        b"dob:19770412": BIRTH_DATE,
        b"OID-77": "another ID of the patient",
        b"acc A123;": ACCESSION,
    }
    for data, what in hits.items():
        assert m.search(data) == what, data
    for data in (b"zhangsanfeng", b"MRN00123456", b"119770412", b"A1234", b"Santos"):
        assert m.search(data) is None, data
    assert "Zhang" not in repr(m) and "MRN" not in repr(m)
    assert not IdentifierMatcher(())
    # A two-letter name is searched in text places, not in binary bytes (where it would
    # be "found" by chance); the whole name is searched everywhere.
    short = IdentifierMatcher(patient_needles("Li^Na", "", ""))
    assert short.search(b"\x00li\x00") == NAME
    assert short.search(b"\x00li\x00", binary=True) is None
    assert short.search(b"\x00LI NA\x00", binary=True) == NAME


def test_sniffing_names_the_real_type_and_refuses_contradictions(tmp_path: Path) -> None:
    dicom = to_part10(series(1)[0])
    cases = {
        "a.stl": (binary_stl(), "", "model/stl"),
        "a.bin": (clean_pdf(), "", "application/pdf"),
        "a.3mf": (threemf(), "", "model/3mf"),
        "a.png": (png(), "application/octet-stream", "image/png"),
        "report.pdf": (dicom, "application/pdf", "application/dicom"),
        "x.json": (b'{"wall_mm": 2}', "", "application/json"),
        "x.dat": (b"plain", "", "application/octet-stream"),
    }
    for name, (data, declared, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert resolve_media_type(path, name, declared) == expected, name
    path = tmp_path / "photo.pdf"
    path.write_bytes(png())
    with pytest.raises(ValidationError, match=r"extension says application/pdf.*PNG image"):
        resolve_media_type(path, "photo.pdf", "")
    assert sniff_file(path).kind == "png"


def _gate_check(
    tmp_path: Path, name: str, data: bytes, media_type: str = "", case_id: str = CASE
) -> str:
    """Run the gate (no nodes) on ``data`` for the fictitious patient; the refusal text,
    or "" when the file passes."""
    store = FilesystemStore(tmp_path / "objects")
    digest = hashlib.sha256(data).hexdigest()
    store.put_stream(digest, [data])
    matcher = IdentifierMatcher(
        patient_needles("DOE^JANE=杜^简", STUDY_PATIENT_ID, PATIENT_BIRTH_DATE, [], ["ACC77"])
    )
    gate = OutboundGate(
        lambda case: matcher if case == CASE else IdentifierMatcher(()),
        lambda oid: False,
        tmp_path / "scratch",
        OutboundLimits(max_expanded_bytes=LIMIT, max_archive_depth=5),
    )
    obj = ObjectRecord(digest, len(data), name, media_type, case_id, "hospital-1", {}, "")
    try:
        gate.check(obj, store, "factory-1")
    except OutboundRefused as exc:
        assert not [s for s in ("DOE", "JANE", "杜", STUDY_PATIENT_ID) if s in str(exc)]
        return f"{exc.check}: {exc}"
    return ""


def test_gate_names_each_place_an_identifier_hides_never_the_value(tmp_path: Path) -> None:
    hex_title = "<" + "Jane Doe".encode("utf-16-be").hex() + ">"
    cases = [
        ("a.pdf", pdf_document([stream(text_content("ok"))], info={"Author": "Jane Doe"}),
         "identifier: 'a.pdf' is not sent to factory-1: the patient's name was found in "
         "PDF metadata field /Author"),
        ("b.pdf", pdf_document([stream(text_content("ok")), f"<< /T {hex_title} >>".encode()]),
         "PDF object 5 (strings)"),
        ("c.csv", "part,owner\nguide,杜简\n".encode("utf-16"), "the file's bytes"),
        ("d.3mf", threemf("Guide for Jane Doe"), "3MF metadata 'Title'"),
        ("e.obj", b"# patient MRN0012345\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n",
         "the patient ID was found in OBJ comment (line 1)"),
        ("f.zip", _zip({"x/doe_jane.pdf": clean_pdf()}), "the name of archive member #1 holds"),
        ("jane-doe.pdf", clean_pdf(), "its file name holds the patient's name"),
        ("g.zip", _zip({"r.pdf": clean_pdf(), "n.txt": b"hello"}),
         "archive member #2 ('n.txt') is of unknown type"),
        ("h.pdf", png(), "declared application/pdf but its content is PNG image"),
        ("i.json", b'{"acc": "ACC77"}', "an accession number of the patient's studies"),
        ("j.stl", binary_stl(b"solid 19770412"), "STL header (80 bytes)"),
    ]  # fmt: skip
    for name, data, expected in cases:
        declared = "application/pdf" if name == "h.pdf" else ""
        text = _gate_check(tmp_path, name, data, declared)
        assert expected in text, (name, text)
    # clean files pass; without a case there is no patient to search for, types still hold
    assert _gate_check(tmp_path, "k.pdf", clean_pdf()) == ""
    assert _gate_check(tmp_path, "l.stl", binary_stl(b"solid 19770412"), case_id="") == ""
    assert _gate_check(tmp_path, "m.zip", _zip({"x.dcm": to_part10(series(1)[0])}), case_id="")


class _CopyingStore(ObjectStore):
    """A store the gate must copy from (as from S3): no local file of its own."""

    def __init__(self, root: Path) -> None:
        self.inner = FilesystemStore(root)

    def describe(self) -> str:
        return "copying:" + self.inner.describe()

    def check(self) -> None:
        self.inner.check()

    def put_file(self, key: str, path: Path) -> None:
        self.inner.put_file(key, path)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        return self.inner.put_stream(key, chunks)

    def open_read(self, key: str, offset: int = 0, chunk_bytes: int = 1 << 20) -> ChunkReader:
        return self.inner.open_read(key, offset, chunk_bytes)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def region(self) -> str | None:
        return None


def test_gate_verdict_is_remembered_by_sha256_and_a_changed_object_is_checked_again(
    tmp_path: Path,
) -> None:
    """A pass is remembered under the object's SHA-256 (a re-check reads nothing); other
    bytes are another key, checked in full and refused; a stored copy that no longer
    matches its SHA-256 is refused by a gate that has no verdict for it (a restart)."""
    store = FilesystemStore(tmp_path / "objects")
    matcher = IdentifierMatcher(
        patient_needles("DOE^JANE=杜^简", STUDY_PATIENT_ID, PATIENT_BIRTH_DATE, [], ["ACC77"])
    )

    def gate() -> OutboundGate:
        return OutboundGate(lambda case: matcher, lambda oid: False, tmp_path / "scratch")

    def record(data: bytes, name: str = "review.pdf") -> ObjectRecord:
        digest = hashlib.sha256(data).hexdigest()
        store.put_stream(digest, [data])
        return ObjectRecord(digest, len(data), name, "application/pdf", CASE, "hospital-1", {}, "")

    clean = record(clean_pdf())
    first = gate()
    first.check(clean, store, "factory-1")
    # remembered: the re-check before a send attempt does not read the object again
    stored = store.path_for(clean.object_id)
    aside = stored.rename(tmp_path / "aside")
    first.check(clean, store, "factory-1")
    with pytest.raises(YigongError, match="not found"):  # without the verdict: read
        gate().check(clean, store, "factory-1")
    aside.rename(stored)
    # the same name with the patient's name inside: another SHA-256, checked, refused
    dirty = record(clean_pdf(text="Guide for Jane Doe"))
    with pytest.raises(OutboundRefused) as refused:
        first.check(dirty, store, "factory-1")
    assert refused.value.check == "identifier" and "Doe" not in str(refused.value)
    # the clean object's stored bytes replaced behind the node's back: a gate without a
    # verdict for it refuses it, whether it scans the file in place or copies it first
    stored.write_bytes(clean_pdf(text="Guide for Jane Doe"))
    for s in (store, _CopyingStore(tmp_path / "objects")):
        with pytest.raises(OutboundRefused) as changed:
            gate().check(clean, s, "factory-1")
        assert changed.value.check == "integrity", changed.value
        assert "no longer matches its SHA-256" in str(changed.value)
    assert not list((tmp_path / "scratch").iterdir())  # no copy left behind
