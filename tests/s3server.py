"""A real S3-compatible server for the tests (moto in server mode, own process).

Fixtures:

* ``s3_server`` (session): starts moto's S3 server on 127.0.0.1 with an
  OS-assigned port in a child process and yields :class:`S3Server`.
* ``s3_store`` (function): a checked :class:`~gateway.storage.S3Store` on a fresh
  bucket (``create=True``, ``part_size`` 5 MiB so multipart is exercised, short
  timeouts); the bucket is emptied and removed afterwards.

The server runs in a separate process so that its state is not shared with any
in-process ``moto.mock_aws`` used elsewhere. The child binds port 0 and prints
the port it got; it exits when its stdin closes (so it also dies with pytest).

Use from any test module via ``pytest_plugins = ["tests.s3server"]`` in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio

from gateway.storage import S3Store

_CHILD = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""

TEST_PART_SIZE = 5 * 1024 * 1024
"""Smallest part size S3 allows; the test store uses it so multipart uploads are cheap."""


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and how to log in."""

    endpoint: str
    access_key: str = "testing"
    secret_key: str = "testing"
    secure: bool = False
    region: str = "us-east-1"

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def client(self) -> Minio:
        """A plain minio client, for test set-up and inspection."""
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=self.secure,
            region=self.region,
        )

    def store(
        self,
        bucket: str,
        *,
        create: bool = False,
        part_size: int = TEST_PART_SIZE,
        timeout: float = 10.0,
        retries: int = 1,
    ) -> S3Store:
        """An :class:`S3Store` on ``bucket`` with test-friendly defaults."""
        return S3Store(
            self.endpoint,
            bucket,
            self.access_key,
            self.secret_key,
            secure=self.secure,
            region=self.region,
            part_size=part_size,
            create=create,
            timeout=timeout,
            retries=retries,
        )


def new_bucket_name() -> str:
    """A fresh, valid bucket name."""
    return f"yg-test-{uuid.uuid4().hex[:16]}"


def _start(log_path: Path, timeout_s: float = 30.0) -> tuple[subprocess.Popen[str], int]:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.isdigit():
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(
            f"moto S3 server did not report its port within {timeout_s:.0f} s "
            f"(exit {proc.returncode}); its log:\n{log_path.read_text()[-4000:]}"
        )
    return proc, int(line)


def _stop(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def _wait_ready(server: S3Server, deadline_s: float = 15.0) -> None:
    client = server.client()
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    log_path = tmp_path_factory.mktemp("s3server") / "moto.log"
    proc, port = _start(log_path)
    try:
        server = S3Server(endpoint=f"127.0.0.1:{port}")
        _wait_ready(server)
        yield server
    finally:
        _stop(proc)


def remove_bucket(server: S3Server, bucket: str) -> None:
    client = server.client()
    with contextlib.suppress(Exception):
        for obj in client.list_objects(bucket, recursive=True):
            if obj.object_name is not None:
                client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)


@pytest.fixture
def s3_store(s3_server: S3Server) -> Iterator[S3Store]:
    bucket = new_bucket_name()
    store = s3_server.store(bucket, create=True)
    store.check()
    try:
        yield store
    finally:
        remove_bucket(s3_server, bucket)
