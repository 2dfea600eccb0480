"""The engineer's pages of the factory console: incoming studies, downloads, designs.

Thin adapters over the same domain calls as the gRPC servicers, with the request's
verified identity and address:

- ``/factory/studies`` — received studies per case with their suitability result and
  its reasons (:meth:`FactoryRole.list_studies`, what ``Factory.ListStudies`` calls);
  ``/factory/studies/{uid}`` one study, its series analysis and its objects
  (:meth:`FactoryRole.get_study`, what ``Factory.GetStudy`` calls).
- ``/factory/studies/{uid}/zip`` the study's objects as one ZIP, streamed (stored
  entries written as the object's bytes are read, never the whole study in memory), and
  ``/objects/{object_id}`` one object: each object through
  :meth:`gateway.query.QueryService.read_object` (what ``Query.ReadObject`` calls), so
  every download is audited as ``object.downloaded`` the same way. Only objects received
  as instances of a study at this node are offered (anything else: 404).
- ``/factory/cases/{case_id}/designs`` a design file uploaded for a case: format-checked
  under the node's ``[design]`` limits (its figures shown), then submitted through
  :meth:`gateway.exchange.Exchange.submit` (what ``Exchange.Submit`` calls) to the
  hospital the case's studies came from.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from starlette.responses import Response, StreamingResponse

from gateway.errors import NotFound, ValidationError
from gateway.exchange import Submission
from gateway.fidelity.formats import DESIGN_MEDIA_TYPES, design_media_type, validate_design_file
from gateway.fidelity.mesh import (
    FACT_AREA,
    FACT_BBOX_MAX,
    FACT_BBOX_MIN,
    FACT_TRIANGLES,
    FACT_VOLUME,
    FACT_WATERTIGHT,
)
from gateway.hashing import sha256_bytes
from gateway.transfer.model import ChunkMsg, check_name, check_object_id
from gateway.web.app import Console, ConsolePages, NavEntry, PageRequest, route

if TYPE_CHECKING:
    from factory_node.role import FactoryNodeRole
    from gateway.catalog import ObjectRecord

STUDIES = "/console/factory.studies"
DOWNLOAD = "/console/factory.download"
UPLOAD = "/console/factory.upload"

TEMPLATES = Path(__file__).parent / "templates"
UPLOAD_CHUNK_BYTES = 1024 * 1024
MAX_PAGES = 1000


class _Sink:
    """A write-only, non-seekable file for :class:`zipfile.ZipFile`: what was written
    since the last :meth:`drain` is handed on (the ZIP is streamed, never held)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._buf += data
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seek(self, *args: object) -> int:
        raise OSError("the ZIP is streamed: not seekable")

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


def _attachment(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:120] or "object"
    return f'attachment; filename="{safe}"'


