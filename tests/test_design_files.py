"""Design files: every accepted format validates and yields its facts, corrupted files
are refused naming file, declared type and reason, and over two real nodes the
hospital's receipt carries the mesh figures of the STL the factory sent, equal to the
factory's own, compared before the transfer counts as done."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trimesh

from gateway.errors import NotFound, ReceiptError, ValidationError
from gateway.fidelity.formats import (
    FACT_ERROR,
    DesignFactsCache,
    check_design_facts,
    design_facts,
    design_media_type,
    validate_design_file,
)
from gateway.fidelity.mesh import (
    MeshFigures,
    compare_facts,
    figures_as_facts,
    figures_of,
    mesh_figures,
)
from gateway.fidelity.mesh_readers import MeshData
from gateway.storage import ObjectStore
from gateway.storage.filesystem import FilesystemStore
from gateway.transfer.model import Announce
from gateway.transfer.receipts import verify_receipt
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from yigong_node.cli import main as cli_main

BOX_FACTS = {
    "mesh.triangles": "12",
    "mesh.vertices": "8",
    "mesh.area_mm2": "2200.000000",
    "mesh.volume_mm3": "6000.000000",
    "mesh.bbox_min_mm": "-5.000000,-10.000000,-15.000000",
    "mesh.bbox_max_mm": "5.000000,10.000000,15.000000",
    "mesh.watertight": "true",
}


def box() -> trimesh.Trimesh:
    return trimesh.creation.box((10.0, 20.0, 30.0))


def sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=2, radius=5.0)


# -- generators -------------------------------------------------------------------------


def stl_binary(mesh: trimesh.Trimesh) -> bytes:
    return bytes(trimesh.exchange.stl.export_stl(mesh))


def stl_ascii(mesh: trimesh.Trimesh) -> bytes:
    return trimesh.exchange.stl.export_stl_ascii(mesh).encode()


def obj(mesh: trimesh.Trimesh) -> bytes:
    return trimesh.exchange.obj.export_obj(mesh).encode()


def ply(mesh: trimesh.Trimesh, encoding: str = "binary") -> bytes:
    return bytes(trimesh.exchange.ply.export_ply(mesh, encoding=encoding))


CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" '
    'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="model" '
    'ContentType="application/vnd.ms-package.3dmanufacturing-3dmodel+xml"/></Types>'
)
RELS = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Target="/3D/3dmodel.model" Id="rel0" '
    'Type="http://schemas.microsoft.com/3dmanufacturing/2013/01/3dmodel"/></Relationships>'
)


def mesh_object(oid: int, mesh: trimesh.Trimesh, scale: float = 1.0) -> str:
    verts = "".join(
        f'<vertex x="{x * scale:.6f}" y="{y * scale:.6f}" z="{z * scale:.6f}"/>'
        for x, y, z in mesh.vertices
    )
    tris = "".join(f'<triangle v1="{a}" v2="{b}" v3="{c}"/>' for a, b, c in mesh.faces)
    return (
        f'<object id="{oid}" type="model"><mesh><vertices>{verts}</vertices>'
        f"<triangles>{tris}</triangles></mesh></object>"
    )


def threemf(resources: str, build: str, unit: str = "millimeter") -> bytes:
    """A minimal 3MF package written by hand (trimesh needs lxml to write one)."""
    model = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<model unit="{unit}" xml:lang="en-US" '
        'xmlns="http://schemas.microsoft.com/3dmanufacturing/core/2015/02">'
        f"<resources>{resources}</resources><build>{build}</build></model>"
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", CONTENT_TYPES)
        zf.writestr("_rels/.rels", RELS)
        zf.writestr("3D/3dmodel.model", model)
    return out.getvalue()


def minimal_pdf() -> bytes:
    """A one-page PDF with a correct cross-reference table."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


