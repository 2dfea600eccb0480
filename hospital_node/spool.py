"""The DICOM spool: a C-STORE is answered once its instance is durable here; a filer
thread then stores, audits and catalogues it (:meth:`hospital_node.ingest.Ingest.file`).

Why: a PACS sends the next instance only after the answer to the last one, so all
work done before answering is latency on every instance. Filing an instance takes
five fsyncs (object, its directory, new shard directories, audit log, catalog); the
spool needs one file and its directory, and that write runs in a helper thread while
the association's thread parses and validates the instance (which must happen before
answering: a malformed instance is refused). See docs/dicom-ingest.md for figures.

Invariant 1 holds: the success status goes out only after the instance's bytes and
what the filer needs (calling/called AE title, time of receipt) are fsynced in the
spool, and a spool file is removed only after the instance is filed. After a crash,
:meth:`DicomSpool.start` files every complete spool file again (``replay``: an
instance already catalogued is left as it is, so nothing is filed twice).

Layout: ``<dicom.spool_path>/<seq>.<size>.<header>.dcm`` (mode 0600): the Part-10
object exactly as it will be stored, so filing it into a filesystem store is a hard
link, not a copy; ``<header>`` is base64url JSON of the calling and called AE titles
and the time of receipt. Its SHA-256 (the object id) is computed by the filer, not on
the C-STORE's path. A spool file is written with one ``O_DSYNC`` write, then the
directory is fsynced; only then is the C-STORE answered. A file shorter than the size
in its name was cut off by a crash before its answer and is removed at start (the PACS
sends it again); a file whose name cannot be read or whose bytes no longer parse is
moved to ``rejected/`` and logged — never deleted.

While filing fails (object store or catalog down), the filer retries with backoff and
new instances are refused with :class:`StorageError` (0xA700, the PACS sends again
later) instead of piling up; at most ``dicom.spool_max_waiting`` instances wait.
:meth:`DicomSpool.settle` waits until everything acknowledged so far is filed:
queries and confirmation call it, so what a PACS was told is stored is what they see.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.backoff import Backoff
from gateway.catalog import utcnow
from gateway.errors import NotReady, StorageError, ValidationError, YigongError
from gateway.fidelity.dicom import PixelHasher
from gateway.hashing import DEFAULT_CHUNK_BYTES, StreamHasher, iter_file_chunks, sha256_hex
from gateway.storage.filesystem import fsync_dir
from hospital_node.ingest import Filing, Ingest, Parsed, parse_instance

log = logging.getLogger(__name__)

SUFFIX = ".dcm"
RETRY_FIRST, RETRY_MAX = 0.2, 5.0
RETRY = Backoff(RETRY_FIRST, RETRY_MAX)
"""The filer's wait after a failed batch: 0.2 s, doubling, at most 5 s."""
"""Seconds between attempts to file an instance while filing fails (doubling)."""
BATCH_MAX = 64
"""Most instances filed in one audit and one catalog transaction."""
ROOM_WAIT_SECONDS = 30.0
"""How long a C-STORE waits for room when ``spool_max_waiting`` instances wait."""


@dataclass(frozen=True)
class Spooled:
    """One acknowledged instance waiting to be filed."""

    seq: int
    path: Path
    size: int
    calling_ae: str
    called_ae: str
    received_at: str
    parsed: Parsed | None  # None after a restart: parsed again when filed


