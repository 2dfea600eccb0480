"""The case pages of the console: the list, a case's verified chain, record forms, the
person's signature made in their browser, and the clinician's design review.

Every page calls the same domain as the gRPC Case service (:class:`CaseService`): the
list and the chain are :meth:`CaseService.list_cases` / :meth:`CaseService.show`, a new
record is built with the one record builder (:func:`gateway.cases.signing.build_record`,
the author taken from the caller's verified certificate) and submitted with
:meth:`CaseService.submit`, exactly as ``SubmitRecord`` does. The node never sees a
person's private key: the prepare page hands the canonical record bytes to the
browser, ``case-sign.js`` signs them there with the key file the person picks
(WebCrypto, ECDSA P-256 SHA-256) and posts the bytes and the signature back.

Forms are generated from the record schema (:data:`gateway.cases.schema.TYPES`):
one input per scalar field (nested objects flattened as ``patient.age``), a textarea
with one entry a line for lists of identifiers, and JSON for lists of objects and maps.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from starlette.responses import JSONResponse, RedirectResponse, Response

from gateway import authz
from gateway.cases import CaseService
from gateway.cases.describe import example_value, preview
from gateway.cases.records import Record
from gateway.cases.schema import SHAPES, TYPES, Spec, is_hex64, validate_data
from gateway.cases.signing import author_of, build_record
from gateway.cases.views import CaseView
from gateway.cases.workflow import Parties
from gateway.catalog import Catalog
from gateway.errors import CaseFormatError, NotFound, ValidationError, YigongError
from gateway.fidelity.formats import DesignFactsCache
from gateway.fidelity.mesh import DEFAULT_MAX_MESH_BYTES, MESH_MEDIA_TYPES, canonical_media_type
from gateway.fidelity.mesh_view import mesh_view_json
from gateway.storage import ObjectStore
from gateway.web.app import Console, ConsolePages, NavEntry, PageRequest, route
from gateway.web.status import http_status_for

CASES = "/console/cases"
CASES_SIGN = "/console/cases.sign"
DESIGN_TYPES = ("design_output", "design_change")
"""Record types that name design files (``data.files``)."""


@dataclass(frozen=True)
class CaseServices:
    """What the case pages use."""

    cases: CaseService
    store: ObjectStore
    catalog: Catalog
    design_facts: DesignFactsCache


# --------------------------------------------------------------------------- the forms
@dataclass(frozen=True)
class FormField:
    """One input of a record form."""

    path: str  # patient.age (under data)
    kind: str  # text textarea identifier date choice boolean integer number lines json
    required: bool
    what: str
    choices: tuple[str, ...] = ()
    example: str = ""

    @property
    def name(self) -> str:
        return "data." + self.path

    @property
    def label(self) -> str:
        return self.path.replace(".", " / ").replace("_", " ")


def _choices(what: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in what.removeprefix("one of ").split(","))


def form_fields(kind: str) -> list[FormField]:
    """The inputs of a form for record type ``kind`` (from its schema)."""
    spec = TYPES[kind]
    out: list[FormField] = []

    def walk(name: str, required: bool, s: Spec) -> None:
        shape = SHAPES[s]
        if shape.kind == "object":
            for sub, req, sub_spec in shape.fields:
                walk(f"{name}.{sub}", required and req, sub_spec)
            return
        if shape.kind == "list" and shape.item is not None:
            item = SHAPES[shape.item]
            if item.kind in ("identifier", "text"):
                out.append(
                    FormField(name, "lines", required, f"{shape.what}, one a line: {item.what}")
                )
                return
            example = json.dumps(example_value(s, name), indent=1)
            out.append(FormField(name, "json", required, f"JSON: {shape.what}", (), example))
            return
        if shape.kind == "map":
            example = json.dumps(shape.example)
            out.append(FormField(name, "json", required, f"JSON: {shape.what}", (), example))
            return
        kind_ = shape.kind
        if kind_ == "text" and "4000" in shape.what:
            kind_ = "textarea"
        choices = _choices(shape.what) if kind_ == "choice" else ()
        out.append(FormField(name, kind_, required, shape.what, choices))

    for name, s in spec.required.items():
        walk(name, True, s)
    for name, s in spec.optional.items():
        walk(name, False, s)
    return out


def _spec_at(kind: str, path: str) -> Spec:
    spec = TYPES[kind]
    parts = path.split(".")
    s = {**spec.required, **spec.optional}[parts[0]]
    for part in parts[1:]:
        s = {n: sub for n, _, sub in SHAPES[s].fields}[part]
    return s


def _value(f: FormField, form: dict[str, str]) -> tuple[bool, Any]:
    """(given, value) of field ``f`` in a posted form; a value that does not parse is
    kept as text so that the schema names what it must be."""
    raw = form.get(f.name, "")
    if f.kind == "boolean":
        if f.name in form:
            return True, raw in ("true", "on", "1", "yes")
        return (True, False) if f.required else (False, None)
    if not raw.strip():
        return False, None
    if f.kind == "integer":
        try:
            return True, int(raw.strip())
        except ValueError:
            return True, raw
    if f.kind == "number":
        for convert in (int, float):
            try:
                return True, convert(raw.strip())
            except ValueError:
                continue
        return True, raw
    if f.kind == "lines":
        return True, [line.strip() for line in raw.splitlines() if line.strip()]
    if f.kind == "json":
        try:
            return True, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _FieldError(
                f"data.{f.path} must be JSON ({exc.msg}, line {exc.lineno})"
            ) from None
    if f.kind in ("text", "textarea"):
        return True, raw.replace("\r\n", "\n")
    return True, raw.strip()


class _FieldError(Exception):
    pass


def parse_form(kind: str, form: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The record ``data`` of a posted form and the errors by field path (``""``: the
    record as a whole). Each field is checked with its own schema entry, then the whole
    record with :func:`validate_data` (the rules that tie fields together)."""
    fields = form_fields(kind)
    data: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for f in fields:
        try:
            given, value = _value(f, form)
        except _FieldError as exc:
            errors[f.path] = str(exc)
            continue
        if not given:
            if f.required:
                errors[f.path] = f"data.{f.path} is required"
            continue
        try:
            _spec_at(kind, f.path)(value, f"data.{f.path}")
        except CaseFormatError as exc:
            errors[f.path] = str(exc)
            continue
        *parents, last = f.path.split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    if errors:
        return data, errors
    try:
        validate_data(kind, data)
    except CaseFormatError as exc:
        message = str(exc)
        paths = sorted((f.path for f in fields), key=len, reverse=True)
        at = next((p for p in paths if message.startswith(f"data.{p}")), "")
        errors[at] = message
    return data, errors


