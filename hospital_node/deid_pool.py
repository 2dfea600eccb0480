"""De-identification on both cores: a small pool of worker processes (issue #10.2).

A release de-identifies every instance of a study. Each instance costs a few
milliseconds of CPU, most of it Python (the raw-element walk of the de-identifier,
pydicom for the outgoing scan) that holds the GIL, so threads would not use the second
core; processes do. :class:`DeidPool` keeps ``deid.workers`` processes (each a fresh
interpreter, ``python -m hospital_node.deid_pool``, talking over a socket pair, so a
worker holds none of the node's memory: no vault, no node key), started lazily on the
first large release, reused by every later one and stopped with the node. What a worker
is given per instance: the Part-10 bytes (read once, by the node, from its store), the
recipient's pseudonym, and — once per worker and recipient — the pickled per-recipient
:class:`Deidentifier` (its key is the HMAC-derived key of that one patient and
destination, never the node-wide key or the vault key). What comes back
(:class:`Outcome`): the status, the SHA-256 and size of the output, its new SOP Instance
UID, geometry and pixel hashes, the findings of the outgoing scan
(:func:`hospital_node.deid.scan_for_identifiers`) over exactly those bytes, and a keyed
digest of the instance's patient (Patient ID + Issuer) so the node can check the
one-patient rule again on the bytes it released. The output itself is written by the
worker to the release scratch folder and fsynced there (:func:`deidentify_one`), so it
never travels back through a pipe; the node links it into the store, a group at a time.

A worker that dies (killed, out of memory) is replaced on the next release; the
instances it held are de-identified in the node process instead, so a release is
never lost to it. When the node process dies, each worker sees its pipe close and
exits.

Nothing here logs patient data: log lines carry counts, pids and object ids only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TypeVar, cast

from pydicom import dcmread

from gateway.errors import (
    BurnedInAnnotationHeld,
    IntegrityError,
    ShuttingDown,
    ValidationError,
    YigongError,
)
from gateway.hashing import sha256_bytes, sha256_hex
from gateway.storage.filesystem import FilesystemStore
from hospital_node.deid import Deidentifier, burned_in_reason, scan_for_identifiers
from hospital_node.vault import PatientIdentity, patient_of

log = logging.getLogger(__name__)

K = TypeVar("K")

RELEASED, HELD, REFUSED, FAILED = "released", "held", "refused", "failed"
ERROR = "error"
"""Not an outcome of the instance: its object could not be read or written (the
release stops there and is finished later, as after a crash)."""
Source = Callable[[], bytes] | str
"""An instance's bytes: read by the node (a function), or a file the worker reads."""
PER_WORKER_IN_FLIGHT = 4
"""Instances queued at each worker when the node sends their bytes: one working, three
waiting (bounds memory to a few MiB)."""
PER_WORKER_IN_FLIGHT_FILES = 16
"""Instances queued at each worker when it reads and writes the store's files itself (a
path each, no bytes held): enough work queued that the workers keep de-identifying while
the node commits the previous group (a catalog and an audit commit, each an fsync);
the groups then grow with the commit time instead of the workers waiting for it."""
MAX_RECIPIENTS_PER_WORKER = 16
PATIENT_WINDOW = 32
"""Head reads (one-patient rule) queued at each worker."""
SCRATCH_SUFFIX = ".deid"
_PATIENT_KEY_LABEL = b"yigong.release.patient-key.v1\x00"


@dataclass(frozen=True)
class Outcome:
    """What became of one instance (no patient data: digests, UIDs and reasons only)."""

    status: str  # released | held | refused | failed (| error)
    reason: str = ""
    object_id: str = ""  # SHA-256 of the de-identified Part-10 bytes
    size: int = 0
    path: str = ""  # the scratch file holding them (fsynced), unless stored: released only
    stored: bool = False  # written into the filesystem store by the worker itself
    new_sop_uid: str = ""
    geometry_hash: str = ""
    pixel_hash: str = ""
    findings: tuple[str, ...] = ()  # outgoing scan of the output; () = may be sent
    patient_key: str = ""  # keyed digest of (Patient ID, Issuer) of the source
    pid: int = 0  # the process that de-identified it


def patient_key(patient_id: str, issuer: str, salt: bytes) -> str:
    """A keyed digest of a patient (Patient ID + Issuer of Patient ID) for comparing
    instances without holding the ID itself in a result; ``salt`` is per release."""
    material = patient_id.encode("utf-8") + b"\x00" + issuer.encode("utf-8")
    return hmac.new(salt, _PATIENT_KEY_LABEL + material, hashlib.sha256).hexdigest()


