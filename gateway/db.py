"""The one data-access layer of a node's databases: SQLite (embedded default) or PostgreSQL.

Everything a node keeps in a database (catalog, outbox, receipts, studies, cases, vault,
audit log) talks through a :class:`Database`. Queries are written once, in the SQL both
engines run (``?`` placeholders, ``INSERT … ON CONFLICT … DO NOTHING/UPDATE``, ``CASE``
instead of two-argument ``MAX``); the PostgreSQL engine translates only what cannot be
written portably:

* placeholders ``?`` → ``%s`` (a literal ``%`` is escaped), once per distinct statement;
* DDL in migrations: ``INTEGER`` → ``BIGINT`` (sizes exceed 2³¹), ``BLOB`` → ``BYTEA``,
  ``REAL`` → ``DOUBLE PRECISION``, ``INTEGER PRIMARY KEY`` → an identity column, and
  every table gains a trailing ``rowid`` identity column, so ``ORDER BY rowid`` (insertion
  order) means the same on both engines;
* ``bool`` parameters are sent as integers (both schemas store flags as integers);
  ``NUMERIC`` results (PostgreSQL's ``SUM`` of ``BIGINT``) come back as ``int``.

Writers are serialised the same way on both engines, which is what keeps read-then-write
sequences (quiet periods, stage gates, outbox claims) correct when several processes —
replicas of one node — share the database: SQLite ``BEGIN IMMEDIATE``; PostgreSQL
``BEGIN`` + ``pg_advisory_xact_lock(<database's key>)``, a lock held until commit by one
transaction of the whole cluster. Reads outside a transaction take a pooled connection
(PostgreSQL) and never wait for a writer. A nested :meth:`Database.transaction` in the
thread that holds one joins it (one commit).

Each database keeps its tables in its own PostgreSQL schema (``catalog``, ``audit``), so
one PostgreSQL database holds a node's catalog and audit log without name clashes.
Schema versions live in table ``schema_versions`` (namespace → version); SQLite's core
catalog keeps ``PRAGMA user_version`` as it always has. Migrations run inside the write
lock and re-read the version there, so replicas starting together migrate once.

Errors of either driver become the error class the owner passes (``CatalogError``,
``AuditError``), naming the database (never a password).
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from gateway.errors import ConfigError, YigongError
from gateway.hashing import sha256_bytes

log = logging.getLogger(__name__)

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


class Row(Protocol):
    """A result row: by position and by column name (``sqlite3.Row`` and :class:`PgRow`)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What a transaction hands its body: ``execute(sql, params)`` (``sqlite3.Connection``
    on SQLite, :class:`_PgConn` on PostgreSQL)."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any: ...


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def is_postgresql_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (e.g. ``yigong:catalog``)."""
    return int.from_bytes(sha256_bytes(name.encode())[:8], "big", signed=True)


class Database:
    """A node database; see the module docstring. Thread-safe."""

    engine: str = ""
    #: the driver's exception classes (translated by the methods below)
    driver_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, where: str, error: type[YigongError]) -> None:
        self.where = where  # "catalog /data/catalog.sqlite", never a password
        self._error = error
        self._lock = threading.RLock()
        self._depth = 0
        self._owner = 0  # thread id holding the open transaction

    # -- engine hooks --
    def _begin(self, serialize: bool) -> Conn:
        raise NotImplementedError

    def _commit(self, conn: Conn) -> None:
        raise NotImplementedError

    def _rollback(self, conn: Conn) -> None:
        raise NotImplementedError

    def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    def _tx_conn(self) -> Conn:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def user_version(self) -> int | None:
        """SQLite's ``PRAGMA user_version``; None where the engine has none."""
        return None

    # -- the API --
    def fail(self, what: str, exc: BaseException) -> YigongError:
        return self._error(f"{self.where}: {what}{': ' if what else ''}{exc}")

    #: appended to a SELECT that claims rows: on PostgreSQL ``FOR UPDATE SKIP LOCKED`` (a
    #: row another transaction is claiming is passed over); SQLite's writer lock suffices
    skip_locked: str = ""

    @contextmanager
    def transaction(self, *, serialize: bool = True) -> Iterator[Conn]:
        """One write transaction, serialised with every other writer of this database (in
        every process); a nested call in the same thread joins the enclosing one.

        ``serialize=False`` (PostgreSQL) skips the database-wide writer lock: for
        transactions whose correctness rests on row locks alone (outbox claims with
        :attr:`skip_locked`). SQLite has only the one writer lock."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._tx_conn()
                finally:
                    self._depth -= 1
                return
            self._depth, self._owner = 1, threading.get_ident()
            try:
                try:
                    conn = self._begin(serialize)
                except self.driver_errors as exc:
                    raise self.fail("cannot begin a write", exc) from exc
                try:
                    yield conn
                except BaseException:
                    try:
                        self._rollback(conn)
                    except self.driver_errors:
                        log.warning("%s: rollback failed", self.where)
                    raise
                self._commit(conn)
            except self.driver_errors as exc:
                raise self.fail("", exc) from exc
            finally:
                self._depth, self._owner = 0, 0

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read; inside this thread's transaction it sees that transaction."""
        try:
            if self._depth and self._owner == threading.get_ident():
                return list(self._tx_conn().execute(sql, params))
            return self._read(sql, params)
        except self.driver_errors as exc:
            raise self.fail("", exc) from exc

    def tables(self) -> set[str]:
        """The tables this database holds (its schema's, on PostgreSQL)."""
        raise NotImplementedError

    def has_column(self, table: str, column: str) -> bool:
        raise NotImplementedError

    def snapshot(self) -> AbstractContextManager[Conn]:
        """A read-only connection seeing one consistent state of the database for the
        whole block (long reads such as verifying the audit chain); writers go on."""
        raise NotImplementedError

    def version(self, namespace: str) -> int:
        with self.transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions"
                " (namespace TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
        rows = self.query("SELECT version FROM schema_versions WHERE namespace = ?", (namespace,))
        return int(rows[0][0]) if rows else 0

    def migrate(self, namespace: str, migrations: Sequence[str], what: str = "") -> None:
        """Run ``namespace``'s numbered migrations not yet applied, each in one write
        transaction that re-reads the version (replicas starting at once migrate once).
        A database newer than the code is refused."""
        what = what or ("schema" if namespace == "schema" else f"{namespace} schema")
        core = namespace == "schema" and self.user_version() is not None
        if not core:
            self.version(namespace)  # creates schema_versions
        while True:
            with self.transaction() as db:
                current = self._current(db, namespace, core)
                if current > len(migrations):
                    raise self._error(
                        f"{self.where} has {what} version {current}, newer than this "
                        f"yigong-gateway supports ({len(migrations)}); upgrade yigong-gateway"
                    )
                if current == len(migrations):
                    return
                number = current + 1
                log.info("%s: applying %s migration %d", self.where, what, number)
                for statement in migrations[number - 1].split(";"):
                    if statement.strip():
                        db.execute(self.ddl(statement))
                if core:
                    db.execute(f"PRAGMA user_version = {number}")
                else:
                    db.execute(
                        "INSERT INTO schema_versions VALUES (?, ?) ON CONFLICT(namespace)"
                        " DO UPDATE SET version = excluded.version",
                        (namespace, number),
                    )

    @staticmethod
    def _current(db: Conn, namespace: str, core: bool) -> int:
        if core:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
        row = db.execute(
            "SELECT version FROM schema_versions WHERE namespace = ?", (namespace,)
        ).fetchone()
        return int(row[0]) if row else 0

    def ddl(self, statement: str) -> str:
        """A migration statement in this engine's dialect."""
        return statement


