"""The CLI as a new user meets it: which node answers, clear one-line errors, help texts,
``yigong config check`` and ``yigong pki crl``. Real nodes, real mTLS."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import pki
from gateway.errors import RevokedCertificate
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.outbound_files import clean_pdf
from yigong_node.cli import build_parser, main

Pair = tuple[InProcessNode, InProcessNode]


@pytest.fixture(autouse=True)
def _no_yigong_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("YIGONG_"):
            monkeypatch.delenv(name)


def _person(fed: Federation, node: InProcessNode, name: str, role: str) -> list[str]:
    org = node.node.cfg.node.id
    issued = fed.person(name, role, org)
    return [
        "--address",
        node.address,
        "--cert",
        str(issued.cert_path),
        "--key",
        str(issued.key_path),
        "--ca",
        str(fed.ca),
    ]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one ``error:`` line, no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


# --- connection resolution ---------------------------------------------------------------


def test_config_wins_over_yigong_environment_and_names_the_node(
    pair: Pair,
    federation: Federation,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    eng = federation.person("eng-env", "engineer", "factory-1")
    monkeypatch.setenv("YIGONG_ADDRESS", factory.address)
    monkeypatch.setenv("YIGONG_NODE_ID", "factory-1")
    monkeypatch.setenv("YIGONG_CERT", str(eng.cert_path))
    monkeypatch.setenv("YIGONG_KEY", str(eng.key_path))
    monkeypatch.setenv("YIGONG_CA", str(federation.ca))
    argv = ["query", "transfers", "--config", str(hospital.config), "--address", hospital.address]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    assert "note: --config given; ignoring YIGONG_ADDRESS, YIGONG_NODE_ID, YIGONG_CERT" in err
    assert (
        f"node hospital-1 (hospital, region cn-east) at {hospital.address}, as node:hospital-1"
        in err
    )
    assert "factory-1" not in err
    # Without --config the environment is used, and the answer names the factory.
    code, _, err = _run(["query", "objects"], capsys)
    assert code == 0, err
    who = "as engineer:eng-env@factory-1"
    assert f"node factory-1 (factory, region cn-east) at {factory.address}, {who}" in err


def test_conflicting_connection_options_are_refused(
    pair: Pair,
    federation: Federation,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    eng = federation.person("eng-mix", "engineer", "factory-1")
    cfg = ["--config", str(hospital.config), "--address", hospital.address]
    code, _, err = _run(["query", "objects", *cfg, "--cert", str(eng.cert_path)], capsys)
    assert code == 2
    assert "--cert cannot be combined with --config" in _one_error_line(err)
    code, _, err = _run(["query", "objects", *cfg, "--node-id", "factory-1"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "--node-id factory-1 contradicts --config" in line and "node hospital-1" in line

    monkeypatch.setenv("YIGONG_NODE_ID", "factory-1")
    monkeypatch.setenv("YIGONG_ADDRESS", factory.address)
    person = _person(federation, hospital, "olga-mix", "officer")
    code, _, err = _run(["query", "objects", *person], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"--address {hospital.address} with YIGONG_NODE_ID=factory-1" in line
    assert "unset YIGONG_NODE_ID" in line

    monkeypatch.delenv("YIGONG_NODE_ID")
    monkeypatch.setenv("YIGONG_KEY", str(eng.key_path))
    code, _, err = _run(
        ["query", "objects", "--cert", str(eng.cert_path), "--ca", str(federation.ca)], capsys
    )
    assert code == 2
    assert "--cert on the command line with YIGONG_KEY from the environment" in _one_error_line(err)


def test_missing_connection_names_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["query", "objects", "--address", "127.0.0.1:1"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "--config NODE.toml, or --address HOST:PORT" in line
    assert "missing: --cert (or YIGONG_CERT), --key (or YIGONG_KEY), --ca (or YIGONG_CA)" in line


# --- errors explained before anything is sent ----------------------------------------------


def test_key_of_another_certificate_is_detected_before_connecting(
    pair: Pair, federation: Federation, tmp_path: Path
) -> None:
    _, factory = pair
    eng = federation.person("eng-key", "engineer", "factory-1")
    other = federation.person("olga-key", "officer", "hospital-1")
    argv = ["query", "objects", "--address", factory.address, "--cert", str(eng.cert_path)]
    argv += ["--key", str(other.key_path), "--ca", str(federation.ca), "--node-id", "factory-1"]
    run = subprocess.run(
        [sys.executable, "-m", "yigong_node", *argv], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"error: private key {other.key_path} does not belong to certificate {eng.cert_path} "
        "(their public keys differ): give the .key file written next to this .crt by "
        "'yigong pki issue-...'"
    ]


def test_port_in_use_is_one_line_without_grpc_core_log(pair: Pair, tmp_path: Path) -> None:
    _, factory = pair
    config = tmp_path / "clash.toml"
    text = factory.config.read_text().replace('"127.0.0.1:0"', f'"{factory.address}"')
    config.write_text(text.replace("factory-1-data", "clash-data"))
    run = subprocess.run(
        [sys.executable, "-m", "yigong_node", "serve", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"error: {config}: cannot listen on {factory.address}")
    assert "is another process using the port" in line and "GRPC_VERBOSITY" not in line


def test_role_mismatched_commands_are_explained(
    pair: Pair, federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, factory = pair
    code, _, err = _run(
        ["study", "list", *_person(federation, factory, "eng-r", "engineer")], capsys
    )
    assert code == 2
    assert _one_error_line(err) == (
        "error: factory-1 is a factory node; `study` commands are for hospital nodes "
        "(give the address or --config of a hospital node)"
    )
    officer = _person(federation, hospital, "olga-r", "officer")
    code, _, err = _run(["factory", "studies", *officer], capsys)
    assert code == 2
    assert "hospital-1 is a hospital node; `factory` commands are for factory nodes" in err


def test_wrong_or_missing_node_id_gets_a_hint(
    pair: Pair, federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, factory = pair
    eng = _person(federation, factory, "eng-n", "engineer")
    code, _, err = _run(["query", "objects", *eng, "--node-id", "hospital-1"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert f"the node at {factory.address} is factory-1 (factory node), not hospital-1" in line
    assert "--node-id factory-1" in line
    # A node reached at an address its certificate does not name: the id is the fix.
    wide = InProcessNode(
        write_config(federation, tmp_path / "wide", "factory-1", "factory", listen="0.0.0.0:0")
    )
    try:
        other_host = f"127.0.0.2:{wide.port}"
        argv = ["query", "objects", *eng]
        argv[argv.index(factory.address)] = other_host
        code, _, err = _run(argv, capsys)
        assert code == 2
        line = _one_error_line(err)
        assert "does not name the host '127.0.0.2'" in line
        assert "pass --node-id factory-1" in line
        code, _, err = _run([*argv, "--node-id", "factory-1"], capsys)
        assert code == 0, err
        assert f"node factory-1 (factory, region cn-east) at {other_host}" in err
    finally:
        wide.stop()


def test_nothing_listening_and_dicom_port_are_explained(
    pair: Pair, federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    argv = ["query", "objects", *_person(federation, hospital, "olga-p", "officer")]
    argv[argv.index(hospital.address)] = "127.0.0.1:1"
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert "nothing listens at 127.0.0.1:1" in _one_error_line(err)
    dicom_port = hospital.node.hooks.dicom_port  # type: ignore[attr-defined]
    argv[argv.index("127.0.0.1:1")] = f"127.0.0.1:{dicom_port}"
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert "is this a yigong node's gRPC port (not its DICOM port)?" in _one_error_line(err)


def test_download_of_an_unknown_object_into_a_directory_is_one_error_line(
    pair: Pair, federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, factory = pair
    eng = _person(federation, factory, "eng-d", "engineer")
    out_dir = tmp_path / "downloads"
    out_dir.mkdir()
    code, _, err = _run(["query", "download", "ab" * 32, "-o", f"{out_dir}/", *eng], capsys)
    assert code != 0
    assert f"object {'ab' * 32} is not in the catalog" in _one_error_line(err)
    assert list(out_dir.iterdir()) == []  # nothing written, not even a .part


def test_transfers_table_shows_the_last_error(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    src = tmp_path / "report.pdf"
    src.write_bytes(clean_pdf())
    with hospital.self_client() as client:
        tid = client.submit(src, ["factory-1"], case_id="case-e").queued[0].transfer_id
    # the factory is up: let the send finish first, or its success clears the error set here
    wait_for(
        lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done",
        what=f"transfer {tid} done",
    )
    with hospital.node.catalog.transaction() as db:
        db.execute(
            "UPDATE transfers SET last_error = ? WHERE transfer_id = ?",
            ("peer factory-1 unavailable:\nconnection refused", tid),
        )
    cfg = ["--config", str(hospital.config), "--address", hospital.address]
    code, out, _ = _run(["query", "transfers", *cfg], capsys)
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split()[-2:] == ["LAST", "ERROR"]
    assert row.startswith(tid) and row.endswith("peer factory-1 unavailable: connection refused")


# --- every command: bad input gives one error line ------------------------------------------


def _leaves(
    parser: argparse.ArgumentParser, path: list[str]
) -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, [*path, name])


NO_INPUT = {("case", "types"), ("case", "template")}
"""Commands that take no input, or only one of a fixed list (nothing to get wrong:
``case template TYPE`` prints the example of a valid TYPE)."""


def test_every_command_answers_bad_input_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("this is not TOML, PEM, JSON or a directory = [\n")
    seen = 0
    for path, parser in _leaves(build_parser(), []):
        if tuple(path) in NO_INPUT:
            continue
        argv = list(path)
        options = {o for a in parser._actions for o in a.option_strings}
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not (
                action.required or not action.option_strings
            ):
                continue
            value = str(garbage) if action.type is Path else "bogus"
            if action.choices:
                value = str(next(iter(action.choices)))
            elif action.type is int or action.type is float:
                value = "1"
            if action.option_strings:
                argv += [action.option_strings[-1], value]
            elif action.nargs in ("+", "*"):
                argv += [value]
            else:
                argv.append(value)
        if "--config" in options and "--config" not in argv:
            argv += ["--config", str(garbage)]
        if "--dir" in options and "--dir" not in argv:
            argv += ["--dir", str(garbage)]
        code, out, err = _run(argv, capsys)
        assert code != 0, argv
        if out.startswith("FAIL  configuration:"):  # config check reports on stdout
            err = "error: " + out
        assert "error:" in err, (argv, code, out)
        line = _one_error_line(err)
        assert line.startswith("error:") or ": error:" in line, (argv, err)
        seen += 1
    assert seen >= 30


def test_every_option_and_argument_has_help_text() -> None:
    missing = []
    for path, parser in _leaves(build_parser(), ["yigong"]):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


# --- config check and the CRL ---------------------------------------------------------------


def test_config_check_passes_on_a_working_node(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, factory = pair
    from tests.cluster import pin_port

    pin_port(factory.config, factory.port)
    code, out, _ = _run(["config", "check", str(hospital.config)], capsys)
    assert code == 0, out
    lines = out.splitlines()
    for what in (
        "configuration",
        "CA certificate",
        "node certificate",
        "revocation list",
        "storage",
        "catalog",
        "audit log",
        "peer factory-1",
    ):
        assert any(line.startswith("OK") and f"  {what}: " in line for line in lines), (what, out)
    assert f"peer factory-1: {factory.address}: node factory-1 (factory, cn-east), SERVING" in out
    assert lines[-1] == "hospital-1: every check passed"


def test_config_check_says_what_is_wrong(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": "127.0.0.1:1"}
    )
    good = config.read_text()
    # A peer nobody listens at.
    code, out, _ = _run(["config", "check", str(config), "--timeout", "2"], capsys)
    assert code == 1
    (fail,) = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fail.startswith("FAIL  peer factory-1: nothing listens at 127.0.0.1:1")
    assert out.splitlines()[-1] == "hospital-1: 1 check(s) FAILED"
    # Another node's key, and a CRL path where no CRL was put.
    other = federation.node("hospital-9", "hospital")
    text = good.replace(
        str(federation.node("hospital-1", "hospital").key_path), str(other.key_path)
    )
    config.write_text(text.replace(str(federation.crl), str(tmp_path / "nowhere" / "crl.pem")))
    code, out, _ = _run(["config", "check", str(config)], capsys)
    assert code == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2, out
    assert "node certificate" in fails[0] and "does not belong to certificate" in fails[0]
    assert "revocation list" in fails[1] and "does not exist" in fails[1]
    assert "yigong pki crl --ca-dir CA --out PATH" in fails[1]
    assert "WARN  peers: not contacted (fix the node certificate first)" in out
    # An unknown key: the loader's message, and nothing else is checked.
    config.write_text(good.replace("[server]\n", "[server]\nlisten_port = 1\n"))
    code, out, _ = _run(["config", "check", str(config)], capsys)
    assert code == 1
    (line,) = out.splitlines()
    assert line.startswith("FAIL  configuration:") and "listen_port" in line


def test_node_certificate_of_another_node_fails_the_check(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(federation, tmp_path, "hospital-1", "hospital")
    mine = federation.node("hospital-1", "hospital")
    other = federation.node("factory-7", "factory")
    text = config.read_text().replace(str(mine.cert_path), str(other.cert_path))
    config.write_text(text.replace(str(mine.key_path), str(other.key_path)))
    code, out, _ = _run(["config", "check", str(config), "--no-peers"], capsys)
    assert code == 1
    assert (
        "is the certificate of node:factory-7 (role factory, region cn-east), but [node] "
        "says hospital-1, hospital, cn-east" in out
    )


def test_pki_crl_refreshes_and_copies_the_revocation_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir = tmp_path / "ca"
    pki.create_ca(ca_dir, "crlfed")
    person = pki.issue_person_cert(ca_dir, "mallory", "engineer", "factory-1", tmp_path / "m")
    pki.revoke(ca_dir, person.serial, "key_compromise")
    before = pki.crl_info(ca_dir / pki.CRL_FILE, ca_dir / pki.CA_CERT)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    code, out, _ = _run(
        [
            "pki",
            "crl",
            "--ca-dir",
            str(ca_dir),
            "--out",
            str(node_dir),
            "--out",
            str(tmp_path / "other.pem"),
        ],
        capsys,
    )
    assert code == 0
    assert "1 revoked, valid until" in out
    assert f"wrote {node_dir / 'crl.pem'} (copy of the revocation list)" in out
    after = pki.crl_info(node_dir / "crl.pem", ca_dir / pki.CA_CERT)
    assert after[0] == 1 and after[1] >= before[1]
    assert (tmp_path / "other.pem").read_bytes() == (ca_dir / "crl.pem").read_bytes()
    store = pki.TrustStore(ca_dir / pki.CA_CERT, node_dir / "crl.pem")
    with pytest.raises(RevokedCertificate):
        store.verify(pki.load_certificate(person.cert_path))
    shutil.rmtree(ca_dir)


def test_serve_with_a_missing_crl_says_once_where_to_put_it(
    federation: Federation, tmp_path: Path
) -> None:
    config = write_config(federation, tmp_path, "factory-1", "factory")
    missing = tmp_path / "crl.pem"
    config.write_text(config.read_text().replace(str(federation.crl), str(missing)))
    run = subprocess.run(
        [sys.executable, "-m", "yigong_node", "serve", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"error: revocation list {missing} does not exist ([tls] crl): put the federation's "
        f"crl.pem there; 'yigong pki crl --ca-dir CA --out {missing}' writes a fresh one"
    ]
