"""The one translation from :mod:`gateway.errors` to DIMSE C-STORE status codes.

Like :mod:`gateway.grpc_status` for gRPC: the SCP asks :func:`store_status` which
status an error is answered with; nothing else in the node picks a status code.

PS3.4 Annex B.2.3 (Storage Service Class) and PS3.7 Annex C give the meaning:

======  ======================================  =========================================
status  meaning                                 the PACS should
======  ======================================  =========================================
0x0000  Success: stored durably and catalogued  nothing (resending is harmless)
0xA700  Refused: out of resources — storage     retry later (storage full or failing)
0xA701  Refused: out of resources — catalog     retry later (catalog database failing)
0xA702  Refused: out of resources — audit log   retry later (audit log not writable)
0xA710  Refused: out of resources — stopping    retry later (node shutting down / not ready)
0xA7FF  Refused: out of resources — internal    retry later; the node operator checks the log
0xA900  Error: data set does not match SOP      not retry: fix the instance (UIDs, SOP Class,
        Class                                   pixel module) and resend
0xC000  Error: cannot understand                not retry: the data set cannot be parsed
0x0124  Refused: not authorized                 not retry (never sent today: refusals of
                                                peers happen at association)
======  ======================================  =========================================

Every failure carries an Error Comment (0000,0902): for refused data sets the cause
(UIDs, tags, byte offsets — never a value); for the node's own failures a fixed text
(paths and internals stay in the node's log).
"""

from __future__ import annotations

from typing import Final

from pydicom.dataset import Dataset

from gateway import errors as e
from hospital_node.ingest import DatasetMismatch, UnreadableInstance

SUCCESS: Final = 0x0000
OUT_OF_RESOURCES: Final = 0xA700
CATALOG_FAILED: Final = 0xA701
AUDIT_FAILED: Final = 0xA702
NOT_NOW: Final = 0xA710
INTERNAL: Final = 0xA7FF
DATASET_MISMATCH: Final = 0xA900
CANNOT_UNDERSTAND: Final = 0xC000
NOT_AUTHORIZED: Final = 0x0124

_STATUSES: tuple[tuple[type[BaseException], int, str], ...] = (
    # (error, status, Error Comment; "" = the error's own message, which names UIDs/tags)
    (DatasetMismatch, DATASET_MISMATCH, ""),
    (UnreadableInstance, CANNOT_UNDERSTAND, ""),
    (e.ValidationError, CANNOT_UNDERSTAND, ""),
    (e.StorageError, OUT_OF_RESOURCES, "storage failed; send again later"),
    (e.CatalogError, CATALOG_FAILED, "catalog failed; send again later"),
    (e.AuditError, AUDIT_FAILED, "audit log failed; send again later"),
    (e.ShuttingDown, NOT_NOW, "node stopping; send again later"),
    (e.NotReady, NOT_NOW, "node not ready; send again later"),
    (e.AuthError, NOT_AUTHORIZED, "not authorized"),
)
_INTERNAL_COMMENT = "internal error; send again later"

RETRYABLE: Final = frozenset({OUT_OF_RESOURCES, CATALOG_FAILED, AUDIT_FAILED, NOT_NOW, INTERNAL})
"""Statuses after which a PACS should send the instance again later."""

ERROR_COMMENT_CHARS: Final = 64
"""Error Comment is LO: at most 64 characters."""


def store_status(exc: BaseException) -> int:
    """The C-STORE status that ``exc`` (raised while taking an instance) is answered with."""
    return _lookup(exc)[0]


def _lookup(exc: BaseException) -> tuple[int, str]:
    for cls, status, comment in _STATUSES:
        if isinstance(exc, cls):
            return status, comment or str(exc)
    return INTERNAL, _INTERNAL_COMMENT


def reason(exc: BaseException) -> str:
    """What may be said about ``exc`` in logs and to the peer: our own errors' messages
    (UIDs only, by construction); for anything else only its type (its text may quote
    a value from the data set)."""
    if isinstance(exc, e.YigongError):
        return str(exc)
    return f"internal error ({type(exc).__name__})"


def error_comment(text: str) -> str:
    """``text`` fitted into an Error Comment (ASCII, no backslash, at most 64 chars)."""
    if text.startswith("instance ") and ": " in text:  # the PACS knows which instance
        text = text.split(": ", 1)[1]
    clean = "".join(ch if " " <= ch <= "~" and ch != "\\" else "?" for ch in text)
    return clean if len(clean) <= ERROR_COMMENT_CHARS else clean[: ERROR_COMMENT_CHARS - 3] + "..."


def store_response(exc: BaseException) -> Dataset:
    """The status data set of a failed C-STORE: Status and Error Comment."""
    status, comment = _lookup(exc)
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = error_comment(comment)
    return rsp
