"""gateway.fidelity.series: slice geometry and whole-series analysis."""

from __future__ import annotations

import json
import math

import pytest
from pydicom.dataset import Dataset

from gateway.fidelity.series import SliceGeometry, analyse_series, slice_geometry
from tests.dicom_factory import SeriesInfo, StudyInfo, ct_series, enhanced_ct

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def geom(
    z: float | None,
    *,
    i: int = 0,
    x: float = -125.0,
    y: float = -140.5,
    orientation: tuple[float, float, float, float, float, float] | None = AXIAL,
    thickness: float | None = 1.0,
    spacing: tuple[float, float] | None = (0.5, 0.5),
    tilt: float | None = 0.0,
    rows: int = 512,
    columns: int = 512,
) -> SliceGeometry:
    return SliceGeometry(
        sop_instance_uid=f"2.25.{1000 + i}",
        series_uid="2.25.42",
        position=None if z is None else (x, y, z),
        orientation=orientation,
        pixel_spacing=spacing,
        slice_thickness=thickness,
        rows=rows,
        columns=columns,
        gantry_tilt=tilt,
        instance_number=i + 1,
    )


def stack(zs: list[float], **kw: object) -> list[SliceGeometry]:
    return [geom(z, i=i, **kw) for i, z in enumerate(zs)]  # type: ignore[arg-type]


def test_uniform_stack() -> None:
    slices = stack([-80.0 + i for i in range(20)])
    report = analyse_series(list(reversed(slices)))  # order does not matter
    assert report.series_uid == "2.25.42"
    assert report.instance_count == 20
    assert report.orientation_consistent
    assert report.normal == (0.0, 0.0, 1.0)
    assert report.positions_mm == tuple(-80.0 + i for i in range(20))
    assert report.spacing_min_mm == report.spacing_max_mm == report.spacing_median_mm == 1.0
    assert report.spacing_uniform
    assert report.gaps == ()
    assert report.missing_slices_estimate == 0
    assert report.duplicate_positions == 0
    assert report.slice_thickness_mm == (1.0,)
    assert report.pixel_spacing_mm == ((0.5, 0.5),)
    assert report.gantry_tilt_deg == 0.0
    assert report.rows_columns == ((512, 512),)


def test_missing_slice_is_a_gap() -> None:
    zs = [float(i) for i in range(12) if i != 5]
    report = analyse_series(stack(zs))
    assert report.gaps == ((4.0, 6.0),)
    assert report.missing_slices_estimate == 1
    assert report.spacing_median_mm == 1.0
    assert report.spacing_max_mm == 2.0
    assert not report.spacing_uniform


def test_several_missing_slices_in_one_gap() -> None:
    zs = [float(i) for i in range(20) if i not in (7, 8, 9)]
    report = analyse_series(stack(zs))
    assert report.gaps == ((6.0, 10.0),)
    assert report.missing_slices_estimate == 3


def test_non_uniform_spacing_without_gap() -> None:
    zs = [0.0, 1.0, 2.0, 3.2, 4.2, 5.2, 6.2]
    report = analyse_series(stack(zs))
    assert not report.spacing_uniform
    assert report.gaps == ()  # 1.2 < 1.5 x median
    assert report.missing_slices_estimate == 0
    assert math.isclose(report.spacing_max_mm or 0, 1.2)
    # A looser tolerance accepts it.
    assert analyse_series(stack(zs), spacing_tolerance_mm=0.25).spacing_uniform


def test_rounding_noise_is_uniform() -> None:
    zs = [round(i * 0.625, 4) for i in range(30)]  # 0.625 written with 4 decimals
    report = analyse_series(stack(zs))
    assert report.spacing_uniform
    assert report.spacing_median_mm == 0.625


def test_mixed_orientations() -> None:
    slices = stack([float(i) for i in range(10)])
    localizer = geom(0.0, i=99, orientation=SAGITTAL)
    report = analyse_series([localizer, *slices])
    assert not report.orientation_consistent
    assert report.instance_count == 11
    # Positions come from the dominant (axial) orientation only.
    assert report.normal == (0.0, 0.0, 1.0)
    assert report.positions_mm == tuple(float(i) for i in range(10))
    assert report.spacing_uniform


def test_nearly_equal_orientations_are_consistent() -> None:
    slices = stack([0.0, 1.0, 2.0])
    tweaked = geom(3.0, i=3, orientation=(0.9999998, 0.0, 0.0, 0.0, 1.0, 0.0002))
    assert analyse_series([*slices, tweaked]).orientation_consistent


def test_gantry_tilt_from_sheared_stack() -> None:
    # A 10 degree tilt: each plane 1 mm further along z is shifted tan(10 deg) mm in y.
    shift = math.tan(math.radians(10.0))
    slices = [geom(float(i), i=i, y=-140.5 + i * shift, tilt=None) for i in range(10)]
    report = analyse_series(slices)
    assert report.gantry_tilt_deg == pytest.approx(10.0, abs=1e-4)
    # Spacing is measured between the planes, not along the sheared stack.
    assert report.spacing_median_mm == 1.0
    assert report.spacing_uniform


