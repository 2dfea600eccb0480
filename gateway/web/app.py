"""The console's Starlette application: admission, CSRF, security headers, templates.

Every page is declared with :meth:`Console.page` and the action it is (an entry of
:data:`gateway.authz.POLICY`, ``/console/...``). For each request the console finds the
client certificate of the connection (the TLS terminator's, :mod:`gateway.web.server`)
and asks the node's one gatekeeper (:meth:`gateway.gate.Gate.admit`): the certificate
is verified again on every request — an expired or revoked one is refused on the next
request even on an open keep-alive connection — and the action authorized by the one
table; refusals are audited. Requests that change state (any method but GET/HEAD) must
carry the page's CSRF token (form field ``_csrf`` or header ``X-CSRF-Token``: an HMAC of
the caller's certificate under a per-node-start key) and, where the browser says so,
come from the console's own origin. Every response carries a strict
Content-Security-Policy (scripts, styles, images, fonts only from the node itself; no
inline script or style; no framing). Page functions run in a worker thread and call the
same domain functions as the gRPC servicers. Every page's response says how long the
node took to answer it — admission, the page function and its template, refusals
included — in a ``Server-Timing: app;dur=<ms>`` header (browsers show it in their
developer tools; bench/console_bench.py reads it).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import __version__
from gateway.audit import AuditLog
from gateway.authz import NodeSelf, RequestContext, allowed
from gateway.errors import PermissionDenied, ValidationError, YigongError
from gateway.gate import Gate
from gateway.hashing import sha256_bytes
from gateway.rpc.terminator import Caller
from gateway.web.status import http_status_for

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
)
SAFE_METHODS = frozenset({"GET", "HEAD"})
MAX_FORM_FIELDS = 200


@dataclass(frozen=True)
class NavEntry:
    """A link in the console's navigation, shown to those allowed its action."""

    label: str
    path: str
    action: str


@dataclass(frozen=True)
class ConsolePages:
    """What one part of the node (the core, a role) adds to the console."""

    routes: Sequence[BaseRoute]
    nav: Sequence[NavEntry] = ()
    templates: Path | None = None
    """A folder of the part's own Jinja templates (they may extend ``base.html``)."""


