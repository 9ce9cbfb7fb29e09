"""Reading and validating the canonical raw logs (docs/data-format.md) for the Beam pipelines.

Place in the data flow: first step of `ebr pipeline examples`. Files are read through Beam's
file systems (local, gs://, ...; `.gz` decompressed by extension) in numbered chunks of lines so
every record keeps its file and 1-based line; each line is then parsed and checked here. A bad
record raises `BadRecord(reason, detail)`; the pipeline turns it into a dead letter
`{"file", "line", "reason", "detail", "record"}`. Checks that need other records (unknown ids,
duplicates) live in `examples.py`; their reason codes are defined here with the others.

Plain Python, no Beam imports at module level: the functions are unit-testable and cheap to
pickle into workers.
"""
from __future__ import annotations

import json
import math
from typing import Iterator

from ebr import features

SEARCHERS, DOCUMENTS, SESSIONS = "searchers", "documents", "sessions"
KINDS = (SEARCHERS, DOCUMENTS, SESSIONS)

# Dead-letter reason codes (stable strings: stats.json and dead letters use them).
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_QUERY = "empty_query"
QUERY_TOO_LONG = "query_too_long"
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"
CLICK_NOT_IMPRESSED = "click_not_impressed"
UNKNOWN_SEARCHER = "unknown_searcher_id"
UNKNOWN_DOCUMENT = "unknown_doc_id"
DUPLICATE_SESSION = "duplicate_session_id"
DUPLICATE_SEARCHER = "duplicate_searcher_id"
DUPLICATE_DOCUMENT = "duplicate_doc_id"
REASONS = (INVALID_UTF8, MALFORMED_JSON, NOT_AN_OBJECT, MISSING_FIELD, WRONG_TYPE, EMPTY_QUERY,
           QUERY_TOO_LONG, EMPTY_TEXT, TEXT_TOO_LONG, CLICK_NOT_IMPRESSED, UNKNOWN_SEARCHER,
           UNKNOWN_DOCUMENT, DUPLICATE_SESSION, DUPLICATE_SEARCHER, DUPLICATE_DOCUMENT)

CHUNK_LINES = 2000
_READ_BLOCK = 1 << 20