# --------------------------------------------------------------------------- helpers
_FACT_LABELS: dict[str, tuple[str, str]] = {
    # receipt fact -> (label, unit); shown in this order, then any other fact as it is
    "mesh.triangles": ("Number of triangles", ""),
    "mesh.vertices": ("Vertices", ""),
    "mesh.volume_mm3": ("Volume", "mm³"),
    "mesh.area_mm2": ("Surface area", "mm²"),
    "mesh.watertight": ("Watertight", ""),
    "mesh.format": ("Format", ""),
    "mesh.unit": ("Unit in the file", ""),
    "design.media_type": ("Media type", ""),
}


def readable_facts(facts: Mapping[str, str]) -> list[tuple[str, str]]:
    """A design's facts as a person reads them: labels, units, one bounding box."""
    out: list[tuple[str, str]] = []
    for key, (label, unit) in _FACT_LABELS.items():
        if key not in facts:
            continue
        value = facts[key]
        if unit:
            try:
                value = f"{float(value):,.1f} {unit}"
            except ValueError:
                pass
        elif value in ("true", "false"):
            value = "yes" if value == "true" else "no"
        out.append((label, value))
    lo, hi = facts.get("mesh.bbox_min_mm"), facts.get("mesh.bbox_max_mm")
    if lo and hi:
        try:
            a = [float(x) for x in lo.split(",")]
            b = [float(x) for x in hi.split(",")]
            size = " \u00d7 ".join(f"{y - x:.1f}" for x, y in zip(a, b, strict=True))
            out.append(("Bounding box", f"{size} mm (from {', '.join(f'{x:g}' for x in a)})"))
        except ValueError:
            out.append(("Bounding box", f"{lo} to {hi} mm"))
    shown = {*_FACT_LABELS, "mesh.bbox_min_mm", "mesh.bbox_max_mm"}
    out += [(k, v) for k, v in sorted(facts.items()) if k not in shown]
    return out


