"""Encapsulated STL export: built from an original CT instance of the patient's study,
written as Part-10, read back with pydicom (the STL bytes exactly, linked to the
original study and frame of reference, in mm), and stored by C-STORE in a real dcmtk
storescp; failures name the PACS."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trimesh
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt

from gateway.errors import PeerUnavailable, TransferError, ValidationError
from hospital_node.stl_export import (
    ENCAPSULATED_STL_STORAGE,
    Equipment,
    build_encapsulated_stl,
    encapsulate_document,
    encapsulated_document,
    write_part10,
)
from hospital_node.wire.pacs_scu import send_to_pacs
from tests.dicom_factory import (
    ACCESSION,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    REFERRING_PHYSICIAN,
    SeriesInfo,
    StudyInfo,
    ct_slice,
)

STORESCP = "/usr/bin/storescp"  # dcmtk's; pynetdicom's own 'storescp' shadows it on PATH


@pytest.fixture
def original() -> Dataset:
    """An original (identified) CT instance of the patient's study."""
    return ct_slice(3, study=StudyInfo(), series=SeriesInfo(), rows=16, cols=16)


@pytest.fixture
def stl() -> bytes:
    return bytes(trimesh.exchange.stl.export_stl(trimesh.creation.icosphere(2, radius=12.5)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_back(ds: Dataset, tmp_path: Path) -> tuple[Dataset, bytes]:
    path = tmp_path / "design.dcm"
    write_part10(ds, path)
    raw = path.read_bytes()
    return dcmread(path), raw


def test_encapsulated_stl_reads_back_linked_to_the_original_study(
    original: Dataset, stl: bytes, tmp_path: Path
) -> None:
    ds = build_encapsulated_stl(stl, original_study=original, case_id="case-7")
    back, raw = read_back(ds, tmp_path)
    assert raw[128:132] == b"DICM"
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPClassUID == ENCAPSULATED_STL_STORAGE
    assert back.SOPClassUID == ENCAPSULATED_STL_STORAGE
    assert back.SOPInstanceUID == back.file_meta.MediaStorageSOPInstanceUID
    assert back.Modality == "M3D"
    assert back.MIMETypeOfEncapsulatedDocument == "model/stl"
    assert encapsulated_document(back) == stl
    assert bytes(back.EncapsulatedDocument) == stl  # a binary STL is of even length
    assert back.EncapsulatedDocumentLength == len(stl)
    # Patient and study: the original's, so the PACS files it in the patient's study.
    assert back.StudyInstanceUID == original.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert back.get(keyword) == original.get(keyword), keyword
    assert (back.PatientName, back.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert back.PatientBirthDate == PATIENT_BIRTH_DATE
    assert back.IssuerOfPatientID == original.IssuerOfPatientID
    assert (back.StudyDate, back.StudyTime) == (original.StudyDate, original.StudyTime)
    assert back.AccessionNumber == ACCESSION
    assert back.ReferringPhysicianName == REFERRING_PHYSICIAN
    assert back.StudyID == original.StudyID
    assert back.SpecificCharacterSet == original.SpecificCharacterSet
    # A new series and instance; the original series' frame of reference.
    assert back.SeriesInstanceUID not in (original.SeriesInstanceUID, "")
    assert back.SOPInstanceUID != original.SOPInstanceUID
    assert back.FrameOfReferenceUID == original.FrameOfReferenceUID
    units = back.MeasurementUnitsCodeSequence
    assert len(units) == 1
    assert (units[0].CodeValue, units[0].CodingSchemeDesignator, units[0].CodeMeaning) == (
        "mm",
        "UCUM",
        "mm",
    )
    # The original instance is the source, and is referenced from the study.
    (source,) = back.SourceInstanceSequence
    assert source.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert source.ReferencedSOPClassUID == original.SOPClassUID
    purpose = source.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121324", "DCM")
    (series,) = back.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == original.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        original.SOPInstanceUID
    )
    # Type 1 and 2 attributes of the other modules are present.
    for keyword in (
        "Manufacturer",
        "ManufacturerModelName",
        "DeviceSerialNumber",
        "SoftwareVersions",
        "SeriesNumber",
        "InstanceNumber",
        "BurnedInAnnotation",
    ):
        assert str(back.get(keyword, "")).strip(), keyword
    for keyword in (
        "ContentDate",
        "ContentTime",
        "AcquisitionDateTime",
        "DocumentTitle",
        "ConceptNameCodeSequence",
        "PositionReferenceIndicator",
    ):
        assert keyword in back, keyword
    assert "case-7" in back.ContentDescription


def test_frame_of_reference_and_equipment_can_be_given(
    original: Dataset, stl: bytes, tmp_path: Path
) -> None:
    frame = "1.2.826.0.1.3680043.8.498.4242"
    ds = build_encapsulated_stl(
        stl,
        original_study=original,
        frame_of_reference_uid=frame,
        equipment=Equipment("ACME Implants", "PlateDesigner", "SN-1", "4.2"),
        series_description="Femoral plate v3",
    )
    back, _ = read_back(ds, tmp_path)
    assert back.FrameOfReferenceUID == frame
    assert (back.Manufacturer, back.ManufacturerModelName) == ("ACME Implants", "PlateDesigner")
    assert back.SeriesDescription == "Femoral plate v3"


@pytest.mark.parametrize("size", [685, 686], ids=["odd", "even"])
def test_odd_and_even_documents_pad_and_read_back_exactly(
    original: Dataset, stl: bytes, tmp_path: Path, size: int
) -> None:
    """A binary STL is always even (84 + 50 n); the padding rule is tested with the
    same encapsulation on a document of each parity."""
    document = bytes((i * 7 + 1) % 256 for i in range(size))
    ds = build_encapsulated_stl(stl, original_study=original)
    encapsulate_document(ds, document, "model/obj")
    back, raw = read_back(ds, tmp_path)
    value = bytes(back.EncapsulatedDocument)
    assert len(value) % 2 == 0
    assert len(value) == size + size % 2
    assert back.EncapsulatedDocumentLength == size
    assert encapsulated_document(back) == document
    if size % 2:
        assert value[-1:] == b"\x00"
    # On disk: tag (0042,0011), VR OB, two reserved bytes, the even value length.
    header = b"\x42\x00\x11\x00OB\x00\x00" + (size + size % 2).to_bytes(4, "little")
    assert header in raw


def test_what_cannot_be_encapsulated_is_refused(original: Dataset, stl: bytes) -> None:
    ascii_stl = trimesh.exchange.stl.export_stl_ascii(trimesh.creation.box((1, 2, 3))).encode()
    with pytest.raises(ValidationError, match=r"only a binary STL.*ASCII STL"):
        build_encapsulated_stl(ascii_stl, original_study=original)
    with pytest.raises(ValidationError, match="needs 684 bytes, this has 300"):
        truncated = stl[:80] + (12).to_bytes(4, "little") + bytes(216)
        build_encapsulated_stl(truncated, original_study=original)
    no_study = Dataset()
    no_study.update(original)
    del no_study.StudyInstanceUID
    with pytest.raises(ValidationError, match="original instance has no StudyInstanceUID"):
        build_encapsulated_stl(stl, original_study=no_study)
    ds = build_encapsulated_stl(stl, original_study=original)
    ds.EncapsulatedDocumentLength = len(stl) + 5
    with pytest.raises(ValidationError, match="does not fit"):
        encapsulated_document(ds)


# -- C-STORE into a real dcmtk storescp ------------------------------------------------


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp on 127.0.0.1, AE title PACS, storing into a folder."""
    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    log = open(tmp_path / "storescp.log", "wb")
    proc = subprocess.Popen(
        [STORESCP, "-aet", "PACS", "-od", str(out), "--socket-timeout", "10", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "storescp.log").read_text()) from None
                time.sleep(0.05)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_storescp_receives_the_encapsulated_stl(
    storescp: tuple[int, Path], original: Dataset, stl: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    port, out = storescp
    caplog.set_level(logging.DEBUG)
    ds = build_encapsulated_stl(stl, original_study=original, case_id="case-7")
    status = send_to_pacs(ds, "127.0.0.1", port, "PACS", calling_ae="YIGONG", timeout=10)
    assert status == 0x0000
    deadline = time.monotonic() + 10
    while not (stored := list(out.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stored) == 1
    got = dcmread(stored[0])
    assert got.SOPClassUID == ENCAPSULATED_STL_STORAGE
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.StudyInstanceUID == original.StudyInstanceUID
    assert got.PatientID == original.PatientID
    assert encapsulated_document(got) == stl
    assert got.file_meta.SourceApplicationEntityTitle == "YIGONG"
    logged = "\n".join(r.getMessage() for r in caplog.records)  # ours and pynetdicom's
    assert ds.SOPInstanceUID in logged
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, ACCESSION):
        assert secret not in logged


def test_pacs_not_running_names_host_and_port(original: Dataset, stl: bytes) -> None:
    port = free_port()  # nothing listens there
    ds = build_encapsulated_stl(stl, original_study=original)
    with pytest.raises(PeerUnavailable, match=f"PACS PACS@127.0.0.1:{port} could not be reached"):
        send_to_pacs(ds, "127.0.0.1", port, "PACS", timeout=20)


def test_refusals_name_the_pacs_and_the_status(
    original: Dataset, stl: bytes, tmp_path: Path
) -> None:
    ds = build_encapsulated_stl(stl, original_study=original)
    # dcmtk storescp that refuses every association
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "-aet", "PACS", "--refuse", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "storescp did not start"
                time.sleep(0.05)
        # dcmtk --refuse sends A-ASSOCIATE-RJ and closes at once; pynetdicom sometimes sees
        # the close first (an abort). Either way the refusal names the PACS.
        refused = (
            rf"PACS@127\.0\.0\.1:{port} "
            "(rejected the association|accepted the connection but no association)"
        )
        with pytest.raises(TransferError, match=refused):
            send_to_pacs(ds, "127.0.0.1", port, "PACS", timeout=20)
    finally:
        proc.terminate()
        proc.wait(10)

    # A PACS that answers with a failure status (pynetdicom SCP: out of resources)
    def disk_full(event: evt.Event) -> Dataset:
        status = Dataset()
        status.Status = 0xA700
        status.ErrorComment = "disk full"
        return status

    full = AE(ae_title="FULLPACS")
    full.add_supported_context(ENCAPSULATED_STL_STORAGE, ExplicitVRLittleEndian)
    server = full.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, disk_full)]
    )
    try:
        port = server.server_address[1]
        with pytest.raises(TransferError, match=r"0xA700 \(disk full\)") as err:
            send_to_pacs(ds, "127.0.0.1", port, "FULLPACS", timeout=20)
        assert f"PACS FULLPACS@127.0.0.1:{port} refused instance {ds.SOPInstanceUID}" in str(
            err.value
        )
    finally:
        server.shutdown()
    # A PACS that does not know the SOP Class at all
    old = AE(ae_title="OLDPACS")
    old.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
    server = old.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.server_address[1]
        with pytest.raises(TransferError, match=r"does not accept SOP Class .*Encapsulated STL"):
            send_to_pacs(ds, "127.0.0.1", port, "OLDPACS", timeout=20)
    finally:
        server.shutdown()