# --- SQLite ------------------------------------------------------------------------------
class SqliteDatabase(Database):
    """One connection (WAL, ``synchronous=FULL``) shared by the process's threads."""

    engine = SQLITE
    driver_errors = (sqlite3.Error,)

    def __init__(self, path: Path, error: type[YigongError], *, label: str = "catalog") -> None:
        super().__init__(f"{label} {path}", error)
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
        except (sqlite3.Error, OSError) as exc:
            raise error(f"cannot open {label} {path}: {exc}") from exc

    def _begin(self, serialize: bool) -> Conn:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def _commit(self, conn: Conn) -> None:
        self._db.execute("COMMIT")

    def _rollback(self, conn: Conn) -> None:
        self._db.execute("ROLLBACK")

    def _tx_conn(self) -> Conn:
        return self._db

    def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._lock:
            return list(self._db.execute(sql, params))

    def user_version(self) -> int | None:
        return int(self.query("PRAGMA user_version")[0][0])

    def tables(self) -> set[str]:
        rows = self.query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        return {str(r[0]) for r in rows}

    def has_column(self, table: str, column: str) -> bool:
        return any(r[1] == column for r in self.query(f'PRAGMA table_info("{table}")'))

    @contextmanager
    def snapshot(self) -> Iterator[Conn]:
        try:
            conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise self.fail("cannot open for reading", exc) from exc
        try:
            conn.execute("BEGIN")  # one snapshot (WAL) for every read of the block
            yield conn
        except sqlite3.Error as exc:
            raise self.fail("", exc) from exc
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- PostgreSQL --------------------------------------------------------------------------
class PgRow:
    """A PostgreSQL result row that reads like ``sqlite3.Row``."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = tuple(values)
        self._index = index

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PgRow):
            return self._values == other._values
        return self._values == other

    def __hash__(self) -> int:
        return hash(self._values)

    def keys(self) -> list[str]:
        return list(self._index)

    def __repr__(self) -> str:
        return f"PgRow{self._values!r}"


def _pg_row_factory(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    index = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


_QUOTED = re.compile(r"('(?:[^']|'')*'|\"[^\"]*\")")


@functools.lru_cache(maxsize=4096)
def pg_sql(sql: str) -> str:
    """``sql`` with ``?`` placeholders as psycopg's ``%s`` (quoted text left alone)."""
    parts = _QUOTED.split(sql)
    for i in range(0, len(parts), 2):  # outside quotes
        parts[i] = parts[i].replace("%", "%%").replace("?", "%s")
    for i in range(1, len(parts), 2):
        parts[i] = parts[i].replace("%", "%%")
    return "".join(parts)