def held_reason(data: bytes) -> str:
    """Why an instance is held back for burned-in annotation (no attribute values)."""
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        return "may show patient data in its pixels"
    return (burned_in_reason(ds) or "may show patient data in its pixels") + (
        "; held until a clinician allows burned-in annotation (--allow-burned-in)"
    )


_counter = itertools.count()


def deidentify_one(
    deid: Deidentifier,
    data: bytes,
    pseudonym: str,
    allow_burned_in: bool,
    scratch: Path,
    salt: bytes,
    store_root: str = "",
) -> Outcome:
    """De-identify one Part-10 instance through the public entry point
    (:meth:`Deidentifier.deidentify_part10`), hash the output, scan it as the outgoing
    guard would, and make it durable: into the filesystem store at ``store_root``
    (:meth:`FilesystemStore.put_stream`), else into ``scratch`` (fsynced) for the node to
    store. Runs in a worker or inline."""
    pid = os.getpid()
    try:
        who = patient_of(data)
        key = patient_key(who.patient_id, who.issuer_of_patient_id, salt)
    except ValidationError as exc:
        return Outcome(FAILED, reason=str(exc), pid=pid)
    try:
        out, result = deid.deidentify_part10(data, pseudonym, allow_burned_in=allow_burned_in)
    except BurnedInAnnotationHeld:
        return Outcome(HELD, reason=held_reason(data), patient_key=key, pid=pid)
    except IntegrityError as exc:
        return Outcome(REFUSED, reason=str(exc), patient_key=key, pid=pid)
    except ValidationError as exc:
        return Outcome(FAILED, reason=str(exc), patient_key=key, pid=pid)
    digest = sha256_hex(out)
    try:
        findings = tuple(scan_for_identifiers(dcmread(io.BytesIO(out), force=True), pseudonym))
    except Exception as exc:  # the guard would refuse it the same way
        findings = (f"the de-identified object cannot be parsed ({type(exc).__name__})",)
    path, stored = "", False
    try:
        if store_root:
            store = FilesystemStore(Path(store_root))
            if store.size(digest) != len(out):
                store.put_stream(digest, [out])
            stored = True
        else:
            path = _write_scratch(scratch, f"{digest}.{pid}.{next(_counter)}", out)
    except (OSError, YigongError) as exc:
        return Outcome(ERROR, reason=f"could not store de-identified object {digest}: {exc}")
    return Outcome(
        RELEASED,
        object_id=digest,
        size=len(out),
        path=path,
        stored=stored,
        new_sop_uid=result.new_sop_uid,
        geometry_hash=result.geometry_hash,
        pixel_hash=result.pixel_hash,
        findings=findings,
        patient_key=key,
        pid=pid,
    )


def _write_scratch(scratch: Path, name: str, out: bytes) -> str:
    path = scratch / f"{name}{SCRATCH_SUFFIX}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(out)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return str(path)


def run_one(
    deid: Deidentifier,
    source: Source | bytes,
    pseudonym: str,
    allow: bool,
    scratch: Path,
    salt: bytes,
    store_root: str = "",
) -> Outcome:
    """:func:`deidentify_one` of a :data:`Source` (a file is read here) or of bytes."""
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            return Outcome(ERROR, reason=f"could not read {source}: {exc.strerror or exc}")
    else:
        data = source()
    return deidentify_one(deid, data, pseudonym, allow, scratch, salt, store_root)