STEP = """ISO-10303-21;
HEADER;
/* written by hand for the tests; a comment; with semicolons */
FILE_DESCRIPTION(('femoral plate'),'2;1');
FILE_NAME('plate.stp','2024-03-15T10:00:00',('engineer'),('factory'),'t','t','');
FILE_SCHEMA(('AUTOMOTIVE_DESIGN { 1 0 10303 214 1 1 1 1 }'));
ENDSEC;
DATA;
#1=CARTESIAN_POINT('origin; it''s here',(0.,0.,0.));
#2=DIRECTION('z',(0.,0.,1.));
#3=AXIS2_PLACEMENT_3D('',#1,#2,$);
ENDSEC;
END-ISO-10303-21;
"""

PARAMS = {"implant": "femoral plate", "thickness_mm": 2.5, "screws": [4.0, 4.0, 3.5]}


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- every format validates ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "media_type", "make", "fmt"),
    [
        ("box.stl", "model/stl", lambda: stl_binary(box()), "stl-binary"),
        ("box_ascii.stl", "model/stl", lambda: stl_ascii(box()), "stl-ascii"),
        ("box.obj", "model/obj", lambda: obj(box()), "obj"),
        ("box.ply", "model/x-ply", lambda: ply(box()), "ply-binary_little_endian"),
        ("box_ascii.ply", "application/ply", lambda: ply(box(), "ascii"), "ply-ascii"),
        (
            "box.3mf",
            "model/3mf",
            lambda: threemf(mesh_object(1, box()), '<item objectid="1"/>'),
            "3mf",
        ),
    ],
)
def test_box_figures_in_every_mesh_format(
    tmp_path: Path, name: str, media_type: str, make: object, fmt: str
) -> None:
    facts = validate_design_file(write(tmp_path, name, make()), media_type)  # type: ignore[operator]
    assert facts["mesh.format"] == fmt
    assert facts["design.media_type"] == design_media_type(media_type)
    assert {k: facts[k] for k in BOX_FACTS} == BOX_FACTS


def test_sphere_figures_match_trimesh(tmp_path: Path) -> None:
    ball = sphere()
    for name, data, mtype in [
        ("ball.stl", stl_binary(ball), "model/stl"),
        ("ball.obj", obj(ball), "model/obj"),
        ("ball.ply", ply(ball), "model/x-ply"),
    ]:
        fig = mesh_figures(write(tmp_path, name, data), mtype)
        assert (fig.triangles, fig.vertices, fig.watertight) == (320, 162, True)
        assert fig.area_mm2 == pytest.approx(ball.area, rel=1e-6)
        assert fig.volume_mm3 == pytest.approx(ball.volume, rel=1e-6)
        assert 0.95 < fig.volume_mm3 / (4 / 3 * np.pi * 125) < 1.0  # inscribed polyhedron
        assert np.allclose(fig.bbox_min, ball.bounds[0], atol=1e-5)


def test_3mf_units_transforms_and_components(tmp_path: Path) -> None:
    # A box given in centimetres is measured in mm.
    cm = threemf(mesh_object(1, box(), scale=0.1), '<item objectid="1"/>', unit="centimeter")
    facts = validate_design_file(write(tmp_path, "cm.3mf", cm), "model/3mf")
    assert {k: facts[k] for k in BOX_FACTS} == BOX_FACTS
    assert facts["mesh.unit"] == "centimeter"
    # Two instances of the box through components, the assembly moved by a build item.
    comps = (
        mesh_object(1, box())
        + '<object id="2" type="model"><components>'
        + '<component objectid="1" transform="1 0 0 0 1 0 0 0 1 -20 0 0"/>'
        + '<component objectid="1" transform="1 0 0 0 1 0 0 0 1 20 0 0"/>'
        + "</components></object>"
    )
    pair = threemf(comps, '<item objectid="2" transform="1 0 0 0 1 0 0 0 1 0 0 100"/>')
    facts = validate_design_file(write(tmp_path, "pair.3mf", pair), "model/3mf")
    assert facts["mesh.triangles"] == "24"
    assert facts["mesh.area_mm2"] == "4400.000000"
    assert facts["mesh.volume_mm3"] == "12000.000000"
    assert facts["mesh.bbox_min_mm"] == "-25.000000,-10.000000,85.000000"
    assert facts["mesh.bbox_max_mm"] == "25.000000,10.000000,115.000000"


