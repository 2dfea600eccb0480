"""The hospital's console pages: received studies and the clinician's confirmation.

``/studies`` lists the received studies (newest first, a cursor per page), with whom
each is of for the hospital's clinicians only (the domain decides: ``withheld``);
``/studies/{uid}`` shows one study's completeness report per series, duplicates and
confirmations, and — for a clinician — the confirmation form. Sending data out of the
hospital cannot be undone: the form asks to type the study UID's last 8 characters and
the server checks the typed text again before it calls the domain
(:meth:`HospitalRole.confirm_study`, the same call as ``Hospital.ConfirmStudy``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markupsafe import Markup
from starlette.responses import Response

from gateway import authz
from gateway.errors import PermissionDenied, ValidationError
from gateway.web.app import Console, ConsolePages, NavEntry, PageRequest, route
from hospital_node.deid.transform import BURNED_IN_MODALITIES, SECONDARY_CAPTURE_CLASSES
from hospital_node.previews import PRESETS, StudyPreviews

if TYPE_CHECKING:
    from hospital_node.role import HospitalRole
    from hospital_node.studies import InstanceRecord

STUDIES = "/console/hospital.studies"
CONFIRM = "/console/hospital.confirm"
TEMPLATES = Path(__file__).parent / "templates"
STATUSES = ("", "receiving", "received")
CONFIRM_CHARS = 8
"""The typed confirmation: the study UID's last this many characters."""


@dataclass(frozen=True)
class HeldBack:
    """An instance the confirmation would not send, and why."""

    instance: InstanceRecord
    reason: str
    burned_in: bool  # sent after all when the clinician allows burned-in instances


def confirm_text(study_uid: str) -> str:
    return study_uid[-CONFIRM_CHARS:]


def held_back(instances: list[InstanceRecord]) -> list[HeldBack]:
    """What a confirmation would hold back, as far as the catalog tells before it reads
    the instances (the de-identifier's burned-in rule on the recorded attributes;
    duplicates are never sent)."""
    out: list[HeldBack] = []
    for i in instances:
        if i.duplicate:
            out.append(HeldBack(i, "another object under the same SOP Instance UID", False))
            continue
        flag = (i.burned_in or "").upper()
        if flag == "YES":
            reason = "Burned In Annotation is YES"
        elif flag == "NO":
            continue
        elif (i.modality or "").upper() in BURNED_IN_MODALITIES:
            reason = f"modality {i.modality} often has burned-in text (Burned In Annotation not NO)"
        elif i.sop_class_uid in SECONDARY_CAPTURE_CLASSES:
            reason = "Secondary Capture without Burned In Annotation = NO"
        else:
            continue
        out.append(HeldBack(i, reason + " (may show patient data in its pixels)", True))
    return out


def _series_rows(report: dict[str, Any], instances: list[InstanceRecord]) -> list[dict[str, Any]]:
    modalities: dict[str, set[str]] = defaultdict(set)
    for i in instances:
        if i.modality:
            modalities[i.series_uid].add(i.modality)
    rows = []
    for r in report.get("series", []):
        count = int(r.get("instance_count", 0))
        missing = int(r.get("missing_slices_estimate", 0))
        rows.append(
            {
                **r,
                "modality": ", ".join(sorted(modalities.get(r.get("series_uid", ""), ()))),
                "expected": count + missing,
                "gaps": [tuple(g) for g in r.get("gaps", [])],
            }
        )
    return rows