def signable(p: PageRequest, view: CaseView) -> list[str]:
    """Record types the caller may sign on this case now: those the workflow asks of the
    caller's role at the caller's node (its next actions come from
    :data:`authz.RECORD_SIGNERS`)."""
    me = p.ctx.identity
    kinds = [k for a in view.next if authz.asked_of(me, a.role, a.node) for k in a.record_types]
    return list(dict.fromkeys(kinds))


def is_mine(p: PageRequest, view: CaseView) -> bool:
    return any(authz.asked_of(p.ctx.identity, a.role, a.node) for a in view.next)


@dataclass(frozen=True)
class DesignFile:
    object_id: str
    name: str
    media_type: str
    record_seq: int
    record_type: str
    record_hash: str  # what a design_confirmation's design_hash names
    held: bool


def design_files(view: CaseView, catalog: Catalog) -> list[DesignFile]:
    """Mesh files named by the design records of the case (newest record first)."""
    out: list[DesignFile] = []
    for r in reversed(view.records):
        if r.type not in DESIGN_TYPES or not r.ok or not r.record_json:
            continue
        for f in json.loads(r.record_json)["data"].get("files", ()):
            obj = catalog.find_object(f["object_id"])
            mtype = canonical_media_type(obj.media_type) if obj is not None else ""
            if obj is not None and mtype not in MESH_MEDIA_TYPES:
                continue
            out.append(
                DesignFile(f["object_id"], f["name"], mtype, r.seq, r.type, r.record_hash,
                           obj is not None and obj.case_id in ("", view.case.case_id))
            )  # fmt: skip
    return out


def _design(view: CaseView, catalog: Catalog, object_id: str) -> DesignFile:
    for d in design_files(view, catalog):
        if d.object_id == object_id and d.held:
            return d
    raise NotFound(
        f"case {view.case.case_id}: object {object_id[:16]}… is not a design file of the case "
        "held by this node"
    )


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"{what} is not valid base64") from None


def der_signature(raw: bytes) -> bytes:
    """WebCrypto's ECDSA P-256 signature (64 bytes r||s) as DER, what the domain checks;
    a DER signature is passed through."""
    if len(raw) == 64:
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        return encode_dss_signature(r, s)
    return raw


def _chunks(store: ObjectStore, object_id: str, limit: int) -> Iterator[bytes]:
    total = 0
    with store.open_read(object_id) as chunks:
        for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise ValidationError(
                    f"object {object_id[:16]}… is larger than {limit} bytes; it is not shown"
                )
            yield chunk