def _worker_main(conn: Connection, scratch: str) -> None:
    """A worker: receive recipients and instances, answer with outcomes, until the pipe
    closes (the node stopped or died) or it is told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when workers stop
    deids: dict[bytes, Deidentifier] = {}
    folder = Path(scratch)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "deid":
            if len(deids) >= MAX_RECIPIENTS_PER_WORKER:
                deids.clear()
            deids[msg[1]] = pickle.loads(msg[2])
            continue
        if kind == "patient":
            try:
                conn.send((msg[1], _patient(msg[2])))
            except (EOFError, OSError):
                return
            continue
        _, seq, token, source, pseudonym, allow, salt, store_root = msg
        try:
            outcome = run_one(deids[token], source, pseudonym, allow, folder, salt, store_root)
        except Exception as exc:  # a bug: this instance fails, the worker lives
            outcome = Outcome(
                FAILED, reason=f"de-identification error: {type(exc).__name__}", pid=os.getpid()
            )
        try:
            conn.send((seq, outcome))
        except (EOFError, OSError):
            return


def _patient(path: str) -> PatientIdentity | str:
    """The patient of a file, or why it could not be read (for the one-patient rule)."""
    from hospital_node.release_patient import file_patient

    try:
        return file_patient(path)
    except ValidationError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"


class _Worker:
    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.tokens: set[bytes] = set()
        self.in_flight: deque[tuple[int, object, bytes | str]] = deque()  # (seq, key, source)


class DeidPool:
    """``workers`` de-identification processes, started on first use and reused.

    :meth:`run` is called by one release at a time (the releaser's lock)."""

    def __init__(self, workers: int, scratch: Path) -> None:
        self.workers = workers
        self.scratch = scratch
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"DeidPool(workers={self.workers}, started={len(self._pool)})"

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool]

    def _start(self) -> None:
        self._pool = [w for w in self._pool if w.proc.poll() is None]
        if len(self._pool) >= self.workers:
            return
        while len(self._pool) < self.workers:
            ours, theirs = socket.socketpair()
            try:
                proc = subprocess.Popen(  # a fresh interpreter: none of the node's memory
                    [sys.executable, "-m", __name__, str(theirs.fileno()), str(self.scratch)],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    close_fds=True,
                )
            except OSError as exc:
                ours.close()
                raise ValidationError(
                    f"cannot start a de-identification worker ({exc.strerror or exc}); "
                    "set deid.workers = 0 to de-identify in the node process"
                ) from exc
            finally:
                theirs.close()  # only the worker holds its end: it sees EOF when we are gone
            self._pool.append(_Worker(proc, Connection(ours.detach())))
        log.info("de-identification pool: %d worker process(es) %s", len(self._pool), self.pids)

    def warm(self) -> None:
        """Start the workers now (they load while the caller prepares the release); a
        pool busy with a release is started already, so this never waits for one."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                self._start()
        finally:
            self._lock.release()

    def patients(self, paths: list[str]) -> list[PatientIdentity | str]:
        """The patient of each file (or why it could not be read), read by the workers
        (the one-patient rule of a release, before anything is recorded)."""
        found: dict[int, PatientIdentity | str] = {}
        with self._lock:
            if self._closed:
                raise ShuttingDown("the de-identification pool is stopped (node stopping)")
            self._start()
            todo = iter(enumerate(paths))
            live = list(self._pool)
            asked: dict[_Worker, deque[int]] = {w: deque() for w in live}

            def feed(w: _Worker) -> None:
                while len(asked[w]) < PATIENT_WINDOW:
                    item = next(todo, None)
                    if item is None:
                        return
                    asked[w].append(item[0])
                    try:
                        w.conn.send(("patient", item[0], item[1]))
                    except (EOFError, OSError):
                        return

            for w in live:
                feed(w)
            while any(asked[w] for w in live):
                busy = [w for w in live if asked[w]]
                ready = wait([w.conn for w in busy])
                for w in busy:
                    if w.conn not in ready:
                        continue
                    try:
                        while asked[w] and w.conn.poll():
                            n, who = w.conn.recv()
                            asked[w].remove(n)
                            found[n] = who
                    except (EOFError, OSError):  # gone: the rest is read here
                        live.remove(w)
                        for n in asked.pop(w):
                            found[n] = _patient(paths[n])
                        continue
                    feed(w)
            for n, path in todo:  # no worker left
                found[n] = _patient(path)
        return [found[n] for n in range(len(paths))]

    def run(
        self,
        deid: Deidentifier,
        pseudonym: str,
        allow_burned_in: bool,
        jobs: Iterable[tuple[K, Source]],
        salt: bytes,
        store_root: str = "",
    ) -> Iterator[list[tuple[K, Outcome]]]:
        """De-identify every job (``key``, the instance's :data:`Source`), yielding the
        outcomes as they complete, a group at a time (whatever finished while the caller
        handled the previous group). At most :data:`PER_WORKER_IN_FLIGHT` instances per
        worker are read ahead (:data:`PER_WORKER_IN_FLIGHT_FILES` when the workers read and
        write the store's files themselves). ``store_root``: the filesystem store the workers write
        the outputs into ("": the scratch folder)."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._closed:
                raise ShuttingDown("the de-identification pool is stopped (node stopping)")
            self._start()
            yield from self._run(deid, pseudonym, allow_burned_in, iter(jobs), salt, store_root)

    def _run(
        self,
        deid: Deidentifier,
        pseudonym: str,
        allow: bool,
        jobs: Iterator[tuple[K, Source]],
        salt: bytes,
        store_root: str,
    ) -> Iterator[list[tuple[K, Outcome]]]:
        blob = pickle.dumps(deid)
        token = sha256_bytes(blob)
        seqs = itertools.count()
        live = list(self._pool)
        done: list[tuple[K, Outcome]] = []
        window = PER_WORKER_IN_FLIGHT_FILES if store_root else PER_WORKER_IN_FLIGHT

        def feed(w: _Worker) -> None:
            while len(w.in_flight) < window:
                job = next(jobs, None)
                if job is None:
                    return
                key, source = job
                data = source if isinstance(source, str) else source()
                seq = next(seqs)
                w.in_flight.append((seq, key, data))
                try:
                    if token not in w.tokens:
                        w.conn.send(("deid", token, blob))
                        w.tokens.add(token)
                    w.conn.send(("job", seq, token, data, pseudonym, allow, salt, store_root))
                except (EOFError, OSError):
                    lost(w)
                    return

        def lost(w: _Worker) -> None:
            """A worker died: its instances are de-identified here instead."""
            with contextlib.suppress(Exception):
                w.proc.kill()  # if only its pipe broke
                w.proc.wait(5)
            if w in self._pool:
                self._pool.remove(w)  # replaced at the next release
            log.warning(
                "de-identification worker %s ended (exit code %s); %d instance(s) done in "
                "the node process instead",
                w.proc.pid,
                w.proc.poll(),
                len(w.in_flight),
            )
            if w in live:
                live.remove(w)
            with contextlib.suppress(OSError):
                w.conn.close()
            while w.in_flight:
                _, key, data = w.in_flight.popleft()
                out = run_one(deid, data, pseudonym, allow, self.scratch, salt, store_root)
                done.append((cast(K, key), out))

        try:
            for w in list(live):
                feed(w)
            while True:
                if done:
                    yield done
                    done = []
                if self._closed:  # the node is stopping: the rest is finished at its start
                    raise ShuttingDown("the node is stopping; the release is finished at start")
                busy = [w for w in live if w.in_flight]
                if not busy:
                    job = next(jobs, None)
                    if job is None:
                        return
                    key, source = job  # every worker is gone: the node process does the rest
                    out = run_one(deid, source, pseudonym, allow, self.scratch, salt, store_root)
                    done.append((key, out))
                    continue
                ready = wait([w.conn for w in busy])
                for w in busy:
                    if w.conn not in ready:
                        continue
                    try:
                        while w.in_flight and w.conn.poll():
                            seq, outcome = w.conn.recv()
                            head, held, _ = w.in_flight.popleft()
                            assert head == seq, "worker answers out of order"
                            done.append((cast(K, held), outcome))
                    except (EOFError, OSError):
                        lost(w)
                        continue
                    feed(w)
        finally:
            for w in live:
                if w.in_flight:  # the caller stopped early: drop what the worker still holds
                    self._discard(w)

    def _discard(self, w: _Worker) -> None:
        w.in_flight.clear()
        with contextlib.suppress(Exception):
            w.proc.kill()
            w.proc.wait(5)
        with contextlib.suppress(OSError):
            w.conn.close()
        if w in self._pool:
            self._pool.remove(w)

    def close(self) -> None:
        """Stop the workers (node shutdown); a release in progress stops after its
        current group (and is finished at the next start); a later :meth:`run` is refused."""
        self._closed = True
        with self._lock:
            pool, self._pool = self._pool, []
        for w in pool:
            with contextlib.suppress(OSError, EOFError):
                w.conn.send(("stop",))
        for w in pool:
            try:
                w.proc.wait(5)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(5)
            with contextlib.suppress(OSError):
                w.conn.close()


def clear_scratch(scratch: Path) -> int:
    """Remove every scratch file a release left behind (a crash, a killed worker)."""
    removed = 0
    if not scratch.is_dir():
        return 0
    for path in scratch.iterdir():
        if path.name.endswith(SCRATCH_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def main(argv: list[str]) -> int:
    """Worker entry point: ``python -m hospital_node.deid_pool FD SCRATCH``."""
    fd, scratch = int(argv[0]), argv[1]
    _worker_main(Connection(fd), scratch)
    return 0


if __name__ == "__main__":  # run by name, so results pickle as hospital_node.deid_pool.*
    from hospital_node.deid_pool import main as _main

    sys.exit(_main(sys.argv[1:]))