@dataclass
class PageRequest:
    """One admitted request, as a page function sees it."""

    request: Request
    ctx: RequestContext
    console: Console
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadFile] = field(default_factory=dict)

    @property
    def params(self) -> Mapping[str, str]:
        return self.request.query_params

    def arg(self, name: str, default: str = "") -> str:
        """A query parameter, stripped (``default`` when absent)."""
        return (self.request.query_params.get(name) or default).strip()

    def int_arg(self, name: str, default: int = 0, *, minimum: int = 0) -> int:
        raw = self.arg(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ValidationError(f"query parameter {name!r} must be a whole number") from None
        if value < minimum:
            raise ValidationError(f"query parameter {name!r} must be at least {minimum}")
        return value

    @property
    def htmx(self) -> bool:
        return self.request.headers.get("hx-request") == "true"

    def render(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        return self.console.render(self, template, status, **values)

    def allowed(self, action: str, resource: str = "") -> bool:
        return allowed(self.ctx, action, resource=resource)


PageFunction = Callable[[PageRequest], Response]


class Console:
    """The console of one node: admission, CSRF, templates; builds the ASGI app."""

    def __init__(
        self,
        *,
        node: NodeSelf,
        gate: Gate,
        callers: Callable[[str], Caller | None],
        audit: AuditLog,
        page_size: int = 50,
    ) -> None:
        self.node = node
        self.gate = gate
        self.callers = callers
        self.audit = audit
        self.page_size = page_size
        self._csrf_key = secrets.token_bytes(32)  # new at each start: old pages re-load
        self._nav: list[NavEntry] = []
        self._template_dirs: list[Path] = [TEMPLATES]
        self._env: Environment | None = None

    # -- declaring pages ------------------------------------------------------------
    def page(
        self, action: str, *, form: bool = False, max_upload_bytes: int = 0
    ) -> Callable[[PageFunction], Callable[[Request], Awaitable[Response]]]:
        """Make ``fn`` an endpoint admitted for ``action``; ``form``: parse a posted form
        (with files up to ``max_upload_bytes`` each when that is > 0)."""

        def wrap(fn: PageFunction) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                return await self._handle(request, action, fn, form, max_upload_bytes)

            endpoint.__name__ = fn.__name__
            endpoint.__doc__ = fn.__doc__
            return endpoint

        return wrap

    def csrf_token(self, ctx: RequestContext) -> str:
        """The CSRF token of the caller's certificate (the same on every page)."""
        return hmac.new(self._csrf_key, sha256_bytes(ctx.cert_pem), "sha256").hexdigest()[:40]

    # -- handling one request -------------------------------------------------------
    async def _handle(
        self, request: Request, action: str, fn: PageFunction, form: bool, max_upload: int
    ) -> Response:
        started = time.perf_counter()
        response = await self._answer(request, action, fn, form, max_upload)
        response.headers["server-timing"] = server_timing(time.perf_counter() - started)
        return response

    async def _answer(
        self, request: Request, action: str, fn: PageFunction, form: bool, max_upload: int
    ) -> Response:
        peer = request.client.host if request.client else ""
        caller = self.callers(peer)
        pem, remote = (caller.cert_pem, caller.remote) if caller else (None, peer)
        try:
            ctx = await run_in_threadpool(self.gate.admit, pem, remote, action)
        except YigongError as exc:
            return self._error_page(request, None, exc)
        page = PageRequest(request, ctx, self)
        try:
            if request.method not in SAFE_METHODS:
                if form:
                    await self._read_form(page, max_upload)
                self._check_csrf(page)
            return await run_in_threadpool(fn, page)
        except YigongError as exc:
            if isinstance(exc, PermissionDenied):
                await run_in_threadpool(
                    self.gate.record_refusal, "authz.refused", ctx.identity, action, exc, remote
                )
            return self._error_page(request, page, exc)
        except Exception:
            log.exception("console: internal error in %s", action)
            return self._error_page(
                request,
                page,
                YigongError(f"internal error in {action}; see the node's log"),
            )
        finally:
            for upload in page.files.values():
                await upload.close()

    async def _read_form(self, page: PageRequest, max_upload: int) -> None:
        try:
            data = await page.request.form(
                max_files=4 if max_upload else 0,
                max_fields=MAX_FORM_FIELDS,
                max_part_size=max(max_upload, 1024 * 1024),
            )
        except Exception as exc:  # python-multipart's errors: a malformed request
            raise ValidationError(f"the form could not be read: {exc}") from exc
        for key, value in data.multi_items():
            if isinstance(value, UploadFile):
                if max_upload and (value.size or 0) > max_upload:
                    raise ValidationError(
                        f"file {value.filename!r} is {value.size} bytes; at most {max_upload} "
                        "bytes are accepted here"
                    )
                page.files[key] = value
            else:
                page.form[key] = str(value)

    def _check_csrf(self, page: PageRequest) -> None:
        headers = page.request.headers
        token = headers.get("x-csrf-token") or page.form.get("_csrf", "")
        expected = self.csrf_token(page.ctx)
        if not token or not hmac.compare_digest(token, expected):
            raise PermissionDenied(
                f"{page.request.method} {page.request.url.path} refused: the request carries no "
                "valid CSRF token; reload the page and submit the form again"
            )
        site = headers.get("sec-fetch-site")
        if site not in (None, "same-origin", "none"):
            raise PermissionDenied(
                f"{page.request.method} {page.request.url.path} refused: it came from another "
                f"site (Sec-Fetch-Site: {site})"
            )
        origin = headers.get("origin")
        host = headers.get("host", "")
        if origin and origin not in (f"https://{host}", "null"):
            raise PermissionDenied(
                f"{page.request.method} {page.request.url.path} refused: origin {origin!r} is "
                f"not this console's (https://{host})"
            )

    def _error_page(
        self, request: Request, page: PageRequest | None, exc: YigongError
    ) -> HTMLResponse:
        status = http_status_for(exc)
        if page is None:  # not admitted: no navigation, no identity shown
            html = self.env.get_template("refused.html").render(
                status=status, message=str(exc), node=self.node, version=__version__
            )
            return HTMLResponse(html, status_code=status, headers={"cache-control": "no-store"})
        template = "error_fragment.html" if page.htmx else "error.html"
        return self.render(page, template, status, message=str(exc), kind=type(exc).__name__)

    # -- rendering --------------------------------------------------------------------
    @property
    def env(self) -> Environment:
        if self._env is None:
            self._env = Environment(
                loader=ChoiceLoader([FileSystemLoader(str(d)) for d in self._template_dirs]),
                autoescape=select_autoescape(default=True, default_for_string=True),
                trim_blocks=True,
                lstrip_blocks=True,
            )
            self._env.globals["qs"] = _query_string
        return self._env

    def render(
        self, page: PageRequest, template: str, status: int = 200, **values: Any
    ) -> HTMLResponse:
        nav = [n for n in self._nav if allowed(page.ctx, n.action)]
        html = self.env.get_template(template).render(
            **values,
            me=page.ctx.identity,
            node=self.node,
            nav=nav,
            path=page.request.url.path,
            csrf=self.csrf_token(page.ctx),
            version=__version__,
        )
        return HTMLResponse(html, status_code=status, headers={"cache-control": "no-store"})

    # -- the application ----------------------------------------------------------------
    def app(self, parts: Iterable[ConsolePages]) -> ASGIApp:
        routes: list[BaseRoute] = []
        for part in parts:
            routes.extend(part.routes)
            self._nav.extend(part.nav)
            if part.templates is not None:
                self._template_dirs.append(part.templates)
        routes.append(Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"))
        app = Starlette(routes=routes)
        return SecurityHeaders(app)


class SecurityHeaders:
    """Adds the console's security headers (strict CSP, no framing, ...) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def server_timing(seconds: float) -> str:
    """The ``Server-Timing`` header value of a page answered in ``seconds``."""
    return f"app;dur={seconds * 1000:.2f}"


def _query_string(base: Mapping[str, str], **changes: object) -> str:
    """``?a=1&b=2`` of ``base`` with ``changes`` (None or "" drops a key)."""
    merged = {**base, **{k: "" if v is None else str(v) for k, v in changes.items()}}
    kept = {k: v for k, v in merged.items() if v != ""}
    return "?" + urlencode(kept) if kept else "?"


def route(
    path: str, endpoint: Callable[[Request], Awaitable[Response]], *, post: bool = False
) -> Route:
    """A console route (GET, or POST with ``post``)."""
    return Route(path, endpoint, methods=["POST"] if post else ["GET"])
