"""Local submission: take an object from a person, tool or the node itself,
store it durably, and queue it for delivery to peers.

The upload is spooled, each chunk checked against its SHA-256, the whole
checked against the SHA-256/size the client announced (if any), its media type
resolved from its content and name (:func:`gateway.fidelity.sniff.resolve_media_type`:
inferred when missing, refused when contradicted), design files format-checked, then
stored in the object store (content-addressed) and catalogued. Destinations are
checked before any byte is accepted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.audit import AuditLog
from gateway.catalog import Catalog, ObjectRecord, TransferRecord
from gateway.errors import (
    ConfigError,
    IdentifiableData,
    IntegrityError,
    OutboundRefused,
    ValidationError,
    YigongError,
)
from gateway.fidelity.formats import is_design_media_type
from gateway.fidelity.sniff import resolve_media_type
from gateway.hashing import ChunkErrors, ChunkVerifier
from gateway.identity import Identity
from gateway.storage import ObjectStore
from gateway.transfer.model import ChunkMsg, check_name
from gateway.transfer.outbox import Outbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    name: str
    media_type: str
    case_id: str
    destinations: tuple[str, ...]
    sha256: str = ""
    size: int = 0
    labels: dict[str, str] = field(default_factory=dict)


class Exchange:
    def __init__(
        self,
        node_id: str,
        store: ObjectStore,
        catalog: Catalog,
        audit: AuditLog,
        outbox: Outbox,
        spool_dir: Path,
        max_object_bytes: int,
        *,
        validate_design: Callable[[Path, str, str], None] | None = None,
        alert_on_type_refusal: bool = False,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.catalog = catalog
        self.audit = audit
        self.outbox = outbox
        self.spool_dir = spool_dir
        self.max_object_bytes = max_object_bytes
        self.validate_design = validate_design  # the node's design-file format check
        # the hospital role's: a type the content contradicts is a security alert there
        self.alert_on_type_refusal = alert_on_type_refusal
        spool_dir.mkdir(parents=True, exist_ok=True)

    def submit(
        self, caller: Identity, sub: Submission, chunks: Iterator[ChunkMsg]
    ) -> tuple[ObjectRecord, list[TransferRecord]]:
        check_name(sub.name)
        for dest in sub.destinations:
            if dest not in self.outbox.settings.known_peers:
                raise ConfigError(
                    f"destination {dest!r} is not a configured peer of node {self.node_id} "
                    f"(known: {', '.join(sorted(self.outbox.settings.known_peers)) or 'none'})"
                )
        part = self.spool_dir / f"{uuid.uuid4().hex}.part"
        try:
            digest, size = self._spool(part, sub, chunks)
            # the type the content shows when none was declared; a contradiction refused
            try:
                resolved = resolve_media_type(part, sub.name, sub.media_type)
            except ValidationError as exc:
                if self.alert_on_type_refusal:
                    self._alert(caller, sub.case_id, digest, "", exc, "type-mismatch")
                raise
            sub = dataclasses.replace(sub, media_type=resolved)
            if self.validate_design is not None and is_design_media_type(sub.media_type):
                self.validate_design(part, sub.media_type, sub.name)  # refused before storing
            if self.store.size(digest) != size:
                self.store.adopt_file(digest, part)
        finally:
            part.unlink(missing_ok=True)
        obj = self.catalog.add_object(
            object_id=digest,
            size=size,
            name=sub.name,
            media_type=sub.media_type or "application/octet-stream",
            case_id=sub.case_id,
            origin_node=self.node_id,
            labels=sub.labels,
        )
        self.audit.record(
            "object.stored",
            actor=caller.label(),
            object_id=digest,
            case_id=sub.case_id or None,
            details={"size": size, "store": self.store.describe(), "source": "submit"},
        )
        for dest in sub.destinations:
            try:
                self.outbox.hooks.check_outgoing(obj, self.store, dest)
            except IdentifiableData as exc:
                check = exc.check if isinstance(exc, OutboundRefused) else ""
                self._alert(caller, obj.case_id, obj.object_id, dest, exc, check)
                raise
        queued = [self.outbox.queue(obj, dest, actor=caller.label()) for dest in sub.destinations]
        log.info(
            "object %s (%d bytes) submitted by %s, queued for %s",
            digest,
            size,
            caller.label(),
            ",".join(sub.destinations) or "nobody",
        )
        return obj, queued

    def _alert(
        self, caller: Identity, case_id: str, object_id: str, peer: str, exc: Exception, check: str
    ) -> None:
        """A refused submission is a security alert naming who tried (ids only)."""
        self.audit.record(
            "security.alert",
            actor=caller.label(),
            outcome="failure",
            peer=peer or None,
            object_id=object_id,
            case_id=case_id or None,
            details={
                "reason": type(exc).__name__,
                "action": "submission refused",
                **({"check": check} if check else {}),
            },
        )

    def _spool(self, part: Path, sub: Submission, chunks: Iterator[ChunkMsg]) -> tuple[str, int]:
        """Write the verified upload to ``part``: (SHA-256, size), both checked against
        what the client announced (if it did)."""
        verifier = ChunkVerifier(
            _UploadErrors(sub), max_total=self.max_object_bytes, require_sha256=False
        )
        # 0600 like every spool file; O_EXCL: the name is fresh, never an existing file
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                verifier.check(chunk.offset, chunk.data, chunk.sha256)
                fh.write(chunk.data)
        return verifier.finish(
            sha256=[sub.sha256] if sub.sha256 else (), size=[sub.size] if sub.size else ()
        )


class _UploadErrors(ChunkErrors):
    """An upload's chunk errors, worded as they always were (nothing is stored)."""

    def __init__(self, sub: Submission) -> None:
        super().__init__("upload")
        self.sub = sub

    def bad_offset(self, offset: int, expected: int) -> YigongError:
        return ValidationError(f"upload chunk at offset {offset}, expected {expected}")

    def too_large(self, limit: int) -> YigongError:
        return ValidationError(f"upload exceeds transfer.max_object_bytes ({limit})")

    def bad_chunk(self, offset: int, expected: int) -> YigongError:
        return IntegrityError(
            f"upload chunk at offset {offset} does not match its SHA-256; nothing was stored"
        )

    def bad_whole(self, digest: str, size: int) -> YigongError:
        sub = self.sub
        if sub.sha256 and sub.sha256 != digest:
            return IntegrityError(
                f"upload of {sub.name!r}: SHA-256 is {digest}, client announced "
                f"{sub.sha256}; nothing was stored"
            )
        return IntegrityError(
            f"upload of {sub.name!r}: {size} bytes arrived, client announced "
            f"{sub.size}; nothing was stored"
        )
