"""Clean Descriptors: allowlist cleaning of free-text descriptors.

Why an allowlist: descriptors such as Study/Series Description, Protocol Name or Image
Comments are typed by people and routinely carry names ("CT HEAD DR WANG"), dates,
phone numbers and record numbers, in any script. No blocklist can know every name,
but the vocabulary of acquisition descriptors is small and technical. So every token
that is not a known clinical/technical word (``clean_words.txt``), a short number or
a short number with a unit is replaced by ``X``; separators are kept. "AXIAL 1.0 BONE"
stays as it is, "CT HEAD DR WANG 2024-03-15" becomes "CT HEAD X X X".

Rules (conservative on purpose):

- Tokens are runs of characters between whitespace and the ASCII punctuation below;
  ``. - / :`` join characters inside a token ("1.0mm", "L4-L5", "2024-03-15") and
  are separators only at a token's edge. Letters of any script belong to tokens, so
  a name in Chinese characters is one token and is replaced.
- Numbers: at most 4 integer and 4 fractional digits; integers 1900-2099 look like
  years and are replaced. Number + unit (``120kV``, ``0.625mm``) and dimensions
  (``512x512``, ``0.5x0.5mm``) follow the same digit limits.
- Compound tokens ("AXIAL/CORONAL", "L4-L5") are kept only when every part is kept
  and at most one part is a number (so dates and times are replaced).
- Three or more numbers in a row ("138 0013 8000") are all replaced: they look like
  a phone number or a date written with spaces.

Cleaning is idempotent: ``clean_text(clean_text(v)) == clean_text(v)``; the scanner
relies on this to recognise a cleaned value.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from gateway.errors import ConfigError

WORDS_RESOURCE = "clean_words.txt"
REPLACEMENT = "X"

_SEPARATOR_CHARS = " \t\r\n\f\v^\\,;()[]{}<>\"'_=+*&#!?|~`@$"
_EDGE_CHARS = ".-/:"
_SPLIT_RE = re.compile(r"([\s" + re.escape(_SEPARATOR_CHARS) + r"]+)")
_COMPOUND_SPLIT_RE = re.compile(r"[/:\-]")

_UNITS = (
    "mm|cm|m|um|µm|nm|mm2|mm3|cm2|cm3|ml|l|ms|s|sec|min|h|hr|hz|khz|mhz|kv|kvp|ma|mas|"
    "mgy|gy|mgycm|hu|deg|°|%|t|mt|mg|g|kg|mmol|mol|bpm|cc|mls|x|px|mm/s|ml/s|cm/s|ppm|"
    "ch|f|fr|mf|sl|rows|cols|slices|mb|kb"
)
_NUM = r"\d{1,4}(?:[.,]\d{1,4})?"
_NUMBER_RE = re.compile(_NUM)
_NUMBER_UNIT_RE = re.compile(rf"{_NUM}(?:{_UNITS})", re.IGNORECASE)
_DIMENSION_RE = re.compile(rf"{_NUM}(?:x{_NUM})+(?:{_UNITS})?", re.IGNORECASE)


@functools.cache
def allowed_words() -> frozenset[str]:
    """The packaged allowlist, upper-cased (``#`` starts a comment)."""
    try:
        text = resources.files(__package__).joinpath(WORDS_RESOURCE).read_text("utf-8")
    except OSError as exc:  # e.g. a wheel built without *.txt package data
        raise ConfigError(f"cannot load packaged {WORDS_RESOURCE}: {exc}") from exc
    words = set()
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip()
        if word:
            words.add(word.upper())
    words.add(REPLACEMENT)
    return frozenset(words)


def _is_number(token: str) -> bool:
    if not _NUMBER_RE.fullmatch(token):
        return False
    if "." not in token and "," not in token and 1900 <= int(token) <= 2099:
        return False
    return True


def _simple_ok(token: str, words: frozenset[str]) -> bool:
    return (
        token.upper() in words
        or _is_number(token)
        or bool(_NUMBER_UNIT_RE.fullmatch(token))
        or bool(_DIMENSION_RE.fullmatch(token))
    )


def _token_ok(token: str, words: frozenset[str]) -> bool:
    if _simple_ok(token, words):
        return True
    if not _COMPOUND_SPLIT_RE.search(token):
        return False
    parts = _COMPOUND_SPLIT_RE.split(token)
    if any(not p or not _simple_ok(p, words) for p in parts):
        return False
    return sum(1 for p in parts if _is_number(p)) <= 1


def _split_edges(chunk: str) -> tuple[str, str, str]:
    core = chunk.strip(_EDGE_CHARS)
    if not core:
        return chunk, "", ""
    start = chunk.index(core)
    return chunk[:start], core, chunk[start + len(core) :]


def clean_text(value: str) -> str:
    """Clean one descriptor value: every token not allowed becomes ``X``."""
    if not value:
        return value
    words = allowed_words()
    pieces: list[tuple[str, bool]] = []  # (text, is_token)
    for i, chunk in enumerate(_SPLIT_RE.split(value)):
        if not chunk:
            continue
        if i % 2 == 1:  # separator run
            pieces.append((chunk, False))
            continue
        lead, core, trail = _split_edges(chunk)
        if lead:
            pieces.append((lead, False))
        if core:
            pieces.append((core, True))
        if trail:
            pieces.append((trail, False))

    out = [text if not is_tok or _token_ok(text, words) else REPLACEMENT for text, is_tok in pieces]
    _blank_number_runs(pieces, out)
    return "".join(out)


def _blank_number_runs(pieces: list[tuple[str, bool]], out: list[str]) -> None:
    run: list[int] = []
    for idx, (_text, is_tok) in enumerate(pieces):
        if not is_tok:
            continue
        if _is_number(out[idx]):
            run.append(idx)
            continue
        _flush(run, out)
        run = []
    _flush(run, out)


def _flush(run: list[int], out: list[str]) -> None:
    if len(run) >= 3:
        for idx in run:
            out[idx] = REPLACEMENT


def is_clean(value: str) -> bool:
    """True when ``value`` is unchanged by cleaning."""
    return clean_text(value) == value
