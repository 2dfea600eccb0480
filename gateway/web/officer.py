"""The core's console pages: home, transfers, and the officer's audit pages.

Each page calls the same domain functions as the gRPC servicers and the CLI (the query
service, the audit log, reconciliation) with the request's verified context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import Response

from gateway.audit import (
    AUTH_REFUSED,
    AUTHZ_REFUSED,
    EVENT_TYPES,
    RESIDENCY_REFUSED,
    SECURITY_ALERT,
    TRANSFER_INTEGRITY_FAILED,
    TRANSFER_REFUSED,
    AuditEvent,
    AuditLog,
    VerifyReport,
    parse_when,
)
from gateway.config import NodeConfig
from gateway.errors import ValidationError
from gateway.query import QueryService, TransferFilter
from gateway.reconcile import Finding
from gateway.web.app import Console, ConsolePages, NavEntry, PageRequest, route

HOME = "/console/home"
TRANSFERS = "/console/transfers"
AUDIT = "/console/audit"
AUDIT_VERIFY = "/console/audit.verify"
RECONCILE = "/console/reconcile"

ALERT_EVENTS = frozenset(
    {
        AUTH_REFUSED,
        AUTHZ_REFUSED,
        RESIDENCY_REFUSED,
        SECURITY_ALERT,
        TRANSFER_INTEGRITY_FAILED,
        TRANSFER_REFUSED,
    }
)
"""Audit events shown highlighted: refusals, residency refusals, security alerts."""

TRANSFER_STATUSES = ("", "queued", "sending", "receiving", "done", "failed", "abandoned")


@dataclass(frozen=True)
class OfficerServices:
    """What the core pages use."""

    config: Callable[[], NodeConfig]
    query: QueryService
    audit: AuditLog
    verify: Callable[[], VerifyReport]
    reconcile: Callable[[NodeConfig, list[str]], tuple[dict[str, list[Finding]], dict[str, str]]]


def core_pages(console: Console, s: OfficerServices) -> ConsolePages:
    page = console.page

    @page(HOME)
    def home(p: PageRequest) -> Response:
        return p.render("home.html")

    def transfer_rows(p: PageRequest) -> tuple[list, str, TransferFilter]:
        status, direction = p.arg("status"), p.arg("direction")
        if status not in TRANSFER_STATUSES:
            raise ValidationError(f"status must be one of {', '.join(TRANSFER_STATUSES[1:])}")
        f = TransferFilter(
            case_id=p.arg("case"),
            peer=p.arg("peer"),
            status=status,
            direction=direction,
            until=p.arg("until"),
            limit=console.page_size,
        )
        rows = s.query.list_transfers(p.ctx.identity, f, remote=p.ctx.remote)
        more = min(r.created_at for r in rows) if len(rows) == console.page_size else ""
        return rows, more, f

    @page(TRANSFERS)
    def transfers(p: PageRequest) -> Response:
        rows, more, f = transfer_rows(p)
        template = "transfer_rows.html" if p.htmx else "transfers.html"
        return p.render(
            template, rows=rows, more=more, f=f, statuses=TRANSFER_STATUSES, args=dict(p.params)
        )

    def audit_filters(p: PageRequest) -> dict[str, object]:
        event = p.arg("event")
        if event and event not in EVENT_TYPES:
            raise ValidationError(f"unknown audit event {event!r}; pick one from the list")
        return {
            "event": event or None,
            "actor": p.arg("actor") or None,
            "case_id": p.arg("case") or None,
            "since": parse_when(p.arg("since"), "since"),
            "until": parse_when(p.arg("until"), "until"),
        }

    @page(AUDIT)
    def audit(p: PageRequest) -> Response:
        filters = audit_filters(p)
        before = p.int_arg("before", 0, minimum=0)
        rows: list[AuditEvent] = s.audit.events(
            **filters,  # type: ignore[arg-type]
            before_seq=before or None,
            limit=console.page_size,
            newest=True,
        )
        rows.reverse()  # newest first on the page
        older = rows[-1].seq if len(rows) == console.page_size else 0
        newest = rows[0].seq if rows else (before - 1 if before else 0)
        return p.render(
            "audit.html",
            rows=rows,
            older=older,
            newest=newest,
            live=not before,
            args=dict(p.params),
            events=sorted(EVENT_TYPES),
            alerts=ALERT_EVENTS,
        )

    @page(AUDIT)
    def audit_tail(p: PageRequest) -> Response:
        """New entries after ``after`` (the live tail polls this)."""
        after = p.int_arg("after", 0, minimum=0)
        rows = s.audit.events(
            **audit_filters(p),  # type: ignore[arg-type]
            after_seq=after,
            limit=console.page_size,
        )
        rows.reverse()
        newest = rows[0].seq if rows else after
        return p.render("audit_tail.html", rows=rows, newest=newest, alerts=ALERT_EVENTS,
                        args=dict(p.params))  # fmt: skip

    @page(AUDIT_VERIFY, form=True)
    def audit_verify(p: PageRequest) -> Response:
        report = s.verify()
        return p.render("verify_result.html", report=report)

    @page(RECONCILE)
    def reconcile_page(p: PageRequest) -> Response:
        peers = [peer.id for peer in s.config().peers]
        return p.render("reconcile.html", peers=peers, results=None)

    @page(RECONCILE, form=True)
    def reconcile_run(p: PageRequest) -> Response:
        cfg = s.config()
        peers = [peer.id for peer in cfg.peers]
        wanted = p.form.get("peer", "")
        if wanted:
            if wanted not in peers:
                raise ValidationError(f"{wanted!r} is not a peer of node {cfg.node.id}")
            peers = [wanted]
        results, logs = s.reconcile(cfg, peers)
        return p.render("reconcile.html", peers=[x.id for x in cfg.peers], results=results,
                        logs=logs)  # fmt: skip

    return ConsolePages(
        routes=[
            route("/", home),
            route("/transfers", transfers),
            route("/audit", audit),
            route("/audit/tail", audit_tail),
            route("/audit/verify", audit_verify, post=True),
            route("/reconcile", reconcile_page),
            route("/reconcile", reconcile_run, post=True),
        ],
        nav=[
            NavEntry("Transfers", "/transfers", TRANSFERS),
            NavEntry("Audit log", "/audit", AUDIT),
            NavEntry("Reconcile", "/reconcile", RECONCILE),
        ],
    )
