"""The steps of ``yigong demo`` (:mod:`gateway.demo` runs the nodes): the main path
PACS -> hospital -> clinician -> factory -> engineer, then a file round trip.

Each step checks what it shows; a failed check prints ``CHECK FAILED`` and makes the
demo exit non-zero. Only UIDs, hashes, counts and the case pseudonym are printed; the
fictitious patient's name appears once, in step 3, as what the PACS sent.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from gateway import pki
from gateway.audit import read_events, verify_log
from gateway.config import load_config
from gateway.demo import (
    CASE_ID,
    CLINICIAN,
    ENGINEER,
    FACTORY,
    HOSPITAL,
    OFFICER,
    QUIET_PERIOD_SECONDS,
    Demo,
)
from gateway.demo.data import FICTITIOUS_NAME, FICTITIOUS_STRINGS, clean_pdf, ct_series
from gateway.errors import ReceiptError, TransferError, YigongError
from gateway.hashing import sha256_hex
from gateway.rpc.call import rpc_call
from gateway.transfer.manifest import check_manifest, verify_manifest
from gateway.transfer.receipts import verify_receipt
from yigong.v1 import (
    common_pb2,
    factory_pb2,
    factory_pb2_grpc,
    hospital_pb2,
    hospital_pb2_grpc,
    query_pb2,
)

SLICES = 12
PDF_NAME = "design-review.pdf"
WAIT_TIMEOUT = 90.0
T = TypeVar("T")


def run_story(demo: Demo) -> bool:
    """Steps 1-9; True when every check passed."""
    demo.say(f"== yigong demo: a throwaway federation in {demo.root} ==")
    with demo.step("Federation CA and certificates"):
        demo.certificates()
    with demo.step("Nodes: real `yigong serve` processes, mTLS gRPC on 127.0.0.1"):
        demo.start_node(FACTORY, "factory", peers=[])
        demo.start_node(HOSPITAL, "hospital", peers=[(FACTORY, demo.nodes[FACTORY].address)])
    story = Story(demo)
    checks = [
        story.push,
        story.quiet,
        story.confirm,
        story.arrive,
        story.download,
        story.agree,
        story.round_trip,
    ]
    return all([check() for check in checks])  # every step runs, even after a failure


def _rpc(call: Callable[..., T], request: Any, target: str, timeout: float = 60.0) -> T:
    return rpc_call(call, request, target=target, timeout=timeout)


def _wait(what: str, probe: Callable[[], T | None], timeout: float = WAIT_TIMEOUT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise TransferError(f"demo: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


class Story:
    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.say = demo.say
        self.study_uid = ""
        self.transfer_ids: list[str] = []
        self.pseudonym = ""
        self.object_ids: list[str] = []

    def check(self, ok: bool, good: str, bad: str) -> bool:
        self.say(f"  {good}" if ok else f"  CHECK FAILED: {bad}")
        return ok

    # -- 3: the PACS pushes a study ---------------------------------------------------
    def push(self) -> bool:
        node = self.demo.nodes[HOSPITAL]
        with self.demo.step(
            f"PACS pushes a CT study by C-STORE to {HOSPITAL} (DICOM 127.0.0.1:{node.dicom_port})"
        ):
            datasets = ct_series(SLICES)
            self.study_uid = str(datasets[0].StudyInstanceUID)
            pacs = self.demo.root / "pacs"
            pacs.mkdir()
            for ds in datasets:
                ds.save_as(pacs / f"CT{int(ds.InstanceNumber):04d}.dcm", enforce_file_format=True)
            self.say(
                f"  synthetic study: {SLICES} axial slices, 1 mm apart, of the fictitious "
                f"patient {FICTITIOUS_NAME} (no real patient data)",
                f"  study {self.study_uid} (also in pacs/ for storescu)",
            )
            ae = AE(ae_title="PACS")
            ae.add_requested_context(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="YIGONG")
            if not assoc.is_established:
                raise YigongError(f"demo: {HOSPITAL}'s DICOM SCP refused the association")
            statuses = []
            try:
                for ds in datasets:
                    status = assoc.send_c_store(ds)
                    statuses.append(int(status.Status) if status else -1)
            finally:
                assoc.release()
            stored = sum(1 for s in statuses if s == 0)
            return self.check(
                stored == SLICES,
                f"C-STORE: {stored}/{SLICES} instances answered Success (0x0000)",
                f"C-STORE statuses {sorted(set(statuses))}",
            )

    # -- 4: the quiet period ------------------------------------------------------------
    def quiet(self) -> bool:
        with self.demo.step(
            f"Quiet period ({QUIET_PERIOD_SECONDS:g} s without new instances): the study "
            "becomes 'received'"
        ):
            with self.demo.client(HOSPITAL, CLINICIAN) as c:
                stub = hospital_pb2_grpc.HospitalStub(c.channel)
                req = hospital_pb2.GetHospitalStudyRequest(study_uid=self.study_uid)

                def received() -> hospital_pb2.HospitalStudy | None:
                    got = _rpc(stub.GetStudy, req, c.target)
                    return got if got.study.status == "received" else None

                study = _wait("the study's quiet period", received)
            s = study.study
            report = json.loads(s.report_json or "{}")
            for series in report.get("series", []):
                self.say(
                    f"  series {series.get('series_uid')}: {series.get('instance_count')} "
                    f"instances, spacing median {series.get('spacing_median_mm')} mm, "
                    f"gaps {len(series.get('gaps', []))}"
                )
            return self.check(
                s.instance_count == SLICES,
                f"{HOSPITAL} (asked by {CLINICIAN}): status {s.status}, {s.instance_count} "
                f"instances in {s.series_count} series, report sha256 {s.report_sha256[:16]}...",
                f"{HOSPITAL} holds {s.instance_count} instances, expected {SLICES}",
            )

    # -- 5: the clinician confirms ------------------------------------------------------
    def confirm(self) -> bool:
        with self.demo.step(
            f"Clinician {CLINICIAN} confirms the study for case {CASE_ID} -> {FACTORY}"
        ):
            with self.demo.client(HOSPITAL, CLINICIAN) as c:
                stub = hospital_pb2_grpc.HospitalStub(c.channel)
                req = hospital_pb2.ConfirmStudyRequest(
                    study_uid=self.study_uid, case_id=CASE_ID, destination=FACTORY
                )
                reply = _rpc(stub.ConfirmStudy, req, c.target, timeout=300)
            record = json.loads(reply.confirmation.record_json)
            self.transfer_ids = list(reply.transfer_ids)
            released = sum(1 for i in reply.instances for r in i.releases if r.status == "released")
            self.say(
                f"  confirmation {reply.confirmation.confirmation_id}, signed by {HOSPITAL} for "
                f"{record['clinician']['label']}",
                f"  de-identified study uid {record['deid_study_uid']}",
                f"  {released} instances released, {len(self.transfer_ids)} transfers queued",
            )
            began = time.monotonic()
            with self.demo.client(HOSPITAL, OFFICER) as c:
                wanted = set(self.transfer_ids)

                def done() -> list[common_pb2.TransferInfo] | None:
                    found = [
                        t for t in c.list_transfers(case_id=CASE_ID) if t.transfer_id in wanted
                    ]
                    failed = [t for t in found if t.status == "failed"]
                    if failed:
                        raise TransferError(f"transfer failed: {failed[0].last_error}")
                    ok = len(found) == len(wanted) and all(t.status == "done" for t in found)
                    return found if ok else None

                _wait("the transfers to the factory", done)
            return self.check(
                released == SLICES == len(self.transfer_ids),
                f"all {len(wanted)} transfers done, every receipt checked by {HOSPITAL} "
                f"({time.monotonic() - began:.1f} s)",
                f"{released} released and {len(self.transfer_ids)} queued, expected {SLICES}",
            )

    # -- 6: the factory -------------------------------------------------------------
    def arrive(self) -> bool:
        with self.demo.step(
            f"{FACTORY}: the de-identified study arrives and its suitability is checked"
        ):
            with self.demo.client(FACTORY, ENGINEER) as c:
                stub = factory_pb2_grpc.FactoryStub(c.channel)
                req = factory_pb2.ListFactoryStudiesRequest(case_id=CASE_ID)

                def checked() -> factory_pb2.FactoryStudy | None:
                    for s in _rpc(stub.ListStudies, req, c.target).studies:
                        if s.HasField("suitability") and s.suitability.current:
                            return s
                    return None

                study = _wait("the factory's suitability check", checked)
            verdict = study.suitability
            self.say(
                f"  {FACTORY} (asked by {ENGINEER}): case {study.case_id}, study {study.study_uid}",
                f"  {study.instance_count} instances in {study.series_count} series; "
                f"suitability {'PASSED' if verdict.passed else 'FAILED'} "
                f"(max slice thickness {verdict.thresholds.max_slice_thickness_mm:g} mm, "
                f"at least {verdict.thresholds.min_slices} slices)",
                *(f"    finding: {f}" for f in verdict.findings),
            )
            factory_dir = self.demo.root / "data" / FACTORY
            hospital_dir = self.demo.root / "data" / HOSPITAL
            leaks = _files_containing(factory_dir, FICTITIOUS_STRINGS)
            at_hospital = len(_files_containing(hospital_dir, FICTITIOUS_STRINGS))
            ok = self.check(
                study.instance_count == SLICES and verdict.passed,
                f"suitability passed for all {SLICES} instances",
                f"{study.instance_count} instances, suitability passed={verdict.passed}",
            )
            return ok and self.check(
                not leaks and at_hospital > 0,
                f"no trace of the patient's name or ID in any of "
                f"{sum(1 for p in factory_dir.rglob('*') if p.is_file())} files under "
                f"data/{FACTORY} (the originals stay in data/{HOSPITAL}: {at_hospital} files)",
                f"the fictitious patient's name or ID is in {leaks or 'no hospital file'}",
            )

    # -- 7: the engineer downloads ------------------------------------------------------
    def download(self) -> bool:
        with self.demo.step(f"Engineer {ENGINEER} downloads the whole study from {FACTORY}"):
            dest = self.demo.root / "downloads" / CASE_ID
            dest.mkdir(parents=True)
            good, total, names = 0, 0, set()
            with self.demo.client(FACTORY, ENGINEER) as c:
                listed = [
                    o
                    for o in c.list_objects(case_id=CASE_ID)
                    if o.media_type == "application/dicom"
                ]
                for obj in listed:
                    path = dest / f"{obj.object_id[:16]}.dcm"
                    digest, size = c.download(obj.object_id, path)
                    total += size
                    ds = dcmread(io.BytesIO(path.read_bytes()))
                    names.add(str(ds.PatientName))
                    good += digest == obj.object_id == sha256_hex(path.read_bytes())
            self.object_ids = [o.object_id for o in listed]
            self.pseudonym = next(iter(names)) if len(names) == 1 else ""
            self.say(
                f"  downloaded {len(listed)} instances ({total} bytes) into downloads/{CASE_ID}/",
                f"  patient name in every instance: {' / '.join(sorted(names))} "
                "(the case pseudonym)",
            )
            return self.check(
                good == len(listed) == SLICES
                and self.pseudonym.startswith("YG-")
                and not any(s in n for n in names for s in FICTITIOUS_STRINGS),
                f"download verified: {good}/{SLICES} instances match their SHA-256",
                f"{good} of {len(listed)} downloads verified; names {sorted(names)}",
            )

    # -- 8: both sides agree ------------------------------------------------------------
    def agree(self) -> bool:
        with self.demo.step("Both nodes agree: query endpoints and audit logs"):
            sides: dict[str, dict[str, common_pb2.TransferInfo]] = {}
            batches: dict[str, dict[str, query_pb2.BatchInfo]] = {}
            for node_id, who in ((HOSPITAL, OFFICER), (FACTORY, ENGINEER)):
                with self.demo.client(node_id, who) as c:
                    sides[node_id] = {
                        t.transfer_id: t
                        for t in c.list_transfers(case_id=CASE_ID, limit=1000)
                        if t.transfer_id in self.transfer_ids
                    }
                    batches[node_id] = {
                        b.batch_id: b for b in c.list_batches(case_id=CASE_ID, limit=1000)
                    }
            h, f = sides[HOSPITAL], sides[FACTORY]
            same = [
                tid
                for tid in self.transfer_ids
                if tid in h
                and tid in f
                and h[tid].status == f[tid].status == "done"
                and h[tid].object_id == f[tid].object_id
                and h[tid].batch_id == f[tid].batch_id
                and (h[tid].batch_id or _same_receipt(h[tid], f[tid]))
            ]
            ok = self.check(
                len(same) == len(self.transfer_ids),
                f"query: {HOSPITAL} (outbound) and {FACTORY} (inbound) list the same "
                f"{len(same)} transfers, all done",
                f"only {len(same)} of {len(self.transfer_ids)} transfers agree",
            )
            ok = self._manifests_agree(h, batches[HOSPITAL], batches[FACTORY]) and ok
            counts = {}
            for node_id, event in (
                (HOSPITAL, "transfer.completed"),
                (FACTORY, "transfer.received"),
            ):
                cfg = load_config(self.demo.nodes[node_id].config)
                events = read_events(cfg, event=event, limit=10_000)
                counts[node_id] = len({e.transfer_id for e in events} & set(self.transfer_ids))
                cert = pki.load_certificate(cfg.tls.cert)
                report = verify_log(cfg, node_id, verify_signature=_verifier(cert))
                ok = (
                    self.check(
                        report.ok,
                        f"audit {node_id}: {counts[node_id]} '{event}' entries for these "
                        f"transfers; hash chain {report.reason}",
                        f"audit log of {node_id} does not verify: {report.reason}",
                    )
                    and ok
                )
            return ok and self.check(
                counts[HOSPITAL] == counts[FACTORY] == len(self.transfer_ids),
                "both audit logs record every transfer once",
                f"audit counts differ: {counts}",
            )

    def _manifests_agree(
        self,
        ours: dict[str, common_pb2.TransferInfo],
        h: dict[str, query_pb2.BatchInfo],
        f: dict[str, query_pb2.BatchInfo],
    ) -> bool:
        """Transfers sent as one exchange (a batch) are acknowledged by one signed manifest
        receipt: both nodes hold it byte for byte, it verifies against the federation CA
        and lists exactly these transfers with their SHA-256 and size."""
        members: dict[str, dict[str, tuple[str, int]]] = {}
        for t in ours.values():
            if t.batch_id:
                members.setdefault(t.batch_id, {})[t.transfer_id] = (t.object_id, t.size)
        single = len(ours) - sum(map(len, members.values()))
        trust = pki.TrustStore(self.demo.ca, self.demo.ca_dir / pki.CRL_FILE)
        roots = []
        for batch_id, wanted in members.items():
            mine, theirs = h.get(batch_id), f.get(batch_id)
            held = mine.receipt.SerializeToString() if mine and mine.HasField("receipt") else b""
            try:
                if not held or theirs is None or theirs.receipt.SerializeToString() != held:
                    raise ReceiptError(f"batch {batch_id}: the nodes do not hold the same receipt")
                manifest = verify_manifest(
                    held,
                    trust,
                    expect_receiver=FACTORY,
                    expect_sender=HOSPITAL,
                    expect_batch_id=batch_id,
                )
                check_manifest(manifest, wanted)
            except YigongError as exc:
                return self.check(False, "", f"manifest receipt: {exc}")
            roots.append(manifest.body.merkle_root[:16])
        exchanges = (
            "the study went as one exchange" if len(members) == 1 else (f"{len(members)} exchanges")
        )
        return self.check(
            True,
            f"{exchanges}: one signed manifest receipt (Merkle root "
            f"{', '.join(roots) or '-'}…), byte-identical on both nodes, listing every "
            "object's SHA-256"
            + (f"; {single} transfer(s) with their own identical receipt" if single else ""),
            "",
        )

    # -- 9: a file round trip -------------------------------------------------------
    def round_trip(self) -> bool:
        with self.demo.step(
            f"File round trip: {CLINICIAN} sends {PDF_NAME} {HOSPITAL} -> {FACTORY}, "
            f"{ENGINEER} downloads it"
        ):
            payload = clean_pdf(f"Design review for case {CASE_ID}")
            src = self.demo.root / "pacs" / PDF_NAME
            src.write_bytes(payload)
            with self.demo.client(HOSPITAL, CLINICIAN) as c:
                reply = c.submit(src, [FACTORY], case_id=CASE_ID, media_type="application/pdf")
            digest, tid = reply.object.object_id, reply.queued[0].transfer_id
            self.say(f"  object {digest} ({len(payload)} bytes), transfer {tid}")
            with self.demo.client(HOSPITAL, OFFICER) as c:

                def finished() -> common_pb2.TransferInfo | None:
                    t = next(
                        (t for t in c.list_transfers(object_id=digest) if t.transfer_id == tid),
                        None,
                    )
                    if t is not None and t.status == "failed":
                        raise TransferError(f"transfer {tid} failed: {t.last_error}")
                    return t if t is not None and t.status == "done" else None

                mine = _wait(f"transfer {tid}", finished)
            with self.demo.client(FACTORY, ENGINEER) as c:
                theirs = next(t for t in c.get_object(digest).transfers if t.transfer_id == tid)
                dest = self.demo.root / "downloads" / PDF_NAME
                got, size = c.download(digest, dest)
            body = common_pb2.ReceiptBody.FromString(mine.receipt.body)
            try:
                verify_receipt(
                    mine.receipt.SerializeToString(),
                    pki.TrustStore(self.demo.ca, self.demo.ca_dir / pki.CRL_FILE),
                    expect_sha256=digest,
                    expect_sender=HOSPITAL,
                    expect_receiver=FACTORY,
                )
                verified = True
            except YigongError as exc:
                self.say(f"  receipt does not verify: {exc}")
                verified = False
            self.say(
                f"  receipt signed by {body.receiver_node}: sha256 {body.sha256}, {body.size} bytes"
            )
            same_receipt = mine.receipt.SerializeToString() == theirs.receipt.SerializeToString()
            return self.check(
                verified
                and same_receipt
                and got == digest == sha256_hex(payload)
                and size == len(payload),
                f"both sides hold the same receipt; downloaded downloads/{PDF_NAME}: sha256 {got}, "
                "matches the file the hospital sent",
                "the round trip's receipt or download does not match",
            )


def _verifier(cert: Any) -> Callable[[bytes, bytes], None]:
    def verify(data: bytes, signature: bytes) -> None:
        pki.verify_signature(cert, data, signature)

    return verify


def _files_containing(root: Path, needles: tuple[str, ...]) -> list[str]:
    found = []
    encoded = [n.encode() for n in needles]
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if any(n in data for n in encoded):
            found.append(str(path.relative_to(root)))
    return found


def _same_receipt(a: common_pb2.TransferInfo, b: common_pb2.TransferInfo) -> bool:
    """A single-object transfer: both sides hold the same signed receipt."""
    return a.HasField("receipt") and a.receipt.SerializeToString() == b.receipt.SerializeToString()
