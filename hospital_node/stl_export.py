"""An approved design as a DICOM Encapsulated STL instance, for the hospital's own PACS.

Runs only inside the hospital: the instance carries the real patient's identity,
taken from an *original* (identified) instance of the study the design was made from,
so that in the PACS the implant appears in the patient's own study. Nothing built
here is ever sent to another node (the outgoing guard refuses identifiable DICOM).
Sending it to the PACS is :func:`hospital_node.wire.pacs_scu.send_to_pacs`.

The instance follows the Encapsulated STL IOD (PS3.3 A.85.1; SOP Class
1.2.840.10008.5.1.4.1.1.104.3), module by module:

=============================  =====  ===================================================
module (PS3.3)                 usage  filled from
=============================  =====  ===================================================
Patient C.7.1.1                M      original: Patient's Name, Patient ID, Issuer of
                                      Patient ID, Birth Date, Sex (Type 2: empty if absent)
General Study C.7.2.1          M      original: Study Instance UID, Study Date/Time,
                                      Referring Physician, Study ID, Accession Number,
                                      Study Description
Encapsulated Document Series   M      Modality M3D, new Series Instance UID, Series Number,
C.24.1                                Series Description
Frame of Reference C.7.4.1     M      the original series' Frame of Reference UID (the
                                      model was designed in its coordinates), Position
                                      Reference Indicator
General Equipment C.7.5.1      M      Manufacturer
Enhanced General Equipment     M      Manufacturer, Model Name, Device Serial Number,
C.7.5.2                               Software Versions (all Type 1: :class:`Equipment`)
Encapsulated Document C.24.2   M      Instance Number, Content Date/Time (export time),
                                      Acquisition DateTime (empty), Burned In Annotation
                                      NO, Source Instance Sequence (the original instance,
                                      purpose (121324, DCM, "Source Image") of CID 7060),
                                      Document Title, Concept Name Code Sequence (empty),
                                      MIME Type ``model/stl``, Encapsulated Document,
                                      Encapsulated Document Length
Manufacturing 3D Model C.35.1  M      Measurement Units Code Sequence (mm, UCUM, "mm") of
                                      CID 7063; Content Description (label and case id)
SOP Common C.12.1              M      SOP Class/Instance UID, Specific Character Set (of
                                      the original: the names are in it), creation date/time
Common Instance Reference      C      required because the Source Instance Sequence
C.12.2                                references an instance: Referenced Series Sequence
                                      (original series → original instance)
=============================  =====  ===================================================

Only a binary STL may be encapsulated (the IOD's content constraint; dcmtk's stl2dcm
refuses ASCII too). It is never converted: converting ASCII to binary would round
every coordinate to float32, and the geometry must arrive as designed.

The Encapsulated Document value must have even length: an odd document gets one
0x00 byte appended and Encapsulated Document Length (0042,0015) holds the length
without it (:func:`encapsulate_document`, :func:`encapsulated_document`). A binary
STL (84 + 50 n bytes) always has even length; the rule matters for other documents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from gateway import __version__
from gateway.errors import ValidationError

log = logging.getLogger(__name__)

ENCAPSULATED_STL_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.3")
STL_MIME_TYPE = "model/stl"
MODALITY = "M3D"
SOURCE_IMAGE = ("121324", "DCM", "Source Image")
"""CID 7060 "Encapsulated Document Source Purpose of Reference"."""
MILLIMETRE = ("mm", "UCUM", "mm")
"""CID 7063 "Model Scale Unit"."""
MAX_DOCUMENT_BYTES = 0xFFFFFFFE
"""An OB value with explicit length holds at most 2**32 - 2 bytes."""

_PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_STUDY = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_OPTIONAL = ("IssuerOfPatientID", "StudyDescription")


@dataclass(frozen=True)
class Equipment:
    """Enhanced General Equipment (all Type 1): the system that made this instance."""

    manufacturer: str = "yigong-gateway"
    model_name: str = "yigong-gateway design export"
    device_serial_number: str = "yigong"
    software_versions: str = __version__


def binary_stl_problem(data: bytes) -> str | None:
    """Why ``data`` is not a binary STL (size = 84 + 50 x count, count >= 1), or None."""
    if len(data) < 84:
        return f"a binary STL has at least 84 bytes, this has {len(data)}"
    count = int.from_bytes(data[80:84], "little")
    if count == 0:
        return "the binary STL header declares 0 triangles"
    if len(data) != 84 + 50 * count:
        ascii_hint = " (it starts with 'solid': ASCII STL?)" if data[:5].lower() == b"solid" else ""
        return (
            f"triangle count {count} in the header needs {84 + 50 * count} bytes, "
            f"this has {len(data)}{ascii_hint}"
        )
    return None


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _required(original: Dataset, keyword: str) -> str:
    value = str(original.get(keyword, "") or "").strip()
    if not value:
        raise ValidationError(
            f"the original instance has no {keyword}; the Encapsulated STL cannot be "
            "linked to the patient's study without it"
        )
    return value


def encapsulate_document(ds: Dataset, document: bytes, mime_type: str) -> None:
    """Set Encapsulated Document (padded to even length), its length and MIME type."""
    if not document:
        raise ValidationError("an empty document cannot be encapsulated")
    if len(document) > MAX_DOCUMENT_BYTES:
        raise ValidationError(
            f"a document of {len(document)} bytes is larger than one DICOM value "
            f"({MAX_DOCUMENT_BYTES} bytes)"
        )
    ds.MIMETypeOfEncapsulatedDocument = mime_type
    ds.EncapsulatedDocument = document + b"\x00" if len(document) % 2 else document
    ds.EncapsulatedDocumentLength = len(document)


def encapsulated_document(ds: Dataset) -> bytes:
    """The document bytes of an encapsulated document instance, without padding."""
    value = bytes(ds.get("EncapsulatedDocument", b"") or b"")
    length = ds.get("EncapsulatedDocumentLength")
    if length is None:
        return value
    if int(length) not in (len(value), len(value) - 1):
        raise ValidationError(
            f"Encapsulated Document Length {int(length)} does not fit a value of {len(value)} bytes"
        )
    return value[: int(length)]


def build_encapsulated_stl(
    stl_bytes: bytes,
    *,
    original_study: Dataset,
    frame_of_reference_uid: str | None = None,
    series_description: str = "Approved implant design",
    content_label: str = "Approved implant design",
    case_id: str = "",
    equipment: Equipment | None = None,
    series_number: int = 900,
    created: datetime | None = None,
) -> Dataset:
    """The Encapsulated STL instance of ``stl_bytes``, in the original patient's study.

    ``original_study`` is an original (identified) instance of the study the design
    was made from; patient and study attributes are copied from it, it is referenced
    as the source, and its Frame of Reference UID is used unless
    ``frame_of_reference_uid`` (of the series the model was designed in) is given.
    ``content_label`` becomes the Document Title, ``case_id`` goes into the Content
    Description. Raises ValidationError if the STL is not binary or the original
    lacks what the link needs. The result has file meta (Explicit VR Little Endian)
    and can be written with :func:`write_part10`.
    """
    problem = binary_stl_problem(stl_bytes)
    if problem:
        raise ValidationError(
            f"only a binary STL can be encapsulated (DICOM Encapsulated STL IOD): {problem}"
        )
    study_uid = _required(original_study, "StudyInstanceUID")
    source_series = _required(original_study, "SeriesInstanceUID")
    source_class = _required(original_study, "SOPClassUID")
    source_instance = _required(original_study, "SOPInstanceUID")
    frame = frame_of_reference_uid or _required(original_study, "FrameOfReferenceUID")
    equipment = equipment or Equipment()
    when = created or datetime.now().astimezone()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds = Dataset()
    # SOP Common
    if "SpecificCharacterSet" in original_study:
        ds.SpecificCharacterSet = original_study.SpecificCharacterSet
    ds.SOPClassUID = ENCAPSULATED_STL_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient and General Study: copied, so the instance joins the patient's study
    for keyword in _PATIENT + _STUDY:
        setattr(ds, keyword, original_study.get(keyword, "") or "")
    ds.StudyInstanceUID = study_uid
    for keyword in _OPTIONAL:
        if original_study.get(keyword):
            setattr(ds, keyword, original_study.get(keyword))
    # Encapsulated Document Series
    ds.Modality = MODALITY
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    # Frame of Reference
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = original_study.get("PositionReferenceIndicator", "") or ""
    # General Equipment + Enhanced General Equipment
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model_name
    ds.DeviceSerialNumber = equipment.device_serial_number
    ds.SoftwareVersions = equipment.software_versions
    # Manufacturing 3D Model
    ds.MeasurementUnitsCodeSequence = Sequence([_code(*MILLIMETRE)])
    ds.ContentDescription = f"{content_label} (case {case_id})" if case_id else content_label
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "NO"
    source = Dataset()
    source.ReferencedSOPClassUID = source_class
    source.ReferencedSOPInstanceUID = source_instance
    source.PurposeOfReferenceCodeSequence = Sequence([_code(*SOURCE_IMAGE)])
    ds.SourceInstanceSequence = Sequence([source])
    ds.DocumentTitle = content_label
    ds.ConceptNameCodeSequence = Sequence()
    encapsulate_document(ds, stl_bytes, STL_MIME_TYPE)
    # Common Instance Reference (the source is in this study)
    instance = Dataset()
    instance.ReferencedSOPClassUID = source_class
    instance.ReferencedSOPInstanceUID = source_instance
    series = Dataset()
    series.SeriesInstanceUID = source_series
    series.ReferencedInstanceSequence = Sequence([instance])
    ds.ReferencedSeriesSequence = Sequence([series])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_STL_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    log.info(
        "Encapsulated STL %s built for study %s (%d bytes)",
        ds.SOPInstanceUID,
        study_uid,
        len(stl_bytes),
    )
    return ds


def write_part10(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM Part-10 file (preamble, file meta, Explicit VR LE)."""
    dcmwrite(path, ds, enforce_file_format=True)