class BadRecord(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Files

def resolve_inputs(raw_dir: str) -> dict[str, str]:
    """{kind: path} for `RAW/{kind}.jsonl` or `.jsonl.gz`, checked readable before any run.

    A missing or unreadable file is an error naming it (FileNotFoundError / OSError), raised
    here in the driver so a bad path never becomes a half-run pipeline."""
    from apache_beam.io.filesystems import FileSystems

    found = {}
    for kind in KINDS:
        candidates = [FileSystems.join(raw_dir, f"{kind}.jsonl{ext}") for ext in ("", ".gz")]
        existing = [c for c in candidates if FileSystems.exists(c)]
        if not existing:
            raise FileNotFoundError(f"{raw_dir}: input file {kind}.jsonl (or {kind}.jsonl.gz) "
                                    "does not exist")
        if len(existing) > 1:
            raise ValueError(f"{raw_dir}: both {kind}.jsonl and {kind}.jsonl.gz exist; "
                             "keep one so the input is unambiguous")
        path = existing[0]
        try:
            with FileSystems.open(path) as f:
                f.read(1024)
        except Exception as e:  # permission, not gzip, truncated header, ...
            raise OSError(f"{path}: input file is unreadable: {e}") from None
        found[kind] = path
    return found


def read_chunks(path: str, chunk_lines: int = CHUNK_LINES) -> Iterator[tuple[str, list]]:
    """Yields `(path, [(line_number, raw_bytes), ...])` chunks of non-blank lines.

    Blank lines are skipped (they hold no record) but still counted, so line numbers match
    what an editor shows. A read error mid-file is raised naming the file."""
    from apache_beam.io.filesystems import FileSystems

    chunk: list = []
    line_no = 0
    try:
        with FileSystems.open(path) as f:
            rest = b""
            while True:
                block = f.read(_READ_BLOCK)
                if not block:
                    break
                lines = (rest + block).split(b"\n")
                rest = lines.pop()
                for raw in lines:
                    line_no += 1
                    if raw.strip():
                        chunk.append((line_no, raw.rstrip(b"\r")))
                if len(chunk) >= chunk_lines:
                    yield path, chunk
                    chunk = []
            if rest.strip():
                line_no += 1
                chunk.append((line_no, rest.rstrip(b"\r")))
    except (OSError, EOFError, ValueError) as e:
        raise OSError(f"{path}: cannot read input file after line {line_no}: {e}") from e
    if chunk:
        yield path, chunk


def display_record(raw: bytes) -> str:
    """The raw line as text for a dead letter; invalid UTF-8 bytes kept as \\xNN escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


# ---------------------------------------------------------------------------------------------
# Records

def parse_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(INVALID_UTF8, f"invalid UTF-8 at byte {e.start}") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise BadRecord(MALFORMED_JSON, str(e)) from None
    if not isinstance(record, dict):
        raise BadRecord(NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    return record


def _id(record: dict, kind: str, field: str) -> str:
    value = record.get(field)
    if value is None or value == "":
        raise BadRecord(MISSING_FIELD, f"{kind}.{field} is required")
    if not isinstance(value, str):
        raise BadRecord(WRONG_TYPE, f"{kind}.{field}: expected a string, got "
                                    f"{type(value).__name__}")
    return value


def _opt_str(record: dict, kind: str, field: str) -> str:
    value = record.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(WRONG_TYPE, f"{kind}.{field}: expected a string, got "
                                    f"{type(value).__name__}")
    return value


def _str_list(record: dict, kind: str, field: str, required: bool = False) -> list[str]:
    value = record.get(field)
    if value is None:
        if required:
            raise BadRecord(MISSING_FIELD, f"{kind}.{field} is required")
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        got = type(value).__name__ if not isinstance(value, list) else "a list with non-strings"
        raise BadRecord(WRONG_TYPE, f"{kind}.{field}: expected a list of strings, got {got}")
    return value


_SCALAR = (str, int, float, bool)


def _attributes(record: dict, kind: str) -> dict:
    value = record.get("attributes")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRecord(WRONG_TYPE, f"{kind}.attributes: expected an object, got "
                                    f"{type(value).__name__}")
    for key, v in value.items():
        # Documented as strings or lists of strings; numbers are accepted too since they
        # stringify unambiguously (MovieLens ages, years).
        ok = isinstance(v, _SCALAR) or (isinstance(v, list) and all(isinstance(x, _SCALAR)
                                                                    for x in v))
        if not ok:
            raise BadRecord(WRONG_TYPE, f"{kind}.attributes.{key}: expected a string or a list "
                                        f"of strings, got {type(v).__name__}")
    return value


def _dedupe(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def validate_searcher(record: dict) -> dict:
    k = SEARCHERS
    return {
        "searcher_id": _id(record, k, "searcher_id"),
        "city": _opt_str(record, k, "city"),
        "region": _opt_str(record, k, "region"),
        "country": _opt_str(record, k, "country"),
        "language": _opt_str(record, k, "language"),
        "attributes": _attributes(record, k),
        "friends": _str_list(record, k, "friends"),
    }


def validate_document(record: dict) -> dict:
    k = DOCUMENTS
    doc_id = _id(record, k, "doc_id")
    text = record.get("text")
    if text is None:
        raise BadRecord(MISSING_FIELD, f"{k}.text is required")
    if not isinstance(text, str):
        raise BadRecord(WRONG_TYPE, f"{k}.text: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise BadRecord(EMPTY_TEXT, f"{k}.text is empty")
    if len(text) > features.MAX_TEXT_CHARS:
        raise BadRecord(TEXT_TOO_LONG, f"{k}.text has {len(text)} characters "
                                       f"(limit {features.MAX_TEXT_CHARS})")
    return {
        "doc_id": doc_id,
        "text": text,
        "type": _opt_str(record, k, "type"),
        "city": _opt_str(record, k, "city"),
        "region": _opt_str(record, k, "region"),
        "country": _opt_str(record, k, "country"),
        "language": _opt_str(record, k, "language"),
        "attributes": _attributes(record, k),
        "members": _str_list(record, k, "members"),
    }


def validate_session(record: dict, allow_empty_query: bool) -> dict:
    """Checks one session on its own; ids are checked against the other files later.

    `clicks` and `impressions` are de-duplicated keeping first occurrence (one example per
    (session, clicked document))."""
    k = SESSIONS
    session_id = _id(record, k, "session_id")
    searcher_id = _id(record, k, "searcher_id")
    ts = record.get("timestamp")
    if ts is None:
        raise BadRecord(MISSING_FIELD, f"{k}.timestamp is required")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise BadRecord(WRONG_TYPE, f"{k}.timestamp: expected unix seconds (a number), got "
                                    f"{type(ts).__name__}")
    query = _opt_str(record, k, "query")
    if len(query) > features.MAX_TEXT_CHARS:
        raise BadRecord(QUERY_TOO_LONG, f"{k}.query has {len(query)} characters "
                                        f"(limit {features.MAX_TEXT_CHARS})")
    if not query.strip():
        if not allow_empty_query:
            raise BadRecord(EMPTY_QUERY, f"{k}.query is empty (recommendation logs without "
                                         "queries need --allow-empty-query)")
        query = ""
    if "clicks" not in record or record["clicks"] is None:
        raise BadRecord(MISSING_FIELD, f"{k}.clicks is required (use [] for no click)")
    clicks = _dedupe(_str_list(record, k, "clicks", required=True))
    impressions = _dedupe(_str_list(record, k, "impressions"))
    if impressions:
        shown = set(impressions)
        missing = [c for c in clicks if c not in shown]
        if missing:
            raise BadRecord(CLICK_NOT_IMPRESSED, f"{k}.clicks: {missing[:5]} not in impressions")
    return {
        "session_id": session_id,
        "searcher_id": searcher_id,
        "timestamp": int(math.floor(ts)),
        "query": query,
        "impressions": impressions,
        "clicks": clicks,
    }


def validate(kind: str, raw: bytes, allow_empty_query: bool = False) -> dict:
    record = parse_object(raw)
    if kind == SEARCHERS:
        return validate_searcher(record)
    if kind == DOCUMENTS:
        return validate_document(record)
    return validate_session(record, allow_empty_query)


def dead_letter(path: str, line: int, reason: str, detail: str, record: str) -> dict:
    return {"file": path, "line": line, "reason": reason, "detail": detail, "record": record}
