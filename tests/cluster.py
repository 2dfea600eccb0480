"""Test harness: a throwaway federation, node configs, nodes in-process or as
``yigong serve`` subprocesses. Everything binds port 0 and reports its port;
everything started here is stopped by the fixtures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway import pki
from gateway.config import load_config, render_config
from gateway.roles import RoleRegistry
from gateway.rpc.channel import ClientCredentials
from gateway.rpc.client import NodeClient
from yigong_node.compose import build_node


@dataclass
class Federation:
    root: Path
    ca_dir: Path = field(init=False)
    _issued: dict[str, pki.IssuedCert] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ca_dir = self.root / "ca"
        pki.create_ca(self.ca_dir, "testfed")

    @property
    def ca(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    def node(self, node_id: str, role: str, region: str = "cn-east") -> pki.IssuedCert:
        if node_id not in self._issued:
            self._issued[node_id] = pki.issue_node_cert(
                self.ca_dir, node_id, role, region, self.root / "certs" / node_id
            )
        return self._issued[node_id]

    def person(self, person_id: str, role: str, org: str, **kw: object) -> pki.IssuedCert:
        key = f"person:{person_id}:{role}@{org}"  # the same id in two nodes: two people
        if key not in self._issued or kw:
            out = self.root / "certs" / f"{person_id}-{len(self._issued)}"
            self._issued[key] = pki.issue_person_cert(
                self.ca_dir,
                person_id,
                role,
                org,
                out,
                **kw,  # type: ignore[arg-type]
            )
        return self._issued[key]

    def creds(self, issued: pki.IssuedCert) -> ClientCredentials:
        return ClientCredentials.from_files(self.ca, issued.cert_path, issued.key_path)


def write_config(
    fed: Federation,
    workdir: Path,
    node_id: str,
    role: str,
    *,
    region: str = "cn-east",
    peers: dict[str, str] | None = None,
    listen: str = "127.0.0.1:0",
    extra: str = "",
    dicom: dict[str, object] | None = None,
) -> Path:
    issued = fed.node(node_id, role, region)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{node_id}.toml"
    path.write_text(
        render_config(
            node_id=node_id,
            role=role,
            region=region,
            data_dir=workdir / f"{node_id}-data",
            ca=fed.ca,
            cert=issued.cert_path,
            key=issued.key_path,
            crl=fed.crl,
            listen=listen,
            dicom={"listen": "127.0.0.1:0", **(dicom or {})} if role == "hospital" else None,
            peers=sorted((peers or {}).items()),
            extra=extra or "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0",
        )
        + pg_database_section(extra)
    )
    return path


#: opt-in sweep of the whole-node tests on PostgreSQL: the server's base URL, e.g.
#: ``postgresql://postgres@127.0.0.1:5432`` (each written config gets a fresh database)
PG_URL_BASE_ENV = "YIGONG_TEST_PG_URL_BASE"


def pg_database_section(extra: str = "") -> str:
    """``[database] url`` of a fresh PostgreSQL database when ``YIGONG_TEST_PG_URL_BASE``
    is set (and the test's own ``extra`` has no ``[database]``); else nothing (SQLite)."""
    base = os.environ.get(PG_URL_BASE_ENV, "").rstrip("/")
    if not base or "[database]" in extra:
        return ""
    import uuid

    import psycopg

    name = f"node_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f'\n[database]\nurl = "{base}/{name}"\n'


def pin_port(config: Path, port: int) -> None:
    """Make a node listen on ``port`` from now on (to restart it on the same address)."""
    text = config.read_text()
    assert 'listen = "127.0.0.1:0"' in text
    config.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))


class InProcessNode:
    def __init__(self, config: Path, roles: RoleRegistry | None = None) -> None:
        self.config = config
        self.node = build_node(load_config(config), roles)
        self.port = self.node.start()
        self.address = f"127.0.0.1:{self.port}"

    def client(self, creds: ClientCredentials) -> NodeClient:
        return NodeClient(self.address, creds, node_id=self.node.cfg.node.id)

    def self_client(self) -> NodeClient:
        return self.client(self.node.client_credentials)

    def settle(self) -> None:
        """Wait until what the node acknowledged (e.g. DICOM instances) is catalogued."""
        self.node.hooks.settle()

    def stop(self) -> None:
        self.node.stop(grace=1.0)


class NodeProcess:
    """``yigong serve`` in a child process."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> int:
        ready = self.config.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "yigong_node",
                "-v",
                "serve",
                str(self.config),
                "--ready-file",
                str(ready),
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                self.port = int(json.loads(ready.read_text())["port"])
                return self.port
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"node {self.config} did not start:\n{self.log_path.read_text()[-4000:]}"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode if self.proc else None


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = ""):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


@contextmanager
def broken(directory: Path) -> Iterator[None]:
    """``directory`` replaced by a file for the duration: every write into it fails for
    real (root ignores permissions, so a mode change would not do)."""
    moved = directory.with_name(directory.name + ".moved")
    directory.rename(moved)
    directory.write_bytes(b"a file where a directory should be")
    try:
        yield
    finally:
        directory.unlink()
        moved.rename(directory)
