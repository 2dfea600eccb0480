"""Study previews for the clinician's web console: thumbnails, three orthogonal views and
a plot of the slice positions, rendered on the hospital node from the stored pixels.

Pure domain code (no web framework, no grpc, no pynetdicom): the console's wire layer
calls :class:`StudyPreviews` (or the functions below) and serves the bytes it returns.

- :func:`load_volume` reads one series of a received study from the node's object store
  (the Part-10 objects are stored exactly as received and are not encrypted at rest; the
  catalog's :class:`~hospital_node.studies.StudyCatalog` says which objects belong to
  which series), decodes each slice with pydicom and stacks them in Hounsfield units
  (Rescale Slope / Intercept applied), sorted by Image Position (Patient) projected on
  the slice normal (by Instance Number when a slice has no usable position). Memory is
  bounded: slices are block-averaged in-plane to at most :data:`MAX_IN_PLANE` pixels a
  side and at most :data:`MAX_SLICES` evenly spaced slices are kept, so a 1,000-slice
  512 x 512 series becomes at most 512 x 256 x 256 int16 (64 MiB), decoded one slice at
  a time. Pixel data this node cannot decode (a compressed transfer syntax without a
  decoder here, e.g. JPEG 2000 without pylibjpeg) is an
  :class:`~gateway.errors.UnreadableInstance` naming the instance and the transfer
  syntax, never a crash.
- :func:`window` maps HU to 8-bit grey with a preset of :data:`PRESETS`: ``"bone"``
  (centre 300, width 1500 HU, the usual bone window and what CT scanners commonly put
  in Window Center / Width) and ``"soft"`` (centre 40, width 400 HU). Linear between
  ``centre - width/2`` (0) and ``centre + width/2`` (255), clipped outside.
- :func:`render_previews` gives the middle axial slice and the middle coronal and
  sagittal reformats as PNG; the reformats are resampled along the slice axis at the
  slices' real positions (a gap is stretched over its real extent, not squashed) so
  that one pixel is as tall as it is wide: anatomy keeps its proportions. The slice
  with the largest position along the normal is at the top (for an axial series in
  patient coordinates: head up).
- :func:`thumbnails` gives ``count`` evenly spaced slices as small PNGs.
- :func:`encode_png_gray` writes an 8-bit greyscale PNG with zlib and struct only.
- :func:`slice_plot_svg` draws a series report's slice positions with its gaps marked
  (red, labelled); the SVG has no script, no style element or attribute, no external
  reference, so it can be inlined under a strict Content-Security-Policy.
- :class:`PreviewCache` keeps rendered previews of received studies, keyed by study UID,
  report SHA-256, series UID and preset, bounded in entries and bytes.

Nothing here logs or returns patient data: logs name UIDs and counts only; error
messages name UIDs, object ids and transfer syntaxes, never a value of a data set
(pydicom's own messages can quote values, so they are not passed on).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from gateway.errors import NotFound, UnreadableInstance, ValidationError
from gateway.storage import ObjectStore
from hospital_node.studies import InstanceRecord, StudyCatalog

__all__ = [
    "MAX_INSTANCE_BYTES",
    "MAX_IN_PLANE",
    "MAX_SLICES",
    "PRESETS",
    "VIEWS",
    "PreviewCache",
    "PreviewSet",
    "StudyPreviews",
    "StudyVolume",
    "Window",
    "encode_png_gray",
    "load_volume",
    "render_previews",
    "slice_plot_svg",
    "thumbnails",
    "window",
]

log = logging.getLogger(__name__)

MAX_IN_PLANE = 256
"""A slice larger than this (rows or columns) is block-averaged down to at most this."""
MAX_SLICES = 512
"""A series of more slices keeps this many, evenly spaced (first and last included)."""
MAX_INSTANCE_BYTES = 64 * 1024 * 1024
"""A stored instance larger than this is not read for a preview (a slice of a 512 x 512
CT series is about 0.5 MiB)."""
MAX_VIEW_SIDE = 1024
"""No side of a rendered view is longer than this (pixels)."""
VIEWS = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Window:
    """A display window in HU: ``center - width/2`` is black, ``center + width/2`` white."""

    center: float
    width: float


PRESETS: Mapping[str, Window] = {
    "bone": Window(center=300.0, width=1500.0),
    "soft": Window(center=40.0, width=400.0),
}

Gray = npt.NDArray[np.uint8]
CacheKey = tuple[str, str, str, str, int, int]
Floats = npt.NDArray[np.float32]


# --- PNG ---------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png_gray(pixels: Gray) -> bytes:
    """An 8-bit greyscale PNG of the 2-D uint8 array ``pixels`` (rows top to bottom).

    Filter type 0 on every row, one IDAT chunk, no ancillary chunks."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValidationError("a greyscale PNG needs a 2-D uint8 array")
    height, width = pixels.shape
    if height < 1 or width < 1:
        raise ValidationError(f"a PNG cannot be {width} x {height} pixels")
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # column 0: filter type 0
    rows[:, 1:] = pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _chunk(b"IEND", b""),
        )
    )