# --------------------------------------------------------------------------- the pages
def case_pages(console: Console, s: CaseServices) -> ConsolePages:
    page = console.page

    def case_id_of(p: PageRequest) -> str:
        return str(p.request.path_params["case_id"])

    @page(CASES)
    def case_list(p: PageRequest) -> Response:
        size = console.page_size
        n = p.int_arg("page", 1, minimum=1)
        views = s.cases.list_cases(p.ctx.identity, limit=n * size + 1)
        rows = views[(n - 1) * size : n * size]
        more = len(views) > n * size
        return p.render("cases.html", rows=rows, page_no=n, more=more, mine=is_mine_of(p))

    def is_mine_of(p: PageRequest) -> Any:
        return lambda view: is_mine(p, view)

    @page(CASES)
    def case_page(p: PageRequest) -> Response:
        view = s.cases.show(p.ctx.identity, case_id_of(p))
        return _case(p, view)

    def _case(p: PageRequest, view: CaseView) -> Response:
        return p.render(
            "case.html",
            view=view,
            types=TYPES,
            mine=is_mine(p, view),
            signable=signable(p, view) if p.allowed(CASES_SIGN) else [],
            designs=design_files(view, s.catalog),
            signed=p.arg("signed") == "1",
        )

    def _form(
        p: PageRequest,
        view: CaseView,
        kind: str,
        values: dict[str, str],
        errors: dict[str, str],
        status: int = 200,
    ) -> Response:
        return p.render(
            "case_form.html",
            status,
            view=view,
            kind=kind,
            spec=TYPES.get(kind),
            kinds=signable(p, view),
            fields=form_fields(kind) if kind in TYPES else [],
            values=values,
            errors=errors,
            types=TYPES,
        )

    def _check_kind(p: PageRequest, view: CaseView, kind: str) -> None:
        if kind not in TYPES:
            raise ValidationError(f"unknown record type; one of {', '.join(TYPES)}")
        c, t = view.case, TYPES[kind]
        parties = Parties(c.case_id, c.hospital, c.manufacturer)
        author = author_of(p.ctx.identity)
        authz.authorize_signer(parties, kind, author, title=t.title, section=t.section)

    @page(CASES_SIGN)
    def record_new(p: PageRequest) -> Response:
        view = s.cases.show(p.ctx.identity, case_id_of(p))
        kinds = signable(p, view)
        kind = p.arg("type") or (kinds[0] if kinds else "")
        if kind:
            _check_kind(p, view, kind)
        return _form(p, view, kind, {}, {})

    @page(CASES_SIGN, form=True)
    def record_prepare(p: PageRequest) -> Response:
        view = s.cases.show(p.ctx.identity, case_id_of(p))
        kind = p.form.get("type", "")
        _check_kind(p, view, kind)
        data, errors = parse_form(kind, p.form)
        values = {k: v for k, v in p.form.items() if k.startswith("data.")}
        if errors:
            return _form(p, view, kind, values, errors, 400)
        raw = build_record(
            author_of(p.ctx.identity),
            view.case.case_id,
            view.next_seq,
            view.head_hash,
            kind,
            data,
        )
        return _sign(p, view, raw)

    def _sign(
        p: PageRequest, view: CaseView, raw: bytes, status: int = 200, error: str = ""
    ) -> Response:
        record = json.loads(raw)
        return p.render(
            "case_sign.html",
            status,
            view=view,
            record=record,
            spec=TYPES[record["type"]],
            preview=preview(record),
            record_b64=base64.b64encode(raw).decode(),
            error=error,
        )

    @page(CASES_SIGN, form=True)
    def record_submit(p: PageRequest) -> Response:
        case_id = case_id_of(p)
        raw = _b64(p.form.get("record", ""), "the record")
        signature = der_signature(_b64(p.form.get("signature", ""), "the signature"))
        if Record.parse(raw).case_id != case_id:
            raise ValidationError(f"the record posted is not a record of case {case_id}")
        try:
            s.cases.submit(p.ctx.identity, p.ctx.cert_pem, raw, signature)
        except YigongError as exc:  # audited by the domain; the person may sign again
            return _sign(p, s.cases.view(case_id), raw, http_status_for(exc), str(exc))
        return RedirectResponse(f"/cases/{case_id}?signed=1", status_code=303)

    @page(CASES)
    def design_page(p: PageRequest) -> Response:
        view = s.cases.show(p.ctx.identity, case_id_of(p))
        d = _design(view, s.catalog, str(p.request.path_params["object_id"]))
        facts = s.design_facts(d.media_type, s.store, d.object_id)
        side = authz.CONFIRMATION_SIDES.get(p.ctx.identity.role, "")
        can_confirm = p.allowed(CASES_SIGN) and "design_confirmation" in signable(p, view)
        return p.render(
            "case_design.html",
            view=view,
            design=d,
            facts=readable_facts(facts),
            side=side,
            can_confirm=can_confirm,
        )

    @page(CASES)
    def design_mesh(p: PageRequest) -> Response:
        view = s.cases.view(case_id_of(p))
        object_id = str(p.request.path_params["object_id"])
        if not is_hex64(object_id):
            raise ValidationError("the object id must be 64 lowercase hex digits")
        d = _design(view, s.catalog, object_id)
        data = b"".join(_chunks(s.store, d.object_id, DEFAULT_MAX_MESH_BYTES))
        body = mesh_view_json(data, d.media_type, name=f"object {d.object_id[:16]}")
        return JSONResponse(body, headers={"cache-control": "no-store"})

    return ConsolePages(
        routes=[
            route("/cases", case_list),
            route("/cases/{case_id}", case_page),
            route("/cases/{case_id}/records/new", record_new),
            route("/cases/{case_id}/records/prepare", record_prepare, post=True),
            route("/cases/{case_id}/records", record_submit, post=True),
            route("/cases/{case_id}/designs/{object_id}", design_page),
            route("/cases/{case_id}/designs/{object_id}/mesh.json", design_mesh),
        ],
        nav=[NavEntry("Cases", "/cases", CASES)],
    )
