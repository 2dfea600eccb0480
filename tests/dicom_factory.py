"""Realistic synthetic CT datasets for the de-identification tests.

Everything here is invented: the "patient" is fictitious, UIDs are random under the
pydicom root. The datasets look like what a PACS sends: a multi-slice axial series
with consistent geometry, patient and visit data at top level and inside nested
sequences (Request Attributes, Referenced Study/Image, Source Image, Other Patient
IDs), private blocks (including a private sequence), an enhanced multi-frame variant
with per-frame functional groups and an RLE-encapsulated variant.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

PATIENT_NAME = "DOE^JANE^Q"
PATIENT_ID = "MRN0012345"
PATIENT_BIRTH_DATE = "19770412"
REFERRING_PHYSICIAN = "WANG^LEI^^DR"
INSTITUTION = "FIRST PEOPLES HOSPITAL OF SOMEWHERE"
ACCESSION = "ACC20240315001"
PRIVATE_CREATOR = "ACME CT 1.0"
IDENTIFYING_STRINGS = (
    PATIENT_NAME,
    PATIENT_ID,
    PATIENT_BIRTH_DATE,
    REFERRING_PHYSICIAN,
    INSTITUTION,
    ACCESSION,
    "DOE",
    "MRN0012345",
    "OLDMRN-778899",
    "Room 12 Bed 3",
    "+8613800138000",
)
"""Values the factory plants; none may appear in de-identified output."""


@dataclass
class StudyInfo:
    """One imaging study of the fictitious patient."""

    study_date: str = "20240315"
    study_time: str = "093012"
    study_uid: str = field(default_factory=generate_uid)
    accession: str = ACCESSION
    description: str = "CT KNEE LEFT W/O CONTRAST DR WANG"
    patient_name: str = PATIENT_NAME
    patient_id: str = PATIENT_ID


@dataclass
class SeriesInfo:
    """One series of a study."""

    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    number: int = 3
    description: str = "AXIAL 1.0 BONE"
    slice_thickness: str = "1.0"
    pixel_spacing: tuple[str, str] = ("0.488281", "0.488281")
    origin: tuple[float, float, float] = (-125.0, -140.5, -80.0)


@functools.cache
def _radius_grid(rows: int, cols: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return ((x - cols / 2.0) ** 2 + (y - rows / 2.0) ** 2).astype(np.float32)


def phantom_slice(index: int, rows: int, cols: int) -> bytes:
    """A cylinder of "bone" (HU ~ 1000) in air whose radius changes with the slice."""
    radius = min(rows, cols) * (0.25 + 0.1 * np.sin(index / 15.0))
    pixels = np.where(_radius_grid(rows, cols) < radius**2, 2024 + index % 50, 24)
    return pixels.astype("<u2").tobytes()


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _patient_and_study(ds: Dataset, study: StudyInfo) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.IssuerOfPatientID = "HOSPITAL MRN"
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "F"
    ds.PatientAge = "047Y"
    ds.PatientSize = "1.62"
    ds.PatientWeight = "58.5"
    ds.PatientAddress = "Room 12 Bed 3, 1 Hospital Road"
    ds.PatientTelephoneNumbers = "+8613800138000"
    ds.OtherPatientIDsSequence = Sequence(
        [_item(PatientID="OLDMRN-778899", IssuerOfPatientID="OLD HIS", TypeOfPatientID="TEXT")]
    )
    ds.PatientComments = "Allergic to iodine, call daughter DOE^ANNA"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.StudyID = "S4711"
    ds.AccessionNumber = study.accession
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = REFERRING_PHYSICIAN
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "1 Hospital Road, Somewhere"
    ds.StationName = "CT01-ROOM3"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Slicer 128"
    ds.DeviceSerialNumber = "SN-99812"
    ds.SoftwareVersions = "VA40"
    ds.OperatorsName = "LI^NA"
    ds.PerformingPhysicianName = "ZHANG^WEI"
    ds.ReferencedStudySequence = Sequence(
        [
            _item(
                ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                ReferencedSOPInstanceUID=generate_uid(),
            )
        ]
    )
    ds.RequestAttributesSequence = Sequence(
        [
            _item(
                RequestedProcedureID="RP-20240315-17",
                ScheduledProcedureStepID="SPS-17",
                RequestedProcedureDescription="CT KNEE LEFT FOR DOE JANE",
                ScheduledProcedureStepDescription="KNEE CT PLANNING",
                AccessionNumber=study.accession,
                StudyInstanceUID=study.study_uid,
                ReasonForTheRequestedProcedure="custom implant, pt DOE",
            )
        ]
    )


def _private_blocks(ds: Dataset) -> None:
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", PATIENT_NAME)
    block.add_new(0x02, "DA", PATIENT_BIRTH_DATE)
    block.add_new(0x03, "SQ", Sequence([_item(PatientName=PATIENT_NAME, PatientID=PATIENT_ID)]))
    other = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    other.add_new(0x10, "OB", b"CSA2" + PATIENT_ID.encode() + b"\x00\x00")


def _image_pixel(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "300"
    ds.WindowWidth = "1500"


def _file_meta(ds: Dataset, transfer_syntax: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.SourceApplicationEntityTitle = "PACS_FPH_MAIN"
    ds.file_meta = meta


def ct_slice(
    index: int,
    *,
    study: StudyInfo,
    series: SeriesInfo,
    rows: int = 64,
    cols: int = 64,
    previous_sop_uid: str | None = None,
    pixel_data: bytes | None = None,
) -> Dataset:
    """Slice ``index`` (0-based) of an axial CT series."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = "093512"
    ds.Modality = "CT"
    ds.SeriesDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.ContentDate = study.study_date
    ds.SeriesTime = "093501"
    ds.AcquisitionTime = "093505.250"
    ds.ContentTime = "093512"
    ds.AcquisitionDateTime = study.study_date + "093505.250000+0800"
    ds.TimezoneOffsetFromUTC = "+0800"
    _patient_and_study(ds, study)
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.ProtocolName = "KNEE IMPLANT PLANNING DR WANG"
    ds.BodyPartExamined = "KNEE"
    ds.PatientPosition = "FFS"
    ds.ConvolutionKernel = "BONE"
    ds.KVP = "120"
    ds.GantryDetectorTilt = "0"
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceThickness = series.slice_thickness
    ds.SpacingBetweenSlices = series.slice_thickness
    x0, y0, z0 = series.origin
    z = z0 + index * float(series.slice_thickness)
    ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.4f}"
    ds.PixelSpacing = list(series.pixel_spacing)
    ds.ImageComments = "reviewed by DOE technician"
    ds.BurnedInAnnotation = "NO"
    if previous_sop_uid:
        ref = _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=previous_sop_uid)
        ds.ReferencedImageSequence = Sequence([ref])
        ds.SourceImageSequence = Sequence([_item(**{k: ref.get(k) for k in ref.dir()})])
    ds.AnatomicRegionSequence = Sequence(
        [_item(CodeValue="72696002", CodingSchemeDesignator="SCT", CodeMeaning="Knee")]
    )
    _image_pixel(ds, rows, cols)
    _private_blocks(ds)
    ds.PixelData = pixel_data if pixel_data is not None else phantom_slice(index, rows, cols)
    ds["PixelData"].VR = "OW"
    _file_meta(ds, ExplicitVRLittleEndian)
    return ds