def test_gantry_tilt_attribute() -> None:
    report = analyse_series(stack([0.0, 1.0, 2.0], tilt=-12.5))
    assert report.gantry_tilt_deg == 12.5


def test_duplicates() -> None:
    zs = [0.0, 1.0, 1.0, 2.0, 3.0, 3.0004]
    report = analyse_series(stack(zs))
    assert report.duplicate_positions == 2
    assert report.spacing_uniform
    assert report.spacing_min_mm == 1.0
    assert report.gaps == ()


def test_single_slice() -> None:
    report = analyse_series([geom(5.0)])
    assert report.instance_count == 1
    assert report.orientation_consistent
    assert report.positions_mm == (5.0,)
    assert report.spacing_min_mm is None and report.spacing_median_mm is None
    assert report.spacing_uniform
    assert report.gaps == () and report.missing_slices_estimate == 0
    assert report.gantry_tilt_deg == 0.0


def test_empty_series() -> None:
    report = analyse_series([])
    assert report.instance_count == 0
    assert not report.orientation_consistent
    assert report.normal is None
    assert not report.spacing_uniform


def test_missing_geometry_attributes() -> None:
    slices = [
        geom(None, i=0, orientation=None, thickness=None, spacing=None, tilt=None),
        geom(None, i=1, orientation=None, thickness=None, spacing=None, tilt=None),
    ]
    report = analyse_series(slices)
    assert report.instance_count == 2
    assert not report.orientation_consistent
    assert report.normal is None
    assert report.positions_mm == ()
    assert not report.spacing_uniform
    assert report.slice_thickness_mm == ()
    assert report.pixel_spacing_mm == ()
    assert report.gantry_tilt_deg == 0.0
    json.dumps(report.to_dict())


def test_positions_without_orientation_use_stack_direction() -> None:
    report = analyse_series(stack([0.0, 2.0, 4.0, 6.0], orientation=None))
    assert not report.orientation_consistent
    assert report.normal == (0.0, 0.0, 1.0)
    assert report.spacing_median_mm == 2.0


def test_distinct_values_reported() -> None:
    slices = [*stack([0.0, 1.0]), geom(2.0, i=2, thickness=2.0, spacing=(0.7, 0.7), rows=256)]
    report = analyse_series(slices)
    assert report.slice_thickness_mm == (1.0, 2.0)
    assert report.pixel_spacing_mm == ((0.5, 0.5), (0.7, 0.7))
    assert report.rows_columns == ((256, 512), (512, 512))


def test_to_dict_is_json_ready_and_ordered() -> None:
    report = analyse_series(stack([float(i) for i in range(12) if i != 5]))
    data = report.to_dict()
    assert list(data)[:3] == ["series_uid", "instance_count", "orientation_consistent"]
    assert list(data)[-1] == "rows_columns"
    assert data["gaps"] == [[4.0, 6.0]]
    assert json.loads(json.dumps(data)) == data


# --- reading datasets ------------------------------------------------------------------


def test_slice_geometry_of_ct_slices() -> None:
    series = SeriesInfo(slice_thickness="1.0", pixel_spacing=("0.488281", "0.488281"))
    datasets = list(ct_series(5, rows=16, cols=16, study=StudyInfo(), series=series))
    slices = [slice_geometry(ds) for ds in datasets]
    first = slices[0]
    assert first.sop_instance_uid == datasets[0].SOPInstanceUID
    assert first.series_uid == series.series_uid
    assert first.position == (-125.0, -140.5, -80.0)
    assert first.orientation == AXIAL
    assert first.pixel_spacing == (0.488281, 0.488281)
    assert first.slice_thickness == 1.0
    assert (first.rows, first.columns) == (16, 16)
    assert first.gantry_tilt == 0.0
    assert first.instance_number == 1
    report = analyse_series(slices)
    assert report.spacing_uniform and report.orientation_consistent
    assert report.positions_mm == (-80.0, -79.0, -78.0, -77.0, -76.0)


def test_slice_geometry_of_enhanced_multiframe() -> None:
    ds = enhanced_ct(frames=4, rows=16, cols=16)
    g = slice_geometry(ds)
    assert g.position == (-80.0, -80.0, -40.0)  # first frame
    assert g.orientation == AXIAL  # shared functional groups
    assert g.pixel_spacing == (0.3125, 0.3125)
    assert g.slice_thickness == 0.625


def test_slice_geometry_never_raises_on_missing_or_malformed() -> None:
    g = slice_geometry(Dataset())
    assert g == SliceGeometry("", "", None, None, None, None, 0, 0, None, None)
    ds = Dataset()
    ds.SOPInstanceUID = "2.25.7"
    ds.ImagePositionPatient = ["1", "2"]  # wrong multiplicity
    ds.PixelSpacing = "0.5"  # single value
    ds.SliceThickness = ""
    ds.InstanceNumber = ""
    g = slice_geometry(ds)
    assert g.sop_instance_uid == "2.25.7"
    assert g.position is None and g.pixel_spacing is None
    assert g.slice_thickness is None and g.instance_number is None
