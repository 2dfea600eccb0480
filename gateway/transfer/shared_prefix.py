"""The verified prefix of an inbound transfer, where every replica of the node finds it.

A replica spools an inbound object on its own disk (``<spool>/<transfer id>.part``). When
replicas share the catalog (PostgreSQL) and object store, a sender cut off from one
replica — killed, restarted, taken out of HAProxy — reaches another one next, which has
no spool file. So while a large object arrives, every ``segment_bytes`` of *verified*
bytes (each chunk was checked against its SHA-256 before it was spooled) is also copied
into the shared store as one segment (key ``inbound-prefix/<transfer id>/<start>``) and
recorded in the catalog table ``inbound_segments``. A replica offered the transfer
without a spool file of its own rebuilds the spool from the contiguous segments and
answers that offset: the sender resumes there instead of from byte 0.

Safety does not rest on the segments: the whole object is read back and hashed against
its id before it is stored (as for any resumed transfer), so a damaged segment costs a
re-send, never a wrong object. Segments are deleted when the transfer completes, is
abandoned or restarts from 0. Objects smaller than one segment just restart (cheaper
than copying them twice). On a single node (SQLite) nothing here runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from gateway.catalog import Catalog
from gateway.errors import StorageError, YigongError
from gateway.storage import ObjectStore

log = logging.getLogger(__name__)

PREFIX = "inbound-prefix"
READ_BYTES = 4 * 1024 * 1024


def segment_key(transfer_id: str, start: int) -> str:
    return f"{PREFIX}/{transfer_id}/{start:016d}"


class SharedPrefix:
    """Copies verified spool ranges into the shared store; rebuilds a spool from them."""

    def __init__(self, store: ObjectStore, catalog: Catalog, segment_bytes: int) -> None:
        self.store = store
        self.catalog = catalog
        self.segment_bytes = segment_bytes

    def save(self, transfer_id: str, part: Path, start: int, end: int) -> None:
        """Copy bytes ``[start, end)`` of the spool file ``part`` into the shared store.

        A failure is logged, not raised: the transfer goes on; only a later resume on
        another replica would start further back."""
        key = segment_key(transfer_id, start)

        def ranged() -> Iterator[bytes]:
            with open(part, "rb") as f:
                f.seek(start)
                left = end - start
                while left > 0:
                    data = f.read(min(READ_BYTES, left))
                    if not data:
                        raise StorageError(f"spool file {part} ends before offset {end}")
                    left -= len(data)
                    yield data

        try:
            self.store.put_stream(key, ranged())
            self.catalog.add_segment(transfer_id, start, end - start, key)
        except (YigongError, OSError) as exc:
            log.warning(
                "transfer %s: could not share verified bytes %d-%d with the other replicas: %s",
                transfer_id, start, end, exc,
            )  # fmt: skip

    def restore(self, transfer_id: str, part: Path) -> int:
        """Rebuild ``part`` from the transfer's contiguous segments; the offset reached
        (0 when there are none, or the first is missing)."""
        reached = 0
        tmp = part.with_name(part.name + ".restore")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for start, size, key in self.catalog.segments(transfer_id):
                    if start != reached:
                        break  # a gap (a segment that failed to copy): stop before it
                    written = 0
                    for data in self.store.open_read(key):
                        view = memoryview(data)
                        while view:
                            n = os.write(fd, view)
                            view = view[n:]
                        written += len(data)
                    if written != size:
                        break
                    reached += size
                os.fsync(fd)
            finally:
                os.close(fd)
            if reached:
                with open(tmp, "r+b") as f:
                    f.truncate(reached)
                os.replace(tmp, part)
            else:
                tmp.unlink(missing_ok=True)
        except (YigongError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            log.warning(
                "transfer %s: verified prefix from the other replicas unusable (%s); "
                "the sender starts from offset 0", transfer_id, exc,
            )  # fmt: skip
            return 0
        if reached:
            log.info(
                "transfer %s: %d verified bytes taken over from another replica",
                transfer_id, reached,
            )  # fmt: skip
        return reached

    def discard(self, transfer_id: str) -> None:
        """Delete the transfer's segments (done, abandoned or restarting from 0)."""
        try:
            for _start, _size, key in self.catalog.segments(transfer_id):
                self.store.delete(key)
            self.catalog.drop_segments(transfer_id)
        except YigongError as exc:
            log.warning("transfer %s: shared segments not deleted: %s", transfer_id, exc)
