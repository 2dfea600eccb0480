"""mesh-viewer.js for real: headless Chromium loads the vendored three.js and the viewer from
a server that sends the web console's strict Content-Security-Policy, draws a mesh made by
mesh_view_json, and reports no console error, page error or CSP violation.

Skipped unless ``/usr/bin/chromium`` and the ``playwright`` package are present (Playwright
cannot download its own browser here).

WebGL in headless Chromium 156 (no GPU): WebGL runs on SwiftShader behind ANGLE (the
renderer reports "ANGLE (Google, Vulkan 1.3.0 (SwiftShader Device (Subzero)), SwiftShader
driver)"). Since Chromium 137 that software fallback for WebGL needs
``--enable-unsafe-swiftshader`` (without it: "Error creating WebGL context"). Playwright
1.65 already adds that switch to every Chromium it launches; it is passed here anyway, with
``--use-angle=swiftshader``, so that the test does not depend on Playwright's defaults.
``--disable-gpu`` does not stop it (measured: the same renderer with and without it, and
``--use-gl=swiftshader`` is obsolete). SwiftShader logs "GL Driver Message (OpenGL,
Performance, ...): GPU stall due to ReadPixels" as a console warning whenever the
compositor reads the canvas back; that line is the software GL's, not the viewer's, and is
the one console message tolerated.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trimesh

import gateway.web
from gateway.fidelity.mesh_view import mesh_view_json
from tests.cluster import wait_for

CHROMIUM = Path("/usr/bin/chromium")
playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # WebGL without a GPU (see the module docstring)
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
STATIC = Path(gateway.web.__file__).parent / "static"
TIMES = "\N{MULTIPLICATION SIGN}"  # between the dimensions of the viewer's summary

# A test-only classic script (served from 'self', so CSP allows it) that records CSP
# violations the page would otherwise only log.
PROBE_JS = """
window.cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mesh viewer</title>
<meta name="htmx-config"
  content='{{"includeIndicatorStyles": false, "allowEval": false, "allowScriptTags": false}}'>
<link rel="stylesheet" href="/static/mesh-viewer.css">
<script src="/probe.js"></script>
<script src="/static/vendor/htmx.min.js"></script>
<script type="module" src="/static/mesh-viewer.js"></script>
</head>
<body>
{body}
</body>
</html>
"""


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".json": "application/json",
        ".css": "text/css",
    }

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An http://127.0.0.1 server of a temp dir holding the package's static folder."""
    root = tmp_path / "site"
    shutil.copytree(STATIC, root / "static")
    (root / "probe.js").write_text(PROBE_JS)
    (root / "favicon.ico").write_bytes(b"")  # the browser asks for it; a 404 logs an error
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# the browser: the session fixture of tests/browser.py (one Chromium for every browser test)


def open_page(browser, url: str):  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 800, "height": 700})
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.goto(url)
    return page, messages


def unexpected(messages: list[str]) -> list[str]:
    """Console warnings and errors, but SwiftShader's ReadPixels notice (module docstring)."""
    return [
        m
        for m in messages
        if not m.startswith(("log:", "debug:", "info:"))
        and not ("GL Driver Message" in m and "GPU stall due to ReadPixels" in m)
    ]


def drawn_pixels(page, element) -> dict:  # type: ignore[no-untyped-def]
    """Decode a screenshot of ``element`` in the page (no image library needed here) and
    count the pixels that are not the viewer's background and the distinct colours."""
    png = base64.b64encode(element.screenshot()).decode()
    return page.evaluate(
        """async (png) => {
            const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
            const bitmap = await createImageBitmap(new Blob([bytes], { type: 'image/png' }));
            const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
            const ctx = canvas.getContext('2d');
            ctx.drawImage(bitmap, 0, 0);
            const data = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
            const colours = new Set();
            let other = 0;
            for (let i = 0; i < data.length; i += 4) {
                const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
                colours.add((r << 16) | (g << 8) | b);
                if (Math.abs(r - 0xf4) + Math.abs(g - 0xf5) + Math.abs(b - 0xf7) > 30) other += 1;
            }
            return { total: data.length / 4, other, colours: colours.size };
        }""",
        png,
    )


