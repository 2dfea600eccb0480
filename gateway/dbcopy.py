"""Copy a node's SQLite databases into PostgreSQL: ``yigong db migrate-to-postgresql``
(:func:`migrate_node`: the catalog, then the audit log, each with
:func:`copy_sqlite_to_postgres`).

A node that outgrows one machine moves its catalog (and audit log) from the SQLite files
of its data directory into the PostgreSQL database its replicas will share. The copy is
generic — every table the SQLite file holds, whichever module made it — so it follows
every migration without knowing them:

1. the target schema must be empty of the tables being copied (a copy never merges);
2. tables are created from the SQLite file's own DDL in PostgreSQL's dialect
   (:func:`gateway.db.pg_ddl`), indexes likewise — unless the owner already created them
   (the audit log creates its tables with its append-only triggers first);
3. rows are copied table by table in SQLite's ``rowid`` order (so insertion order, which
   ``ORDER BY rowid`` and hash chains rely on, is kept), in one transaction: all or none;
4. identity sequences are moved past the copied ids; the core schema version (SQLite's
   ``PRAGMA user_version``) becomes row ``schema`` of ``schema_versions``;
5. each table is then counted and digested on both sides (every value of every row in
   order) before the commit; any difference rolls everything back and names the table.

The node must be stopped while it runs (the source is opened read-only).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.audit import AuditLog, latest_checkpoint, verify_log
from gateway.audit_witness import WitnessStore
from gateway.catalog import Catalog
from gateway.db import PostgresDatabase, is_postgresql_url, pg_ddl, pg_sql, redact_url
from gateway.errors import AuditError, CatalogError, ConfigError

if TYPE_CHECKING:
    from gateway.config import NodeConfig

log = logging.getLogger(__name__)

BATCH_ROWS = 5000


@dataclass
class CopyReport:
    """What was copied: rows per table and the per-table digest both sides agree on."""

    source: str
    target: str
    tables: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.tables.values())


def _open_source(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise CatalogError(f"{path} does not exist: nothing to copy")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
    except sqlite3.Error as exc:
        raise CatalogError(f"cannot read {path}: {exc}") from exc
    return conn


def _source_tables(src: sqlite3.Connection) -> list[tuple[str, str]]:
    return [
        (str(name), str(sql))
        for name, sql in src.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        )
    ]


def _columns(src: sqlite3.Connection, table: str) -> list[str]:
    return [str(r[1]) for r in src.execute(f'PRAGMA table_info("{table}")')]


def _rows(src: sqlite3.Connection, table: str, cols: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    listed = ", ".join(f'"{c}"' for c in cols)
    try:
        cur = src.execute(f'SELECT {listed} FROM "{table}" ORDER BY rowid')
    except sqlite3.OperationalError:  # WITHOUT ROWID: primary-key order
        cur = src.execute(f'SELECT {listed} FROM "{table}"')
    while batch := cur.fetchmany(BATCH_ROWS):
        yield from batch


def _digest_value(value: Any) -> bytes:
    if isinstance(value, memoryview):
        value = bytes(value)
    if isinstance(value, bool):
        value = int(value)
    return repr(value).encode() + b"\x1f"


def _digest(rows: Iterator[Sequence[Any]]) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    for row in rows:
        for value in row:
            h.update(_digest_value(value))
        h.update(b"\x1e")
        n += 1
    return n, h.hexdigest()


def copy_sqlite_to_postgres(
    source: Path,
    target: PostgresDatabase,
    *,
    core_namespace: str | None = "schema",
    precreated: Sequence[str] = (),
    skip_existing: Sequence[str] = (),
    progress: Callable[[str, int], None] | None = None,
) -> CopyReport:
    """Copy every table of the SQLite file ``source`` into ``target``'s schema.

    ``precreated``: tables the owner created already in ``target`` (rows are copied,
    DDL is not). ``skip_existing``: tables whose rows may already be there (the same
    key is skipped, e.g. the audit log's ``meta``). ``core_namespace``: the name under
    which SQLite's ``PRAGMA user_version`` is recorded (None: not recorded)."""
    src = _open_source(source)
    report = CopyReport(str(source), target.where)
    try:
        tables = _source_tables(src)
        names = [t for t, _ in tables]
        present = target.tables()
        clash = sorted((set(names) & present) - set(precreated))
        if clash:
            raise CatalogError(
                f"{target.where} already holds table(s) {', '.join(clash)}: copy into an "
                "empty database (or drop that schema first, knowing what it holds)"
            )
        version = int(src.execute("PRAGMA user_version").fetchone()[0])
        with target.transaction() as db:
            raw = db.raw  # type: ignore[attr-defined]
            for name, sql in tables:
                if name not in precreated:
                    db.execute(pg_ddl(sql))
            for (sql,) in src.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                " ORDER BY rowid"
            ):
                if not any(f" ON {t}(" in sql or f" ON {t} (" in sql for t in precreated):
                    db.execute(sql)
            for name, _sql in tables:
                cols = _columns(src, name)
                listed = ", ".join(f'"{c}"' for c in cols)
                conflict = " ON CONFLICT DO NOTHING" if name in skip_existing else ""
                insert = pg_sql(
                    f'INSERT INTO "{name}" ({listed}) VALUES ({", ".join("?" * len(cols))})'
                    + conflict
                )
                count = 0
                batch: list[tuple[Any, ...]] = []
                for row in _rows(src, name, cols):
                    batch.append(tuple(int(v) if isinstance(v, bool) else v for v in row))
                    if len(batch) >= BATCH_ROWS:
                        raw.cursor().executemany(insert, batch)
                        count += len(batch)
                        batch.clear()
                        if progress:
                            progress(name, count)
                if batch:
                    raw.cursor().executemany(insert, batch)
                    count += len(batch)
                report.tables[name] = count
                if progress:
                    progress(name, count)
            _advance_identities(db, target.schema)
            _compare(src, target, tables, skip_existing, report)  # inside: a mismatch rolls back
            if core_namespace and version:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_versions"
                    " (namespace TEXT PRIMARY KEY, version BIGINT NOT NULL)"
                )
                db.execute(
                    "INSERT INTO schema_versions VALUES (?, ?) ON CONFLICT(namespace)"
                    " DO UPDATE SET version = excluded.version",
                    (core_namespace, version),
                )
    finally:
        src.close()
    log.info("copied %d rows of %d tables from %s to %s", report.rows, len(report.tables),
             source, target.where)  # fmt: skip
    return report