# --- windowing ---------------------------------------------------------------------------


def window(hu: npt.NDArray[Any], preset: str) -> Gray:
    """Grey levels (uint8) of the HU values ``hu`` in the window ``PRESETS[preset]``.

    ``grey = round((hu - (center - width/2)) / width * 255)``, clipped to 0..255 (half
    up: the centre maps to 128)."""
    try:
        w = PRESETS[preset]
    except (KeyError, TypeError):
        raise ValidationError(
            f"unknown window preset {preset!r}: use one of {', '.join(sorted(PRESETS))}"
        ) from None
    low = w.center - w.width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) * 255.0 / w.width
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


# --- the volume --------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyVolume:
    """One series as a stack of slices in HU, sorted along the slice normal.

    ``hu[k]`` is slice ``k`` (rows x columns, possibly downsampled); ``positions_mm[k]`` its
    position along the normal (ascending; from Instance Numbers x slice spacing when
    the slices have no usable position: ``positions_known`` is False then);
    ``pixel_spacing_mm`` is (row spacing, column spacing) of ``hu`` (after downsampling);
    ``source_shape`` is (slices, rows, columns) of the series as stored (before keeping
    at most ``max_slices`` and downsampling)."""

    study_uid: str
    series_uid: str
    hu: npt.NDArray[np.int16]
    positions_mm: tuple[float, ...]
    positions_known: bool
    pixel_spacing_mm: tuple[float, float]
    source_shape: tuple[int, int, int]

    @property
    def slice_spacing_mm(self) -> float:
        """The median distance between consecutive distinct positions (or the larger
        pixel spacing when there is none)."""
        steps = [b - a for a, b in itertools.pairwise(self.positions_mm) if b - a > 1e-3]
        return float(np.median(steps)) if steps else max(self.pixel_spacing_mm)


def _read(store: ObjectStore, rec: InstanceRecord) -> bytes:
    if rec.size > MAX_INSTANCE_BYTES:
        raise ValidationError(
            f"{_where(rec)} is {rec.size} bytes, more than the {MAX_INSTANCE_BYTES} a preview "
            "reads: previews show single-frame series only"
        )
    with store.open_read(rec.object_id) as chunks:
        return b"".join(chunks)


def _where(rec: InstanceRecord) -> str:
    return f"instance {rec.sop_instance_uid} (object {rec.object_id[:16]})"


