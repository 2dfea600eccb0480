"""``yigong demo``: a throwaway two-node federation that sends one file and shows the record.

Everything is real: a federation CA, node and person certificates, two ``yigong serve``
child processes speaking mTLS gRPC on 127.0.0.1, a verified transfer with a signed receipt.

Ports: both nodes listen on ``127.0.0.1:0`` (the kernel picks a free port, so there is no
pick-then-bind race). The factory starts first; its ready file names its port, which goes
into the hospital's configuration as its one peer. The factory needs no peer entry: it
accepts transfers from any hospital node of the federation (the role in the certificate
decides, see :mod:`gateway.authz`) and sends nothing in this demo. Once a node is up, the
port it got is written back into its configuration, so ``yigong ... --config NODE.toml``
works and a restarted node comes back at the address its peer knows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import pki
from gateway.client import NodeClient
from gateway.config import render_config
from gateway.errors import ConfigError, TransferError, YigongError
from gateway.hashing import sha256_hex
from gateway.rpc.channel import ClientCredentials
from gateway.transfer.receipts import verify_receipt
from yigong.v1 import common_pb2

log = logging.getLogger(__name__)

HOSPITAL, FACTORY, ENGINEER, OFFICER = "hospital-1", "factory-1", "eng-1", "officer-1"
FEDERATION, REGION, CASE_ID = "yigong-demo", "cn-east", "demo-case-1"
SAMPLE_NAME, SAMPLE_BYTES, SAMPLE_SEED = "sample-design-review.pdf", 1024 * 1024, 20190101


def sample_payload() -> bytes:
    """The demo's file: a design-review PDF with SAMPLE_BYTES of synthetic data in one
    stream (a hospital may send only allowed, clean types; no patient data)."""
    data = random.Random(SAMPLE_SEED).randbytes(SAMPLE_BYTES)
    page = b"BT /F1 12 Tf 20 100 Td (yigong demo: design review) Tj ET"
    bodies = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(page) + page + b"\nendstream",
        b"<< /Length %d >>\nstream\n" % len(data) + data + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for n, body in enumerate(bodies, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(bodies) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(bodies) + 1,
        xref,
    )
    return bytes(out)
READY_TIMEOUT, TRANSFER_TIMEOUT, STOP_TIMEOUT = 30.0, 60.0, 20.0
TRANSFER_TUNING = "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 2.0"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="run a throwaway hospital + factory federation here and send a file"
    )
    p.add_argument(
        "--dir", type=Path, help="work directory, new or empty (default: a new temporary one)"
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave both nodes running; print one JSON document about them on stdout",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    demo = Demo(_prepare_dir(args.dir), keep=bool(args.keep_running))
    try:
        ok = demo.run()
    except BaseException:
        demo.stop()
        raise
    if demo.keep and ok:
        demo.say(f"  both nodes keep running (detached); to stop them: {demo.stop_command()}")
        print(json.dumps(demo.describe(), indent=2), flush=True)
        return 0
    demo.stop()
    demo.say(
        f"\nEverything is in {demo.root}:",
        "  ca/ (throwaway federation CA)  certs/  hospital-1.toml  factory-1.toml",
        "  data/ (object stores, catalogs, audit logs)  logs/  run/  sample/  downloads/",
    )
    return 0 if ok else 1


def _prepare_dir(arg: Path | None) -> Path:
    if arg is None:
        return Path(tempfile.mkdtemp(prefix="yigong-demo-")).resolve()
    root = arg.expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"demo directory {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            f"demo directory {root} is not empty; give a new or empty directory with --dir "
            "(the demo never touches existing files)"
        )
    if any(c in str(root) for c in '"\\') or not str(root).isprintable():
        raise ConfigError(
            f"demo directory {root}: quotes, backslashes and control characters are not "
            "supported (the path is written into TOML files)"
        )
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class NodeProc:
    node_id: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def info(self) -> dict[str, Any]:
        return dict(
            address=self.address, config=str(self.config), log=str(self.log), pid=self.proc.pid
        )


@dataclass
class Demo:
    root: Path
    keep: bool
    issued: dict[str, pki.IssuedCert] = field(default_factory=dict)
    nodes: dict[str, NodeProc] = field(default_factory=dict)

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca(self) -> Path:
        return self.ca_dir / pki.CA_CERT

    def say(self, *lines: str) -> None:
        """Human output: stdout, or stderr when stdout carries the --keep-running JSON."""
        print(*lines, sep="\n", file=sys.stderr if self.keep else sys.stdout, flush=True)

    def client(self, node_id: str, who: str) -> NodeClient:
        """``who``'s certificate talking to node ``node_id`` (pinned to its certificate)."""
        cert = self.issued[who]
        creds = ClientCredentials.from_files(self.ca, cert.cert_path, cert.key_path)
        return NodeClient(self.nodes[node_id].address, creds, node_id=node_id)

    def run(self) -> bool:
        """Steps 1-5; True when every check passed."""
        self.say(f"== yigong demo: a throwaway federation in {self.root} ==", "")
        self.certificates()
        self.say("", "[2/6] Nodes: real `yigong serve` processes, mTLS gRPC on 127.0.0.1")
        (self.root / "logs").mkdir()
        self.start_node(FACTORY, "factory", peers=[])
        self.start_node(HOSPITAL, "hospital", peers=[(FACTORY, self.nodes[FACTORY].address)])
        digest, transfer_id, payload = self.send()
        ok = self.show(digest, transfer_id)
        ok = self.engineer(digest, payload) and ok
        self.say("", "[6/6] " + ("Leaving both nodes running" if self.keep and ok else "Stop"))
        return ok

    def certificates(self) -> None:
        self.say("[1/6] Federation CA and certificates")
        pki.create_ca(self.ca_dir, FEDERATION)
        certs, ca = self.root / "certs", self.ca_dir
        self.issued = {
            HOSPITAL: pki.issue_node_cert(ca, HOSPITAL, "hospital", REGION, certs / HOSPITAL),
            FACTORY: pki.issue_node_cert(ca, FACTORY, "factory", REGION, certs / FACTORY),
            ENGINEER: pki.issue_person_cert(ca, ENGINEER, "engineer", FACTORY, certs / ENGINEER),
            OFFICER: pki.issue_person_cert(ca, OFFICER, "officer", HOSPITAL, certs / OFFICER),
        }
        self.say(f"  {'CA':<11} federation {FEDERATION!r:<21} ca/ca.crt (its key: ca/ca.key)")
        for who, what in (
            (HOSPITAL, f"hospital node, {REGION}"),
            (FACTORY, f"factory node, {REGION}"),
            (ENGINEER, f"engineer at {FACTORY}"),
            (OFFICER, f"officer at {HOSPITAL}"),
        ):
            self.say(f"  {who:<11} {what:<32} {self.issued[who].cert_path.relative_to(self.root)}")

    def write_config(
        self, node_id: str, role: str, peers: list[tuple[str, str]], listen: str
    ) -> Path:
        config, cert = self.root / f"{node_id}.toml", self.issued[node_id]
        config.write_text(
            render_config(
                node_id=node_id,
                role=role,
                region=REGION,
                data_dir=self.root / "data" / node_id,
                ca=self.ca,
                cert=cert.cert_path,
                key=cert.key_path,
                crl=self.ca_dir / pki.CRL_FILE,
                listen=listen,
                peers=peers,
                extra=TRANSFER_TUNING,
                dicom={"listen": "127.0.0.1:0"} if role == "hospital" else None,
            )
        )
        return config

    def start_node(self, node_id: str, role: str, peers: list[tuple[str, str]]) -> None:
        """Start ``yigong serve`` on port 0, wait for its ready file, then pin the port it got
        in its configuration (so ``--config`` and a restart find it at the same address)."""
        config = self.write_config(node_id, role, peers, "127.0.0.1:0")
        ready, log_path = self.root / "run" / f"{node_id}.ready", self.root / f"logs/{node_id}.log"
        ready.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "gateway.cli", "-v", "serve", str(config)]
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                [*cmd, "--ready-file", str(ready)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=self.keep,  # detached: survives this process and its terminal
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        node = self.nodes[node_id] = NodeProc(node_id, config, log_path, proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None and not ready.exists():
            time.sleep(0.05)
        if not ready.exists():
            why = (
                f"exited with status {proc.returncode} before it was ready"
                if proc.poll() is not None
                else f"was not ready after {READY_TIMEOUT:.0f} s"
            )
            raise YigongError(f"node {node_id} {why}; end of {log_path}:\n{_tail(log_path)}")
        node.port = int(json.loads(ready.read_text())["port"])
        self.write_config(node_id, role, peers, node.address)
        peer = f"  peer {peers[0][0]} at {peers[0][1]}" if peers else ""
        log_name = log_path.relative_to(self.root)
        self.say(f"  {node_id:<11} {node.address:<16} pid {proc.pid:<7} log {log_name}{peer}")

    def send(self) -> tuple[str, str, bytes]:
        sample = self.root / "sample" / SAMPLE_NAME
        sample.parent.mkdir()
        payload = sample_payload()
        sample.write_bytes(payload)
        self.say(
            "",
            f"[3/6] Send {SAMPLE_NAME} ({len(payload)} bytes, synthetic, no patient data) "
            f"{HOSPITAL} -> {FACTORY}",
        )
        started = time.monotonic()
        with self.client(HOSPITAL, HOSPITAL) as hc:
            reply = hc.submit(sample, [FACTORY], case_id=CASE_ID)
            digest, transfer_id = reply.object.object_id, reply.queued[0].transfer_id
            self.say(
                f"  submitted with {HOSPITAL}'s own certificate, case {CASE_ID}",
                f"  object   {digest}",
                f"  transfer {transfer_id} queued",
            )
            self.wait_done(hc, transfer_id)
        elapsed = time.monotonic() - started
        self.say(f"  transfer done, receipt verified by {HOSPITAL} ({elapsed:.1f} s)")
        return digest, transfer_id, payload

    def wait_done(self, client: NodeClient, transfer_id: str) -> None:
        deadline, last = time.monotonic() + TRANSFER_TIMEOUT, None
        while time.monotonic() < deadline:
            found = client.list_transfers(direction="outbound")
            last = next((t for t in found if t.transfer_id == transfer_id), None)
            if last is not None and last.status in {"done", "failed"}:
                break
            time.sleep(0.1)
        if last is not None and last.status == "done":
            return
        state, path = "not listed", self.nodes[HOSPITAL].log
        if last is not None:
            state = f"status {last.status}, attempts {last.attempts}, error: {last.last_error}"
        raise TransferError(
            f"transfer {transfer_id} did not finish within {TRANSFER_TIMEOUT:.0f} s ({state}); "
            f"end of {path}:\n{_tail(path)}"
        )

    def show(self, digest: str, transfer_id: str) -> bool:
        """Print what both query endpoints say; True when both sides hold the same record."""
        self.say("", "[4/6] What the query endpoints of both nodes show")
        sides: dict[str, common_pb2.TransferInfo] = {}
        for node_id, who in ((HOSPITAL, OFFICER), (FACTORY, ENGINEER)):
            with self.client(node_id, who) as c:
                detail = c.get_object(digest)
            o = detail.object
            self.say(
                f"  {node_id} (asked by {who}):",
                f"    object    sha256 {o.object_id}",
                f"              {o.size} bytes, {o.name}, case {o.case_id}, from {o.origin_node}",
            )
            for t in detail.transfers:
                if t.transfer_id != transfer_id:
                    continue
                sides[node_id] = t
                to = "to" if t.direction == "outbound" else "from"
                self.say(
                    f"    transfer  {t.transfer_id} {t.direction} {to} {t.peer_node}: {t.status}"
                )
                if t.HasField("receipt"):
                    b, sig = common_pb2.ReceiptBody.FromString(t.receipt.body), t.receipt.signature
                    self.say(
                        f"    receipt   receiver {b.receiver_node}, sha256 {b.sha256}",
                        f"              {b.size} bytes, completed {b.completed_at}",
                        f"              signature {sig[:16].hex()}... ({len(sig)} bytes)",
                    )
        return self.compare(sides, digest)

    def compare(self, sides: dict[str, common_pb2.TransferInfo], digest: str) -> bool:
        h, f = sides.get(HOSPITAL), sides.get(FACTORY)
        if h is None or f is None or not (h.HasField("receipt") and f.HasField("receipt")):
            self.say("  CHECK FAILED: the transfer or its receipt is missing on one side")
            return False
        sha_h = common_pb2.ReceiptBody.FromString(h.receipt.body).sha256
        sha_f = common_pb2.ReceiptBody.FromString(f.receipt.body).sha256
        same_sha = sha_h == sha_f == h.object_id == f.object_id == digest
        same_sig = h.receipt.signature == f.receipt.signature and h.receipt.body == f.receipt.body
        try:
            verify_receipt(
                h.receipt.SerializeToString(),
                pki.TrustStore(self.ca, self.ca_dir / pki.CRL_FILE),
                expect_sha256=digest,
                expect_sender=HOSPITAL,
                expect_receiver=FACTORY,
            )
            verified = f"signed by {FACTORY}, verifies against the federation CA"
        except YigongError as exc:
            verified, same_sig = f"DOES NOT VERIFY: {exc}", False
        self.say(
            f"  SHA-256 is identical on both sides: {digest}"
            if same_sha
            else f"  CHECK FAILED: SHA-256 differs: {HOSPITAL} {sha_h}, {FACTORY} {sha_f}",
            f"  receipt signature bytes are identical on both sides ({verified})"
            if same_sig
            else f"  CHECK FAILED: the receipts of the two sides differ ({verified})",
        )
        return same_sha and same_sig

    def engineer(self, digest: str, payload: bytes) -> bool:
        """The engineering-tool path: eng-1 lists and downloads the object from the factory."""
        self.say("", f"[5/6] Engineering-tool path: {ENGINEER} lists and downloads from {FACTORY}")
        dest = self.root / "downloads" / SAMPLE_NAME
        dest.parent.mkdir()
        with self.client(FACTORY, ENGINEER) as ec:
            listed = ec.list_objects(case_id=CASE_ID)
            got, size = ec.download(digest, dest)
        names = ", ".join(f"{o.name} ({o.object_id[:16]}...)" for o in listed)
        same = got == digest == sha256_hex(payload) and size == len(payload)
        self.say(
            f"  {FACTORY} lists {len(listed)} object(s) for case {CASE_ID}: {names}",
            f"  downloaded downloads/{SAMPLE_NAME}: {size} bytes, sha256 {got}",
            f"  {'matches' if same else 'CHECK FAILED: does not match'} the file the hospital sent",
        )
        return same

    def stop_command(self) -> str:
        return "kill " + " ".join(str(n.proc.pid) for n in self.nodes.values())

    def describe(self) -> dict[str, Any]:
        """The --keep-running document: where everything is and how to use it."""

        def person(who: str) -> dict[str, str]:
            c = self.issued[who]
            return {"cert": str(c.cert_path), "key": str(c.key_path), "ca": str(self.ca)}

        def cli(command: str, node_id: str, who: str) -> str:
            c = self.issued[who]
            words = ["yigong", *command.split(), "--address", self.nodes[node_id].address]
            words += ["--cert", str(c.cert_path), "--key", str(c.key_path), "--ca", str(self.ca)]
            return shlex.join([*words, "--node-id", node_id])

        return {
            "dir": str(self.root),
            "nodes": {node_id: self.nodes[node_id].info() for node_id in (HOSPITAL, FACTORY)},
            "certificates": {"engineer": person(ENGINEER), "officer": person(OFFICER)},
            "ca_dir": str(self.ca_dir),
            "examples": [
                cli("query objects", FACTORY, ENGINEER),
                cli("query transfers", FACTORY, ENGINEER),
                cli("query transfers", HOSPITAL, OFFICER),
                cli(f"send FILE --to {FACTORY} --case {CASE_ID}", HOSPITAL, HOSPITAL),
                shlex.join(
                    ["yigong", "query", "transfers", "--config", str(self.nodes[HOSPITAL].config)]
                ),
            ],
            "stop": self.stop_command(),
        }

    def stop(self) -> None:
        """SIGTERM every node this demo started (hospital first), wait for each to exit."""
        for node in reversed(list(self.nodes.values())):
            proc = node.proc
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM; killing it", node.node_id, proc.pid)
                    proc.kill()
                    proc.wait()
            self.say(f"  stopped {node.node_id} (pid {proc.pid}, exit status {proc.returncode})")
        self.nodes.clear()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError as exc:
        return f"(cannot read: {exc.strerror})"
