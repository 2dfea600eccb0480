"""A whole study through two ``yigong serve`` processes, for the kill -9 proofs.

A hospital node (DICOM SCP) and a factory node run as child processes on pinned ports
(so either can be killed and restarted on the same address). A CT series is written as
Part-10 files and pushed with dcmtk's ``storescu`` (an outside PACS), the study is
confirmed by a clinician (``Hospital.ConfirmStudy``), and the exchange to the factory
is watched from outside through read-only views of the nodes' own files:

- *progress* = bytes the factory holds for the study: the sizes of its catalogued
  inbound transfers that are ``done`` plus the bytes of its transfer spool files;
- the final state is read from both nodes' catalogs, stores and spool folders once
  both are stopped.

Nothing here mocks the data path: real sockets, mTLS with certificates of the test
federation, the node processes' own databases and stores.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.catalog import Catalog, TransferRecord
from gateway.config import NodeConfig, load_config
from gateway.rpc.client import NodeClient
from tests.cluster import Federation, NodeProcess, pin_port, wait_for, write_config
from tests.dicom_factory import StudyInfo, ct_series, to_part10
from yigong.v1 import factory_pb2, factory_pb2_grpc, hospital_pb2, hospital_pb2_grpc

STORESCU = Path("/usr/bin/storescu")  # dcmtk's; pynetdicom's own storescu may come first
AE_TITLE, CALLING_AE = "YIGONG", "PACS"
HOSPITAL, FACTORY = "hospital-1", "factory-1"
CLINICIAN, ENGINEER = "dr-kill", "eng-kill"
QUIET_PERIOD_SECONDS = 0.5


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class WrittenStudy:
    directory: Path
    study_uid: str
    count: int
    file_bytes: int


def write_study(directory: Path, count: int, rows: int, cols: int) -> WrittenStudy:
    """One axial CT series as ``0000.dcm`` ... (Explicit VR Little Endian)."""
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    study_uid = ""
    for index, ds in enumerate(ct_series(count, rows=rows, cols=cols, study=StudyInfo())):
        data = to_part10(ds)
        (directory / f"{index:04d}.dcm").write_bytes(data)
        total += len(data)
        study_uid = str(ds.StudyInstanceUID)
    return WrittenStudy(directory, study_uid, count, total)


def storescu(port: int, study: WrittenStudy, timeout: float = 120.0) -> None:
    """Push every file of ``study`` in one association, as a PACS would."""
    cmd = [str(STORESCU), "-aet", CALLING_AE, "-aec", AE_TITLE, "127.0.0.1", str(port)]
    proc = subprocess.run(
        [*cmd, "+sd", str(study.directory)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"storescu failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def files_under(root: Path) -> list[Path]:
    """Every regular file under ``root`` (hidden ones included: a stray temp file counts)."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class KillableNode(NodeProcess):
    """A node process that can also be restarted without waiting for it to be ready (a
    kill may then land while it starts up, or as soon as the exchange moves again)."""

    def spawn(self) -> None:
        ready = self.config.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "yigong_node", "-v", "serve", str(self.config),
                 "--ready-file", str(ready)],
                stdout=logf, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def wait_ready(self, timeout: float = 120.0) -> None:
        ready = self.config.with_suffix(".ready")
        wait_for(
            lambda: ready.exists() or (self.proc is not None and self.proc.poll() is not None),
            timeout, what=f"{self.config.stem} ready",
        )  # fmt: skip
        if not ready.exists():
            raise AssertionError(f"{self.config.stem} exited:\n{self.log_path.read_text()[-4000:]}")


