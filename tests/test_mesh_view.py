"""mesh_view_json: real meshes written by trimesh (STL, OBJ, PLY) and a hand-written 3MF
(trimesh needs lxml to write one) become the viewer's positions/indices/bbox; large
meshes are simplified and say so; broken files are refused with the format check's
message."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh

from gateway.errors import ValidationError
from gateway.fidelity.formats import validate_design_file
from gateway.fidelity.mesh_view import mesh_media_type, mesh_view_json


def box() -> trimesh.Trimesh:
    return trimesh.creation.box((10.0, 20.0, 30.0))


def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=3, radius=12.5)  # 1280 triangles


def export(mesh: trimesh.Trimesh, file_type: str) -> bytes:
    data = mesh.export(file_type=file_type)
    return data.encode() if isinstance(data, str) else bytes(data)


def threemf(mesh: trimesh.Trimesh, unit: str = "millimeter", scale: float = 1.0) -> bytes:
    verts = "".join(
        f'<vertex x="{x * scale:.6f}" y="{y * scale:.6f}" z="{z * scale:.6f}"/>'
        for x, y, z in mesh.vertices
    )
    tris = "".join(f'<triangle v1="{a}" v2="{b}" v3="{c}"/>' for a, b, c in mesh.faces)
    model = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<model unit="{unit}" xml:lang="en-US" '
        'xmlns="http://schemas.microsoft.com/3dmanufacturing/core/2015/02">'
        f'<resources><object id="1" type="model"><mesh><vertices>{verts}</vertices>'
        f"<triangles>{tris}</triangles></mesh></object></resources>"
        '<build><item objectid="1"/></build></model>'
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" '
            'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="model" '
            'ContentType="application/vnd.ms-package.3dmanufacturing-3dmodel+xml"/></Types>',
        )
        zf.writestr(
            "_rels/.rels",
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Target="/3D/3dmodel.model" Id="rel0" '
            'Type="http://schemas.microsoft.com/3dmanufacturing/2013/01/3dmodel"/>'
            "</Relationships>",
        )
        zf.writestr("3D/3dmodel.model", model)
    return out.getvalue()


def check_shape(view: dict, triangles: int, vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """The dict is JSON as the viewer expects it; positions (n x 3) and indices (m x 3)."""
    assert json.loads(json.dumps(view)) == view
    positions = np.asarray(view["positions"], dtype=np.float64).reshape(-1, 3)
    indices = np.asarray(view["indices"], dtype=np.int64).reshape(-1, 3)
    assert all(type(v) is float for v in view["positions"])
    assert all(type(i) is int for i in view["indices"])
    assert view["triangles"] == len(indices) == triangles
    assert view["vertices"] == len(positions) == vertices
    assert indices.min() >= 0 and indices.max() < len(positions)
    assert len(np.unique(indices)) == len(positions)  # every vertex is used
    np.testing.assert_array_equal(view["bbox"], [positions.min(axis=0), positions.max(axis=0)])
    return positions, indices


BOX_BBOX = [[-5.0, -10.0, -15.0], [5.0, 10.0, 15.0]]


@pytest.mark.parametrize(
    "fmt,data",
    [
        ("stl", lambda: export(box(), "stl")),
        ("model/stl", lambda: export(box(), "stl_ascii")),
        ("OBJ", lambda: export(box(), "obj")),
        (".ply", lambda: export(box(), "ply")),
        ("model/x-ply", lambda: bytes(box().export(file_type="ply", encoding="ascii"))),
        ("model/3mf", lambda: threemf(box())),
        ("3mf", lambda: threemf(box(), unit="centimeter", scale=0.1)),
    ],
)
def test_box_in_every_format(fmt: str, data, tmp_path: Path) -> None:
    view = mesh_view_json(data(), fmt)
    positions, indices = check_shape(view, triangles=12, vertices=8)
    assert view["bbox"] == BOX_BBOX
    assert view["unit"] == "mm" and view["decimated"] is False
    assert view["source_triangles"] == 12
    # the same from a path, and the triangles enclose the box (outward volume 6000 mm3)
    path = tmp_path / "design"
    path.write_bytes(data())
    assert mesh_view_json(path, fmt) == view
    mesh = trimesh.Trimesh(positions, indices, process=False)
    assert mesh.is_watertight and mesh.volume == pytest.approx(6000.0, rel=1e-6)


def test_sphere_stl_file_matches_trimesh(tmp_path: Path) -> None:
    mesh = sphere()
    path = tmp_path / "sphere.stl"
    mesh.export(path)
    view = mesh_view_json(path, "model/stl")
    positions, indices = check_shape(view, triangles=1280, vertices=642)
    np.testing.assert_allclose(view["bbox"], mesh.bounds, atol=1e-5)
    # float32-rounded: within one float32 step of the largest coordinate (12.5 mm)
    ours = trimesh.Trimesh(positions, indices, process=False)
    assert ours.area == pytest.approx(mesh.area, rel=1e-6)
    assert ours.volume == pytest.approx(mesh.volume, rel=1e-6)
    step = float(np.spacing(np.float32(12.5)))
    for value in view["positions"][:300]:
        assert abs(value - float(np.float32(value))) <= step
        assert len(repr(value)) <= 10  # no float64 digit noise in the JSON
    # the receipt figures read the same file the same way
    facts = validate_design_file(path, "model/stl")
    assert facts["mesh.triangles"] == "1280" and facts["mesh.vertices"] == "642"


def test_obj_with_polygons_is_triangulated() -> None:
    quads = b"v 0 0 0\nv 4 0 0\nv 4 3 0\nv 0 3 0\nv 0 0 2\nf 1 2 3 4\nf 1 2 5\n"
    view = mesh_view_json(quads, "obj")
    check_shape(view, triangles=3, vertices=5)
    assert view["bbox"] == [[0.0, 0.0, 0.0], [4.0, 3.0, 2.0]]


def test_large_mesh_is_decimated_and_says_so() -> None:
    data = export(sphere(), "stl")
    view = mesh_view_json(data, "stl", max_triangles=300)
    assert view["decimated"] is True and view["source_triangles"] == 1280
    assert 0 < view["triangles"] <= 300
    check_shape(view, triangles=view["triangles"], vertices=view["vertices"])
    lo, hi = np.asarray(view["bbox"])
    assert (hi <= 12.5 + 1e-6).all() and (lo >= -12.5 - 1e-6).all()
    assert (hi - lo > 20.0).all()  # still a ball, not a speck
    with pytest.raises(ValidationError, match="at most 300 are shown"):
        mesh_view_json(data, "stl", max_triangles=300, decimate=False)
    with pytest.raises(ValidationError, match="1280 triangles; meshes with more than 1000"):
        mesh_view_json(data, "stl", max_read_triangles=1000)


@pytest.mark.parametrize(
    "fmt,data,reason",
    [
        (
            "stl",
            b"solid broken\nfacet normal 0 0 1\nouter loop\n",
            "not a valid binary or ASCII STL",
        ),
        ("stl", export(box(), "stl")[:-7], "not a valid binary or ASCII STL"),
        ("obj", b"v 0 0 0\nv 1 0 0\nf 1 2 3\n", "face refers to vertex 3"),
        ("ply", b"ply\nformat ascii 1.0\nelement vertex 3\nend_header\n0 0 0\n", "PLY"),
        ("3mf", b"PK\x03\x04 this is no zip", "not a valid 3MF package"),
        ("stl", b"", "is empty"),
    ],
)
def test_corrupt_files_are_refused_clearly(fmt: str, data: bytes, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason) as caught:
        mesh_view_json(data, fmt, name="implant-7")
    assert str(caught.value).startswith("implant-7")


def test_formats() -> None:
    assert mesh_media_type("STL") == "model/stl"
    assert mesh_media_type("model/ply") == "model/x-ply"
    assert mesh_media_type("Model/3MF; charset=x") == "model/3mf"
    with pytest.raises(ValidationError, match="not a mesh format"):
        mesh_media_type("model/step")
    with pytest.raises(ValidationError, match="larger than 10 bytes"):
        mesh_view_json(export(box(), "stl"), "stl", max_bytes=10)
