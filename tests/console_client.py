"""A console client for tests: HTTPS over real TLS with a person's certificate, one
keep-alive connection (so a test can show a refusal on a connection already open)."""

from __future__ import annotations

import http.client
import re
import sqlite3
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from gateway import pki
from tests.cluster import Federation, InProcessNode, write_config


def fetch(
    port: int,
    ca: Path,
    who: pki.IssuedCert,
    path: str,
    method: str = "GET",
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection (status, headers, body)."""
    with ConsoleClient(port, ca, who) as client:
        return client.request(method, path, body, headers)


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
        status, got, raw = self.request(method, path, body, headers)
        return Answer(status, got, raw.decode())

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on the connection: status, headers (lower-case names), body."""
        self.conn.request(method, path, body=body, headers=headers or {})
        r = self.conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ConsoleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def console_node(
    fed: Federation, workdir: Path, node_id: str, role: str
) -> Iterator[InProcessNode]:
    """A node of ``role`` with its console on (port 0), stopped on leaving."""
    cfg = write_config(fed, workdir, node_id, role)
    enable_console(cfg)
    node = InProcessNode(cfg)
    try:
        yield node
    finally:
        node.stop()


def tamper_audit_entry(audit_path: Path, seq: int, actor: str) -> None:
    """What an insider with file access does: drop the append-only triggers and change an
    entry's actor behind the node's back."""
    db = sqlite3.connect(audit_path)
    try:
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            db.execute(f"DROP TRIGGER {name}")
        db.execute("UPDATE events SET actor = ? WHERE seq = ?", (actor, seq))
        db.commit()
    finally:
        db.close()
