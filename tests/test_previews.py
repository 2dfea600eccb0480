"""Study previews for the web console: PNG, windows, orthogonal views, slice plot, cache.

Thumbnails and views are rendered from CT series pushed into a running hospital node
with pynetdicom.

Real data path: the series are C-STOREd over a real association into an in-process
hospital node, which stores and catalogues them as for any PACS; the previews are read
back from that node's object store and study catalog.
"""

from __future__ import annotations

import random
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from gateway.errors import NotFound, UnreadableInstance, ValidationError
from gateway.storage import ObjectStore
from hospital_node.previews import (
    PRESETS,
    PreviewCache,
    StudyPreviews,
    encode_png_gray,
    load_volume,
    render_previews,
    slice_plot_svg,
    thumbnails,
    window,
)
from hospital_node.studies import StudyCatalog
from tests.cluster import Federation, InProcessNode, write_config
from tests.dicom_factory import SeriesInfo, StudyInfo, ct_slice, to_part10

QUIET = 3600.0
DICOM = {
    "ae_title": "YIGONG",
    "allowed_calling_aes": ["PACS1"],
    "allowed_addresses": ["127.0.0.1"],
    "quiet_period_seconds": QUIET,
}
ROWS = COLS = 64
SLICES = 20
THICKNESS = 2.5  # mm between slices
SPACING = 0.5  # mm between pixels
# The cube: HU 1000 in air (-1000); rows, columns and slices [start, stop).
CUBE_ROWS, CUBE_COLS, CUBE_SLICES = (24, 40), (28, 52), (6, 14)  # crosses row/col 32
AIR, BONE = -1000, 1000
STORED_OFFSET = 1024  # RescaleIntercept -1024: stored = HU + 1024


# --- decoding PNGs here, independently of the module -------------------------------------