def _advance_identities(db: Any, schema: str) -> None:
    """Identity columns other than ``rowid`` took explicit ids: move their sequences on."""
    for table, column in list(
        db.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = ? AND is_identity = 'YES' AND column_name <> 'rowid'",
            (schema,),
        )
    ):
        db.execute(
            f"SELECT setval(pg_get_serial_sequence('\"{schema}\".\"{table}\"', '{column}'),"
            f' COALESCE((SELECT MAX("{column}") FROM "{table}"), 0) + 1, false)'
        )


def _compare(
    src: sqlite3.Connection,
    target: PostgresDatabase,
    tables: Sequence[tuple[str, str]],
    skip_existing: Sequence[str],
    report: CopyReport,
) -> None:
    for name, _sql in tables:
        if name in skip_existing:
            continue
        cols = _columns(src, name)
        listed = ", ".join(f'"{c}"' for c in cols)
        n_src, d_src = _digest(_rows(src, name, cols))
        order = "rowid" if "rowid" not in cols else ", ".join(f'"{c}"' for c in cols)
        rows = target.query(f'SELECT {listed} FROM "{name}" ORDER BY {order}')
        n_dst, d_dst = _digest(iter(rows))
        if (n_src, d_src) != (n_dst, d_dst):
            raise CatalogError(
                f"copy of table {name} differs: {n_src} rows in {src_name(src)}, {n_dst} in "
                f"{target.where} (digests {d_src[:12]} / {d_dst[:12]}); nothing was copied "
                "(one transaction); the node keeps its SQLite files"
            )
        report.digests[name] = d_src


def src_name(src: sqlite3.Connection) -> str:
    row = src.execute("PRAGMA database_list").fetchone()
    return str(row[2]) if row else "the SQLite file"


def count_rows(path: Path) -> int:
    """Rows in every table of the SQLite file ``path`` (0 when there is none)."""
    if not path.exists():
        return 0
    conn = _open_source(path)
    try:
        return sum(
            int(conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0])
            for name, _sql in _source_tables(conn)
        )
    finally:
        conn.close()


def migrate_node(cfg: NodeConfig, url: str) -> tuple[CopyReport, CopyReport | None]:
    """``yigong db migrate-to-postgresql``: copy the catalog and the audit log of ``cfg``'s
    SQLite files into the empty PostgreSQL database ``url`` (both targets are checked
    before anything is copied)."""
    if cfg.database.url:
        raise ConfigError(
            f"{cfg.source}: database.url already names {redact_url(cfg.database.url)}; "
            "this node is on PostgreSQL already"
        )
    if not is_postgresql_url(url):
        raise ConfigError(f"--to {redact_url(url)!r}: give a postgresql:// URL")
    audit_db = PostgresDatabase(url, AuditError, schema="audit", label="audit log", pool_size=2)
    try:
        if cfg.audit.path.exists() and audit_db.tables() & {"events", "checkpoints", "witnessed"}:
            raise CatalogError(
                f"{redact_url(url)} already holds an audit log (schema audit): copy into an "
                "empty database"
            )
        catalog_db = PostgresDatabase(url, CatalogError, schema="catalog", label="catalog",
                                      pool_size=2)  # fmt: skip
        try:
            catalog = copy_sqlite_to_postgres(cfg.catalog.path, catalog_db)
        finally:
            catalog_db.close()
        Catalog.open(url, cfg.catalog.path).close()  # later migrations, if the file was older
        audit = _copy_audit(cfg, audit_db) if cfg.audit.path.exists() else None
    finally:
        audit_db.close()
    return catalog, audit


def _copy_audit(cfg: NodeConfig, target: PostgresDatabase) -> CopyReport:
    """The audit log file into schema ``audit``: the log's own tables (with their
    append-only triggers, which check every copied entry extends the chain) are made by
    :class:`~gateway.audit.AuditLog` first; then every row in order; then the chain is
    verified on PostgreSQL and its newest checkpoint compared with the file's."""
    log = AuditLog(target, cfg.node.id)  # the schema; no signer: nothing is written
    WitnessStore(cfg.audit.path, log)
    report = copy_sqlite_to_postgres(
        cfg.audit.path, target, core_namespace=None,
        precreated=("meta", "events", "checkpoints", "witnessed"), skip_existing=("meta",),
    )  # fmt: skip
    after = verify_log(target, cfg.node.id)
    if not after.ok:
        raise AuditError(f"the copied audit log does not verify: {after.reason}")
    before, copied = latest_checkpoint(cfg.audit.path), latest_checkpoint(target)
    if (before.head_hash if before else None) != (copied.head_hash if copied else None):
        raise AuditError("the copied audit log's newest checkpoint differs from the file's")
    return report
