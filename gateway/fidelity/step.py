"""ISO 10303-21 (STEP physical file) structure check, streamed in bounded memory.

Checked: the file begins with ``ISO-10303-21;``, then ``HEADER;`` whose first three
entities are FILE_DESCRIPTION, FILE_NAME and FILE_SCHEMA, ``ENDSEC;``; then DATA
sections (``DATA;`` or ``DATA(...);``) of ``#n = ...;`` entity instances closed by
``ENDSEC;`` (ANCHOR, REFERENCE and SIGNATURE sections of edition 3 are skipped);
the file ends with ``END-ISO-10303-21;`` and nothing but whitespace or comments
after it; every string and comment is closed. Statements are split at ``;`` outside
strings (``'...'`` with ``''`` escapes) and comments; only the first 512 characters
of each are kept. Not checked: the entities' attributes against the EXPRESS schema,
references to undefined instances, duplicate instance names.

Facts: ``step.schema`` (first FILE_SCHEMA name, restricted to ``[A-Za-z0-9_ .{}-]``),
``step.data_sections``, ``step.entities``. Nothing else from the header is reported:
FILE_NAME and FILE_DESCRIPTION may carry names of people.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from gateway.errors import StepFormatError

_NORMAL_STOP = re.compile(r"'|;|/\*")
_ENTITY = re.compile(r"#\d+\s*=")
_HEAD_CHARS = 512


class _Part21:
    """Splits ISO 10303-21 text into statements (``;`` outside strings and comments).

    Keeps only the first characters of each statement, so memory stays bounded."""

    def __init__(self) -> None:
        self.state = "n"  # n: normal, s: in 'string', c: in /* comment */
        self.head: list[str] = []
        self.length = 0
        self.buf = ""

    def _add(self, text: str) -> None:
        if self.length < _HEAD_CHARS:
            self.head.append(text[: _HEAD_CHARS - self.length])
        self.length += len(text)

    def _emit(self) -> str:
        stmt = " ".join("".join(self.head).split())
        self.head, self.length = [], 0
        return stmt

    def feed(self, chunk: str) -> Iterator[str]:
        buf, pos = self.buf + chunk, 0
        while True:
            if self.state == "n":
                m = _NORMAL_STOP.search(buf, pos)
                if m is None:
                    keep = len(buf) - 1 if buf.endswith("/") else len(buf)
                    self._add(buf[pos:keep])
                    self.buf = buf[keep:]
                    return
                self._add(buf[pos : m.start()])
                pos = m.end()
                if m.group() == ";":
                    yield self._emit()
                elif m.group() == "'":
                    self._add("'")
                    self.state = "s"
                else:
                    self._add(" ")
                    self.state = "c"
            elif self.state == "s":
                i = buf.find("'", pos)
                if i < 0 or i + 1 == len(buf):
                    end = len(buf) if i < 0 else i
                    self._add(buf[pos:end])
                    self.buf = buf[end:]
                    return
                if buf[i + 1] == "'":
                    self._add(buf[pos : i + 2])
                    pos = i + 2
                else:
                    self._add(buf[pos : i + 1])
                    self.state, pos = "n", i + 1
            else:
                i = buf.find("*/", pos)
                if i < 0:
                    self.buf = "*" if buf.endswith("*") else ""
                    return
                self.state, pos = "n", i + 2

    def finish(self) -> str:
        """Text after the last statement (whitespace-collapsed); raise if inside a token."""
        if self.state == "s" and self.buf == "'":
            self._add("'")
            self.state, self.buf = "n", ""
        if self.state == "s":
            raise StepFormatError("the file ends inside a string")
        if self.state == "c":
            raise StepFormatError("the file ends inside a comment")
        self._add(self.buf)
        return self._emit()


def _step_statements(path: Path) -> Iterator[str]:
    scanner = _Part21()
    with open(path, encoding="latin-1", newline="") as fh:
        while chunk := fh.read(1 << 20):
            yield from scanner.feed(chunk)
    rest = scanner.finish()
    if rest:
        raise StepFormatError(
            f"it does not end with 'END-ISO-10303-21;' (truncated? {rest[:40]!r} has no ';')"
        )


def step_facts(path: Path) -> dict[str, str]:
    """Structure check of an ISO 10303-21 file; its schema and counts as facts."""
    stage, entities, sections, schema = "start", 0, 0, ""
    header: list[str] = []
    for n, stmt in enumerate(_step_statements(path), 1):
        upper = stmt.upper()
        if stage == "start":
            if upper != "ISO-10303-21":
                raise StepFormatError("it does not begin with 'ISO-10303-21;'")
            stage = "header?"
        elif stage == "header?":
            if upper != "HEADER":
                raise StepFormatError("'ISO-10303-21;' is not followed by 'HEADER;'")
            stage = "header"
        elif stage == "header":
            if upper == "ENDSEC":
                wanted = ["FILE_DESCRIPTION", "FILE_NAME", "FILE_SCHEMA"]
                if header[:3] != wanted:
                    raise StepFormatError(f"the HEADER section must start with {', '.join(wanted)}")
                stage = "body"
            else:
                entity = upper.split("(", 1)[0].strip()
                header.append(entity)
                if entity == "FILE_SCHEMA":
                    names = re.findall(r"'([^']*)'", stmt)
                    schema = re.sub(r"[^A-Za-z0-9_ .{}-]", "", names[0] if names else "")[:80]
        elif stage == "body":
            if upper == "END-ISO-10303-21":
                stage = "end"
            elif upper == "DATA" or upper.startswith("DATA("):
                stage, sections = "data", sections + 1
            elif upper in ("ANCHOR", "REFERENCE", "SIGNATURE"):
                stage = "other"
            else:
                raise StepFormatError(f"statement {n} ({stmt[:30]!r}) is not a section or the end")
        elif stage == "data":
            if upper == "ENDSEC":
                stage = "body"
            elif _ENTITY.match(stmt):
                entities += 1
            else:
                raise StepFormatError(
                    f"statement {n} in DATA is not an entity instance: {stmt[:30]!r}"
                )
        elif stage == "other":
            if upper == "ENDSEC":
                stage = "body"
        else:
            raise StepFormatError(f"statement {n} follows 'END-ISO-10303-21;'")
    if stage != "end":
        raise StepFormatError("it does not end with 'END-ISO-10303-21;' (truncated?)")
    if entities == 0:
        raise StepFormatError("its DATA sections contain no entity instances")
    return {
        "step.schema": schema,
        "step.data_sections": str(sections),
        "step.entities": str(entities),
    }