class StudyPair:
    """A factory and a hospital ``yigong serve`` process, each on a pinned port."""

    def __init__(self, fed: Federation, workdir: Path, transfer_extra: str = "") -> None:
        self.fed, self.workdir = fed, workdir
        tuning = (
            "[transfer]\nretry_initial_seconds = 0.1\nretry_max_seconds = 0.5\n" + transfer_extra
        )
        self.fcfg = write_config(fed, workdir, FACTORY, "factory", extra=tuning)
        self.factory = KillableNode(self.fcfg, workdir / f"{FACTORY}.log")
        self.factory.start(timeout=120)
        pin_port(self.fcfg, self.factory.port)
        self.dicom_port = free_port()
        dicom: dict[str, object] = {
            "listen": f"127.0.0.1:{self.dicom_port}",
            "ae_title": AE_TITLE,
            "allowed_calling_aes": [CALLING_AE],
            "allowed_addresses": ["127.0.0.1"],
            "quiet_period_seconds": QUIET_PERIOD_SECONDS,
        }
        self.hcfg = write_config(
            fed, workdir, HOSPITAL, "hospital", peers={FACTORY: self.factory.address},
            extra=tuning, dicom=dicom,
        )  # fmt: skip
        self.hospital = KillableNode(self.hcfg, workdir / f"{HOSPITAL}.log")
        self.hospital.start(timeout=120)
        pin_port(self.hcfg, self.hospital.port)
        self.fconf: NodeConfig = load_config(self.fcfg)
        self.hconf: NodeConfig = load_config(self.hcfg)

    # -- processes ----------------------------------------------------------------------
    def node(self, which: str) -> KillableNode:
        return {"factory": self.factory, "hospital": self.hospital}[which]

    def stop(self) -> None:
        for proc in (self.hospital, self.factory):
            proc.stop()

    def logs_tail(self) -> str:
        out = []
        for proc in (self.hospital, self.factory):
            text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
            out.append(f"--- {proc.log_path.name} ---\n{text[-3000:]}")
        return "\n".join(out)

    # -- clients --------------------------------------------------------------------------
    def _client(self, proc: NodeProcess, node_id: str, who: object) -> NodeClient:
        return NodeClient(proc.address, self.fed.creds(who), node_id=node_id)  # type: ignore[arg-type]

    def hospital_node_client(self) -> NodeClient:
        return self._client(self.hospital, HOSPITAL, self.fed.node(HOSPITAL, "hospital"))

    def ingest(self, study: WrittenStudy, timeout: float = 120.0) -> None:
        """storescu the study in; wait until the hospital holds it as ``received``."""
        storescu(self.dicom_port, study, timeout)
        get = hospital_pb2.GetHospitalStudyRequest(study_uid=study.study_uid)
        with self.hospital_node_client() as c:
            stub = hospital_pb2_grpc.HospitalStub(c.channel)

            def received() -> bool:
                s = stub.GetStudy(get, timeout=60).study
                return s.status == "received" and s.instance_count == study.count

            wait_for(received, timeout, interval=0.1, what="the study received at the hospital")

    def confirm(self, study: WrittenStudy, case_id: str) -> list[str]:
        """A clinician confirms the study for the factory; the queued transfer ids."""
        clinician = self.fed.person(CLINICIAN, "clinician", HOSPITAL)
        req = hospital_pb2.ConfirmStudyRequest(
            study_uid=study.study_uid, case_id=case_id, destination=FACTORY
        )
        with self._client(self.hospital, HOSPITAL, clinician) as dr:
            reply = hospital_pb2_grpc.HospitalStub(dr.channel).ConfirmStudy(req, timeout=300)
        return list(reply.transfer_ids)

    def factory_instance_count(self, case_id: str) -> int:
        """What an engineer at the factory sees: instances of the case's studies."""
        engineer = self.fed.person(ENGINEER, "engineer", FACTORY)
        with self._client(self.factory, FACTORY, engineer) as eng:
            got = factory_pb2_grpc.FactoryStub(eng.channel).ListStudies(
                factory_pb2.ListFactoryStudiesRequest(case_id=case_id), timeout=60
            )
        return sum(s.instance_count for s in got.studies)

    # -- outside views of the nodes' files ----------------------------------------------
    @property
    def factory_spool(self) -> Path:
        return self.fconf.data_dir / "spool"

    @property
    def hospital_spool(self) -> Path:
        return self.hconf.data_dir / "spool"

    def _ro(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        db.execute("PRAGMA busy_timeout = 5000")
        return db

    def factory_done_bytes(self) -> int:
        """Bytes of the inbound transfers the factory has catalogued as done."""
        try:
            with closing(self._ro(self.fconf.catalog.path)) as db:
                (done,) = db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM transfers WHERE direction = 'inbound'"
                    " AND status = 'done'"
                ).fetchone()
        except sqlite3.OperationalError:  # being created / locked for a moment
            return 0
        return int(done)

    def factory_progress(self) -> int:
        """Bytes the factory holds of what was sent to it: done inbound transfers + spool
        files (the pair carries one study, so that is the study's progress)."""
        try:
            with closing(self._ro(self.fconf.catalog.path)) as db:
                (done,) = db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM transfers WHERE direction = 'inbound'"
                    " AND status = 'done'"
                ).fetchone()
        except sqlite3.OperationalError:  # being created / locked for a moment
            done = 0
        spooled = 0
        for part in files_under(self.factory_spool / "inbound"):
            try:
                spooled += part.stat().st_size
            except FileNotFoundError:  # moved into the store meanwhile
                pass
        return int(done) + spooled

    def outbound_statuses(self) -> dict[str, str]:
        with closing(self._ro(self.hconf.catalog.path)) as db:
            rows = db.execute(
                "SELECT transfer_id, status FROM transfers WHERE direction = 'outbound'"
            ).fetchall()
        return {t: s for t, s in rows}

    # -- the final state, nodes stopped ---------------------------------------------------
    @contextmanager
    def catalogs(self) -> Iterator[tuple[Catalog, Catalog]]:
        hcat, fcat = Catalog(self.hconf.catalog.path), Catalog(self.fconf.catalog.path)
        try:
            yield hcat, fcat
        finally:
            hcat.close()
            fcat.close()


def outbound_of(cat: Catalog, transfer_ids: list[str]) -> list[TransferRecord]:
    return [cat.get_transfer(t, "outbound") for t in transfer_ids]
