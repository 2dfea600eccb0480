"""``yigong demo``: a throwaway two-node federation that runs the product's main path.

Everything is real: a federation CA, node and person certificates, two ``yigong serve``
child processes speaking mTLS gRPC on 127.0.0.1, the hospital's DICOM SCP receiving a
synthetic CT study by C-STORE (pynetdicom plays the PACS), a clinician's confirmation,
de-identification, verified transfers with signed receipts, the factory's suitability
check and an engineer downloading the study. The steps are in :mod:`gateway.demo.steps`.

Ports: both nodes listen on ``127.0.0.1:0`` (the kernel picks a free port, so there is no
pick-then-bind race); so does the hospital's DICOM SCP. The factory starts first; its
ready file names its port, which goes into the hospital's configuration as its one peer.
The factory needs no peer entry: it accepts transfers from any hospital node of the
federation (the role in the certificate decides, see :mod:`gateway.authz`). Once a node
is up, the ports it got are written back into its configuration, so ``yigong ...
--config NODE.toml`` works and a restarted node comes back at the address its peer knows.

Without ``--dir`` the work directory is a new temporary folder, removed at exit (it
holds the throwaway CA's private key) unless ``--keep-running`` leaves the nodes up.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import pki
from gateway.config import render_config
from gateway.errors import YigongError
from gateway.rpc.channel import ClientCredentials
from gateway.rpc.client import NodeClient

log = logging.getLogger(__name__)

HOSPITAL, FACTORY = "hospital-1", "factory-1"
CLINICIAN, ENGINEER, OFFICER = "dr-demo", "eng-1", "officer-1"
FEDERATION, REGION, CASE_ID = "yigong-demo", "cn-east", "demo-case-1"
QUIET_PERIOD_SECONDS = 2.0
READY_TIMEOUT, STOP_TIMEOUT = 60.0, 20.0
TRANSFER_TUNING = "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 2.0"
STEPS = 10


@dataclass
class NodeProc:
    node_id: str
    role: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]
    port: int = 0
    dicom_port: int = 0
    console_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def console_url(self) -> str:
        return f"https://127.0.0.1:{self.console_port}/" if self.console_port else ""

    def info(self) -> dict[str, Any]:
        ports: dict[str, Any] = {"grpc": self.port}
        if self.role == "hospital":
            ports["dicom"] = self.dicom_port
        ports["console"] = self.console_port or None
        out: dict[str, Any] = dict(
            role=self.role,
            address=self.address,
            ports=ports,
            config=str(self.config),
            log=str(self.log),
            pid=self.proc.pid,
        )
        if self.role == "hospital":
            out["dicom"] = {"address": f"127.0.0.1:{self.dicom_port}", "ae_title": "YIGONG"}
        if self.console_port:
            out["console"] = self.console_url
        return out


@dataclass
class Demo:
    root: Path
    keep: bool
    issued: dict[str, pki.IssuedCert] = field(default_factory=dict)
    nodes: dict[str, NodeProc] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    step_no: int = 0

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca(self) -> Path:
        return self.ca_dir / pki.CA_CERT

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, *lines: str) -> None:
        """Human output: stdout, or stderr when stdout carries the --keep-running JSON."""
        print(*lines, sep="\n", file=sys.stderr if self.keep else sys.stdout, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        """A numbered step; its duration is printed when it ends."""
        self.step_no += 1
        self.say("", f"[{self.step_no}/{STEPS}] {title}")
        began = time.monotonic()
        yield
        self.say(f"  ({time.monotonic() - began:.1f} s)")

    def client(self, node_id: str, who: str) -> NodeClient:
        """``who``'s certificate talking to node ``node_id`` (pinned to its certificate)."""
        cert = self.issued[who]
        creds = ClientCredentials.from_files(self.ca, cert.cert_path, cert.key_path)
        return NodeClient(self.nodes[node_id].address, creds, node_id=node_id)

    def certificates(self) -> None:
        pki.create_ca(self.ca_dir, FEDERATION)
        certs, ca = self.root / "certs", self.ca_dir
        self.issued = {
            HOSPITAL: pki.issue_node_cert(ca, HOSPITAL, "hospital", REGION, certs / HOSPITAL),
            FACTORY: pki.issue_node_cert(ca, FACTORY, "factory", REGION, certs / FACTORY),
            CLINICIAN: pki.issue_person_cert(
                ca, CLINICIAN, "clinician", HOSPITAL, certs / CLINICIAN
            ),
            ENGINEER: pki.issue_person_cert(ca, ENGINEER, "engineer", FACTORY, certs / ENGINEER),
            OFFICER: pki.issue_person_cert(ca, OFFICER, "officer", HOSPITAL, certs / OFFICER),
        }
        self.say(f"  {'CA':<11} federation {FEDERATION!r:<21} ca/ca.crt (its key: ca/ca.key)")
        for who, what in (
            (HOSPITAL, f"hospital node, {REGION}"),
            (FACTORY, f"factory node, {REGION}"),
            (CLINICIAN, f"clinician at {HOSPITAL}"),
            (ENGINEER, f"engineer at {FACTORY}"),
            (OFFICER, f"officer at {HOSPITAL}"),
        ):
            self.say(f"  {who:<11} {what:<32} {self.issued[who].cert_path.relative_to(self.root)}")

    def write_config(
        self,
        node_id: str,
        role: str,
        peers: list[tuple[str, str]],
        listen: str,
        dicom_listen: str = "127.0.0.1:0",
        console_listen: str = "127.0.0.1:0",
    ) -> Path:
        config, cert = self.root / f"{node_id}.toml", self.issued[node_id]
        dicom = {"listen": dicom_listen, "quiet_period_seconds": QUIET_PERIOD_SECONDS}
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
                dicom=dicom if role == "hospital" else None,
                console_listen=console_listen,
            )
        )
        return config

    def start_node(self, node_id: str, role: str, peers: list[tuple[str, str]]) -> None:
        """Start ``yigong serve`` on port 0, wait for its ready file, then pin the ports it
        got in its configuration (so ``--config`` and a restart find it at the same address)."""
        config = self.write_config(node_id, role, peers, "127.0.0.1:0")
        ready, log_path = self.root / "run" / f"{node_id}.ready", self.root / f"logs/{node_id}.log"
        ready.parent.mkdir(exist_ok=True)
        log_path.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "yigong_node", "-v", "serve", str(config)]
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                [*cmd, "--ready-file", str(ready)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=self.keep,  # detached: survives this process and its terminal
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        node = self.nodes[node_id] = NodeProc(node_id, role, config, log_path, proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None and not ready.exists():
            time.sleep(0.05)
        if not ready.exists():
            why = (
                f"exited with status {proc.returncode} before it was ready"
                if proc.poll() is not None
                else f"was not ready after {READY_TIMEOUT:.0f} s"
            )
            raise YigongError(f"node {node_id} {why}; end of {log_path}:\n{tail(log_path)}")
        info = json.loads(ready.read_text())
        node.port, node.dicom_port = int(info["port"]), int(info.get("dicom_port", 0))
        node.console_port = int(info.get("console_port", 0))
        self.write_config(
            node_id,
            role,
            peers,
            node.address,
            f"127.0.0.1:{node.dicom_port}",
            f"127.0.0.1:{node.console_port}",
        )
        extra = f"  DICOM 127.0.0.1:{node.dicom_port} (AE YIGONG)" if node.dicom_port else ""
        extra += f"  peer {peers[0][0]} at {peers[0][1]}" if peers else ""
        extra += f"  console {node.console_url}" if node.console_port else ""
        log_name = log_path.relative_to(self.root)
        self.say(f"  {node_id:<11} {node.address:<16} pid {proc.pid:<7} log {log_name}{extra}")

    def stop_command(self) -> str:
        return "kill " + " ".join(str(n.proc.pid) for n in self.nodes.values())

    def describe(self) -> dict[str, Any]:
        """The --keep-running document: where everything is and how to use it."""

        def cert(who: str) -> dict[str, str]:
            c = self.issued[who]
            return {"cert": str(c.cert_path), "key": str(c.key_path), "ca": str(self.ca)}

        def person(who: str) -> dict[str, str]:
            """A person's files, with a PKCS#12 to import into a browser for the console."""
            p12, password = pki.write_person_pkcs12(self.issued[who])
            return {**cert(who), "p12": str(p12), "p12_password_file": str(password)}

        def cli(command: str, node_id: str, who: str) -> str:
            c = self.issued[who]
            words = ["yigong", *command.split(), "--address", self.nodes[node_id].address]
            words += ["--cert", str(c.cert_path), "--key", str(c.key_path), "--ca", str(self.ca)]
            return shlex.join([*words, "--node-id", node_id])

        hospital = self.nodes[HOSPITAL]
        return {
            "dir": str(self.root),
            "nodes": {node_id: self.nodes[node_id].info() for node_id in (HOSPITAL, FACTORY)},
            "certificates": {
                "ca": {"cert": str(self.ca), "crl": str(self.ca_dir / pki.CRL_FILE)},
                "hospital": cert(HOSPITAL),
                "factory": cert(FACTORY),
                "clinician": person(CLINICIAN),
                "engineer": person(ENGINEER),
                "officer": person(OFFICER),
            },
            "ca_dir": str(self.ca_dir),
            "case": CASE_ID,
            "examples": [
                cli("query objects", FACTORY, ENGINEER),
                cli("query transfers", FACTORY, ENGINEER),
                cli("factory studies", FACTORY, ENGINEER),
                cli("query transfers", HOSPITAL, OFFICER),
                cli("study list", HOSPITAL, CLINICIAN),
                shlex.join(["yigong", "query", "transfers", "--config", str(hospital.config)]),
                f"/usr/bin/storescu -aec YIGONG -aet PACS 127.0.0.1 {hospital.dicom_port} "
                "+sd STUDY_DIR",
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


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError as exc:
        return f"(cannot read: {exc.strerror})"
