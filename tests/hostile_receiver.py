"""A hostile receiver: the real factory's Transfer service behind a second gRPC server
that alters what it answers.

The factory is a real in-process node (``server.tls_terminator = "grpc"``, so its
Gatekeeper reads the caller from gRPC's own TLS context). The hostile server is a real
``grpc.server`` in the same process with the factory's certificate and key from the
test federation's PKI, mTLS required, the factory's own authentication interceptor in
front, and the real :class:`gateway.rpc.servicers.TransferServicer` (the factory's
receiver, store, catalog) doing the work. A ``tamper`` function sees every reply of the
RPCs it names and returns what is sent instead — e.g. a receipt re-signed with the
factory's real key after an entry was dropped, added or altered. The hospital's peer
address points at the hostile server: to the hospital it *is* ``factory-1`` (same
certificate, same key), so only the content of what it answers can give it away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from gateway.rpc.auth import AuthInterceptor
from gateway.rpc.servicers import TransferServicer
from tests.cluster import Federation, InProcessNode, write_config
from yigong.v1 import common_pb2, transfer_pb2, transfer_pb2_grpc

Tamper = Callable[[str, Any], Any]
"""``tamper(method, reply) -> reply``: what the hostile receiver answers instead (for a
streaming RPC: called for each message of the reply stream)."""


def hostile_factory_config(federation: Federation, workdir: Path, extra: str = "") -> Path:
    """A factory config whose gRPC server does its own TLS (see the module docstring)."""
    path = write_config(federation, workdir, "factory-1", "factory", extra=extra)
    text = path.read_text()
    assert "[server]\n" in text
    path.write_text(text.replace("[server]\n", '[server]\ntls_terminator = "grpc"\n', 1))
    return path


class _Wrapped(transfer_pb2_grpc.TransferServicer):
    """Every Transfer RPC goes to the real servicer; replies of tampered methods are
    passed through ``tamper`` first. Counts calls per method."""

    def __init__(self, real: TransferServicer, tamper: Tamper, methods: set[str]) -> None:
        self._real, self._tamper, self._methods = real, tamper, methods
        self.calls: dict[str, int] = {}

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name == "calls" or not name[:1].isupper():
            return object.__getattribute__(self, name)
        real = getattr(self._real, name)
        if not callable(real):
            return real

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            reply = real(request, context)
            if name not in self._methods:
                return reply
            if isinstance(reply, Message):
                return self._tamper(name, reply)
            return (self._tamper(name, item) for item in reply)  # a reply stream

        return call


class HostileReceiver:
    """The hostile server around ``factory``'s real Transfer servicer."""

    def __init__(self, factory: InProcessNode, tamper: Tamper, methods: set[str]) -> None:
        node = factory.node
        assert node.gate.callers is None, "start the factory with hostile_factory_config()"
        self.node = node
        self.servicer = _Wrapped(TransferServicer(node.gate, node.receiver), tamper, methods)
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=16, thread_name_prefix="hostile"),
            interceptors=[AuthInterceptor(node.gate)],
            options=[
                ("grpc.max_receive_message_length", node.cfg.server.max_message_bytes),
                ("grpc.max_send_message_length", node.cfg.server.max_message_bytes),
            ],
        )
        transfer_pb2_grpc.add_TransferServicer_to_server(self.servicer, self.server)
        creds = grpc.ssl_server_credentials(
            [(node.key_pem, node.cert_pem)], root_certificates=node.ca_pem,
            require_client_auth=True,
        )  # fmt: skip
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=1.0).wait(5)


@contextmanager
def hostile_receiver(
    factory: InProcessNode, tamper: Tamper, methods: set[str]
) -> Iterator[HostileReceiver]:
    h = HostileReceiver(factory, tamper, methods)
    try:
        yield h
    finally:
        h.stop()


def resign(node: Any, body_bytes: bytes, *, bad_signature: bool = False) -> bytes:
    """A SignedReceipt over ``body_bytes`` with ``node``'s real key and certificate (or,
    with ``bad_signature``, a signature that does not verify)."""
    return common_pb2.SignedReceipt(
        body=body_bytes,
        signature=_signature(node, body_bytes, bad_signature),
        signer_certificate=node.cert_pem,
    ).SerializeToString(deterministic=True)


def resign_manifest(
    node: Any, body: transfer_pb2.BatchManifest, *, bad_signature: bool = False
) -> transfer_pb2.SignedManifest:
    """A SignedManifest over ``body`` with ``node``'s real key and certificate."""
    body_bytes = body.SerializeToString(deterministic=True)
    return transfer_pb2.SignedManifest(
        body=body_bytes,
        signature=_signature(node, body_bytes, bad_signature),
        signer_certificate=node.cert_pem,
    )


def _signature(node: Any, body_bytes: bytes, bad: bool) -> bytes:
    if bad:
        return bytes(node.sign(body_bytes + b"\x00"))  # a real signature, of other bytes
    return bytes(node.sign(body_bytes))
