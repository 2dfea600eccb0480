"""The engineer's factory console, over real TLS with person certificates.

Incoming studies with their suitability result, the streamed study ZIP and single
objects (audited downloads, refused to an officer), and a design file uploaded for a
case (checked, its mesh facts shown, queued to the case's hospital)."""

from __future__ import annotations

import hashlib
import io
import re
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from html import escape as html_escape

import pytest
import trimesh

from gateway import pki
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.console_client import enable_console, fetch
from tests.test_factory import CORE_HOSPITAL, deid_series, send, uids

CASE = "case-c1"


@dataclass
class Env:
    fed: Federation
    hospital: InProcessNode
    factory: InProcessNode
    study_uid: str
    engineer: pki.IssuedCert
    officer: pki.IssuedCert


@pytest.fixture(scope="module")
def env(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A factory with its console on, a (core-only) hospital that sent it one study.

    The factory knows hospital-1 at an address nothing listens on: what it sends there
    stays queued (the tests look at the outbox, not at a delivery)."""
    tmp = tmp_path_factory.mktemp("console-factory")
    fed = federation
    cfg = write_config(fed, tmp, "factory-1", "factory", peers={"hospital-1": "127.0.0.1:9"})
    enable_console(cfg)
    factory = InProcessNode(cfg)
    hospital = InProcessNode(
        write_config(fed, tmp, "hospital-1", "hospital", peers={"factory-1": factory.address}),
        roles=CORE_HOSPITAL,
    )
    try:
        blobs = deid_series(4)
        send(hospital, blobs, tmp, case=CASE)
        study_uid, _ = uids(blobs[0])
        wait_for(
            lambda: (
                all(
                    s.result_current
                    for s in factory.node.hooks.studies.list_studies(CASE)  # type: ignore[attr-defined]
                )
                and factory.node.hooks.studies.list_studies(CASE)
            ),  # type: ignore[attr-defined]
            20,
            what="the study's suitability result",
        )
        yield Env(
            fed,
            hospital,
            factory,
            study_uid,
            fed.person("ed", "engineer", "factory-1"),
            fed.person("cf-olga", "officer", "factory-1"),
        )
    finally:
        hospital.stop()
        factory.stop()


def request(
    env: Env,
    who: pki.IssuedCert,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    port = env.factory.node.console_port
    return fetch(port, env.fed.ca, who, path, method, body, headers)


def page(env: Env, who: pki.IssuedCert, path: str) -> tuple[int, str]:
    status, _, body = request(env, who, path)
    return status, body.decode()


def csrf(env: Env, who: pki.IssuedCert) -> str:
    _, html = page(env, who, "/factory/studies")
    m = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert m
    return m.group(1)


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, (filename, data) in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def upload(
    env: Env, filename: str, data: bytes, fmt: str = "model/stl", token: str | None = ""
) -> tuple[int, str]:
    fields = {"format": fmt}
    if token is not None:
        fields["_csrf"] = token or csrf(env, env.engineer)
    body, ctype = multipart(fields, {"file": (filename, data)})
    status, _, out = request(
        env,
        env.engineer,
        f"/factory/cases/{CASE}/designs",
        "POST",
        body,
        {"content-type": ctype},
    )
    return status, out.decode()


def box_stl() -> bytes:
    return bytes(trimesh.creation.box(extents=(10.0, 20.0, 30.0)).export(file_type="stl"))


def test_engineer_sees_incoming_studies_with_suitability(env: Env) -> None:
    status, html = page(env, env.engineer, "/factory/studies")
    assert status == 200, html
    assert "Incoming studies" in html
    assert env.study_uid in html and CASE in html
    latest = env.factory.node.hooks.studies.study(env.study_uid, CASE).latest  # type: ignore[attr-defined]
    assert latest is not None
    assert ("suitable" if latest.passed else "not suitable") in html
    for finding in latest.findings:
        assert html_escape(finding) in html
    assert f"/factory/studies/{env.study_uid}/zip" in html
    assert f"/factory/cases/{CASE}/designs" in html

    status, html = page(env, env.engineer, f"/factory/studies/{env.study_uid}?case={CASE}")
    assert status == 200, html
    instances = env.factory.node.hooks.studies.instances(CASE, env.study_uid)  # type: ignore[attr-defined]
    assert len(instances) == 4
    for inst in instances:
        assert f"/objects/{inst.object_id}" in html


def test_officer_sees_the_list_but_may_not_download(env: Env) -> None:
    status, html = page(env, env.officer, "/factory/studies")
    assert status == 200, html
    assert env.study_uid in html
    assert "/zip" not in html  # no link to what the officer may not do
    status, _ = page(env, env.officer, f"/factory/studies/{env.study_uid}/zip?case={CASE}")
    assert status == 403
    inst = env.factory.node.hooks.studies.instances(CASE, env.study_uid)[0]  # type: ignore[attr-defined]
    assert page(env, env.officer, f"/objects/{inst.object_id}")[0] == 403
    assert page(env, env.officer, f"/factory/cases/{CASE}/designs")[0] == 403


def test_study_zip_streams_every_object_audited(env: Env) -> None:
    node = env.factory.node
    before = len(node.audit.events(event="object.downloaded", limit=1000))
    status, headers, body = request(
        env, env.engineer, f"/factory/studies/{env.study_uid}/zip?case={CASE}"
    )
    assert status == 200, body[:500]
    assert headers["content-type"] == "application/zip"
    instances = node.hooks.studies.instances(CASE, env.study_uid)  # type: ignore[attr-defined]
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.testzip() is None
        names = sorted(zf.namelist())
        assert names == sorted(f"{i.series_uid}/{i.sop_instance_uid}.dcm" for i in instances)
        by_name = {f"{i.series_uid}/{i.sop_instance_uid}.dcm": i.object_id for i in instances}
        for name in names:
            assert hashlib.sha256(zf.read(name)).hexdigest() == by_name[name]
    downloads = node.audit.events(event="object.downloaded", limit=1000)
    assert len(downloads) == before + len(instances)
    assert {e.object_id for e in downloads[before:]} == {i.object_id for i in instances}
    assert all("ed" in e.actor for e in downloads[before:])

    one = instances[0].object_id
    status, _, data = request(env, env.engineer, f"/objects/{one}")
    assert status == 200 and hashlib.sha256(data).hexdigest() == one
    # an object that is no instance of a study here, and one that is nothing at all
    assert request(env, env.engineer, f"/objects/{'0' * 64}")[0] == 404
    assert request(env, env.engineer, "/objects/not-an-id")[0] == 400
    assert request(env, env.engineer, "/factory/studies/1.2.3/zip")[0] == 404


def test_uploaded_stl_shows_its_facts_and_is_queued_to_the_hospital(env: Env) -> None:
    data = box_stl()
    status, html = upload(env, "implant-v1.stl", data)
    assert status == 200, html
    facts = dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]*)</dd>", html))
    assert facts["Triangles"] == "12"
    assert float(facts["Volume (mm³)"]) == pytest.approx(6000.0)
    assert float(facts["Area (mm²)"]) == pytest.approx(2200.0)
    assert facts["Watertight"] == "true"
    object_id = hashlib.sha256(data).hexdigest()
    catalog = env.factory.node.catalog
    obj = catalog.get_object(object_id)
    assert (obj.case_id, obj.media_type, obj.name) == (CASE, "model/stl", "implant-v1.stl")
    queued = catalog.list_transfers(object_id=object_id, direction="outbound")
    assert [t.peer_node for t in queued] == ["hospital-1"]
    assert "hospital-1" in html and queued[0].transfer_id in html


def test_corrupt_stl_is_refused_naming_the_file(env: Env) -> None:
    bad = box_stl()[:-20]  # a binary STL cut short
    status, html = upload(env, "broken.stl", bad)
    assert status == 400
    m = re.search(r'id="upload-error">([^<]+)<', html)
    assert m, html
    assert "broken.stl" in m.group(1)
    assert env.factory.node.catalog.find_object(hashlib.sha256(bad).hexdigest()) is None


def test_post_without_csrf_is_refused(env: Env) -> None:
    status, html = upload(env, "implant-v2.stl", box_stl(), token=None)
    assert status == 403
    assert "CSRF" in html
