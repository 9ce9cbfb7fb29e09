"""JSON Lines I/O for the canonical raw logs (docs/data-format.md), plain or gzip, any URI.

Place in the data flow: the data-set writers (`ebr data social|movielens --out RAW`) stream
records through `JsonlWriter` into a local staging directory (`staged_output_dir`), which is
uploaded to RAW through `ebr.storage` only once everything is written (local disk or gs://;
a plain, unversioned directory, docs/contracts.md). A failed run leaves RAW as it was; a rerun
leaves no file of the earlier output that the new one does not have. `read_jsonl` is the
matching streaming reader (local files directly, remote ones through tf.io.gfile): every error
names the file and the 1-based line. `ebr pipeline examples` reads RAW through Beam's file
systems (`beam_pipelines/rawlog.py`).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ebr import storage
from ebr.config import CONFIG_FILE

RAW_FILES = ("searchers", "documents", "sessions")
# Written last (and removed first) when an output is replaced: present means complete.
_META_FILES = ("generator.json", "source.json")
# The `ebr data` command's configuration beside the logs: removed first too, so an earlier
# run's never describes the new output.
_RECORD_FILES = (CONFIG_FILE,)
# Files whose presence marks a directory as an earlier output of ours, safe to replace.
_OUTPUT_MARKERS = _META_FILES + tuple(
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


def find_raw_file(directory: str | Path, name: str) -> str:
    """`DIR/name.jsonl` or `DIR/name.jsonl.gz` (any URI); a clear error naming both when
    neither exists."""
    d = storage.normalize(directory)
    for candidate in (storage.join(d, f"{name}.jsonl"), storage.join(d, f"{name}.jsonl.gz")):
        if storage.exists(candidate) and not storage.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"{d}: neither {name}.jsonl nor {name}.jsonl.gz exists")


@contextlib.contextmanager
def _open_read(path: str):
    """Binary lines of a local or remote (tf.io.gfile) file, gunzipped by extension."""
    if storage.is_local(path):
        raw = open(path, "rb")
    else:
        import tensorflow as tf

        raw = tf.io.gfile.GFile(path, "rb")
    try:
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield io.BufferedReader(gz, 1 << 20)
        else:
            yield raw if storage.is_local(path) else io.BufferedReader(_RawGFile(raw), 1 << 20)
    finally:
        raw.close()


class _RawGFile(io.RawIOBase):
    """A GFile as a raw stream, so io.BufferedReader iterates its lines in C."""

    def __init__(self, f) -> None:
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yields `(line_number, record)` for every non-blank line of a local or remote (gs://)
    file; bad UTF-8, bad JSON or a non-object line raises ValueError naming `path:line`."""
    path = storage.normalize(path)
    if not storage.exists(path) or storage.isdir(path):
        raise FileNotFoundError(f"{path}: no such file")
    with _open_read(path) as f:
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


def check_replaceable(out: str) -> None:
    """`out` must be absent, empty, or hold an earlier raw-log output (a marker file such as
    generator.json or sessions.jsonl): pointing --out at an unrelated non-empty directory is an
    error rather than a silent overwrite."""
    if not storage.exists(out):
        return
    if not storage.isdir(out):
        raise ValueError(f"check output {out}: exists and is not a directory")
    names = set(storage.listdir(out))
    if names and not names & set(_OUTPUT_MARKERS):
        raise ValueError(f"check output {out}: is a non-empty directory that does not hold a "
                         "raw-log output; refusing to replace it (choose an empty or new --out)")


def publish_raw(staging: str | Path, out: str) -> list[str]:
    """Uploads a staged raw-log directory to `out` (any URI) through `ebr.storage`.

    Object stores have no directory rename, so the files are replaced one by one, in an
    order that lets a reader tell a finished output: the old generator.json / source.json (and
    the command's config.json) go first, then raw-log files of an earlier output that this one
    does not have (e.g. `.gz` after a plain run), then the new data files, the new
    generator.json / source.json last."""
    staging = str(staging)
    new = storage.walk_files(staging)
    meta = [f for f in new if f in _META_FILES]
    present = set(storage.listdir(out))
    for name in _META_FILES + _RECORD_FILES:
        if name in present:
            storage.remove(storage.join(out, name))
    for name in sorted(present & set(_OUTPUT_MARKERS) - set(new)):
        storage.remove(storage.join(out, name))
    for rel in [f for f in new if f not in meta] + meta:
        storage.copy_file(os.path.join(staging, *rel.split("/")), storage.join(out, rel))
    return new


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yields a fresh local staging directory; on success its files replace the raw-log
    output at `out_dir` (any URI, `publish_raw`), on failure it is removed and `out_dir` is
    left as it was. Refuses an unrelated non-empty `out_dir` before anything is written."""
    out = storage.normalize(out_dir)
    check_replaceable(out)
    with tempfile.TemporaryDirectory(prefix="ebr-raw-") as tmp:
        yield Path(tmp)
        publish_raw(tmp, out)
