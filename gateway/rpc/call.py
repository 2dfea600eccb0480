"""The one client-side RPC call: deadline, metadata, and errors a person can act on.

Every call this code base makes on a peer's or a node's stub goes through
:func:`rpc_call` (unary and client-streaming calls) or :func:`rpc_stream` (a
server stream, iterated), or — for a call whose result is consumed in several
steps — sits inside :func:`rpc_errors`. Each turns a :class:`grpc.RpcError` into
the :mod:`gateway.errors` class that :func:`gateway.rpc.status.error_from_rpc`
(the one gRPC→error translation) names for its status code, with the peer and the
call in the message ("peer factory-1 at host:port answered UNAVAILABLE to Offer:
..."). A call site that knows better what a status means for it (``UNIMPLEMENTED``
from a node of the other role) passes ``translate``.

``tests/test_one_home.py`` fails on an ``except grpc.RpcError`` anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

from gateway.errors import YigongError
from gateway.rpc.status import error_from_rpc

R = TypeVar("R")

Translate = Callable[[grpc.StatusCode, str], YigongError | None]
"""A call site's own reading of a status (code, details): an error, or None for the usual."""

Metadata = Sequence[tuple[str, str | bytes]]


def call_name(method: object) -> str:
    """The RPC's name (e.g. ``"Offer"``) of a stub method, or ``""`` if it does not say."""
    path = getattr(method, "_method", None)  # grpc's multi-callables keep "/pkg.Svc/Name"
    if isinstance(path, bytes):
        path = path.decode("ascii", "replace")
    return path.rsplit("/", 1)[-1] if isinstance(path, str) else ""


def translate_rpc_error(
    exc: grpc.RpcError, target: str, call: str = "", translate: Translate | None = None
) -> YigongError:
    """The project error for a failed call ``call`` on ``target``."""
    if translate is not None:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
        mine = translate(code, details)
        if mine is not None:
            return mine
    return error_from_rpc(exc, target, call)


@contextmanager
def rpc_errors(target: str, call: str = "", translate: Translate | None = None) -> Iterator[None]:
    """Inside the block, a :class:`grpc.RpcError` becomes the project's error."""
    try:
        yield
    except grpc.RpcError as exc:
        raise translate_rpc_error(exc, target, call, translate) from exc


def rpc_call(
    method: Callable[..., R],
    request: Any,
    *,
    target: str,
    timeout: float | None,
    metadata: Metadata | None = None,
    call: str = "",
    translate: Translate | None = None,
    **options: Any,
) -> R:
    """``method(request, timeout=..., metadata=..., **options)``; errors translated.

    ``target`` names the peer ("node factory-1 at host:port"); ``timeout`` is the
    deadline in seconds (None: none, e.g. an upload of unknown length); ``options``
    go to grpc as they are (e.g. ``wait_for_ready=False``)."""
    with rpc_errors(target, call or call_name(method), translate):
        if metadata is not None:
            options["metadata"] = metadata
        return method(request, timeout=timeout, **options)


def rpc_stream(
    method: Callable[..., Any],
    request: Any,
    *,
    target: str,
    timeout: float | None = None,
    metadata: Metadata | None = None,
    call: str = "",
    translate: Translate | None = None,
    **options: Any,
) -> Iterator[Any]:
    """The responses of a server-streaming call, with errors translated while iterating."""
    name = call or call_name(method)
    with rpc_errors(target, name, translate):
        if metadata is not None:
            options["metadata"] = metadata
        yield from method(request, timeout=timeout, **options)
