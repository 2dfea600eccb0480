"""Building case records with the CLI: the full schema of a type, templates that pass
the schema and are signed once filled in, the readable preview, hash prefixes, full
hashes in ``case show``, and the same opener and time on both nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cases.describe import article, expand_hashes, template
from gateway.cases.schema import TYPES, validate_data
from gateway.errors import ValidationError
from tests.test_cases import FACTORY, HOSPITAL, Env, _cli, advance, env  # noqa: F401
from yigong_node.cli import main


def test_types_of_one_type_print_the_full_nested_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["case", "types", "acceptance"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "acceptance (§8.3, §9.3, the acceptance)"
    assert "  signed by: a clinician of the hospital node" in lines
    assert "  recorded at: stage 'acceptance' (every earlier stage complete)" in lines
    # nested objects and lists of objects, each field with its type; * = required
    assert any(
        line.split() == ["*", "tolerance_mm", "a", "number", "from", "0.1", "to", "100,", "given",
                         "to", "0.1"]
        for line in lines
    )  # fmt: skip
    indent = {line.split()[1]: len(line) - len(line.lstrip()) for line in lines if "*" in line}
    assert indent["indicators"] < indent["dimensional"] < indent["tolerance_mm"]
    assert any(
        line.split()[:2] == ["disposition", "one"] and "remake, redesign" in line for line in lines
    )  # fmt: skip  (optional: no star)
    assert "  rule: reason is required when decision is 'rejected'" in lines
    assert "yigong case template acceptance -o acceptance.json" in out

    assert main(["case", "types", "design_output"]) == 0
    out = capsys.readouterr().out
    assert "signed by: an engineer of the manufacturer (factory) node" in out
    assert "files[].object_id: objects uploaded for this case" in out


def test_types_list_names_the_signer_with_the_right_article(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["case", "types"]) == 0
    out = capsys.readouterr().out
    assert "design_output (§5.3.3, the design output) — signed by an engineer" in out
    assert "order (§5.2.2, the order) — signed by a clinician" in out
    assert "a engineer" not in out
    assert article("engineer") == "an engineer" and article("officer") == "an officer"


def test_unknown_type_is_refused_with_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["case", "template", "orders"])
    assert exc.value.code == 2
    assert "invalid choice: 'orders'" in capsys.readouterr().err


def test_templates_pass_the_schema_for_every_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind in TYPES:
        path = tmp_path / f"{kind}.json"
        assert main(["case", "template", kind, "-o", str(path)]) == 0
        assert f"wrote {path}: an example {kind} record" in capsys.readouterr().err
        validate_data(kind, json.loads(path.read_text()))
        assert main(["case", "template", kind, "--optional"]) == 0
        full = json.loads(capsys.readouterr().out)
        validate_data(kind, full)
        assert set(full) == set(TYPES[kind].required) | set(TYPES[kind].optional)
    order = json.loads((tmp_path / "order.json").read_text())
    assert order["clinical_description"] == "TODO clinical_description"
    assert order["patient"]["sex"] == "female" and order["delivery_time"] == "2026-01-31"
    # an existing file is not overwritten by accident
    assert main(["case", "template", "order", "-o", str(tmp_path / "order.json")]) == 2
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err


def test_a_filled_in_template_is_signed_and_the_preview_is_readable(
    env: Env,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    case_id = "C-TPL-1"
    assert _cli(env, "clinician", ["create", "--case", case_id, "--manufacturer", FACTORY]) == 0
    path = env.tmp / "dc.json"
    assert main(["case", "template", "data_confirmation", "-o", str(path)]) == 0
    capsys.readouterr()
    sign = ["sign", "data_confirmation", "--case", case_id, "--data", str(path)]
    # unchanged template: a readable preview, the TODOs named, nothing signed
    data = json.loads(path.read_text())
    data["notes"] = "TODO notes"
    path.write_text(json.dumps(data))
    assert _cli(env, "clinician", sign) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"case:      {case_id}"
    assert lines[1] == "record:    0 (data_confirmation)"
    assert lines[2].startswith("author:    clinician:case-dr-li@hospital-1 (certificate ")
    assert lines[5] == "data:" and '    "complete": true,' in lines
    assert "1 field(s) still hold the template's TODO: data.notes" in err
    assert "run again with --yes" in err
    assert env.hospital.cases.view(case_id).next_seq == 0
    # the real facts filled in: signed
    released = env.release(case_id)  # a study really confirmed and sent for the case
    data["studies"] = [released.study]
    data["notes"] = "all series present"
    path.write_text(json.dumps(data))
    assert _cli(env, "clinician", [*sign, "--yes"]) == 0
    assert f"case {case_id}: record 0 (data_confirmation) signed" in capsys.readouterr().out
    record = json.loads(env.hospital.cases.view(case_id).records[0].record_json)
    assert record["data"] == {
        "complete": True,
        "studies": [released.study],
        "notes": "all series present",
    }


def test_hash_prefixes_are_expanded_and_show_prints_full_hashes(
    env: Env,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    case_id = "C-HASH-1"
    out = advance(env, case_id, "design_confirmation")
    design = out["design"]
    assert _cli(env, "clinician", ["show", case_id]) == 0
    shown = capsys.readouterr().out
    assert design in shown  # the full design hash, to copy into the next record
    others = [r.record_hash for r in env.hospital.cases.view(case_id).records]
    unknown = next(
        p for p in (f"{n:04x}" for n in range(65536)) if not any(h.startswith(p) for h in others)
    )
    base = ["sign", "design_confirmation", "--case", case_id, "--set", "side=clinical",
            "--set", "decision=confirmed", "--yes"]  # fmt: skip
    with pytest.raises(ValidationError) as exc:
        _cli(env, "clinician", [*base, "--set", f"design_hash={unknown}"])
    assert f"data.design_hash: no record or object of case {case_id} has a SHA-256 " in str(
        exc.value
    )
    assert env.hospital.cases.view(case_id).next_seq == 4  # nothing signed
    assert _cli(env, "clinician", [*base, "--set", f"design_hash={design[:8]}"]) == 0
    out, err = capsys.readouterr()
    assert f"data.design_hash: {design}" in err
    assert f"case {case_id}: record 4 (design_confirmation) signed" in out
    record = json.loads(env.hospital.cases.view(case_id).records[4].record_json)
    assert record["data"]["design_hash"] == design


def test_both_nodes_show_the_same_opener_and_time(
    env: Env,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    case_id = "C-OPEN-1"
    advance(env, case_id, "order")  # opened by the clinician, record 0 synced to the factory
    shown = {}
    for who in ("clinician", "engineer"):
        assert _cli(env, who, ["show", case_id, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        shown[who] = (doc["hospital"], doc["created_by"], doc["created_at"])
    assert shown["clinician"] == shown["engineer"]
    assert shown["engineer"][:2] == (HOSPITAL, "clinician:case-dr-li@hospital-1")
    assert _cli(env, "engineer", ["show", case_id]) == 0
    assert (
        f"(opened {shown['clinician'][2][:19].replace('T', ' ')}Z by "
        "clinician:case-dr-li@hospital-1)" in capsys.readouterr().out
    )


def test_unknown_and_ambiguous_prefixes_are_clear_errors() -> None:
    data = {"side": "clinical", "decision": "confirmed", "design_hash": "abcd"}
    known = ["abcd" + "0" * 60, "abcd" + "1" * 60, "ef01" + "2" * 60]
    with pytest.raises(ValidationError) as exc:
        expand_hashes("design_confirmation", dict(data), known, "case C-1")
    assert str(exc.value) == (
        "data.design_hash: abcd is the start of 2 hashes of case C-1 "
        f"(abcd{'0' * 12}…, abcd{'1' * 12}…); give more digits"
    )
    with pytest.raises(ValidationError) as exc:
        expand_hashes("design_confirmation", {**data, "design_hash": "9999"}, known, "case C-1")
    assert "data.design_hash: no record or object of case C-1 has a SHA-256 starting with 9999" in (
        str(exc.value)
    )
    files = {"files": [{"object_id": "ef01", "name": "x.stl"}], "parameters": {"a": 1},
             "safety_features": [{"feature": "f", "requirement": "r"}]}  # fmt: skip
    assert expand_hashes("design_output", files, known, "case C-1") == [
        ("data.files[0].object_id", known[2])
    ]
    assert files["files"][0]["object_id"] == known[2]
    # three digits are not a prefix: left as they are (the schema then refuses them)
    short = {**data, "design_hash": "abc"}
    assert expand_hashes("design_confirmation", short, known, "case C-1") == []
    validate_data("design_confirmation", template("design_confirmation"))
