"""Strict reader for 3MF packages (3MF core specification, namespace 2015/02).

A 3MF file is an OPC (ZIP) package. Checked: ``[Content_Types].xml`` and
``_rels/.rels`` exist; ``_rels/.rels`` names exactly one 3D model part, which exists
and has the 3D model content type; that part is well-formed XML without DTD or
entity declarations (streamed with expat, bounded by the package size limit), its
root is a core ``<model>`` with a known unit, objects have unique ids, vertices are
finite, triangles use three different vertices in range, and every build item and
component refers to a defined object. Every build item is measured with its
transform and its components' transforms, in the package's unit converted to mm.
Required extensions other than materials (which do not change geometry) are refused,
as are components in other model parts (production extension); elements of other
namespaces are ignored. trimesh cannot read 3MF without lxml, which this project
does not depend on.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.parsers import expat

import numpy as np

from gateway.fidelity.mesh_readers import MeshData, MeshFormatError, parse_number

CORE_NS = "http://schemas.microsoft.com/3dmanufacturing/core/2015/02"
MATERIAL_NS = "http://schemas.microsoft.com/3dmanufacturing/material/2015/02"
PRODUCTION_NS = "http://schemas.microsoft.com/3dmanufacturing/production/2015/06"
MODEL_REL_TYPE = "http://schemas.microsoft.com/3dmanufacturing/2013/01/3dmodel"
MODEL_CONTENT_TYPE = "application/vnd.ms-package.3dmanufacturing-3dmodel+xml"
_RELS_NS = "{http://schemas.openxmlformats.org/package/2006/relationships}"
_CT_NS = "{http://schemas.openxmlformats.org/package/2006/content-types}"
UNITS_TO_MM = {
    "micron": 0.001, "millimeter": 1.0, "centimeter": 10.0,
    "inch": 25.4, "foot": 304.8, "meter": 1000.0,
}  # fmt: skip


def _package_xml(zf: zipfile.ZipFile, part: str, limit: int) -> ElementTree.Element:
    with zf.open(part) as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise MeshFormatError(f"package part {part} is larger than {limit} bytes")
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise MeshFormatError(f"package part {part} has a DTD; 3MF parts may not")
    try:
        return ElementTree.fromstring(raw)
    except ElementTree.ParseError as exc:
        raise MeshFormatError(f"package part {part} is not well-formed XML ({exc})") from None


def read_3mf(path: Path, max_bytes: int) -> MeshData:
    if not zipfile.is_zipfile(path):
        raise MeshFormatError("not a ZIP archive (a 3MF file is an OPC/ZIP package)")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            total = sum(i.file_size for i in infos.values())
            if total > max_bytes:
                raise MeshFormatError(f"the package unpacks to {total} bytes (> {max_bytes})")
            for required in ("[Content_Types].xml", "_rels/.rels"):
                if required not in infos:
                    raise MeshFormatError(f"the package has no {required} part")
            rels = _package_xml(zf, "_rels/.rels", 1 << 20)
            targets = [
                r.get("Target", "").lstrip("/")
                for r in rels.iter(f"{_RELS_NS}Relationship")
                if r.get("Type") == MODEL_REL_TYPE
            ]
            if len(targets) != 1 or targets[0] not in infos:
                raise MeshFormatError(
                    "_rels/.rels must name exactly one 3D model part that exists in the package "
                    f"(found {len(targets)} 3D model relationship(s))"
                )
            part = targets[0]
            types = _package_xml(zf, "[Content_Types].xml", 1 << 20)
            declared = {
                o.get("PartName", "").lstrip("/").lower(): o.get("ContentType", "")
                for o in types.iter(f"{_CT_NS}Override")
            }
            defaults = {
                d.get("Extension", "").lower(): d.get("ContentType", "")
                for d in types.iter(f"{_CT_NS}Default")
            }
            ctype = declared.get(part.lower(), defaults.get(part.rsplit(".", 1)[-1].lower(), ""))
            if ctype != MODEL_CONTENT_TYPE:
                raise MeshFormatError(
                    f"part {part} has content type {ctype[:80]!r}, not {MODEL_CONTENT_TYPE}"
                )
            model = _ModelReader(part)
            with zf.open(part) as fh:
                model.parse(fh)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise MeshFormatError(f"the ZIP archive is damaged ({exc})") from None
    except (NotImplementedError, RuntimeError) as exc:  # compression method, encryption
        raise MeshFormatError(f"the ZIP archive cannot be read ({exc})") from None
    return model.geometry()


@dataclass
class _Object:
    vertices: list[tuple[float, float, float]] = field(default_factory=list)
    triangles: list[tuple[int, int, int]] = field(default_factory=list)
    components: list[tuple[int, np.ndarray]] = field(default_factory=list)
    has_mesh: bool = False


def _transform(text: str | None, where: str) -> np.ndarray:
    """3MF transform ``m00 m01 m02 m10 ... m32`` as a 4x3 matrix (row vectors)."""
    if text is None:
        return np.vstack([np.eye(3), np.zeros(3)])
    values = [parse_number(t) for t in text.split()]
    if len(values) != 12 or any(v is None for v in values):
        raise MeshFormatError(f"{where}: transform must be 12 finite numbers")
    return np.asarray(values, dtype=np.float64).reshape(4, 3)


class _ModelReader:
    """Streams the 3D model part with expat (namespaces resolved, no DTD allowed)."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.unit = "millimeter"
        self.objects: dict[int, _Object] = {}
        self.items: list[tuple[int, np.ndarray]] = []
        self.current: _Object | None = None
        self.prefixes: dict[str, str] = {}
        self.depth = 0

    def parse(self, fh: Any) -> None:
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.StartNamespaceDeclHandler = lambda prefix, uri: self.prefixes.update(
            {prefix or "": uri}
        )
        parser.StartDoctypeDeclHandler = self._doctype
        parser.EntityDeclHandler = self._doctype
        self.parser = parser
        try:
            parser.ParseFile(fh)
        except expat.ExpatError as exc:
            raise MeshFormatError(f"part {self.part} is not well-formed XML ({exc})") from None

    def _doctype(self, *args: object) -> None:
        raise MeshFormatError(f"part {self.part} has a DTD or entity declaration; 3MF may not")

    def _where(self) -> str:
        return f"{self.part} line {self.parser.CurrentLineNumber}"

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        self.depth += 1
        ns, _, local = name.rpartition(" ")
        if self.depth == 1:
            if (ns, local) != (CORE_NS, "model"):
                raise MeshFormatError(f"{self._where()}: root is not a 3MF core <model>")
            self._model(attrs)
            return
        if ns != CORE_NS:
            return  # extension elements (materials, metadata of others) carry no geometry
        if local == "object":
            oid = self._int(attrs.get("id"), "object id", minimum=1)
            if oid in self.objects:
                raise MeshFormatError(f"{self._where()}: object id {oid} is used twice")
            self.current = self.objects[oid] = _Object()
        elif local == "mesh" and self.current is not None:
            self.current.has_mesh = True
        elif local == "vertex" and self.current is not None:
            xyz = [parse_number(attrs.get(k, "")) for k in ("x", "y", "z")]
            if any(v is None for v in xyz):
                raise MeshFormatError(f"{self._where()}: vertex x/y/z must be finite numbers")
            self.current.vertices.append((xyz[0], xyz[1], xyz[2]))  # type: ignore[arg-type]
        elif local == "triangle" and self.current is not None:
            v = [self._int(attrs.get(k), k) for k in ("v1", "v2", "v3")]
            if len(set(v)) != 3:
                raise MeshFormatError(f"{self._where()}: triangle uses a vertex twice")
            self.current.triangles.append((v[0], v[1], v[2]))
        elif local == "component" and self.current is not None:
            if f"{PRODUCTION_NS} path" in attrs:
                raise MeshFormatError(
                    f"{self._where()}: component in another model part (production extension) "
                    "is not supported"
                )
            oid = self._int(attrs.get("objectid"), "objectid", minimum=1)
            self.current.components.append((oid, _transform(attrs.get("transform"), self._where())))
        elif local == "item":
            oid = self._int(attrs.get("objectid"), "objectid", minimum=1)
            self.items.append((oid, _transform(attrs.get("transform"), self._where())))

    def _model(self, attrs: dict[str, str]) -> None:
        self.unit = attrs.get("unit", "millimeter")
        if self.unit not in UNITS_TO_MM:
            raise MeshFormatError(f"{self._where()}: unknown unit {self.unit[:20]!r}")
        for prefix in attrs.get("requiredextensions", "").split():
            uri = self.prefixes.get(prefix, prefix)
            if uri != MATERIAL_NS:
                raise MeshFormatError(f"{self._where()}: required extension {uri[:80]!r} "
                                      "is not supported")  # fmt: skip

    def _end(self, name: str) -> None:
        self.depth -= 1
        if name == f"{CORE_NS} object":
            self.current = None

    def _int(self, text: str | None, what: str, minimum: int = 0) -> int:
        if text is None or not text.isdigit() or int(text) < minimum:
            raise MeshFormatError(f"{self._where()}: {what} {str(text)[:20]!r} is not valid")
        return int(text)

    def geometry(self) -> MeshData:
        verts: list[np.ndarray] = []
        faces: list[np.ndarray] = []
        count = 0
        stack = [(oid, m, 0) for oid, m in reversed(self.items)]
        if not stack:
            raise MeshFormatError(f"{self.part} has no build items")
        while stack:
            oid, matrix, depth = stack.pop()
            obj = self.objects.get(oid)
            if obj is None:
                raise MeshFormatError(f"{self.part}: object {oid} is referenced but not defined")
            if depth > 32:
                raise MeshFormatError(f"{self.part}: components nest too deep (a cycle?)")
            if obj.has_mesh:
                v = np.asarray(obj.vertices, dtype=np.float64).reshape(-1, 3)
                t = np.asarray(obj.triangles, dtype=np.int64).reshape(-1, 3)
                if len(t) and int(t.max()) >= len(v):
                    raise MeshFormatError(
                        f"{self.part}: object {oid} has a triangle index {int(t.max())} but "
                        f"only {len(v)} vertices"
                    )
                verts.append(v @ matrix[:3] + matrix[3])
                faces.append(t + count)
                count += len(v)
            for child, m in reversed(obj.components):
                combined = np.vstack([m[:3] @ matrix[:3], m[3] @ matrix[:3] + matrix[3]])
                stack.append((child, combined, depth + 1))
        all_faces = np.concatenate(faces) if faces else np.zeros((0, 3), dtype=np.int64)
        if len(all_faces) == 0:
            raise MeshFormatError(f"{self.part}: the build contains no triangles")
        scale = UNITS_TO_MM[self.unit]
        return MeshData("3mf", self.unit, np.concatenate(verts) * scale, all_faces)