def factory_pages(console: Console, role: FactoryNodeRole) -> ConsolePages:
    page = console.page
    cfg = role.ctx.cfg
    max_upload = min(cfg.design.max_mesh_bytes, cfg.transfer.max_object_bytes)
    spool = cfg.data_dir / "spool" / "console"

    def case_hospital(case_id: str) -> str:
        """The peer the case's studies came from (where its designs go)."""
        peers = {p.id for p in role.ctx.cfg.peers}
        origins = {
            o.origin_node
            for o in role.query.catalog.list_objects(case_id=case_id, limit=1000)
            if o.origin_node in peers
        }
        if not origins:
            raise NotFound(
                f"case {case_id!r}: nothing has arrived at this node from a hospital for it, "
                "so there is no hospital to send a design to"
            )
        if len(origins) > 1:
            raise ValidationError(
                f"case {case_id!r} has objects from several peers ({', '.join(sorted(origins))})"
            )
        return origins.pop()

    # -- studies --------------------------------------------------------------------
    @page(STUDIES)
    def studies(p: PageRequest) -> Response:
        case = p.arg("case")
        number = p.int_arg("page", 1, minimum=1)
        if number > MAX_PAGES:
            raise ValidationError(f"query parameter 'page' must be at most {MAX_PAGES}")
        size = console.page_size
        rows = role.list_studies(p.ctx.identity, case, size + 1, offset=(number - 1) * size)
        more = len(rows) > size
        rows = rows[:size]
        return p.render(
            "factory_studies.html",
            rows=[(s, role.is_current(s)) for s in rows],
            case=case,
            page_number=number,
            more=more,
            args=dict(p.params),
            can_download=p.allowed(DOWNLOAD),
            can_upload=p.allowed(UPLOAD),
        )

    @page(STUDIES)
    def study(p: PageRequest) -> Response:
        detail = role.get_study(p.ctx.identity, p.request.path_params["uid"], p.arg("case"))
        return p.render(
            "factory_study.html",
            d=detail,
            can_download=p.allowed(DOWNLOAD),
            can_upload=p.allowed(UPLOAD),
        )

    # -- downloads ------------------------------------------------------------------
    def read(p: PageRequest, object_id: str) -> tuple[ObjectRecord, Iterator[ChunkMsg]]:
        return role.query.read_object(p.ctx.identity, object_id, 0, remote=p.ctx.remote)

    @page(DOWNLOAD)
    def study_zip(p: PageRequest) -> Response:
        uid = p.request.path_params["uid"]
        summary = role.studies.study(uid, p.arg("case"))
        instances = role.studies.instances(summary.case_id, summary.study_uid)
        if not instances:
            raise NotFound(f"study {uid} has no objects at this node")
        # Every object is checked (catalogued, bytes present) and its download audited
        # before the first byte goes out; the bytes are read as the ZIP is written.
        opened = [(inst, *read(p, inst.object_id)) for inst in instances]

        def stream() -> Iterator[bytes]:
            sink = _Sink()
            zf = zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True)  # type: ignore[call-overload]
            with zf:
                for inst, obj, chunks in opened:
                    member_id = inst.sop_instance_uid or obj.object_id
                    name = f"{inst.series_uid or 'series'}/{member_id}.dcm"
                    info = zipfile.ZipInfo(name, date_time=(2000, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_STORED
                    info.file_size = obj.size
                    with zf.open(info, "w", force_zip64=obj.size >= 0x7FFFFFFF) as member:
                        for chunk in chunks:
                            member.write(chunk.data)
                            yield sink.drain()
                    yield sink.drain()
            yield sink.drain()

        return StreamingResponse(
            stream(),
            media_type="application/zip",
            headers={
                "content-disposition": _attachment(f"study-{summary.study_uid}.zip"),
                "cache-control": "no-store",
            },
        )

    @page(DOWNLOAD)
    def object_download(p: PageRequest) -> Response:
        object_id = check_object_id(p.request.path_params["object_id"])
        if role.studies.instance_of(object_id) is None:
            raise NotFound(f"object {object_id} is not an instance of a study at this node")
        obj, chunks = read(p, object_id)
        return StreamingResponse(
            (c.data for c in chunks),
            media_type=obj.media_type or "application/octet-stream",
            headers={
                "content-disposition": _attachment(f"{object_id}.dcm"),
                "content-length": str(obj.size),
                "cache-control": "no-store",
            },
        )

    # -- design upload --------------------------------------------------------------
    def design_form(p: PageRequest, case_id: str, status: int = 200, **values: object) -> Response:
        return p.render(
            "factory_design.html",
            status,
            case_id=case_id,
            formats=DESIGN_MEDIA_TYPES,
            max_upload=max_upload,
            **values,
        )

    @page(UPLOAD)
    def design_page(p: PageRequest) -> Response:
        case_id = p.request.path_params["case_id"]
        return design_form(p, case_id, hospital=case_hospital(case_id))

    @page(UPLOAD, form=True, max_upload_bytes=max_upload)
    def design_upload(p: PageRequest) -> Response:
        case_id = p.request.path_params["case_id"]
        hospital = case_hospital(case_id)
        chosen = p.form.get("format", "")
        upload = p.files.get("file")
        try:
            if upload is None or not upload.filename:
                raise ValidationError("choose a design file to upload")
            name = check_name(PurePath(upload.filename.replace("\\", "/")).name)
            media_type = design_media_type(chosen)
            if media_type is None:
                raise ValidationError(
                    f"{name}: format {chosen[:40]!r} is not a design file type "
                    f"(accepted: {', '.join(DESIGN_MEDIA_TYPES)})"
                )
            facts, obj, queued = _check_and_submit(p, role, spool, upload.file, name,
                                                   media_type, case_id, hospital)  # fmt: skip
        except ValidationError as exc:
            return design_form(p, case_id, 400, hospital=hospital, error=str(exc), chosen=chosen)
        return design_form(
            p,
            case_id,
            hospital=hospital,
            chosen=media_type,
            done=obj,
            queued=queued,
            facts=facts,
            mesh=_mesh_facts(facts),
        )

    return ConsolePages(
        routes=[
            route("/factory/studies", studies),
            route("/factory/studies/{uid}", study),
            route("/factory/studies/{uid}/zip", study_zip),
            route("/objects/{object_id}", object_download),
            route("/factory/cases/{case_id}/designs", design_page),
            route("/factory/cases/{case_id}/designs", design_upload, post=True),
        ],
        nav=[NavEntry("Incoming studies", "/factory/studies", STUDIES)],
        templates=TEMPLATES,
    )


def _check_and_submit(
    p: PageRequest,
    role: FactoryNodeRole,
    spool: Path,
    source: object,
    name: str,
    media_type: str,
    case_id: str,
    hospital: str,
) -> tuple[dict[str, str], ObjectRecord, list[object]]:
    """Spool the upload, check it under ``[design]`` (its facts), submit it as
    Exchange.Submit does (which checks it again before storing)."""
    spool.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=spool, suffix=".part")
    path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            while block := source.read(UPLOAD_CHUNK_BYTES):  # type: ignore[attr-defined]
                fh.write(block)
        d = role.ctx.cfg.design
        facts = validate_design_file(
            path,
            media_type,
            name=name,
            max_mesh_bytes=d.max_mesh_bytes,
            max_mesh_triangles=d.max_mesh_triangles,
        )

        def chunks() -> Iterator[ChunkMsg]:
            offset = 0
            with open(path, "rb") as fh:
                while block := fh.read(UPLOAD_CHUNK_BYTES):
                    yield ChunkMsg(offset, block, sha256_bytes(block))
                    offset += len(block)

        sub = Submission(
            name=name, media_type=media_type, case_id=case_id, destinations=(hospital,)
        )
        obj, queued = role.exchange.submit(p.ctx.identity, sub, chunks())
    finally:
        path.unlink(missing_ok=True)
    return facts, obj, list(queued)


def _mesh_facts(facts: dict[str, str]) -> list[tuple[str, str]]:
    """The mesh figures an engineer checks, labelled (empty for a non-mesh file)."""
    if FACT_TRIANGLES not in facts:
        return []
    return [
        ("Triangles", facts[FACT_TRIANGLES]),
        ("Volume (mm³)", facts.get(FACT_VOLUME, "")),
        ("Area (mm²)", facts.get(FACT_AREA, "")),
        ("Bounding box min (mm)", facts.get(FACT_BBOX_MIN, "")),
        ("Bounding box max (mm)", facts.get(FACT_BBOX_MAX, "")),
        ("Watertight", facts.get(FACT_WATERTIGHT, "")),
    ]
