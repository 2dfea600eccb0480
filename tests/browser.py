"""Headless Chromium (Debian's, driven by Playwright for Python) for the console's browser
tests: one browser per test session, a context per person with Playwright's
client-certificate support; screenshots land in the test's folder (and, with
YIGONG_SCREENSHOTS=DIR, in DIR too — how docs/screenshots/ is made)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import pki

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",  # no connections out of a closed network
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-unsafe-swiftshader",  # WebGL (the 3D design view) in software
]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Person:
    """One person's browser context: their certificate, pages, screenshots, errors."""

    def __init__(
        self,
        browser: Any,
        port: int,
        who: pki.IssuedCert,
        shots: Path,
        pkcs12: tuple[Path, str] | None = None,
    ) -> None:
        """``pkcs12``: sign in with the person's .p12 and its password (what a person
        imports into their browser) instead of the PEM certificate and key."""
        self.base = f"https://127.0.0.1:{port}"
        cert: dict[str, str] = {"origin": self.base}
        if pkcs12 is not None:
            cert |= {"pfxPath": str(pkcs12[0]), "passphrase": pkcs12[1]}
        else:
            cert |= {"certPath": str(who.cert_path), "keyPath": str(who.key_path)}
        self.context = browser.new_context(
            ignore_https_errors=True,  # the node's certificate names no host; trust is mTLS
            viewport={"width": 1360, "height": 900},
            client_certificates=[cert],
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(m.text)
                if m.type == "error" and "favicon" not in (m.location or {}).get("url", "")
                else None
            ),
        )
        self.shots = shots

    def open(self, path: str) -> Any:
        return self.page.goto(self.base + path)

    def shot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        extra = os.environ.get("YIGONG_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)
        return path

    def close(self) -> None:
        self.context.close()