_TYPE_MAP = (
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY(\s+AUTOINCREMENT)?\b", re.I),
     "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
    (re.compile(r"\bBLOB\b", re.I), "BYTEA"),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
    (re.compile(r"\)\s*WITHOUT\s+ROWID\s*$", re.I), ")"),
)  # fmt: skip
_CREATE_TABLE = re.compile(r"^\s*CREATE\s+TABLE\b", re.I)


@functools.lru_cache(maxsize=512)
def pg_ddl(statement: str) -> str:
    """A migration statement written for SQLite, in PostgreSQL's dialect."""
    out = statement
    for pattern, repl in _TYPE_MAP:
        out = pattern.sub(repl, out)
    if _CREATE_TABLE.match(out) and not re.search(r"\browid\b", out, re.I):
        end = out.rstrip().rfind(")")
        out = out[:end].rstrip() + ",\n    rowid BIGINT GENERATED ALWAYS AS IDENTITY\n)"
    return out


_CURSORS = itertools.count(1)


def _pg_params(params: Sequence[Any]) -> Sequence[Any] | None:
    if not params:
        return None
    return [int(p) if isinstance(p, bool) else p for p in params]


class _PgConn:
    """A psycopg connection that takes the portable SQL (see :func:`pg_sql`)."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        params = _pg_params(parameters)
        return self.raw.execute(pg_sql(sql) if params is not None else sql, params)

    def stream(self, sql: str, parameters: Sequence[Any] = ()) -> Iterator[Any]:
        """Rows of one query fetched in batches by a server-side cursor (inside a
        transaction, e.g. :meth:`PostgresDatabase.snapshot`): a long scan in bounded
        memory."""
        params = _pg_params(parameters)
        with self.raw.cursor(name=f"stream_{id(self)}_{next(_CURSORS)}") as cur:
            cur.itersize = 5000
            cur.execute(pg_sql(sql) if params is not None else sql, params)
            yield from cur


class PostgresDatabase(Database):
    """A pool of connections to one PostgreSQL database, tables in schema ``schema``."""

    engine = POSTGRESQL
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        url: str,
        error: type[YigongError],
        *,
        schema: str,
        label: str = "catalog",
        pool_size: int = 8,
        connect_timeout: float = 10.0,
    ) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:  # pragma: no cover - psycopg is a dependency
            raise ConfigError(
                "database.url names PostgreSQL but psycopg is not installed: "
                "pip install 'psycopg[binary]' psycopg-pool"
            ) from exc
        super().__init__(f"{label} {redact_url(url)} (schema {schema})", error)
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
            raise ConfigError(f"PostgreSQL schema name {schema!r}: use [a-z0-9_]")
        self.url, self.schema = url, schema
        self._key = lock_key(f"yigong:{schema}")
        self.driver_errors = (psycopg.Error, psycopg_pool.PoolTimeout)
        self._psycopg = psycopg
        try:
            with psycopg.connect(
                url, autocommit=True, connect_timeout=max(1, round(connect_timeout))
            ) as c:
                row = c.execute(
                    "SELECT datcollate FROM pg_database WHERE datname = current_database()"
                ).fetchone()
                collate = row[0] if row else "C"
                if str(collate).split(".")[0] not in ("C", "POSIX"):
                    log.warning(
                        "%s: database collation %s sorts text unlike SQLite (listings page by "
                        "UIDs and times); create it with LC_COLLATE 'C' (docs/scaling.md)",
                        redact_url(url), collate,
                    )  # fmt: skip
                c.execute("SELECT pg_advisory_lock(%s)", (lock_key("yigong:create-schema"),))
                try:
                    c.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                finally:
                    c.execute("SELECT pg_advisory_unlock(%s)", (lock_key("yigong:create-schema"),))
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise error(
                f"cannot open {label} at {redact_url(url)} (is PostgreSQL running there, and "
                f"may this user connect and create a schema?): {first}"
            ) from exc
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "row_factory": _pg_row_factory},
            configure=self._configure,
            timeout=connect_timeout,
            name=f"yigong-{schema}",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg_pool.PoolTimeout as exc:
            raise error(f"cannot open {label} at {redact_url(url)}: {exc}") from exc
        self._conn: Any = None  # the connection of the open transaction
        self._writer: Any = None  # the one connection this process writes on

    def _configure(self, conn: Any) -> None:
        from psycopg.types.numeric import NumericLoader

        class _IntNumeric(NumericLoader):
            def load(self, data: Any) -> Any:
                value = super().load(data)
                if isinstance(value, Decimal) and value == value.to_integral_value():
                    return int(value)
                return float(value) if isinstance(value, Decimal) else value

        conn.adapters.register_loader("numeric", _IntNumeric)
        conn.execute(f'SET search_path TO "{self.schema}"')

    def _connect_writer(self) -> Any:
        raw = self._psycopg.connect(
            self.url, autocommit=True, row_factory=_pg_row_factory, connect_timeout=10
        )
        self._configure(raw)
        return raw

    def _begin(self, serialize: bool) -> Conn:
        """BEGIN (and the writer lock) on the process's one writer connection, reconnected
        when PostgreSQL dropped it. One round trip: both in one simple-protocol message."""
        begin = "BEGIN" + (f"; SELECT pg_advisory_xact_lock({int(self._key)})" if serialize else "")
        for attempt in (1, 2):
            if self._writer is None or self._writer.closed or self._writer.broken:
                self._close_writer()
                self._writer = self._connect_writer()
            try:
                self._writer.execute(begin)
                break
            except self._psycopg.OperationalError:
                self._close_writer()
                if attempt == 2:
                    raise
                log.warning("%s: connection lost; reconnecting", self.where)
        self._conn = _PgConn(self._writer)
        return self._conn

    def _close_writer(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except self._psycopg.Error:
                pass
        self._writer = None

    def _commit(self, conn: Conn) -> None:
        self._conn = None
        try:
            self._writer.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    def _rollback(self, conn: Conn) -> None:
        self._conn = None
        try:
            self._writer.execute("ROLLBACK")
        except self._psycopg.Error:
            self._close_writer()  # state unknown: the next transaction reconnects

    def _tx_conn(self) -> Conn:
        return self._conn

    def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            with self._pool.connection() as raw:
                return list(_PgConn(raw).execute(sql, params))
        except self._psycopg.OperationalError:  # a pooled connection PostgreSQL dropped
            with self._pool.connection() as raw:
                return list(_PgConn(raw).execute(sql, params))

    def ddl(self, statement: str) -> str:
        return pg_ddl(statement)

    def tables(self) -> set[str]:
        rows = self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
            (self.schema,),
        )
        return {str(r[0]) for r in rows}

    def has_column(self, table: str, column: str) -> bool:
        return bool(
            self.query(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = ?"
                " AND table_name = ? AND column_name = ?",
                (self.schema, table, column),
            )
        )

    @contextmanager
    def snapshot(self) -> Iterator[Conn]:
        try:
            with self._pool.connection() as raw:
                raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                try:
                    yield _PgConn(raw)
                finally:
                    raw.execute("ROLLBACK")
        except self.driver_errors as exc:
            raise self.fail("", exc) from exc

    def close(self) -> None:
        with self._lock:
            self._close_writer()
            self._pool.close()


def open_database(
    url: str,
    path: Path,
    error: type[YigongError],
    *,
    schema: str,
    label: str,
    pool_size: int = 8,
) -> Database:
    """The database ``[database] url`` names (PostgreSQL), else the SQLite file ``path``."""
    if url:
        if not is_postgresql_url(url):
            raise ConfigError(
                f"database.url {redact_url(url)!r}: only postgresql:// URLs are supported "
                "(leave it empty for the embedded SQLite files)"
            )
        return PostgresDatabase(url, error, schema=schema, label=label, pool_size=pool_size)
    return SqliteDatabase(path, error, label=label)

