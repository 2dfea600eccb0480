"""The clinician's path in a real browser: a study pushed by dcmtk's storescu, its
previews, the typed confirmation, and the study arriving at the factory."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.browser import Person
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.console_client import enable_console
from tests.dicom_factory import PATIENT_NAME, ct_series
from tests.test_dicom_ingest import STORESCU
from tests.test_hospital_release import role

CASE = "CASE-2026-0420"
N = 8


def test_clinician_confirms_a_storescu_study_after_seeing_its_previews(
    browser: Any, tmp_path: Path
) -> None:
    fed = Federation(tmp_path / "federation")
    factory = InProcessNode(write_config(fed, tmp_path, "factory-1", "factory"))
    cfg = write_config(
        fed,
        tmp_path,
        "hospital-1",
        "hospital",
        peers={"factory-1": factory.address},
        dicom={"quiet_period_seconds": 0.3},
    )
    enable_console(cfg)
    hospital = InProcessNode(cfg)
    clinician = None
    try:
        files = tmp_path / "study"
        files.mkdir()
        datasets = list(ct_series(N, rows=32, cols=32))
        for i, ds in enumerate(datasets):
            ds.save_as(files / f"ct{i:03d}.dcm", enforce_file_format=True)
        uid = str(datasets[0].StudyInstanceUID)
        port = role(hospital).dicom_port
        subprocess.run(
            [STORESCU, "-aet", "PACS", "-aec", "YIGONG", "127.0.0.1", str(port), "+sd", str(files)],
            check=True,
            timeout=60,
            capture_output=True,
        )
        wait_for(lambda: role(hospital).studies.get_study(uid).status == "received", 30)
        who = fed.person("dr-li", "clinician", "hospital-1")
        clinician = Person(browser, hospital.node.console_port, who, tmp_path / "screenshots")
        page = clinician.page
        clinician.open("/studies")
        assert PATIENT_NAME.split("^")[0] in page.inner_text("main")
        clinician.shot("clinician-studies")
        page.click(f'a[href="/studies/{uid}"]')
        assert page.inner_text("#instance-count").startswith(f"{N} in 1 series")
        page.wait_for_selector("#preview-axial")
        for view in ("axial", "coronal", "sagittal"):
            # polled from here: Playwright's wait_for_function evaluates a string in the
            # page, which the console's CSP (no 'unsafe-eval') refuses once it must poll
            natural = f"document.getElementById('preview-{view}').naturalWidth"
            wait_for(lambda natural=natural: page.evaluate(natural) > 0, 15, what=view)
        assert page.locator("img.thumb").count() > 0
        assert page.locator(".slice-plot svg").count() == 1
        clinician.shot("clinician-study")
        page.fill("input[name=case_id]", CASE)
        page.select_option("select[name=destination]", "factory-1")
        assert page.is_disabled("#confirm-button")  # until the typed text matches
        page.fill("input[name=typed]", uid[-8:])
        assert page.is_enabled("#confirm-button")
        page.click("#confirm-button")
        page.wait_for_load_state()
        body = page.inner_text("main")
        assert CASE in body and f"{N}" in body, body
        clinician.shot("clinician-confirmed")
        wait_for(
            lambda: len(factory.node.catalog.list_objects(case_id=CASE, limit=100)) == N,
            60,
            what="the de-identified study at the factory",
        )
        assert clinician.errors == []
    finally:
        if clinician is not None:
            clinician.close()
        hospital.stop()
        factory.stop()
