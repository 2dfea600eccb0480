"""A console client for tests: HTTPS over real TLS with a person's certificate, one
keep-alive connection (so a test can show a refusal on a connection already open)."""

from __future__ import annotations

import http.client
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from gateway import pki


def enable_console(config: Path) -> None:
    """Turn on the console of a config written by tests.cluster.write_config (port 0)."""
    text = config.read_text()
    assert "[console]\nenabled = false" in text
    config.write_text(
        text.replace("[console]\nenabled = false", '[console]\nlisten = "127.0.0.1:0"')
    )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str

    @property
    def refusal(self) -> str:
        found = re.search(r'id="refusal"[^>]*>([^<]*)<', self.body)
        return found.group(1).replace("&#39;", "'").replace("&quot;", '"') if found else ""

    @property
    def csrf(self) -> str:
        found = re.search(r'name="csrf-token" content="([^"]+)"', self.body)
        assert found, "page has no CSRF token"
        return found.group(1)


class ConsoleClient:
    def __init__(self, port: int, ca: Path, person: pki.IssuedCert | None) -> None:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False
        if person is not None:
            ctx.load_cert_chain(str(person.cert_path), str(person.key_path))
        ctx.set_alpn_protocols(["http/1.1"])
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
        self.port = port

    def get(self, path: str) -> Answer:
        return self._send("GET", path, None, {})

    def post(
        self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None
    ) -> Answer:
        body = urlencode(fields)
        h = {"content-type": "application/x-www-form-urlencoded", **(headers or {})}
        return self._send("POST", path, body, h)

    def _send(self, method: str, path: str, body: str | None, headers: dict[str, str]) -> Answer:
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ConsoleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
