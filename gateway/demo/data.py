"""Synthetic data for ``yigong demo``: a small CT series of a fictitious patient and a
clean PDF. Nothing here is real patient data; every UID is freshly generated.

The CT series is what a PACS would push: an axial series with consistent geometry
(1 mm slices, 0.5 mm pixels), the fictitious patient's name, ID and birth date in the
header, and a phantom (a cylinder of "bone" in air) in the pixels. It passes the
factory's default suitability thresholds (at least 10 slices of at most 1 mm).
"""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

FICTITIOUS_NAME = "FICTITIOUS^DEMOPATIENT"  # no common word: the outbound scan matches words
FICTITIOUS_ID = "DEMO-MRN-000042"
FICTITIOUS_BIRTH_DATE = "19700101"
FICTITIOUS_STRINGS = ("FICTITIOUS^DEMOPATIENT", "FICTITIOUS", "DEMOPATIENT", FICTITIOUS_ID)
"""What must never be found in the factory's data directory."""


def _phantom(index: int, rows: int, cols: int) -> bytes:
    y, x = np.mgrid[0:rows, 0:cols]
    radius = min(rows, cols) * (0.25 + 0.05 * np.sin(index / 4.0))
    inside = (x - cols / 2.0) ** 2 + (y - rows / 2.0) ** 2 < radius**2
    return np.where(inside, 2024, 24).astype("<u2").tobytes()


def ct_series(slices: int = 12, rows: int = 32, cols: int = 32) -> list[Dataset]:
    """One axial CT series of the fictitious patient (``slices`` contiguous 1 mm slices)."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    out: list[Dataset] = []
    for index in range(slices):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.PatientName = FICTITIOUS_NAME
        ds.PatientID = FICTITIOUS_ID
        ds.PatientBirthDate = FICTITIOUS_BIRTH_DATE
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.StudyID = "1"
        ds.AccessionNumber = "DEMO-ACC-1"
        ds.StudyDescription = "CT KNEE"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = "AXIAL 1.0 BONE"
        ds.BodyPartExamined = "KNEE"
        ds.PatientPosition = "FFS"
        ds.InstanceNumber = index + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceThickness = "1.0"
        ds.SpacingBetweenSlices = "1.0"
        ds.GantryDetectorTilt = "0"
        z = -80.0 + index
        ds.ImagePositionPatient = ["-8.0", "-8.0", f"{z:.1f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{z:.1f}"
        ds.PixelSpacing = ["0.5", "0.5"]
        ds.BurnedInAnnotation = "NO"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.PixelData = _phantom(index, rows, cols)
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def clean_pdf(text: str = "Design review: demo case") -> bytes:
    """A one-page PDF with a line of text and no metadata beyond the producer."""
    body = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode("ascii")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(body) + body + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    buf = io.BytesIO()
    buf.write(b"%PDF-1.4\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(buf.tell())
        buf.write(b"%d 0 obj\n" % number + obj + b"\nendobj\n")
    xref = buf.tell()
    buf.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        buf.write(b"%010d 00000 n \n" % offset)
    buf.write(b"trailer\n<< /Size %d /Root 1 0 R >>\n" % (len(objects) + 1))
    buf.write(b"startxref\n%d\n%%%%EOF\n" % xref)
    return buf.getvalue()