def decode_png(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit greyscale PNG, checking signature, chunk CRCs and IHDR."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filt, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, colour, compression, filt, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()  # filter type 0 (None) on every row
    return rows[:, 1:]


# --- the series, pushed into a real hospital node ------------------------------------------


def cube_slice(index: int) -> bytes:
    hu = np.full((ROWS, COLS), AIR, dtype=np.int32)
    if CUBE_SLICES[0] <= index < CUBE_SLICES[1]:
        hu[slice(*CUBE_ROWS), slice(*CUBE_COLS)] = BONE
    return (hu + STORED_OFFSET).astype("<u2").tobytes()


def series_slices(indices: list[int], *, study: StudyInfo) -> list[Dataset]:
    series = SeriesInfo(slice_thickness=str(THICKNESS), pixel_spacing=(str(SPACING), str(SPACING)))
    out = []
    for i in indices:
        ds = ct_slice(i, study=study, series=series, rows=ROWS, cols=COLS,
                      pixel_data=cube_slice(i))  # fmt: skip
        ds.InstanceNumber = 1000 - i  # reversed: the order must come from the positions
        out.append(ds)
    return out


def jpeg2000_slice(study: StudyInfo) -> Dataset:
    """A slice whose pixels claim JPEG 2000 (no decoder on this node)."""
    ds = ct_slice(0, study=study, series=SeriesInfo(), rows=ROWS, cols=COLS)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return ds


def rle(ds: Dataset) -> Dataset:
    pixels = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    return ds


@dataclass(frozen=True)
class Node:
    store: ObjectStore
    studies: StudyCatalog
    cube: str  # study UIDs
    gap: str
    jpeg: str
    rle: str
    large: str


def push(port: int, datasets: list[Dataset], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(to_part10(ds))
        files.append(path)
    ae = AE(ae_title="PACS1")
    metas = [split_dataset(p)[0] for p in files]
    for pair in sorted({(m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in metas}):
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title="YIGONG")
    assert assoc.is_established
    try:
        for path in files:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def node(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("previews")
    hospital = InProcessNode(
        write_config(federation, tmp, "hospital-prev", "hospital", dicom=DICOM)
    )
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the data set bytes as they are in the file
    try:
        cube, gap, jpeg, rle_study, large = (StudyInfo() for _ in range(5))
        shuffled = series_slices(list(range(SLICES)), study=cube)
        random.Random(7).shuffle(shuffled)
        big = SeriesInfo()
        datasets = [
            *shuffled,
            *series_slices([i for i in range(10) if i != 4], study=gap),
            jpeg2000_slice(jpeg),
            *[rle(ds) for ds in series_slices(list(range(4)), study=rle_study)],
            *[ct_slice(i, study=large, series=big, rows=512, cols=512) for i in range(3)],
        ]
        push(hospital.node.hooks.dicom_port, datasets, tmp / "out")  # type: ignore[attr-defined]
        hospital.settle()
        studies: StudyCatalog = hospital.node.hooks.studies  # type: ignore[attr-defined]
        studies.tick(datetime.now(UTC) + timedelta(seconds=QUIET + 1), QUIET)
        yield Node(
            hospital.node.store, studies, cube.study_uid, gap.study_uid, jpeg.study_uid,
            rle_study.study_uid, large.study_uid,
        )  # fmt: skip
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        hospital.stop()


# --- PNG and window ----------------------------------------------------------------------------


def test_png_round_trips_through_an_independent_decoder() -> None:
    """The PNG has the signature, a valid IHDR, correct CRCs and decodes to the pixels."""
    pixels = np.arange(7 * 13, dtype=np.uint8).reshape(7, 13) * 3
    assert (decode_png(encode_png_gray(pixels)) == pixels).all()
    one = np.array([[255]], dtype=np.uint8)
    assert (decode_png(encode_png_gray(one)) == one).all()


@pytest.mark.parametrize(
    "bad", [np.zeros((3, 3), dtype=np.int16), np.zeros((2, 2, 2), dtype=np.uint8),
            np.zeros((0, 4), dtype=np.uint8)],
)  # fmt: skip
def test_png_refuses_what_is_not_an_8_bit_image(bad: np.ndarray) -> None:
    with pytest.raises(ValidationError):
        encode_png_gray(bad)


def test_window_maps_known_hu_to_expected_grey_levels() -> None:
    """Bone 300/1500 and soft 40/400: the edges are black and white, the centre 128."""
    assert PRESETS["bone"].center == 300 and PRESETS["bone"].width == 1500
    bone = window(np.array([-1000, -450, 300, 1050, 3000]), "bone")
    assert bone.dtype == np.uint8 and bone.tolist() == [0, 0, 128, 255, 255]
    soft = window(np.array([-1000, -160, 40, 140, 240, 1000]), "soft")
    assert soft.tolist() == [0, 0, 128, 191, 255, 255]
    with pytest.raises(ValidationError, match="unknown window preset 'lung'"):
        window(np.zeros(2), "lung")


# --- volume and views from the node -----------------------------------------------------------


def test_volume_is_in_hu_and_sorted_by_position_not_instance_number(node: Node) -> None:
    volume = load_volume(node.store, node.studies, node.cube)
    assert volume.hu.shape == (SLICES, ROWS, COLS) and volume.positions_known
    assert list(volume.positions_mm) == sorted(volume.positions_mm)
    assert volume.slice_spacing_mm == pytest.approx(THICKNESS)
    assert volume.pixel_spacing_mm == (SPACING, SPACING)
    inside = [k for k in range(SLICES) if volume.hu[k, CUBE_ROWS[0], CUBE_COLS[0]] == BONE]
    assert inside == list(range(*CUBE_SLICES))  # slice k is at z0 + k * THICKNESS
    assert volume.hu.min() == AIR and volume.hu.max() == BONE


def test_axial_preview_shows_the_cube_where_it_is(node: Node) -> None:
    volume = load_volume(node.store, node.studies, node.cube)
    views = render_previews(volume, "bone")
    assert set(views) == {"axial", "coronal", "sagittal"}
    axial = decode_png(views["axial"])
    assert axial.shape == (ROWS, COLS)
    bright = np.argwhere(axial > 0)  # air (-1000 HU) is black in the bone window
    assert bright[:, 0].min() == CUBE_ROWS[0] and bright[:, 0].max() == CUBE_ROWS[1] - 1
    assert bright[:, 1].min() == CUBE_COLS[0] and bright[:, 1].max() == CUBE_COLS[1] - 1
    # 1000 HU in the bone window: (1000 + 450) * 255 / 1500 = 246.5, rounded half up.
    assert len(bright) == 16 * 24 and (axial[bright[:, 0], bright[:, 1]] == 247).all()


def test_reformats_are_as_tall_as_the_series_is_long(node: Node) -> None:
    """Coronal/sagittal views are 100 rows tall (20 slices x 2.5 mm in 0.5 mm pixels).

    The cube spans its 8 slices (40 rows, the head up) and its columns / rows."""
    volume = load_volume(node.store, node.studies, node.cube)
    views = render_previews(volume, "soft")
    coronal, sagittal = decode_png(views["coronal"]), decode_png(views["sagittal"])
    height = round(SLICES * THICKNESS / SPACING)
    assert coronal.shape == (height, COLS) and sagittal.shape == (height, ROWS)
    per_slice = THICKNESS / SPACING
    top = (SLICES - CUBE_SLICES[1]) * per_slice  # the largest position at the top
    bottom = (SLICES - CUBE_SLICES[0]) * per_slice
    for img, across in ((coronal, CUBE_COLS), (sagittal, CUBE_ROWS)):
        white = np.argwhere(img == 255)  # HU 1000 is white in the soft window
        # Linear interpolation between slice centres: the edges blur by half a slice.
        assert abs(white[:, 0].min() - top) <= per_slice / 2
        assert abs(white[:, 0].max() + 1 - bottom) <= per_slice / 2
        assert (white[:, 1].min(), white[:, 1].max() + 1) == across
        core = img[int(top + per_slice) : int(bottom - per_slice)]
        assert (core[:, across[0] : across[1]] == 255).all()


def test_thumbnails_are_evenly_spaced_and_small(node: Node) -> None:
    volume = load_volume(node.store, node.studies, node.cube)
    thumbs = thumbnails(volume, count=5, size=32)
    assert len(thumbs) == 5
    images = [decode_png(t) for t in thumbs]
    assert all(img.shape == (32, 32) for img in images)
    # Slices 0, 5, 10, 14, 19: only 10 lies in the cube (slices 6..13).
    assert [bool((img > 0).any()) for img in images] == [False, False, True, False, False]
    assert len(thumbnails(volume, count=50, size=16)) == SLICES


def test_a_large_series_is_downsampled_to_bounded_memory(node: Node) -> None:
    volume = load_volume(node.store, node.studies, node.cube, max_in_plane=16, max_slices=5)
    assert volume.hu.shape == (5, 16, 16) and volume.hu.dtype == np.int16
    assert volume.pixel_spacing_mm == (SPACING * 4, SPACING * 4)
    assert volume.source_shape == (SLICES, ROWS, COLS)
    assert volume.positions_mm[0] < volume.positions_mm[-1]


def test_a_512_matrix_is_averaged_down_to_256(node: Node) -> None:
    """The default bound: 512 x 512 slices become 256 x 256 (2 x 2 block means).

    The pixel spacing doubles; the axial preview has that size."""
    volume = load_volume(node.store, node.studies, node.large)
    assert volume.hu.shape == (3, 256, 256) and volume.source_shape == (3, 512, 512)
    assert volume.pixel_spacing_mm == pytest.approx((0.488281 * 2, 0.488281 * 2))
    assert decode_png(render_previews(volume, "bone")["axial"]).shape == (256, 256)


def test_rle_lossless_series_is_previewed(node: Node) -> None:
    volume = load_volume(node.store, node.studies, node.rle)
    assert volume.hu.shape == (4, ROWS, COLS) and volume.hu.min() == AIR


def test_undecodable_compressed_pixels_are_a_clear_error(node: Node) -> None:
    with pytest.raises(UnreadableInstance) as err:
        load_volume(node.store, node.studies, node.jpeg)
    text = str(err.value)
    assert "JPEG 2000" in text and JPEG2000Lossless in text and "cannot be decoded" in text
    with pytest.raises(UnreadableInstance):
        StudyPreviews(node.store, node.studies).previews(node.jpeg)


def test_unknown_study_or_series_is_not_found(node: Node) -> None:
    with pytest.raises(NotFound):
        load_volume(node.store, node.studies, "1.2.3.4.5")
    with pytest.raises(NotFound):
        load_volume(node.store, node.studies, node.cube, "1.2.3.4.5")


# --- slice plot --------------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def _series_report(node: Node, study_uid: str) -> dict:
    report = node.studies.get_study(study_uid).report
    assert len(report["series"]) == 1
    return dict(report["series"][0])


def test_slice_plot_marks_the_one_gap_of_a_series_missing_a_slice(node: Node) -> None:
    series = _series_report(node, node.gap)
    assert len(series["gaps"]) == 1
    svg = slice_plot_svg(series)
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    gaps = [g for g in root.iter(f"{SVG}g") if g.get("class") == "gap"]
    assert len(gaps) == 1
    assert "gap 5.0 mm" in "".join(gaps[0].itertext())
    assert len([c for c in root.iter(f"{SVG}circle") if c.get("class") == "slice"]) == 9
    assert gaps[0].get("stroke") != root.find(f"{SVG}g[@class='slices']").get("fill")  # type: ignore[union-attr]
    no_gap = ET.fromstring(slice_plot_svg(_series_report(node, node.cube)))
    assert not [g for g in no_gap.iter(f"{SVG}g") if g.get("class") == "gap"]


def test_slice_plot_is_safe_to_inline() -> None:
    """No script, style, external reference or event handler; inserted text is escaped."""
    hostile = {
        "series_uid": '1.2"><script>alert(1)</script>&',
        "positions_mm": [0.0, 1.0, 5.0],
        "gaps": [[1.0, 5.0]],
        "missing_slices_estimate": 3,
    }
    svg = slice_plot_svg(hostile)
    root = ET.fromstring(svg)
    for element in root.iter():
        assert element.tag.split("}")[-1] not in {"script", "style", "foreignObject", "image"}
        assert not [a for a in element.attrib if a.startswith("on") or a in {"style", "href"}]
        assert not any("{http://www.w3.org/1999/xlink}" in a for a in element.attrib)
    assert "<script>" not in svg and root.find(f"{SVG}title") is not None
    assert '1.2"><script>' in root.find(f"{SVG}title").text  # type: ignore[union-attr,operator]
    with pytest.raises(ValidationError):
        slice_plot_svg({"positions_mm": ["1", 2.0], "gaps": []})
    ET.fromstring(slice_plot_svg({"positions_mm": [], "gaps": []}))  # empty series: still SVG


# --- the service and its cache ------------------------------------------------------------------


def test_study_previews_are_cached_by_report(node: Node) -> None:
    service = StudyPreviews(node.store, node.studies, PreviewCache(max_entries=1))
    first = service.previews(node.cube, preset="bone")
    assert first.report_sha256 == node.studies.get_study(node.cube).report_sha256
    assert service.previews(node.cube, preset="bone") is first
    assert len(first.thumbnails) == 12 and set(first.views) == {"axial", "coronal", "sagittal"}
    soft = service.previews(node.cube, preset="soft")
    assert soft is not first and len(service.cache) == 1  # bounded: bone was dropped
    assert service.previews(node.cube, preset="bone") is not first
    assert service.series_uids(node.cube) == [first.series_uid]
    with pytest.raises(ValidationError):
        service.previews(node.cube, preset="lung")