def hospital_pages(console: Console, role: HospitalRole) -> ConsolePages:
    page = console.page
    previews = StudyPreviews(role.ctx.store, role.studies)  # one cache for the node

    def preview_set(p: PageRequest) -> Any:
        """The previews of the study in the path, for those who may see whom it is of:
        the original pixels may show a name burned in (the hospital's clinicians)."""
        if not authz.may_see_identity(p.ctx.identity, console.node):
            raise PermissionDenied(
                f"{p.ctx.identity.label()} may not see the original pixels of a study: they "
                "may show whom it is of (the hospital's clinicians only)"
            )
        preset = p.arg("preset", "bone")
        if preset not in PRESETS:
            raise ValidationError(f"preset must be one of {', '.join(sorted(PRESETS))}")
        uid = p.request.path_params["uid"]
        return previews.previews(uid, p.arg("series"), preset)

    @page(STUDIES)
    def study_previews(p: PageRequest) -> Response:
        """The previews fragment: three orthogonal views, thumbnails, slice positions."""
        got = preview_set(p)
        return p.render(
            "hospital_previews.html",
            uid=got.study_uid,
            series=got.series_uid,
            preset=got.preset,
            views=list(got.views),
            thumbs=len(got.thumbnails),
            plot=Markup(got.slice_plot_svg),  # built by previews.slice_plot_svg, escaped there
            presets=sorted(PRESETS),
            all_series=previews.series_uids(got.study_uid),
        )

    @page(STUDIES)
    def preview_image(p: PageRequest) -> Response:
        got = preview_set(p)
        name = p.request.path_params["name"]
        if name.startswith("thumb-") and name[6:].isdigit():
            index = int(name[6:])
            if index >= len(got.thumbnails):
                raise ValidationError(f"study {got.study_uid} has {len(got.thumbnails)} thumbnails")
            png = got.thumbnails[index]
        elif name in got.views:
            png = got.views[name]
        else:
            raise ValidationError(f"no preview {name!r}: axial, coronal, sagittal or thumb-N")
        return Response(png, media_type="image/png", headers={"cache-control": "no-store"})

    @page(STUDIES)
    def studies(p: PageRequest) -> Response:
        status = p.arg("status")
        if status not in STATUSES:
            raise ValidationError("status must be 'receiving', 'received' or empty (any)")
        before_at, before_uid = p.arg("before"), p.arg("before_uid")
        before = (before_at, before_uid) if before_at else None
        rows = role.list_studies(p.ctx.identity, status, console.page_size, before=before)
        more = None
        if len(rows) == console.page_size:
            last = rows[-1].summary
            more = (last.last_received_at, last.study_uid)
        return p.render(
            "hospital_studies.html",
            rows=rows,
            wanted=status,
            statuses=STATUSES,
            more=more,
            args=dict(p.params),
        )

    def study_page(p: PageRequest, uid: str) -> Response:
        view = role.get_study(p.ctx.identity, uid)
        summary = view.summary
        listing = view.listing
        releases = Counter(
            (r.release.confirmation_id, r.release.status)
            for rs in view.releases.values()
            for r in rs
        )
        cases = {c.confirmation_id: c for c in listing.cases} if listing else {}
        return p.render(
            "hospital_study.html",
            uid=uid,
            s=summary,
            listing=listing,
            series=_series_rows(summary.report or {}, view.instances),
            duplicates=(summary.report or {}).get("duplicates", []),
            confirmations=view.confirmations,
            cases=cases,
            releases=releases,
            held=held_back(view.instances),
            may_confirm=p.allowed(CONFIRM),
            peers=[peer.id for peer in role.cfg.peers],
            confirm_text=confirm_text(uid),
        )

    @page(STUDIES)
    def study(p: PageRequest) -> Response:
        return study_page(p, p.request.path_params["uid"])

    @page(CONFIRM, form=True)
    def confirm(p: PageRequest) -> Response:
        uid = p.request.path_params["uid"]
        typed = p.form.get("typed", "").strip()
        if typed != confirm_text(uid):
            raise ValidationError(
                f"not confirmed: type the study UID's last {CONFIRM_CHARS} characters "
                f"({confirm_text(uid)}) to confirm sending study {uid}; nothing was sent"
            )
        case_id = p.form.get("case_id", "").strip()
        destination = p.form.get("destination", "").strip()
        allow = p.form.get("allow_burned_in", "") in ("1", "on", "yes", "true")
        result = role.confirm_study(p.ctx.identity, uid, case_id, destination, allow)
        c = result.confirmation
        counts = Counter(r.status for r in result.instances)
        return p.render(
            "hospital_confirmed.html",
            uid=uid,
            c=c,
            case=role.study_case(c),
            counts=sorted(counts.items()),
            released=counts.get("released", 0),
            held=[r for r in result.instances if r.status != "released"],
            transfers=len(result.transfer_ids),
        )

    return ConsolePages(
        routes=[
            route("/studies", studies),
            route("/studies/{uid}", study),
            route("/studies/{uid}/confirm", confirm, post=True),
            route("/studies/{uid}/previews", study_previews),
            route("/studies/{uid}/previews/{name}.png", preview_image),
        ],
        nav=[NavEntry("Studies", "/studies", STUDIES)],
        templates=TEMPLATES,
    )
