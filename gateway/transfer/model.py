"""Domain types of a transfer, independent of the wire encoding."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from gateway.errors import ValidationError, YigongError
from gateway.hashing import ChunkErrors

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TRANSFER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{7,63}$")
_NAME_BAD = re.compile(r"[/\\\x00-\x1f]")


@dataclass(frozen=True)
class Announce:
    """What a sender says about an object before sending it."""

    object_id: str
    size: int
    name: str
    media_type: str
    case_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def validate(self, max_object_bytes: int) -> None:
        check_object_id(self.object_id)
        if self.size < 0 or self.size > max_object_bytes:
            raise ValidationError(
                f"object {self.object_id}: size {self.size} is outside 0..{max_object_bytes} "
                "bytes allowed by this node (transfer.max_object_bytes)"
            )
        check_name(self.name)
        if len(self.media_type) > 200 or len(self.case_id) > 200:
            raise ValidationError(f"object {self.object_id}: media type or case id too long")


def check_object_id(object_id: str) -> str:
    if not _HEX64.match(object_id):
        raise ValidationError(
            f"object id {object_id[:80]!r} is not a lowercase hex SHA-256 (64 characters)"
        )
    return object_id


def check_transfer_id(transfer_id: str) -> str:
    if not _TRANSFER_ID.match(transfer_id):
        raise ValidationError(
            f"transfer id {transfer_id[:80]!r} must be 8-64 characters of "
            "letters, digits, '-' or '_'"
        )
    return transfer_id


def check_name(name: str) -> str:
    if not name or len(name) > 255 or _NAME_BAD.search(name) or name in {".", ".."}:
        # The name itself is not repeated: file names may carry patient data.
        raise ValidationError(
            f"file name of {len(name)} characters refused: it must be 1-255 characters, "
            "not '.' or '..', with no path separators or control characters"
        )
    return name


@dataclass(frozen=True)
class StartMsg:
    transfer_id: str
    announce: Announce
    offset: int


@dataclass(frozen=True)
class ChunkMsg:
    offset: int
    data: bytes
    sha256: bytes


class PeerChunkErrors(ChunkErrors):
    """How a receiver words a bad chunk stream from a peer (for :class:`ChunkVerifier`).

    A chunk out of place or too large is a ``ValidationError`` "transfer <id>: ...";
    a chunk that does not match its SHA-256 goes to ``refuse(offset)``, which records
    the integrity failure (catalog, audit) and raises the ``IntegrityError`` that names
    the peer, the transfer and what the sender should do."""

    def __init__(self, transfer_id: str, refuse: Callable[[int], NoReturn]) -> None:
        super().__init__(f"transfer {transfer_id}")
        self._refuse = refuse

    def bad_chunk(self, offset: int, expected: int) -> YigongError:
        self._refuse(expected)


@dataclass(frozen=True)
class EndMsg:
    sha256: str
    size: int


PushItem = StartMsg | ChunkMsg | EndMsg


@dataclass(frozen=True)
class OfferResult:
    resume_offset: int
    complete: bool
    receipt: bytes | None  # serialized SignedReceipt when complete


# -- batches (many objects in one stream, one manifest receipt) --------------------------
@dataclass(frozen=True)
class BatchStartMsg:
    batch_id: str
    case_id: str
    ref: str
    kind: str


@dataclass(frozen=True)
class ObjectStartMsg:
    transfer_id: str
    announce: Announce
    offset: int


@dataclass(frozen=True)
class BatchEndMsg:
    transfer_ids: tuple[str, ...]


BatchItem = BatchStartMsg | ObjectStartMsg | ChunkMsg | EndMsg | BatchEndMsg


@dataclass(frozen=True)
class StoredAck:
    """An object of the batch is durable and catalogued at the receiver."""

    transfer_id: str
    sha256: str


@dataclass(frozen=True)
class ManifestAck:
    """The receiver's signed manifest receipt (serialized SignedManifest)."""

    signed: bytes


BatchAckItem = StoredAck | ManifestAck


@dataclass(frozen=True)
class BatchObjectState:
    transfer_id: str
    object_id: str
    held: bool
    resume_offset: int


@dataclass(frozen=True)
class BatchStatusResult:
    objects: tuple[BatchObjectState, ...]
    receipt: bytes | None  # serialized SignedManifest when the batch completed here
