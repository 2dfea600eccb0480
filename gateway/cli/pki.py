"""``yigong pki``: create the federation CA, issue, revoke, list and show certificates."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway import pki
from gateway.errors import PKIError
from gateway.identity import NODE_ROLES, PERSON_ROLES, identity_from_certificate

P12_PASSWORD_ENV = "YIGONG_P12_PASSWORD"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pki`` command group to the top-level subparsers ``sub``."""
    group = sub.add_parser(
        "pki",
        help="federation CA: issue, revoke, list and show certificates",
        description="Manage the federation CA. Run these on the (offline) CA machine; "
        "only ca.crt, crl.pem and a node's own .crt/.key go onto a node.",
    )
    cmds = group.add_subparsers(dest="pki_command", metavar="SUBCOMMAND")
    cmds.required = True

    p = cmds.add_parser("init-ca", help="create a new federation CA directory")
    p.add_argument("--dir", required=True, type=Path, help="CA directory to create")
    p.add_argument("--federation", required=True, help="federation name, e.g. 'east-china'")
    p.add_argument("--days", type=int, default=3650, help="CA validity in days (default 3650)")
    p.set_defaults(func=cmd_init_ca)

    p = cmds.add_parser("issue-node", help="issue a node (server+client) certificate")
    _ca_dir(p)
    p.add_argument("--id", required=True, help="node id, e.g. hospital-1")
    p.add_argument("--role", required=True, choices=sorted(NODE_ROLES), help="role of the node")
    p.add_argument("--region", required=True, help="data-residency region, e.g. cn-east")
    p.add_argument("--out", required=True, type=Path, help="directory for <id>.crt/.key/ca.crt")
    p.add_argument(
        "--hostname",
        action="append",
        metavar="H",
        help="DNS name or IP the node is reached at; repeatable "
        "(default: localhost and 127.0.0.1; giving any replaces the default)",
    )
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.set_defaults(func=cmd_issue_node)

    p = cmds.add_parser("issue-person", help="issue a person/tool (client) certificate")
    _ca_dir(p)
    p.add_argument("--id", required=True, help="person or tool id, e.g. alice")
    p.add_argument(
        "--role", required=True, choices=sorted(PERSON_ROLES), help="what the person may do"
    )
    p.add_argument("--org", required=True, metavar="NODE_ID", help="node the person belongs to")
    p.add_argument("--out", required=True, type=Path, help="directory for <id>.crt/.key/ca.crt")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p12 = p.add_mutually_exclusive_group()
    p12.add_argument(
        "--p12-password-file",
        type=Path,
        metavar="FILE",
        help="password of <id>.p12 (the browser import file): the first line of FILE "
        f"(at least {pki.P12_MIN_PASSWORD} printable ASCII characters); else the "
        f"environment variable {P12_PASSWORD_ENV}; else a random one is written to "
        "<id>.p12.password",
    )
    p12.add_argument("--no-p12", action="store_true", help="do not write <id>.p12")
    p.set_defaults(func=cmd_issue_person)

    p = cmds.add_parser("revoke", help="revoke a certificate (irreversible)")
    _ca_dir(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", type=_hex_serial, metavar="HEX", help="serial number in hex")
    which.add_argument("--cert", type=Path, metavar="PATH", help="certificate file to revoke")
    p.add_argument(
        "--reason",
        default="unspecified",
        choices=list(pki.REVOCATION_REASONS),
        help="revocation reason recorded in the CRL (default unspecified)",
    )
    p.add_argument("--yes", action="store_true", help="really revoke (it cannot be undone)")
    p.set_defaults(func=cmd_revoke)

    p = cmds.add_parser(
        "crl",
        help="re-sign the revocation list (it expires after 7 days) and copy it for nodes",
        description="Re-sign ca/crl.pem with the same entries and a fresh validity, and "
        "optionally copy it where a node's [tls] crl points. Run it at least weekly.",
    )
    _ca_dir(p)
    p.add_argument(
        "--out",
        type=Path,
        action="append",
        metavar="PATH",
        help="also copy the CRL here (a file, or a directory for crl.pem); repeatable",
    )
    p.set_defaults(func=cmd_crl)

    p = cmds.add_parser("list", help="list the certificates a CA has issued")
    _ca_dir(p)
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("show", help="show the identity a certificate file asserts")
    p.add_argument("cert", type=Path, metavar="CERT", help="certificate file (PEM)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_show)


def _ca_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-dir", required=True, type=Path, help="federation CA directory")


def _hex_serial(text: str) -> int:
    try:
        return int(text.strip().lower().removeprefix("0x").replace(":", ""), 16)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal serial number") from exc


def _print_issued(issued: pki.IssuedCert, what: str) -> None:
    cert = pki.load_certificate(issued.cert_path)
    print(
        f"wrote {issued.cert_path} ({what} certificate, serial {issued.serial:x}, "
        f"expires {pki.iso(cert.not_valid_after_utc)})"
    )
    print(f"wrote {issued.key_path} (private key, mode 0600)")
    print(f"wrote {issued.ca_path} (federation CA certificate)")


def cmd_init_ca(args: argparse.Namespace) -> int:
    ca_path = pki.create_ca(args.dir, args.federation, args.days)
    ca_dir = ca_path.parent
    print(f"wrote {ca_path} (federation CA certificate for '{args.federation}')")
    print(f"wrote {ca_dir / pki.CA_KEY} (CA private key, mode 0600: keep it offline)")
    print(f"wrote {ca_dir / pki.CRL_FILE} (revocation list, empty)")
    print(f"wrote {ca_dir / pki.INDEX_FILE} (index of issued certificates)")
    return 0


def cmd_issue_node(args: argparse.Namespace) -> int:
    hostnames = args.hostname if args.hostname else ("localhost", "127.0.0.1")
    issued = pki.issue_node_cert(
        args.ca_dir,
        args.id,
        args.role,
        args.region,
        args.out,
        hostnames=hostnames,
        valid_days=args.days,
    )
    _print_issued(issued, f"{args.role} node '{args.id}'")
    return 0


def _p12_password(args: argparse.Namespace) -> tuple[bytes | None, str]:
    """The password given for the .p12 (None: generate one) and where it came from."""
    if args.p12_password_file is not None:
        source = f"--p12-password-file {args.p12_password_file}"
        try:
            lines = args.p12_password_file.read_bytes().splitlines()
        except OSError as exc:
            raise PKIError(f"{source}: cannot read it: {exc.strerror or exc}") from exc
        password = lines[0] if lines else b""
    elif (env := os.environb.get(P12_PASSWORD_ENV.encode())) is not None:
        source, password = f"environment variable {P12_PASSWORD_ENV}", env
    else:
        return None, "a generated password"
    if problem := pki.p12_password_problem(password):
        raise PKIError(f"{source}: {problem}")
    return password, f"the password from {source}"


def cmd_issue_person(args: argparse.Namespace) -> int:
    password, source = (None, "") if args.no_p12 else _p12_password(args)
    if not args.no_p12:  # refuse before the CA issues anything
        pki.pkcs12_paths(args.out, args.id, generate_password=password is None)
    issued = pki.issue_person_cert(
        args.ca_dir, args.id, args.role, args.org, args.out, valid_days=args.days
    )
    _print_issued(issued, f"{args.role} '{args.id}' of node '{args.org}'")
    if args.no_p12:
        return 0
    p12_path, password_path = pki.write_person_pkcs12(issued, password)
    print(f"wrote {p12_path} (PKCS#12 for a browser: certificate, key and CA; mode 0600)")
    print(f"  encrypted with {source}")
    if password_path is not None:
        print(
            f"wrote {password_path} (the .p12 password, mode 0600: "
            "hand it to the person separately from the .p12)"
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    if args.cert is not None:
        cert = pki.load_certificate(args.cert)
        ca_cert = pki.load_certificate(Path(args.ca_dir) / pki.CA_CERT)
        if cert.issuer != ca_cert.subject:
            raise PKIError(
                f"{args.cert} was issued by '{cert.issuer.rfc4514_string()}', "
                f"not by the CA in {args.ca_dir}"
            )
        serial = cert.serial_number
    else:
        serial = args.serial
    record = pki.find_issued(args.ca_dir, serial)
    if record.revoked:
        raise PKIError(
            f"serial {record.serial} ({record.kind} {record.id}) was already revoked "
            f"at {record.revoked_at}"
        )
    target = (
        f"{record.kind} certificate '{record.id}' (role {record.role}, "
        f"serial {record.serial}, expires {record.not_after})"
    )
    if not args.yes:
        print(f"would revoke {target} with reason {args.reason}")
        print(
            "not revoked: revocation cannot be undone; re-run with --yes to revoke", file=sys.stderr
        )
        return 1
    crl_path = pki.revoke(args.ca_dir, serial, args.reason)
    print(f"revoked {target}, reason {args.reason}")
    print(f"wrote {crl_path} (revocation list; copy it to every node)")
    print(f"wrote {Path(args.ca_dir) / pki.INDEX_FILE} (index of issued certificates)")
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    crl_path = pki.refresh_crl(args.ca_dir)
    entries, next_update = pki.crl_info(crl_path, Path(args.ca_dir) / pki.CA_CERT)
    print(
        f"wrote {crl_path} (revocation list, {entries} revoked, valid until "
        f"{pki.iso(next_update)}; copy it to every node's [tls] crl path)"
    )
    for out in args.out or []:
        dest = out / pki.CRL_FILE if out.is_dir() else out
        try:
            shutil.copyfile(crl_path, dest)
        except OSError as exc:
            raise PKIError(f"cannot copy the CRL to {dest}: {exc.strerror}") from exc
        print(f"wrote {dest} (copy of the revocation list)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    records = pki.read_index(args.ca_dir)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    rows = [("SERIAL", "KIND", "ID", "ROLE", "REGION/ORG", "EXPIRES", "REVOKED")]
    for r in records:
        revoked = f"yes ({r.revocation_reason}, {r.revoked_at})" if r.revoked else "no"
        rows.append(
            (r.serial, r.kind, r.id, r.role, r.region or r.org or "-", r.not_after, revoked)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not records:
        print(f"(no certificates issued by the CA in {args.ca_dir})")
    return 0


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def cmd_show(args: argparse.Namespace) -> int:
    cert = pki.load_certificate(args.cert)
    start, end, now = cert.not_valid_before_utc, cert.not_valid_after_utc, datetime.now(UTC)
    status = "not yet valid" if now < start else "expired" if now > end else "valid"
    info: dict[str, Any] = {"file": str(args.cert)}
    if _is_ca(cert):
        info.update(kind="ca", federation=pki.federation_of(cert))
    else:
        ident = identity_from_certificate(cert)
        info.update(
            kind=ident.kind,
            id=ident.subject_id,
            role=ident.role,
            region=ident.region,
            org_node=ident.org_node,
            label=ident.label(),
        )
    info.update(
        {
            "serial": f"{cert.serial_number:x}",
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "not_before": pki.iso(start),
            "not_after": pki.iso(end),
            "status": status,
            "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
        }
    )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key + ':':20} {value if value is not None else '-'}")
    return 0