def _number(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    try:
        value = ds.get(keyword)
        items = [value] if count == 1 else list(value)
        numbers = tuple(float(v) for v in items)
    except Exception:  # absent or malformed: not usable
        return None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        return None
    return numbers


def _decode(data: bytes, rec: InstanceRecord) -> tuple[Dataset, npt.NDArray[Any]]:
    """The data set and its stored pixel values (2-D) of one stored instance."""
    try:
        ds = dcmread(io.BytesIO(data), force=False)
        syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    except Exception:
        raise UnreadableInstance(f"{_where(rec)} cannot be parsed as a DICOM file") from None
    if "PixelData" not in ds:
        raise UnreadableInstance(f"{_where(rec)} has no Pixel Data: it cannot be previewed")
    frames = _number(ds, "NumberOfFrames", 1)
    if frames is not None and frames[0] != 1:
        raise ValidationError(
            f"{_where(rec)} has {int(frames[0])} frames: previews show single-frame series only"
        )
    if str(ds.get("SamplesPerPixel", 1)) != "1":
        raise ValidationError(f"{_where(rec)} is not greyscale: previews show CT series only")
    try:
        decodable = get_decoder(syntax).is_available
    except Exception:  # no decoder at all for this syntax
        decodable = False
    if not decodable:
        raise UnreadableInstance(
            f"{_where(rec)}: pixel data in transfer syntax {syntax.name or 'unknown'} "
            f"({syntax}) cannot be decoded on this node, so no preview can be shown; "
            "uncompressed, deflated and RLE Lossless series can be previewed"
        )
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception:
        raise UnreadableInstance(
            f"{_where(rec)}: pixel data in transfer syntax {syntax.name} ({syntax}) "
            "does not decode (damaged or inconsistent with Rows/Columns/Bits)"
        ) from None
    if pixels.ndim != 2:
        raise ValidationError(f"{_where(rec)}: pixel data is not one greyscale image")
    return ds, pixels


def _downsample(image: npt.NDArray[Any], factor: int) -> Floats:
    """Block average by ``factor`` in both directions (edges not filling a block dropped)."""
    img = image.astype(np.float32, copy=False)
    if factor == 1:
        return img
    rows, cols = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    blocks = img[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _series_instances(
    studies: StudyCatalog, study_uid: str, series_uid: str
) -> tuple[str, list[InstanceRecord]]:
    """The series' instances, the first object of each SOP Instance UID only (as in the
    completeness report); the largest series of the study when ``series_uid`` is ''."""
    by_series: dict[str, dict[str, InstanceRecord]] = {}
    for rec in studies.instances(study_uid):
        kept = by_series.setdefault(rec.series_uid, {})
        if rec.sop_instance_uid not in kept or kept[rec.sop_instance_uid].duplicate:
            kept[rec.sop_instance_uid] = rec
    if not by_series:
        raise NotFound(f"study {study_uid} has no instances on this node")
    if not series_uid:
        series_uid = max(sorted(by_series), key=lambda s: len(by_series[s]))
    if series_uid not in by_series:
        raise NotFound(f"series {series_uid} is not part of study {study_uid} on this node")
    return series_uid, list(by_series[series_uid].values())


def load_volume(
    store: ObjectStore,
    studies: StudyCatalog,
    study_uid: str,
    series_uid: str = "",
    *,
    max_in_plane: int = MAX_IN_PLANE,
    max_slices: int = MAX_SLICES,
) -> StudyVolume:
    """Read one series of ``study_uid`` (its largest when ``series_uid`` is '') from the
    node's ``store`` as recorded in ``studies``; see the module docstring.

    Raises NotFound (no such study / series), UnreadableInstance (an instance does not
    parse or its pixels do not decode here), ValidationError (multi-frame, colour, or
    slices of different matrix sizes)."""
    if max_in_plane < 8 or max_slices < 1:
        raise ValidationError("max_in_plane must be at least 8 and max_slices at least 1")
    series_uid, records = _series_instances(studies, study_uid, series_uid)
    # Decide the slices kept from the catalog before decoding any pixel (bounded work).
    records.sort(
        key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_instance_uid)
    )
    total = len(records)
    if total > max_slices:
        keep = np.unique(np.linspace(0, len(records) - 1, max_slices).round().astype(int))
        records = [records[i] for i in keep]
    # Sorting by position needs the headers: decode each slice once, downsample at once.
    slices: list[tuple[float | None, int, npt.NDArray[np.int16]]] = []
    normal: np.ndarray | None = None
    shape: tuple[int, int] | None = None
    spacing: tuple[float, float] | None = None
    thickness: float | None = None
    factor = 1
    for order, rec in enumerate(records):
        ds, stored = _decode(_read(store, rec), rec)
        if shape is None:
            shape = (int(stored.shape[0]), int(stored.shape[1]))
            factor = max(1, math.ceil(max(shape) / max_in_plane))
            ps = _number(ds, "PixelSpacing", 2)
            spacing = (ps[0], ps[1]) if ps and ps[0] > 0 and ps[1] > 0 else (1.0, 1.0)
            st = _number(ds, "SpacingBetweenSlices", 1) or _number(ds, "SliceThickness", 1)
            thickness = st[0] if st and st[0] > 0 else None
            iop = _number(ds, "ImageOrientationPatient", 6)
            if iop is not None:
                cross = np.cross(np.array(iop[:3]), np.array(iop[3:]))
                norm = float(np.linalg.norm(cross))
                normal = cross / norm if norm > 1e-6 else None
        elif stored.shape != shape:
            raise ValidationError(
                f"{_where(rec)} is {stored.shape[0]} x {stored.shape[1]} pixels, other slices "
                f"of series {series_uid} are {shape[0]} x {shape[1]}: no volume can be built"
            )
        slope = _number(ds, "RescaleSlope", 1)
        intercept = _number(ds, "RescaleIntercept", 1)
        hu = _downsample(stored, factor) * np.float32(slope[0] if slope else 1.0) + np.float32(
            intercept[0] if intercept else 0.0
        )
        ipp = _number(ds, "ImagePositionPatient", 3)
        position = float(np.dot(np.array(ipp), normal)) if ipp and normal is not None else None
        slices.append((position, order, np.clip(np.rint(hu), -32768, 32767).astype(np.int16)))
    assert shape is not None and spacing is not None  # at least one record was read
    known = all(s[0] is not None for s in slices)
    if known:
        slices.sort(key=lambda s: (s[0], s[1]))
        positions = tuple(float(s[0] or 0.0) for s in slices)
    else:  # instance-number order (records are sorted so); positions by slice spacing
        step = thickness or max(spacing)
        positions = tuple(k * step for k in range(len(slices)))
    volume = np.stack([s[2] for s in slices])
    log.info(
        "volume of study %s series %s: %d of %d slice(s), %d x %d -> %d x %d",
        study_uid, series_uid, len(slices), total, shape[0], shape[1],
        volume.shape[1], volume.shape[2],
    )  # fmt: skip
    return StudyVolume(
        study_uid=study_uid,
        series_uid=series_uid,
        hu=volume,
        positions_mm=positions,
        positions_known=known,
        pixel_spacing_mm=(spacing[0] * factor, spacing[1] * factor),
        source_shape=(total, shape[0], shape[1]),
    )


# --- rendering ---------------------------------------------------------------------------


def _resample_axis(image: Floats, axis: int, sources: Floats) -> Floats:
    """Linear interpolation of ``image`` along ``axis`` at fractional indices ``sources``."""
    n = image.shape[axis]
    src = np.clip(sources, 0.0, n - 1.0)
    lower = np.floor(src).astype(np.intp)
    upper = np.minimum(lower + 1, n - 1)
    frac = (src - lower).astype(np.float32)
    a, b = np.take(image, lower, axis=axis), np.take(image, upper, axis=axis)
    shape = [1, 1]
    shape[axis] = len(frac)
    weights = frac.reshape(shape)
    return a + (b - a) * weights


def _resize(image: Floats, height: int, width: int) -> Floats:
    """``image`` resampled (linearly, pixel centres aligned) to ``height`` x ``width``."""
    rows, cols = image.shape
    out = image
    if height != rows:
        out = _resample_axis(out, 0, (np.arange(height) + 0.5) * (rows / height) - 0.5)
    if width != cols:
        out = _resample_axis(out, 1, (np.arange(width) + 0.5) * (cols / width) - 0.5)
    return out


def _fit(height_mm: float, width_mm: float, longest: int) -> tuple[int, int]:
    """Pixel size (height, width) with the aspect of the mm extent, longest side given."""
    if height_mm >= width_mm:
        return longest, max(1, round(longest * width_mm / height_mm))
    return max(1, round(longest * height_mm / width_mm)), longest


def _reformat(volume: StudyVolume, plane: Floats, width_spacing: float) -> Floats:
    """A plane of (slices x width) resampled so its rows are ``width_spacing`` mm apart,
    along the real slice positions, the largest position at the top."""
    positions = np.asarray(volume.positions_mm, dtype=np.float64)
    step = volume.slice_spacing_mm
    extent = float(positions[-1] - positions[0]) + step
    height = max(1, round(extent / width_spacing))
    width = plane.shape[1]
    if height > MAX_VIEW_SIDE or width > MAX_VIEW_SIDE:
        height, width = _fit(extent, width * width_spacing, MAX_VIEW_SIDE)
        plane = _resize(plane, plane.shape[0], width)
    # Row r (top = 0) shows the position top - (r + 0.5) * extent / height.
    top = float(positions[-1]) + step / 2.0
    wanted = top - (np.arange(height) + 0.5) * (extent / height)
    if len(positions) > 1:
        distinct, first = np.unique(positions, return_index=True)
        sources = np.interp(wanted, distinct, first.astype(np.float64))
    else:
        sources = np.zeros(height)
    return _resample_axis(plane, 0, sources.astype(np.float32))


def _views(volume: StudyVolume) -> dict[str, Floats]:
    hu = volume.hu
    n, rows, cols = hu.shape
    row_spacing, col_spacing = volume.pixel_spacing_mm
    axial = hu[n // 2].astype(np.float32)
    if rows * row_spacing != cols * col_spacing or max(rows, cols) > MAX_VIEW_SIDE:
        longest = min(MAX_VIEW_SIDE, max(rows, cols))
        axial = _resize(axial, *_fit(rows * row_spacing, cols * col_spacing, longest))
    coronal = _reformat(volume, hu[:, rows // 2, :].astype(np.float32), col_spacing)
    sagittal = _reformat(volume, hu[:, :, cols // 2].astype(np.float32), row_spacing)
    return {"axial": axial, "coronal": coronal, "sagittal": sagittal}


def render_previews(volume: StudyVolume, preset: str) -> dict[str, bytes]:
    """PNGs of the middle axial slice and the middle coronal and sagittal reformats
    (keys of :data:`VIEWS`), windowed with ``preset``.

    The axial view has the stored matrix size (after downsampling) unless its pixels
    are not square; a reformat is as wide as the slices (columns for coronal, rows for
    sagittal) and as tall as the series' extent along the normal in those pixels."""
    window(np.zeros(1), preset)  # an unknown preset fails before any work
    return {name: encode_png_gray(window(img, preset)) for name, img in _views(volume).items()}


def thumbnails(
    volume: StudyVolume, count: int = 12, size: int = 96, preset: str = "bone"
) -> list[bytes]:
    """PNGs of ``count`` slices evenly spaced along the series (first and last included;
    fewer when the series has fewer slices), the longest side ``size`` pixels."""
    if count < 1 or not 8 <= size <= MAX_VIEW_SIDE:
        raise ValidationError(f"thumbnails need count >= 1 and 8 <= size <= {MAX_VIEW_SIDE}")
    n, rows, cols = volume.hu.shape
    picks = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    row_spacing, col_spacing = volume.pixel_spacing_mm
    height, width = _fit(rows * row_spacing, cols * col_spacing, size)
    return [
        encode_png_gray(window(_resize(volume.hu[k].astype(np.float32), height, width), preset))
        for k in picks
    ]


# --- the slice plot ------------------------------------------------------------------------

_PLOT_W, _PLOT_H = 640, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 28, 40
_POINT, _GAP, _AXIS = "#1f77b4", "#d62728", "#444444"


def _esc(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        .replace('"', "&quot;").replace("'", "&#39;")
    )  # fmt: skip


def _floats(value: Any, what: str) -> list[float]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValidationError(f"series report: {what} must be a list of numbers")
    out: list[float] = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValidationError(f"series report: {what} must be a list of finite numbers")
        out.append(float(v))
    return out


def slice_plot_svg(series_report: Mapping[str, Any]) -> str:
    """An SVG plot of slice index (x) against position along the normal (y, mm) of one
    series of a completeness report (``SeriesReport.to_dict()``: ``positions_mm``,
    ``gaps``, ``series_uid``, ``spacing_median_mm``, ``missing_slices_estimate``).

    Each gap of the report is one ``<g class="gap">``: a red segment between the two
    slices around it and a label with its size. Slices are blue dots (``class="slice"``).
    Only presentation attributes, no script, style or external reference; every text
    is escaped."""
    positions = sorted(_floats(series_report.get("positions_mm"), "positions_mm"))
    raw_gaps = series_report.get("gaps") or []
    if not isinstance(raw_gaps, list | tuple):
        raise ValidationError("series report: gaps must be a list of [from, to] pairs")
    gaps = [_floats(g, "each gap") for g in raw_gaps]
    if any(len(g) != 2 for g in gaps):
        raise ValidationError("series report: each gap must be a [from, to] pair")
    series_uid = str(series_report.get("series_uid", ""))
    missing = series_report.get("missing_slices_estimate", 0)

    inner_w, inner_h = _PLOT_W - _LEFT - _RIGHT, _PLOT_H - _TOP - _BOTTOM
    n = len(positions)
    low = min(positions + [v for g in gaps for v in g], default=0.0)
    high = max(positions + [v for g in gaps for v in g], default=1.0)
    if high - low < 1e-6:
        low, high = low - 1.0, high + 1.0

    def x(index: float) -> float:
        return _LEFT + (inner_w * index / (n - 1) if n > 1 else inner_w / 2.0)

    def y(mm: float) -> float:
        return _TOP + inner_h * (high - mm) / (high - low)

    def index_of(mm: float) -> int:
        return min(range(n), key=lambda i: abs(positions[i] - mm)) if n else 0

    title = f"Slice positions of series {series_uid}: {n} slice(s), {len(gaps)} gap(s)"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_PLOT_W} {_PLOT_H}" '
        f'width="{_PLOT_W}" height="{_PLOT_H}" role="img" aria-label="{_esc(title)}" '
        'font-family="sans-serif" font-size="11">',
        f"<title>{_esc(title)}</title>",
        f'<rect x="0" y="0" width="{_PLOT_W}" height="{_PLOT_H}" fill="#ffffff"/>',
        f'<g class="axes" stroke="{_AXIS}" fill="none">'
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + inner_h}"/>'
        f'<line x1="{_LEFT}" y1="{_TOP + inner_h}" x2="{_LEFT + inner_w}" y2="{_TOP + inner_h}"/>'
        "</g>",
        f'<g class="labels" fill="{_AXIS}">'
        f'<text x="{_LEFT + inner_w / 2:.1f}" y="{_PLOT_H - 8}" text-anchor="middle">'
        "slice index</text>"
        f'<text x="12" y="{_TOP + inner_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 12 {_TOP + inner_h / 2:.1f})">position (mm)</text>'
        f'<text x="{_LEFT - 4}" y="{y(high) + 4:.1f}" text-anchor="end">{high:.1f}</text>'
        f'<text x="{_LEFT - 4}" y="{y(low) + 4:.1f}" text-anchor="end">{low:.1f}</text>'
        f'<text x="{_LEFT}" y="{_TOP + inner_h + 14}" text-anchor="middle">0</text>'
        f'<text x="{_LEFT + inner_w}" y="{_TOP + inner_h + 14}" text-anchor="middle">'
        f"{max(n - 1, 0)}</text>"
        f'<text x="{_LEFT}" y="16">{_esc(f"{len(gaps)} gap(s), ~{missing} missing slice(s)")}'
        "</text></g>",
    ]
    for start, end in gaps:
        i = index_of(start)
        j = min(i + 1, n - 1) if n else 0
        x1, x2 = x(i), x(j)
        label = f"gap {end - start:.1f} mm"
        out.append(
            f'<g class="gap" stroke="{_GAP}" fill="{_GAP}">'
            f'<line x1="{x1:.1f}" y1="{y(start):.1f}" x2="{x2:.1f}" y2="{y(end):.1f}" '
            'stroke-width="3"/>'
            f'<text x="{(x1 + x2) / 2 + 6:.1f}" y="{(y(start) + y(end)) / 2:.1f}" '
            f'stroke="none">{_esc(label)}</text></g>'
        )
    out.append(f'<g class="slices" fill="{_POINT}">')
    out.extend(
        f'<circle class="slice" cx="{x(i):.1f}" cy="{y(p):.1f}" r="2.5"/>'
        for i, p in enumerate(positions)
    )
    out.append("</g></svg>")
    return "".join(out)


# --- the service and its cache ---------------------------------------------------------------


@dataclass(frozen=True)
class PreviewSet:
    """Everything the console shows for one series and window preset."""

    study_uid: str
    series_uid: str
    preset: str
    report_sha256: str
    views: Mapping[str, bytes]
    thumbnails: tuple[bytes, ...]
    slice_plot_svg: str

    @property
    def size(self) -> int:
        return (
            sum(len(v) for v in self.views.values())
            + sum(len(t) for t in self.thumbnails)
            + len(self.slice_plot_svg)
        )


class PreviewCache:
    """Least-recently-used :class:`PreviewSet` s, at most ``max_entries`` and ``max_bytes``
    (thread-safe). Keyed by (study UID, report SHA-256, series UID, preset, thumbnail
    count, thumbnail size): the previews of a received study do not change, and a
    re-opened study gets a new report (hence a new key)."""

    def __init__(self, max_entries: int = 32, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[CacheKey, PreviewSet] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: CacheKey) -> PreviewSet | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: CacheKey, value: PreviewSet) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            if value.size > self.max_bytes:
                return
            self._items[key] = value
            self._bytes += value.size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.size


def _series_report(report: Mapping[str, Any], series_uid: str) -> dict[str, Any]:
    for entry in report.get("series", []):
        if isinstance(entry, dict) and entry.get("series_uid") == series_uid:
            return entry
    return {"series_uid": series_uid, "positions_mm": [], "gaps": []}


class StudyPreviews:
    """What the console calls: previews of a study the node received, from the node's
    object store and study catalog (``role.studies`` and ``ctx.store`` of the hospital
    role), cached for received studies."""

    def __init__(
        self, store: ObjectStore, studies: StudyCatalog, cache: PreviewCache | None = None
    ) -> None:
        self.store, self.studies = store, studies
        self.cache = cache if cache is not None else PreviewCache()

    def previews(
        self,
        study_uid: str,
        series_uid: str = "",
        preset: str = "bone",
        *,
        thumbnail_count: int = 12,
        thumbnail_size: int = 96,
    ) -> PreviewSet:
        """The previews of one series (the largest when ``series_uid`` is '') of
        ``study_uid``; NotFound for an unknown study or series. A study still
        ``receiving`` is rendered from what has arrived (and not cached); its slice
        plot uses a report computed now."""
        window(np.zeros(1), preset)
        summary = self.studies.get_study(study_uid)
        received = summary.status == "received" and bool(summary.report_sha256)
        if not series_uid:
            series_uid = _series_instances(self.studies, study_uid, "")[0]
        key = (
            study_uid, summary.report_sha256, series_uid, preset, thumbnail_count, thumbnail_size
        )  # fmt: skip
        if received:
            found = self.cache.get(key)
            if found is not None:
                return found
        volume = load_volume(self.store, self.studies, study_uid, series_uid)
        report = summary.report if received else self.studies.build_report(study_uid)
        result = PreviewSet(
            study_uid=study_uid,
            series_uid=series_uid,
            preset=preset,
            report_sha256=summary.report_sha256,
            views=render_previews(volume, preset),
            thumbnails=tuple(thumbnails(volume, thumbnail_count, thumbnail_size, preset)),
            slice_plot_svg=slice_plot_svg(_series_report(report, series_uid)),
        )
        if received:
            self.cache.put(key, result)
        log.info(
            "previews of study %s series %s (%s): %d slice(s), %d thumbnail(s)",
            study_uid, series_uid, preset, volume.hu.shape[0], len(result.thumbnails),
        )  # fmt: skip
        return result

    def series_uids(self, study_uid: str) -> list[str]:
        """The series of ``study_uid`` on this node, sorted (NotFound: no such study)."""
        self.studies.get_study(study_uid)
        return sorted({r.series_uid for r in self.studies.instances(study_uid)})
