"""The spool janitor: nothing abandoned stays on disk.

* At start (before the node serves): every ``spool/submit/*.part`` is an upload
  cut by a crash or stop (an upload is never resumed) and is deleted; every
  ``spool/inbound/*.part`` whose transfer is not open (``receiving``) any more
  — or was never recorded — is deleted; the spool files kept are made 0600;
  the object store's temporary files of writes a crash cut short are deleted
  (:meth:`~gateway.storage.base.ObjectStore.sweep_temp_files`).
* While the node runs, a background thread expires inbound transfers whose
  sender has not been heard of (no Offer, no bytes) for
  ``transfer.inbound_expiry_seconds``: their spool file is deleted, the row
  marked ``abandoned`` and the expiry audited (``transfer.abandoned``).
  A sender that comes back later simply starts again from offset 0.

Together with the receiver's per-peer caps this bounds what a peer that opens
transfers and walks away can leave on the disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.catalog import iso_utc
from gateway.errors import YigongError
from gateway.transfer.receiver import Receiver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    """What one start-up sweep removed."""

    uploads: int = 0
    upload_bytes: int = 0
    orphans: int = 0
    orphan_bytes: int = 0
    expired: int = 0
    store_temps: int = 0
    store_temp_bytes: int = 0


class SpoolJanitor:
    def __init__(
        self,
        receiver: Receiver,
        submit_spool: Path,
        expiry_seconds: float,
        *,
        period_seconds: float | None = None,
    ) -> None:
        self.receiver = receiver
        self.catalog = receiver.catalog
        self.submit_spool = submit_spool
        self.expiry_seconds = expiry_seconds
        self.period_seconds = (
            period_seconds
            if period_seconds is not None
            else min(60.0, max(0.2, expiry_seconds / 4))
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- at start -----------------------------------------------------------
    def sweep_at_start(self) -> SweepReport:
        """Delete interrupted uploads and orphaned inbound spool files; expire stale rows."""
        uploads = upload_bytes = orphans = orphan_bytes = 0
        for part in sorted(self.submit_spool.glob("*.part")):
            size = _size(part)
            part.unlink(missing_ok=True)
            uploads += 1
            upload_bytes += size
        inbound = self.receiver.settings.spool_dir
        for part in sorted(inbound.glob("*.part")):
            rec = self.catalog.find_transfer(part.stem, "inbound")
            if rec is not None and rec.status == "receiving":
                with contextlib.suppress(OSError):
                    os.chmod(part, 0o600)
                continue
            size = _size(part)
            part.unlink(missing_ok=True)
            orphans += 1
            orphan_bytes += size
        if uploads:
            log.info(
                "spool: %d interrupted upload(s) (%d bytes) in %s deleted",
                uploads,
                upload_bytes,
                self.submit_spool,
            )
        if orphans:
            log.info(
                "spool: %d inbound spool file(s) of no open transfer (%d bytes) in %s deleted",
                orphans,
                orphan_bytes,
                inbound,
            )
        expired = self.expire_once()
        temps, temp_bytes = self.receiver.store.sweep_temp_files()
        return SweepReport(
            uploads, upload_bytes, orphans, orphan_bytes, expired, temps, temp_bytes
        )

    # -- while running --------------------------------------------------------
    def expire_once(self, now: datetime | None = None) -> int:
        """Abandon every open inbound transfer quiet for longer than the expiry."""
        cutoff = iso_utc((now or datetime.now(UTC)) - timedelta(seconds=self.expiry_seconds))
        why = f"no Offer or bytes from the sender for more than {self.expiry_seconds:g} s"
        expired = 0
        while not self._stop.is_set():
            batch = self.catalog.stale_inbound(cutoff, limit=500)
            done = sum(1 for rec in batch if self.receiver.abandon(rec, why))
            expired += done
            if len(batch) < 500 or done == 0:
                break
        return expired

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="spool-janitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.period_seconds):
            try:
                self.expire_once()
            except (YigongError, OSError) as exc:  # keep sweeping; say why it failed
                log.error("spool janitor: expiring abandoned transfers failed: %s", exc)
            except Exception:  # a bug must not stop the janitor for good
                log.exception("spool janitor: unexpected error")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
