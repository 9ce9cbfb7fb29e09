"""JSON Lines I/O for the canonical raw logs (docs/data-format.md), plain or gzip.

The data-set writers (`ebr data social|movielens`) stream records through `JsonlWriter` into a
temporary directory that `atomic_output_dir` renames into place only once everything is
written, so a rerun never leaves old and new files mixed. `read_jsonl` is the matching
streaming reader: every error names the file and the 1-based line.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

RAW_FILES = ("searchers", "documents", "sessions")
# Files whose presence marks a directory as an earlier output of ours, safe to replace whole.
_OUTPUT_MARKERS = ("generator.json", "source.json") + tuple(
    f"{name}.jsonl{ext}" for name in RAW_FILES for ext in ("", ".gz"))


def dumps(record: dict) -> str:
    """One compact JSON line; non-ASCII kept as UTF-8 (titles like "Café")."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _open_write(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        # mtime=0 and no embedded file name keep .gz output byte-identical across runs.
        raw = open(path, "wb")
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
        return _ClosingText(gz, raw)
    return open(path, "w", encoding="utf-8", newline="\n")


class _ClosingText(io.TextIOWrapper):
    """Text wrapper over a GzipFile that also closes the underlying file object."""

    def __init__(self, gz: gzip.GzipFile, raw) -> None:
        super().__init__(gz, encoding="utf-8", newline="\n")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


class JsonlWriter:
    """Streams records (dicts or pre-serialised lines) to `path` (.jsonl or .jsonl.gz).

    Lines are buffered and written in blocks so callers producing millions of small records
    are not bound by per-call I/O overhead."""

    def __init__(self, path: str | Path, buffer_lines: int = 4096) -> None:
        self.path = Path(path)
        self._f = _open_write(self.path)
        self._buf: list[str] = []
        self._limit = buffer_lines
        self.count = 0

    def write(self, record: dict) -> None:
        self.write_line(dumps(record))

    def write_line(self, line: str) -> None:
        self._buf.append(line)
        self.count += 1
        if len(self._buf) >= self._limit:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._f.write("\n".join(self._buf))
            self._f.write("\n")
            self._buf.clear()

    def close(self) -> None:
        self.flush()
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_raw_file(directory: str | Path, name: str) -> Path:
    """`DIR/name.jsonl` or `DIR/name.jsonl.gz`; a clear error naming both when neither exists."""
    d = Path(directory)
    for candidate in (d / f"{name}.jsonl", d / f"{name}.jsonl.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{d}: neither {name}.jsonl nor {name}.jsonl.gz exists")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yields `(line_number, record)` for every non-blank line; bad UTF-8, bad JSON or a
    non-object line raises ValueError naming `path:line`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_records(path: str | Path) -> Iterator[dict]:
    for _, record in read_jsonl(path):
        yield record


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `out_dir`; on success it replaces `out_dir`
    whole (rename), on failure it is removed and `out_dir` is left as it was.

    An existing `out_dir` is replaced only if it is empty or holds an earlier raw-log output
    (a marker file such as generator.json or sessions.jsonl): pointing --out at an unrelated
    non-empty directory is an error rather than a silent deletion."""
    out = Path(out_dir).absolute()
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not any((out / m).exists() for m in _OUTPUT_MARKERS):
            raise ValueError(f"{out}: is a non-empty directory that does not hold a raw-log output; "
                             "refusing to replace it (choose an empty or new --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the output is ordinary data
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "x")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