def test_viewer_draws_a_mesh_under_the_strict_csp(browser, site, tmp_path: Path) -> None:
    base, root = site
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=12.5)
    mesh.apply_translation((0.0, 0.0, 12.5))
    view = mesh_view_json(mesh.export(file_type="stl"), "stl")
    (root / "sphere.json").write_text(json.dumps(view))
    decimated = mesh_view_json(mesh.export(file_type="stl"), "stl", max_triangles=300)
    (root / "small.json").write_text(json.dumps(decimated))
    (root / "index.html").write_text(
        PAGE.format(
            body='<div class="mesh-viewer" id="one" data-mesh-url="/sphere.json"></div>\n'
            '<div class="mesh-viewer" id="two" data-mesh-url="small.json" data-aspect="0.5">'
            "</div>"
        )
    )
    page, messages = open_page(browser, f"{base}/index.html")
    try:
        page.wait_for_selector("#one[data-mesh-viewer-state=ready] canvas", timeout=30_000)
        page.wait_for_selector("#two[data-mesh-viewer-state=ready] canvas", timeout=30_000)
        one = page.locator("#one")
        box = one.locator("canvas").bounding_box()
        assert (
            box is not None
            and box["width"] > 700
            and box["height"] == pytest.approx(box["width"] * 0.75, abs=1)
        )
        info = one.locator(".mesh-viewer-info").inner_text()
        assert "1,280 triangles" in info and f"25.00 {TIMES} 25.00 {TIMES} 25.00 mm" in info
        assert (
            "simplified for display from 1,280 triangles"
            in page.locator("#two .mesh-viewer-info").inner_text()
        )
        assert page.evaluate("window.cspViolations") == []
        assert not unexpected(messages), messages

        page.wait_for_timeout(200)
        shaded = drawn_pixels(page, one.locator("canvas"))
        assert shaded["other"] > shaded["total"] * 0.05, shaded  # the part is drawn
        assert shaded["colours"] > 50, shaded  # lit and shaded, not a flat silhouette
        page.screenshot(path=str(tmp_path / "mesh-viewer.png"))

        wire = one.locator("button.mesh-viewer-wireframe")
        wire.click()
        assert wire.get_attribute("aria-pressed") == "true"
        page.wait_for_timeout(200)
        wired = drawn_pixels(page, one.locator("canvas"))
        assert wired["other"] < shaded["other"], (wired, shaded)  # lines only, less filled
        page.screenshot(path=str(tmp_path / "mesh-viewer-wireframe.png"))
        one.locator("button.mesh-viewer-reset").click()

        assert page.evaluate("window.cspViolations") == []
        assert not unexpected(messages), messages
    finally:
        page.close()


def test_viewer_reports_errors_into_the_element(browser, site) -> None:
    base, root = site
    (root / "bad.json").write_text(json.dumps({"positions": [0, 0, 0], "indices": [0, 1, 2]}))
    (root / "notjson.json").write_text("<html>login</html>")
    (root / "index.html").write_text(
        PAGE.format(
            body='<div class="mesh-viewer" id="missing" data-mesh-url="/nothing.json"></div>'
            '<div class="mesh-viewer" id="bad" data-mesh-url="/bad.json"></div>'
            '<div class="mesh-viewer" id="notjson" data-mesh-url="/notjson.json"></div>'
            '<div class="mesh-viewer" id="foreign" data-mesh-url="https://example.org/m.json">'
            "</div>"
        )
    )
    page, messages = open_page(browser, f"{base}/index.html")
    try:
        for element in ("missing", "bad", "notjson", "foreign"):
            page.wait_for_selector(f"#{element}[data-mesh-viewer-state=error]", timeout=30_000)
        text = {
            e: page.locator(f"#{e} .mesh-viewer-error").inner_text()
            for e in ("missing", "bad", "notjson", "foreign")
        }
        assert "the server answered 404" in text["missing"]
        assert "triangle 0 refers to vertex 1, but there are 1" in text["bad"]
        assert "did not answer JSON" in text["notjson"]
        assert "not on this site" in text["foreign"]
        assert page.locator("canvas").count() == 0
        assert page.evaluate("window.cspViolations") == []
        # the only console error is the browser's own line about the 404
        errors = unexpected(messages)
        assert len(errors) == 1 and "404" in errors[0], messages
    finally:
        page.close()


def test_viewer_starts_in_content_swapped_in_by_htmx(browser, site) -> None:
    base, root = site
    box = trimesh.creation.box((10.0, 20.0, 30.0))
    (root / "box.json").write_text(json.dumps(mesh_view_json(box.export(file_type="stl"), "stl")))
    (root / "fragment.html").write_text(
        '<div class="mesh-viewer" id="swapped" data-mesh-url="/box.json"></div>'
    )
    (root / "index.html").write_text(
        PAGE.format(
            body='<button id="load" hx-get="/fragment.html" hx-target="#slot">review</button>'
            '<div id="slot"></div>'
        )
    )
    page, messages = open_page(browser, f"{base}/index.html")
    try:
        # polled from here: wait_for_function's polling evaluates a string in the page,
        # which this CSP (no 'unsafe-eval') refuses
        wait_for(lambda: page.evaluate("window.htmx !== undefined"), 15, what="htmx loaded")
        page.locator("#load").click()
        page.wait_for_selector("#swapped[data-mesh-viewer-state=ready] canvas", timeout=30_000)
        info = page.locator("#swapped .mesh-viewer-info").inner_text()
        assert "12 triangles" in info and f"10.00 {TIMES} 20.00 {TIMES} 30.00 mm" in info
        page.evaluate("document.querySelector('#swapped').id = 'old'")
        page.locator("#load").click()  # swapped again: the old viewer is cleaned up
        page.wait_for_selector("#old", state="detached", timeout=30_000)
        page.wait_for_selector("#swapped[data-mesh-viewer-state=ready] canvas", timeout=30_000)
        assert page.locator("canvas").count() == 1
        assert page.evaluate("window.cspViolations") == []
        assert not unexpected(messages), messages
    finally:
        page.close()
