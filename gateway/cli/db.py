"""``yigong db``: where a node keeps its catalog and audit log, and moving them.

    yigong db status --config node.toml [--json]
    yigong db migrate-to-postgresql --config node.toml --to postgresql://user@host/db [--yes]

``status`` names the engine and database (never a password), the schema versions, the
replicas registered in a shared database with the age of their last heartbeat, and the
outbox by status and claiming replica.

``migrate-to-postgresql`` copies the node's SQLite catalog and audit log into an empty
PostgreSQL database (:mod:`gateway.dbcopy`: every table, in insertion order, in one
transaction per database, each table counted and digested on both sides before the
commit; the audit chain is verified on PostgreSQL afterwards). Stop the node first. It
changes nothing in the configuration file: it prints the ``[database]`` lines to add.
Without ``--yes`` it only says what it would copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.config import NodeConfig, load_config
from gateway.db import open_database, redact_url
from gateway.dbcopy import count_rows, migrate_node
from gateway.errors import CatalogError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("db", help="the node's database: status, migrate SQLite to PostgreSQL")
    cmds = d.add_subparsers(dest="db_command", metavar="SUBCOMMAND")
    cmds.required = True

    p = cmds.add_parser("status", help="engine, schema versions, replicas, outbox")
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = cmds.add_parser(
        "migrate-to-postgresql",
        help="copy the SQLite catalog and audit log into an empty PostgreSQL database",
    )
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.add_argument(
        "--to", required=True, metavar="URL",
        help="postgresql://user@host:port/database (password from PGPASSWORD/PGPASSFILE)",
    )  # fmt: skip
    p.add_argument("--yes", action="store_true", help="really copy (the node must be stopped)")
    p.set_defaults(func=cmd_migrate)


def _age(when: str) -> float:
    try:
        then = datetime.fromisoformat(when)
    except ValueError:
        return -1.0
    return (datetime.now(UTC) - then).total_seconds()


def status(cfg: NodeConfig) -> dict[str, Any]:
    """What ``db status`` prints (read-only: no migration runs)."""
    url = cfg.database.url
    db = open_database(url, cfg.catalog.path, CatalogError, schema="catalog", label="catalog",
                       pool_size=1)  # fmt: skip
    try:
        out: dict[str, Any] = {
            "engine": db.engine,
            "catalog": redact_url(url) if url else str(cfg.catalog.path),
            "audit": redact_url(url) + " (schema audit)" if url else str(cfg.audit.path),
        }
        versions: dict[str, int] = {}
        uv = db.user_version()
        if uv is not None:
            versions["schema"] = uv
        tables = db.tables()
        if "schema_versions" in tables:
            versions.update(
                {
                    str(r[0]): int(r[1])
                    for r in db.query("SELECT namespace, version FROM schema_versions")
                }
            )
        out["schema_versions"] = dict(sorted(versions.items()))
        out["replicas"] = []
        if "replicas" in tables:
            out["replicas"] = [
                {"replica": r[0], "host": r[1], "pid": int(r[2]), "started": r[3],
                 "heartbeat_age_s": round(_age(r[4]), 1)}
                for r in db.query(
                    "SELECT replica_id, host, pid, started_at, heartbeat_at FROM replicas"
                    " ORDER BY started_at"
                )
            ]  # fmt: skip
        out["outbox"] = []
        if "transfers" in tables:
            claimed = "claimed_by" if db.has_column("transfers", "claimed_by") else "''"
            out["outbox"] = [
                {"status": r[0], "claimed_by": r[1], "count": int(r[2])}
                for r in db.query(
                    f"SELECT status, {claimed}, COUNT(*) FROM transfers"
                    " WHERE direction = 'outbound' AND status IN ('queued', 'sending')"
                    f" GROUP BY status, {claimed} ORDER BY status"
                )
            ]
        return out
    finally:
        db.close()


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    out = status(cfg)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"engine: {out['engine']}")
    print(f"catalog: {out['catalog']}")
    print(f"audit log: {out['audit']}")
    print("schema versions: " + ", ".join(f"{k} {v}" for k, v in out["schema_versions"].items()))
    if out["engine"] != "sqlite":
        print(f"replicas: {len(out['replicas'])}")
        for r in out["replicas"]:
            print(f"  {r['replica']}  pid {r['pid']} on {r['host']}, "
                  f"heartbeat {r['heartbeat_age_s']:.1f} s ago")  # fmt: skip
    for o in out["outbox"]:
        who = f" by {o['claimed_by']}" if o["claimed_by"] else ""
        print(f"outbox: {o['count']} {o['status']}{who}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if not args.yes:
        rows, arows = count_rows(cfg.catalog.path), count_rows(cfg.audit.path)
        print(
            f"would copy {rows} catalog rows from {cfg.catalog.path} and {arows} audit rows "
            f"from {cfg.audit.path} into {redact_url(args.to)} (an empty database).\n"
            "Stop the node first, then re-run with --yes. The SQLite files are not changed.",
            file=sys.stderr,
        )
        return 1
    catalog, audit = migrate_node(cfg, args.to)
    print(f"catalog: {catalog.rows} rows in {len(catalog.tables)} tables copied and compared")
    if audit is not None:
        print(f"audit log: {audit.rows} rows copied; chain verified on PostgreSQL")
    print(
        "\nNow add to "
        f'{cfg.source}:\n\n[database]\nurl = "{redact_url(args.to)}"\n\n'
        "then start the node (and any replicas). Keep the SQLite files as the backup of "
        "the moment of the switch."
    )
    return 0
