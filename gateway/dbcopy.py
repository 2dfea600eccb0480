"""Copy a node's SQLite database into PostgreSQL: ``yigong db migrate-to-postgresql``.

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
from typing import Any

from gateway.db import PostgresDatabase, pg_ddl, pg_sql
from gateway.errors import CatalogError

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
        present = {
            str(r[0])
            for r in target.query(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
                (target.schema,),
            )
        }
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