def _digests(
    path: Path, spans: tuple[tuple[int, int, int], ...], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[str, str]:
    """SHA-256 of the file ``path`` (the object id) and, in the same read, the pixel hash
    of the elements at ``spans`` ((tag, offset, length), ascending); ``""`` without spans."""
    whole, pixels = StreamHasher(), PixelHasher()
    pending, opened, pos = list(spans), False, 0
    with open(path, "rb") as fh:
        for chunk in iter_file_chunks(fh, chunk_bytes):
            end = pos + len(chunk)
            whole.update(chunk)
            view = memoryview(chunk)
            while pending:
                tag, start, length = pending[0]
                if start > end or (start == end and length):
                    break  # starts in a later chunk
                if not opened:
                    pixels.element(tag, length)
                    opened = True
                stop = start + length
                pixels.update(view[max(start, pos) - pos : min(stop, end) - pos])
                if stop > end:
                    break  # goes on in the next chunk
                pending.pop(0)
                opened = False
            pos = end
    if pending:
        raise StorageError(f"DICOM spool: {path} is shorter than when it was parsed")
    return whole.hexdigest(), pixels.hexdigest() if spans else ""


class DicomSpool:
    """Acknowledge-after-spool in front of :class:`Ingest`; see the module doc."""

    def __init__(self, ingest: Ingest, directory: Path, *, max_waiting: int = 256) -> None:
        self.ingest = ingest
        self.directory = Path(directory)
        self.max_waiting = max_waiting
        self.room_wait_seconds = ROOM_WAIT_SECONDS
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dicom-spool-io")
        self._queue: queue.Queue[Spooled | None] = queue.Queue()
        self._cond = threading.Condition()
        self._waiting: set[int] = set()  # seqs acknowledged (or recovered), not yet filed
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._failure: YigongError | None = None
        self._stop = threading.Event()
        self._filer: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------
    def start(self) -> int:
        """Create the spool directory, queue every spool file left by an earlier run
        (oldest first) and start the filer; return how many were queued."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            names = sorted(p.name for p in self.directory.glob(f"*{SUFFIX}"))
        except OSError as exc:
            raise StorageError(
                f"DICOM spool {self.directory}: cannot use it ({exc.strerror or exc}); "
                "check dicom.spool_path and its permissions"
            ) from exc
        rejected = self.directory / "rejected"
        seen = (
            [*names, *(p.name for p in rejected.glob(f"*{SUFFIX}"))] if rejected.is_dir() else names
        )
        seqs = [int(n.split(".", 1)[0]) for n in seen if n.split(".", 1)[0].isdigit()]
        self._seq = itertools.count(max(seqs, default=0) + 1)  # never a name used before
        recovered = [s for s in (self._recover(self.directory / n) for n in names) if s]
        for item in recovered:
            self._enqueue(item)
        if recovered:
            log.warning(
                "DICOM spool %s: %d acknowledged instance(s) from before the last stop are "
                "filed now", self.directory, len(recovered),
            )  # fmt: skip
        self._stop.clear()
        self._filer = threading.Thread(target=self._run, name="dicom-spool-filer", daemon=True)
        self._filer.start()
        return len(recovered)

    def stop(self, grace: float = 10.0) -> None:
        """File what waits for up to ``grace`` seconds; what is left stays in the spool
        and is filed at the next start."""
        if self._filer is None:
            return
        self._queue.put(None)
        self._filer.join(grace)
        self._stop.set()
        self._filer.join(RETRY_MAX + 1.0)
        self._filer = None
        self._io.shutdown(wait=True)
        left = len(self._waiting)
        if left:
            log.warning(
                "DICOM spool %s: %d instance(s) not filed yet; they are filed at the next start",
                self.directory, left,
            )  # fmt: skip

    @property
    def waiting(self) -> int:
        """Instances acknowledged and not yet filed."""
        with self._cond:
            return len(self._waiting)

    def settle(self, timeout: float = 10.0) -> None:
        """Return once every instance acknowledged before this call is filed; raise
        :class:`NotReady` if that takes longer than ``timeout`` seconds."""
        with self._cond:
            target = self._last_seq
            done = self._cond.wait_for(
                lambda: not any(seq <= target for seq in self._waiting), timeout
            )
            if done:
                return
            left, failure = len(self._waiting), self._failure
        why = f" (filing fails: {failure})" if failure else ""
        raise NotReady(
            f"{left} received DICOM instance(s) are still being filed{why}; try again shortly"
        )

    # -- receiving (the association's thread) -----------------------------
    def receive(
        self, part10: bytes, *, calling_ae: str, called_ae: str, context_sop_class: str = ""
    ) -> None:
        """Make ``part10`` durable in the spool and validate it (both at once). Raises
        what :func:`parse_instance` raises for a refused instance (audited) and
        :class:`StorageError` when it cannot be spooled or filing is failing."""
        facts: dict[str, object] = {
            "calling_ae": calling_ae, "called_ae": called_ae, "size": len(part10)
        }  # fmt: skip
        try:
            self._make_room()
        except StorageError as exc:
            self.ingest.audit_refusal(sha256_hex(part10), facts, exc)
            raise
        seq = next(self._seq)
        header = {"calling_ae": calling_ae, "called_ae": called_ae, "received_at": utcnow()}
        started: list[Future[Parsed]] = []

        def check() -> Future[Parsed]:  # in a helper thread, while the write waits for the disk
            if not started:
                started.append(self._io.submit(
                    self.ingest.check, part10, calling_ae=calling_ae, called_ae=called_ae,
                    context_sop_class=context_sop_class, defer_pixel_hash=True,
                ))  # fmt: skip
            return started[0]

        try:
            path = self._write(seq, part10, header, check)
        except StorageError as exc:
            with contextlib.suppress(ValidationError):
                parsed = check().result()
                facts.update(sop_instance_uid=parsed.sop_instance_uid, study_uid=parsed.study_uid)
            self.ingest.audit_refusal(sha256_hex(part10), facts, exc)
            raise
        try:
            parsed = check().result()  # a refusal is audited by Ingest.check
        except ValidationError:
            with contextlib.suppress(OSError):
                path.unlink()  # if a crash keeps it, the restart parses it again, rejects it
            raise
        self._enqueue(Spooled(
            seq, path, len(part10), calling_ae, called_ae, header["received_at"], parsed,
        ))  # fmt: skip

    def _make_room(self) -> None:
        with self._cond:
            if self._failure is not None:
                raise StorageError(
                    f"received instances cannot be filed ({self._failure}); "
                    f"{len(self._waiting)} wait in the DICOM spool; send again later"
                )
            if not self._cond.wait_for(
                lambda: len(self._waiting) < self.max_waiting, self.room_wait_seconds
            ):
                raise StorageError(
                    f"the DICOM spool holds dicom.spool_max_waiting={self.max_waiting} "
                    "instances not yet filed; send again later"
                )

    def _write(
        self, seq: int, part10: bytes, header: dict[str, str], meanwhile: Callable[[], object]
    ) -> Path:
        """The spool file of ``part10``: written, synced, directory fsynced.

        ``meanwhile()`` is called just before the write: it is one ``O_DSYNC`` write
        call that releases the GIL until the bytes are on disk, which is when work in
        other threads (the parse) gets done."""
        head = json.dumps([header["calling_ae"], header["called_ae"], header["received_at"]])
        code = base64.urlsafe_b64encode(head.encode()).decode()
        path = self.directory / f"{seq:016d}.{len(part10)}.{code}{SUFFIX}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DSYNC, 0o600)
            try:
                meanwhile()
                view = memoryview(part10)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise StorageError(
                f"DICOM spool {self.directory} could not write instance {seq}: "
                f"{exc.strerror or exc}; check disk space and permissions"
            ) from exc
        return path

    def _enqueue(self, item: Spooled) -> None:
        with self._cond:
            self._waiting.add(item.seq)
            self._last_seq = max(self._last_seq, item.seq)
        self._queue.put(item)

    # -- filing (the filer thread) ----------------------------------------
    def _run(self) -> None:
        """File what waits, oldest first, in batches of what has arrived meanwhile (so a
        burst costs one audit and one catalog commit per batch, not per instance)."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, last = [first], False
            while len(batch) < BATCH_MAX and not last:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    last = True
                else:
                    batch.append(item)
            failures = 0
            while not self._file(batch, failures > 0):
                failures += 1
                if self._stop.wait(RETRY.delay(failures)):
                    return
            if last:
                return

    def _file(self, batch: list[Spooled], retry: bool) -> bool:
        """File a batch; False (to retry) when filing failed. A retry files like a replay:
        what the failed attempt did catalogue is not filed twice."""
        store = self.ingest.store
        try:
            filings: list[Filing] = []
            for item in list(batch):
                facts = self._facts(item)
                if facts is None:  # set aside in rejected/: nothing to file, nor to retry
                    batch.remove(item)
                    self._done([item])
                    continue
                object_id, parsed = facts
                filings.append(Filing(
                    None, object_id, item.size, parsed, item.calling_ae, item.called_ae,
                    item.received_at, replay=retry or item.parsed is None,
                ))  # fmt: skip
            store.link_files(
                [(f.object_id, item.path) for f, item in zip(filings, batch, strict=True)]
            )
            self.ingest.file(filings)
        except Exception as exc:  # the filer must outlive any failure: it holds acked data
            if not isinstance(exc, YigongError):
                log.exception("DICOM spool: unexpected error while filing")
                exc = StorageError(f"unexpected {type(exc).__name__} while filing")
            if self._failure is None:
                log.error(
                    "DICOM spool: filing %d instance(s) failed, retrying; new instances are "
                    "refused until it works: %s", len(batch), exc,
                )  # fmt: skip
            with self._cond:
                self._failure = exc
            return False
        for item in batch:
            with contextlib.suppress(OSError):
                item.path.unlink()
        with self._cond:
            if self._failure is not None:
                log.warning("DICOM spool: filing works again")
            self._failure = None
        self._done(batch)
        return True

    def _done(self, items: list[Spooled]) -> None:
        with self._cond:
            self._waiting.difference_update(item.seq for item in items)
            self._cond.notify_all()

    def _facts(self, item: Spooled) -> tuple[str, Parsed] | None:
        """(object id, facts) of a spooled instance, its file read once; None (and the
        file set aside) if a recovered one no longer parses — it was accepted once, so
        that means the spool file was damaged."""
        try:
            if item.parsed is not None:
                object_id, pixels = _digests(item.path, item.parsed.pixel_spans)
                if not item.parsed.pixel_spans:
                    return object_id, item.parsed
                return object_id, replace(item.parsed, pixel_sha256=pixels)
            data = item.path.read_bytes()
        except OSError as exc:
            raise StorageError(f"DICOM spool: cannot read {item.path} ({exc})") from exc
        try:
            return sha256_hex(data), parse_instance(data)
        except ValidationError as exc:
            self._reject(item.path, f"no longer a valid instance ({exc})")
            return None

    # -- recovery ---------------------------------------------------------
    def _recover(self, path: Path) -> Spooled | None:
        """The spool file ``path`` as a queue item, or None (set aside) if it is damaged."""
        try:
            actual = path.stat().st_size
        except OSError as exc:
            raise StorageError(f"DICOM spool: cannot read {path} ({exc})") from exc
        try:
            seq, size, head = path.name.removesuffix(SUFFIX).split(".")
            calling_ae, called_ae, received_at = json.loads(base64.urlsafe_b64decode(head))
            if actual != int(size):  # the node stopped while writing it: never answered
                log.info("DICOM spool: removing %s (incomplete, never acknowledged)", path.name)
                path.unlink()
                return None
            return Spooled(
                int(seq), path, actual, str(calling_ae), str(called_ae), str(received_at), None
            )
        except (ValueError, TypeError, binascii.Error) as exc:
            self._reject(path, str(exc))
            return None

    def _reject(self, path: Path, why: str) -> None:
        """Move a spool file that cannot be filed to ``rejected/`` (kept, never deleted)."""
        target = self.directory / "rejected" / path.name
        try:
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, target)
            fsync_dir(self.directory)
        except OSError as exc:
            raise StorageError(f"DICOM spool: cannot set aside {path} ({exc})") from exc
        log.error(
            "DICOM spool: %s set aside in %s, not filed: %s; inspect it: it may have been "
            "acknowledged to the PACS", path.name, target.parent, why,
        )  # fmt: skip