def test_documents_and_parameter_files(tmp_path: Path) -> None:
    pdf = validate_design_file(write(tmp_path, "report.pdf", minimal_pdf()), "application/pdf")
    assert pdf == {
        "design.media_type": "application/pdf",
        "pdf.version": "1.4",
        "pdf.xref": "table",
    }
    step = validate_design_file(write(tmp_path, "plate.stp", STEP.encode()), "model/step")
    assert step["step.schema"] == "AUTOMOTIVE_DESIGN { 1 0 10303 214 1 1 1 1 }"
    assert (step["step.entities"], step["step.data_sections"]) == ("3", "1")
    params = write(tmp_path, "params.json", json.dumps(PARAMS).encode())
    assert validate_design_file(params, "application/json")["json.keys"] == "3"
    table = write(tmp_path, "screws.csv", b'hole,diameter_mm\n1,4.0\n2,"3,5"\n')
    facts = validate_design_file(table, "text/csv; charset=utf-8")
    assert (facts["csv.rows"], facts["csv.columns"]) == ("3", "2")


def test_step_streams_across_chunk_boundaries(tmp_path: Path) -> None:
    """Statements, strings with '' and comments split across 1 MiB read chunks."""
    body = "".join(
        f"#{n}=CARTESIAN_POINT('p{n}; it''s /* not a comment',({n}.,0.,0.));/* c;{n} */\n"
        for n in range(1, 30001)
    )
    text = STEP.replace("#1=CARTESIAN_POINT", body + "#30001=CARTESIAN_POINT")
    text = text.replace("#2=", "#30002=").replace("#3=", "#30003=")
    facts = validate_design_file(write(tmp_path, "big.stp", text.encode()), "model/step")
    assert facts["step.entities"] == "30003"


def test_non_watertight_mesh_is_reported(tmp_path: Path) -> None:
    open_box = box()
    open_box.update_faces(np.arange(len(open_box.faces)) != 0)
    facts = validate_design_file(write(tmp_path, "open.stl", stl_binary(open_box)), "model/stl")
    assert facts["mesh.watertight"] == "false"
    assert facts["mesh.triangles"] == "11"


# -- corrupted files are refused -------------------------------------------------------