def ct_series(
    n_slices: int,
    *,
    rows: int = 64,
    cols: int = 64,
    study: StudyInfo | None = None,
    series: SeriesInfo | None = None,
) -> Iterator[Dataset]:
    """Yield the slices of one axial CT series (lazily, to keep memory bounded)."""
    study = study or StudyInfo()
    series = series or SeriesInfo()
    previous: str | None = None
    for index in range(n_slices):
        ds = ct_slice(
            index, study=study, series=series, rows=rows, cols=cols, previous_sop_uid=previous
        )
        previous = ds.SOPInstanceUID
        yield ds


def enhanced_ct(
    frames: int = 4, *, rows: int = 16, cols: int = 16, study: StudyInfo | None = None
) -> Dataset:
    """An Enhanced CT instance with shared and per-frame functional groups."""
    study = study or StudyInfo()
    series = SeriesInfo(number=5, description="ENHANCED AXIAL 0.625 BONE")
    ds = ct_slice(
        0,
        study=study,
        series=series,
        rows=rows,
        cols=cols,
        pixel_data=b"".join(phantom_slice(i, rows, cols) for i in range(frames)),
    )
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "SliceLocation",
    ):
        delattr(ds, keyword)
    ds.NumberOfFrames = frames
    shared = _item(
        PixelMeasuresSequence=Sequence(
            [_item(PixelSpacing=["0.3125", "0.3125"], SliceThickness="0.625")]
        ),
        PlaneOrientationSequence=Sequence(
            [_item(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])]
        ),
        PixelValueTransformationSequence=Sequence(
            [_item(RescaleIntercept="-1024", RescaleSlope="1", RescaleType="HU")]
        ),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i in range(frames):
        content = _item(
            FrameAcquisitionDateTime=f"{study.study_date}0935{i:02d}.000000",
            FrameReferenceDateTime=f"{study.study_date}093500.000000",
            FrameAcquisitionNumber=i + 1,
            FrameComments=f"frame {i} checked by DOE",
        )
        per_frame.append(
            _item(
                FrameContentSequence=Sequence([content]),
                PlanePositionSequence=Sequence(
                    [_item(ImagePositionPatient=["-80.0", "-80.0", f"{-40.0 + 0.625 * i:.4f}"])]
                ),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return ds


def encapsulated_ct(*, rows: int = 32, cols: int = 32, study: StudyInfo | None = None) -> Dataset:
    """A single CT slice whose pixel data is RLE Lossless (encapsulated)."""
    study = study or StudyInfo()
    ds = ct_slice(7, study=study, series=SeriesInfo(), rows=rows, cols=cols)
    pixels = np.frombuffer(ds.PixelData, dtype="<u2").reshape(rows, cols)
    ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def to_part10(ds: Dataset) -> bytes:
    """Encode ``ds`` as a Part-10 file in the transfer syntax of its file meta."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --- helpers for the per-attribute tests generated from Table E.1-1 ----------------------

CONTAINER = 0x00081115  # Referenced Series Sequence: not in the table, recursed into
INNER = 0x0008114A  # Referenced Instance Sequence: not in the table either
TEXT_VRS = {"AE", "CS", "SH", "LO", "ST", "LT", "UT", "UC", "PN", "UR"}
BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def token_for(vr: str, i: int) -> tuple[object, bytes | None]:
    """A unique value valid for ``vr`` and the bytes to search for (None: parse check)."""
    if vr in TEXT_VRS:
        text = f"TOKQ{i:04d}Z"
        return text, text.encode()
    if vr == "AS":
        return f"{i % 1000:03d}D", None
    if vr == "DA":
        text = (date(1950, 1, 1) + timedelta(days=i)).strftime("%Y%m%d")
        return text, text.encode()
    if vr == "DT":
        text = (date(1950, 1, 1) + timedelta(days=i)).strftime("%Y%m%d") + "101500.123456"
        return text, text.encode()
    if vr == "TM":
        text = f"10{i % 60:02d}07.{i:06d}"
        return text, text.encode()
    if vr == "UI":
        text = f"1.2.826.0.1.3680043.8.498.77.{i}.5"
        return text, text.encode()
    if vr == "DS":
        text = f"9{i:04d}.25"
        return text, text.encode()
    if vr == "IS":
        return str(800000 + i), None
    if vr in {"US", "SS"}:
        return 40000 + i if vr == "US" else 20000 + i, None
    if vr in {"UL", "SL", "UV", "SV"}:
        return 3_000_000 + i, None
    if vr in {"FL", "FD"}:
        return 1234.5 + i, None
    if vr in BINARY_VRS:
        data = f"TOKQ{i:04d}ZZZZZZZ".encode()  # 16 bytes: valid for OF/OD/OL/OV too
        return data, data
    raise AssertionError(f"no token for VR {vr}")


def sequence_token(i: int, *, uid_only: bool) -> tuple[Sequence, list[bytes]]:
    """A one-item sequence with a unique UID and (unless ``uid_only``) a text token."""
    uid = f"1.2.826.0.1.3680043.8.498.78.{i}.9"
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = uid
    needles = [uid.encode()]
    if not uid_only:
        item.CodeMeaning = f"TOKQ{i:04d}Z"
        needles.append(item.CodeMeaning.encode())
    return Sequence([item]), needles


def base_dataset() -> Dataset:
    """A small, deterministic CT instance (fixed UIDs so the byte search is stable)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1.3"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1.4"
    ds.Modality = "CT"
    ds.StudyDate = "20200101"
    ds.PatientName = "BASE^PATIENT"
    ds.PatientID = "BASE01"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.PixelData = bytes(range(32))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def plant(ds: Dataset, tag_value: int, vr: str, value: object) -> None:
    """Put ``value`` at top level, two sequence levels deep, and in a private element."""
    ds.add_new(tag_value, vr, copy.deepcopy(value))
    inner = Dataset()
    inner.add_new(tag_value, vr, copy.deepcopy(value))
    outer = Dataset()
    outer.add_new(tag_value, vr, copy.deepcopy(value))
    outer.add_new(INNER, "SQ", Sequence([inner]))
    ds.add_new(CONTAINER, "SQ", Sequence([outer]))
    block = ds.private_block(0x0011, "YIGONG TEST", create=True)
    block.add_new(0x01, vr, copy.deepcopy(value))


def values_at(ds: Dataset, tag_value: int) -> list[object]:
    found: list[object] = []
    for elem in ds.iterall():
        if elem.tag == tag_value:
            found.append(elem.value)
    return found