def corrupted_cases() -> Iterator[tuple[str, str, bytes, str]]:
    good_stl = stl_binary(box())
    yield (
        "design.stl",
        "model/stl",
        good_stl[:300],
        "triangle count 12 in the header needs 684 bytes, file has 300",
    )
    yield "ascii.stl", "model/stl", stl_ascii(box()).replace(b"endsolid", b""), "without 'endsolid'"
    yield (
        "nan.stl",
        "model/stl",
        good_stl[:96] + np.float32("nan").tobytes() + good_stl[100:],
        "non-finite",
    )
    bad_obj = obj(box()).replace(b"\nf 2 4 1\n", b"\nf 2 4 99\n")
    yield "plate.obj", "model/obj", bad_obj, "refers to vertex 99, but the file defines only 8"
    yield "plate2.obj", "model/obj", obj(box()) + b"bogus 1 2 3\n", "unknown statement 'bogus'"
    yield "report.pdf", "application/pdf", b"this is not a pdf at all\n" * 10, "'%PDF-n.n' header"
    yield "cut.pdf", "application/pdf", minimal_pdf()[:-30], "does not end with '%%EOF'"
    lie = ply(box()).replace(b"element vertex 8", b"element vertex 9")
    yield (
        "lie.ply",
        "model/x-ply",
        lie,
        "the data does not match the header (9 'vertex', 12 'face')",
    )
    lie_ascii = ply(box(), "ascii").replace(b"element face 12", b"element face 13")
    yield "lie.ply", "model/x-ply", lie_ascii, "declares 13 'face' lines, the data ends after 12"
    yield (
        "params.json",
        "application/json",
        b"{'thickness': 2.5}",
        "is not a valid JSON parameter file",
    )
    yield "params.json", "application/json", b'{"a": 1, "a": 2}', "key 'a' appears twice"
    yield "params.json", "application/json", b"[1, 2]", "top level is a list, not an object"
    yield "params.json", "application/json", b'{"a": NaN}', "NaN is not a JSON number"
    yield "rows.csv", "text/csv", b"a,b\n1,2,3\n", "row 2 has 3 columns, row 1 has 2"
    not3mf = io.BytesIO()
    with zipfile.ZipFile(not3mf, "w") as zf:
        zf.writestr("readme.txt", "hello")
    yield "model.3mf", "model/3mf", not3mf.getvalue(), "the package has no [Content_Types].xml part"
    yield "model.3mf", "model/3mf", b"PK\x03\x04 but not really", "not a ZIP archive"
    bad_index = threemf(
        mesh_object(1, box()).replace('v3="0"', 'v3="80"', 1), '<item objectid="1"/>'
    )
    yield "index.3mf", "model/3mf", bad_index, "triangle index 80 but only 8 vertices"
    packed = bytearray(threemf(mesh_object(1, box()), '<item objectid="1"/>'))
    at = packed.find(b"3D/3dmodel.model", 40) + len(b"3D/3dmodel.model") + 20
    packed[at : at + 16] = bytes(16)  # damage the deflated model part
    yield "damaged.3mf", "model/3mf", bytes(packed), "the ZIP archive is damaged"
    yield "cut.stp", "model/step", STEP.encode()[:-20], "does not end with 'END-ISO-10303-21;'"
    yield "quote.stp", "model/step", STEP.replace("('z'", "('z").encode(), "ends inside a string"
    yield "empty.stl", "model/stl", b"", "is empty"


CORRUPTED = list(corrupted_cases())


@pytest.mark.parametrize(
    ("name", "media_type", "data", "reason"),
    CORRUPTED,
    ids=[f"{i}-{case[0]}" for i, case in enumerate(CORRUPTED)],
)
def test_corrupted_files_are_refused_naming_file_type_and_reason(
    tmp_path: Path, name: str, media_type: str, data: bytes, reason: str
) -> None:
    with pytest.raises(ValidationError) as err:
        validate_design_file(write(tmp_path, name, data), media_type)
    message = str(err.value)
    assert message.startswith(f"{name} declared {design_media_type(media_type)} but ")
    assert reason in message


def test_mesh_declared_as_another_format_and_unknown_types(tmp_path: Path) -> None:
    path = write(tmp_path, "box.stl", stl_binary(box()))
    with pytest.raises(ValidationError, match=r"box.stl declared model/obj but is not a valid"):
        validate_design_file(path, "model/obj")
    with pytest.raises(ValidationError, match="which is not a design file type"):
        validate_design_file(path, "application/octet-stream")
    with pytest.raises(ValidationError, match="meshes larger than 100 bytes are not checked"):
        validate_design_file(path, "model/stl", max_mesh_bytes=100)
    with pytest.raises(ValidationError, match="has 12 triangles; meshes with more than 10 are"):
        mesh_figures(path, "model/stl", max_triangles=10)


def test_compare_facts_tolerance_and_differences() -> None:
    ours = figures_as_facts(mesh_figures_for_box())
    assert compare_facts(ours, dict(ours)) == []
    rounding = {**ours, "mesh.area_mm2": "2200.000001", "unrelated.fact": "x"}
    assert compare_facts(ours, rounding) == []
    moved = {**ours, "mesh.bbox_max_mm": "5.000000,10.000000,15.100000"}
    assert compare_facts(ours, moved) == [
        "mesh.bbox_max_mm: ours 5.000000,10.000000,15.000000, theirs 5.000000,10.000000,15.100000"
    ]
    fewer = {k: v for k, v in ours.items() if k != "mesh.triangles"}
    assert compare_facts(ours, fewer) == ["mesh.triangles: ours 12, theirs (missing)"]
    assert compare_facts(ours, {**ours, "mesh.watertight": "false"})


def mesh_figures_for_box() -> MeshFigures:
    m = box()
    return figures_of(MeshData("stl-binary", "unspecified", m.triangles.reshape(-1, 3), None))


# -- the hooks the core calls ------------------------------------------------------------


def test_design_facts_from_a_store_and_the_sender_check(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    good = write(tmp_path, "design.stl", stl_binary(box()))
    oid = hashlib.sha256(good.read_bytes()).hexdigest()
    store.put_file(oid, good)
    facts = design_facts("model/stl", store, oid, spool_dir=tmp_path)
    assert {k: facts[k] for k in BOX_FACTS} == BOX_FACTS
    assert design_facts("application/dicom", store, oid) == {}
    check_design_facts("model/stl", facts, dict(facts))
    # The same bytes declared as something they are not: an error fact, never a raise.
    wrong = design_facts("model/obj", store, oid, spool_dir=tmp_path)
    assert list(wrong) == [FACT_ERROR]
    assert f"object {oid[:16]} declared model/obj" in wrong[FACT_ERROR]
    assert "design.stl" not in wrong[FACT_ERROR]  # file names may carry patient data
    with pytest.raises(ReceiptError, match="receiver refused the design file"):
        check_design_facts("model/obj", facts, wrong)
    with pytest.raises(ReceiptError, match=re.escape("mesh.volume_mm3: ours 6000.000000, theirs")):
        check_design_facts("model/stl", facts, {**facts, "mesh.volume_mm3": "6001.000000"})
    check_design_facts("application/dicom", facts, {})  # not a design: not ours to check
    assert list(tmp_path.glob("design-check-*")) == []  # temporary copies are removed
    # Remembered per (type, object): a re-issued receipt does not read the mesh again.
    cache = DesignFactsCache(spool_dir=tmp_path / "spool", entries=1)
    assert cache("Model/STL", store, oid) == facts
    store.delete(oid)
    assert cache("model/stl", store, oid) == facts
    with pytest.raises(NotFound):  # store errors propagate, and are not remembered
        cache("model/obj", store, oid)


# -- over two real nodes -------------------------------------------------------------------


@pytest.fixture
def factory_to_hospital(
    federation: Federation, tmp_path: Path
) -> Iterator[tuple[InProcessNode, InProcessNode]]:
    """A hospital node, and a factory node that has the hospital as its peer."""
    hospital = InProcessNode(write_config(federation, tmp_path, "hospital-1", "hospital"))
    factory = InProcessNode(
        write_config(
            federation, tmp_path, "factory-1", "factory", peers={"hospital-1": hospital.address}
        )
    )
    # The wiring the core will get. Hospital: design facts go into its receipts.
    # Factory: an upload that does not parse as its type is refused, naming the file
    # (here in check_outgoing, which Submit calls; in the core: Exchange.submit), and
    # the receipt's facts are compared with its own.
    role_facts = hospital.node.receiver.facts_hook
    hospital_design = DesignFactsCache(spool_dir=tmp_path / "hospital-design")
    factory_design = DesignFactsCache(spool_dir=tmp_path / "factory-design")

    def facts_hook(announce: Announce, store: ObjectStore) -> dict[str, str]:
        facts = dict(role_facts(announce, store)) if role_facts else {}
        facts.update(hospital_design(announce.media_type, store, announce.object_id))
        return facts

    hospital.node.receiver.facts_hook = facts_hook
    hooks = factory.node.hooks
    role_outgoing, role_receipt = hooks.check_outgoing, hooks.check_receipt

    def check_outgoing(obj, store, peer):  # type: ignore[no-untyped-def]
        role_outgoing(obj, store, peer)
        error = design_facts(obj.media_type, store, obj.object_id, name=obj.name).get(FACT_ERROR)
        if error:
            raise ValidationError(error)

    def check_receipt(obj, facts, store):  # type: ignore[no-untyped-def]
        role_receipt(obj, facts, store)
        ours = factory_design(obj.media_type, store, obj.object_id)
        check_design_facts(obj.media_type, ours, facts)

    hooks.check_outgoing = check_outgoing  # type: ignore[method-assign]
    hooks.check_receipt = check_receipt  # type: ignore[method-assign]
    yield factory, hospital
    factory.stop()
    hospital.stop()


def test_factory_sends_stl_and_both_sides_agree_on_its_figures(
    factory_to_hospital: tuple[InProcessNode, InProcessNode],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    factory, hospital = factory_to_hospital
    design = write(tmp_path, "femoral-plate.stl", stl_binary(box()))
    with factory.self_client() as client:
        reply = client.submit(design, ["hospital-1"], case_id="case-7", media_type="model/stl")
        tid = reply.queued[0].transfer_id
        catalog = factory.node.catalog
        wait_for(
            lambda: catalog.get_transfer(tid, "outbound").status in ("done", "failed"),
            timeout=20,
            what="design transfer",
        )
        sent = catalog.get_transfer(tid, "outbound")
        assert sent.status == "done", sent.last_error
        receipt = verify_receipt(sent.receipt or b"", factory.node.trust).body
        assert receipt.receiver_node == "hospital-1"
        ours = validate_design_file(design, "model/stl")
        assert dict(receipt.facts) == ours
        assert {k: receipt.facts[k] for k in BOX_FACTS} == BOX_FACTS
        held = hospital.node.catalog.find_transfer(tid, "inbound")
        assert held is not None and held.receipt == sent.receipt  # both keep the same receipt

        # The figures are in the human-readable view too, not only in --json.
        conn = ["--config", str(factory.config), "--address", factory.address]
        assert cli_main(["query", "object", reply.object.object_id, *conn]) == 0
        shown = capsys.readouterr().out
        assert "facts both nodes computed:" in shown
        assert re.search(r"^ +triangles +12$", shown, re.M), shown
        assert re.search(r"^ +volume \(mm³\) +6000\.000000$", shown, re.M), shown
        assert re.search(r"^ +watertight +true$", shown, re.M), shown

        # A file that does not parse as its declared type is refused on upload.
        broken = write(tmp_path, "broken-plate.stl", stl_binary(box())[:300])
        with pytest.raises(ValidationError) as err:
            client.submit(broken, ["hospital-1"], case_id="case-7", media_type="model/stl")
        assert (
            "broken-plate.stl declared model/stl but is not a valid binary or ASCII STL: "
            "triangle count 12 in the header needs 684 bytes, file has 300"
        ) in str(err.value)


def test_receiver_reading_other_figures_refuses_the_transfer(
    factory_to_hospital: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    """A receiver whose figures differ (another parser, a bug) stops the send for good."""
    factory, hospital = factory_to_hospital
    honest = hospital.node.receiver.facts_hook
    assert honest is not None

    def skewed(announce: Announce, store: ObjectStore) -> dict[str, str]:
        return {**honest(announce, store), "mesh.volume_mm3": "5999.000000"}

    hospital.node.receiver.facts_hook = skewed
    design = write(tmp_path, "plate.obj", obj(box()))
    with factory.self_client() as client:
        reply = client.submit(design, ["hospital-1"], case_id="case-8", media_type="model/obj")
    tid = reply.queued[0].transfer_id
    catalog = factory.node.catalog
    wait_for(
        lambda: catalog.get_transfer(tid, "outbound").status in ("done", "failed"),
        timeout=20,
        what="refused design transfer",
    )
    sent = catalog.get_transfer(tid, "outbound")
    assert sent.status == "failed"
    assert "mesh.volume_mm3: ours 6000.000000, theirs 5999.000000" in sent.last_error


# -- the bulk and the line-by-line readers accept the same files -----------------------

QUAD_BOX_OBJ = """# a box of quads, with texture coordinates and normals
mtllib plate.mtl
o plate
v -5 -10 -15
v 5 -10 -15
v 5 10 -15
v -5 10 -15 \\
  # continued: the w below belongs to the next line
v -5 -10 15 1.0
v 5 -10 15 0.5 0.5 0.5
v 5 10 15
v -5 10 15
vt 0 0
vn 0 0 1
usemtl titanium
s off
f 1/1/1 4/1/1 3/1/1 2/1/1
f 5//1 6//1 7//1 8//1
f -8 -7 -3 -4
f 4 8 7 3
f 1 5 8 4
f +2 +3 +7 +6
"""


def ascii_stl_variants() -> Iterator[tuple[str, bytes]]:
    plain = stl_ascii(box()).decode()
    yield "upper-case keywords", plain.upper().encode()
    yield (
        "CRLF and names",
        plain.replace("solid \n", "solid femoral plate v2\n", 1)
        .replace("endsolid", "endsolid femoral plate v2")
        .replace("\n", "\r\n")
        .encode(),
    )
    one_line = plain
    for word in ("outer", "vertex", "endloop", "endfacet"):
        one_line = one_line.replace(f"\n{word}", f" {word}")
    yield "one facet per line", one_line.encode()
    facets = plain.split("facet normal")
    two = "solid a\nfacet normal" + "facet normal".join(facets[1:7]) + "endsolid a\n"
    two += "solid b\nfacet normal" + "facet normal".join(facets[7:]).replace("endsolid", "")
    yield "two solids", (two + "endsolid b\n").encode()
    yield (
        "exponents",
        plain.replace("vertex -5.0", "vertex -5E+00").replace(" 15.0", " 1.5e1").encode(),
    )


@pytest.mark.parametrize(("what", "data"), list(ascii_stl_variants()))
def test_ascii_stl_variants_read_alike(tmp_path: Path, what: str, data: bytes) -> None:
    from gateway.fidelity.stl import _read_ascii_stl_tokens

    path = write(tmp_path, "variant.stl", data)
    facts = validate_design_file(path, "model/stl")
    assert {k: facts[k] for k in BOX_FACTS} == BOX_FACTS, what
    assert figures_as_facts(figures_of(_read_ascii_stl_tokens(path))) == {
        k: v for k, v in facts.items() if k.startswith("mesh.")
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (("vertex 5.0", "vertex nan"), "vertex value 'nan' is not a number"),
        (("vertex 5.0", "vertex 5_0"), "vertex value '5_0' is not a number"),
        (("vertex 5.0", "vertex 1.2.3"), "vertex value '1.2.3' is not a number"),
        (("endloop", "endlop"), "expected 'endloop', found 'endlop'"),
        (("endsolid", "endsolid\nsolid"), "without 'endsolid'"),
        (("endsolid", "endsolid\ngarbage"), "expected 'solid' or end of file, found 'garbage'"),
    ],
)
def test_ascii_stl_refusals_name_the_line(
    tmp_path: Path, change: tuple[str, str], reason: str
) -> None:
    data = stl_ascii(box()).decode().replace(*change, 1).encode()
    with pytest.raises(ValidationError, match=re.escape(reason)) as err:
        validate_design_file(write(tmp_path, "bad.stl", data), "model/stl")
    assert re.search(r": line \d+: |file ends after line \d+", str(err.value))


def test_obj_variants_read_alike(tmp_path: Path) -> None:
    from gateway.fidelity.mesh_readers import _read_obj_lines

    quads = write(tmp_path, "quads.obj", QUAD_BOX_OBJ.encode())
    facts = validate_design_file(quads, "model/obj")
    assert {k: facts[k] for k in BOX_FACTS} == BOX_FACTS
    plain = write(tmp_path, "plain.obj", obj(box()))
    for path in (quads, plain):
        assert figures_as_facts(figures_of(_read_obj_lines(path))) == figures_as_facts(
            mesh_figures(path, "model/obj")
        )


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("f 4 8 7 3", "f 4/1/1/1 8 7 3", "line 20: face reference '4/1/1/1' is malformed"),
        ("f 4 8 7 3", "f 0 8 7 3", "line 20: vertex index 0 (OBJ indices start at 1)"),
        ("f -8 -7", "f -9 -7", "line 19: relative vertex index -9 reaches before the first"),
        ("v 5 10 15", "v 5 10", "line 11: 'v' needs 3 coordinates"),
        ("f 1 5 8 4", "f 1 5", "line 21: a face needs at least 3 vertices"),
        ("v 5 10 15", "v 5 10 inf", "line 11: vertex value is not a finite number"),
        ("f 4 8 7 3", "f 4 8 7 9", "line 20: face refers to vertex 9, but the file defines only 8"),
    ],
)
def test_obj_refusals_name_the_line(tmp_path: Path, old: str, new: str, reason: str) -> None:
    text = QUAD_BOX_OBJ.replace(old, new, 1)
    assert text != QUAD_BOX_OBJ
    for variant in (text, "\n".join(line.split("#")[0] for line in text.split("\n"))):
        with pytest.raises(ValidationError, match=re.escape(reason)):
            validate_design_file(write(tmp_path, "bad.obj", variant.encode()), "model/obj")


def test_ascii_ply_layouts_read_alike(tmp_path: Path) -> None:
    from gateway.fidelity.ply import _ply_ascii_lines, _ply_header, read_ply

    header = (
        "ply\nformat ascii 1.0\nelement vertex 8\nproperty float x\nproperty float y\n"
        "property float z\n{extra}element face {faces}\nproperty list uchar int vertex_indices\n"
        "end_header\n"
    )
    m = box()
    corners = [f"{x} {y} {z}" for x, y, z in m.vertices]
    tris = [f"3 {a} {b} {c}" for a, b, c in m.faces]
    colours = [f"{c} 200 100 50" for c in corners]
    layouts = {
        "plain": header.format(extra="", faces=12) + "\n".join(corners + tris) + "\n",
        "colours (mixed types)": header.format(
            extra="property uchar red\nproperty uchar green\nproperty uchar blue\n", faces=12
        )
        + "\n".join(colours + tris),
        "blank lines": header.format(extra="", faces=12) + "\n\n".join(corners + tris) + "\n\n",
    }
    for what, text in layouts.items():
        path = write(tmp_path, "layout.ply", text.encode())
        facts = validate_design_file(path, "model/x-ply")
        assert {k: facts[k] for k in BOX_FACTS} == BOX_FACTS, what
        data = path.read_bytes()
        _, elements, offset = _ply_header(data)
        slow = _ply_ascii_lines(data[offset:].decode("latin-1"), elements)
        assert np.array_equal(np.asarray(slow["face"]["vertex_indices"]), m.faces), what
        assert read_ply(path).faces is not None
    for old, new, reason in [
        ("\n3 1 3 0\n", "\n3 1 3.5 0\n", "'face' line 0: '3.5' is not a valid value"),
        ("\n3 4 1 0\n", "\n3 4 1 0 7\n", "'face' line 1 has 5 values, the header's properties"),
    ]:
        bad = layouts["plain"].replace(old, new)
        assert bad != layouts["plain"]
        with pytest.raises(ValidationError, match=re.escape(reason)):
            validate_design_file(write(tmp_path, "bad.ply", bad.encode()), "model/x-ply")
