"""File operations on any URI: local paths and `gs://` alike (docs/contracts.md, "Storage").

Place in the data flow: the bottom layer. `ebr.artifacts` (versions, commit markers, metadata)
and every stage's own I/O go through these functions, which are TensorFlow's file system
(`tf.io.gfile`): the same code path on local disk, in Cloud Storage (TensorFlow's built-in GCS
file system) and on any other scheme TensorFlow has registered. Beam pipelines read and write
their shards through Beam's FileSystems, which understands the same URIs.

Every failure is a `StorageError` whose one-line message names the operation and the path
(`write gs://b/x/1/saved_model.pb: PermissionDenied: ...`); an unknown URI scheme is one too.
TensorFlow is imported on first use so `ebr --help` stays fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import Iterator

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Object stores: no directory rename, no atomic replace (docs/contracts.md, "Commit protocol").
OBJECT_STORE_SCHEMES = ("gs", "s3")


class StorageError(OSError):
    """One storage operation failed; the message names the operation and the path."""


class NotFound(StorageError, FileNotFoundError):
    """The path (or its bucket) does not exist."""


def scheme(uri: str) -> str:
    """`gs` for gs://b/x, `file` for local paths."""
    m = _SCHEME.match(str(uri))
    return m.group(1).lower() if m else "file"


def is_local(uri: str) -> bool:
    return scheme(uri) == "file"


def is_object_store(uri: str) -> bool:
    return scheme(uri) in OBJECT_STORE_SCHEMES


def normalize(uri) -> str:
    """A URI without a trailing slash; local paths made absolute (`file://` stripped)."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_local(uri):
        return os.path.abspath(uri)
    return uri.rstrip("/") if not uri.endswith("://") else uri


def join(base, *parts) -> str:
    out = str(base).rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[0]


def _gfile():
    import ebr  # noqa: F401 - TF_USE_LEGACY_KERAS before TensorFlow
    import tensorflow as tf

    return tf.io.gfile


def _error(op: str, path: str, e: Exception) -> StorageError:
    import tensorflow as tf

    text = (getattr(e, "message", None) or str(e)).strip().splitlines()
    text = text[0] if text else type(e).__name__
    if isinstance(e, tf.errors.UnimplementedError) or "not implemented" in text.lower():
        return StorageError(f"{op} {path}: unknown URI scheme {scheme(path)!r} ({text})")
    kind = type(e).__name__.replace("Error", "")
    cls = NotFound if isinstance(e, (tf.errors.NotFoundError, FileNotFoundError)) else StorageError
    return cls(f"{op} {path}: {kind}: {text}")


@contextlib.contextmanager
def _op(op: str, path: str) -> Iterator[None]:
    import tensorflow as tf

    try:
        yield
    except StorageError:
        raise
    except (tf.errors.OpError, OSError, UnicodeDecodeError) as e:  # a name that is not UTF-8
        raise _error(op, path, e) from None


def exists(path: str) -> bool:
    with _op("stat", path):
        return _gfile().exists(path)


def isdir(path: str) -> bool:
    with _op("stat", path):
        return _gfile().isdir(path)


def listdir(path: str) -> list[str]:
    """Names directly under `path` (no trailing slashes); [] when it does not exist."""
    with _op("list", path):
        g = _gfile()
        if not g.isdir(path):
            return []
        return sorted({n.rstrip("/") for n in g.listdir(path)})


def glob(pattern: str) -> list[str]:
    with _op("list", pattern):
        return sorted(_gfile().glob(pattern))


def walk_files(root: str) -> list[str]:
    """Every file below `root`, as paths relative to it ('/'-separated), sorted."""
    root = str(root).rstrip("/")
    out = []
    with _op("list", root):
        g = _gfile()
        if not g.isdir(root):
            return []
        for d, _, files in g.walk(root):
            rel = str(d).rstrip("/")[len(root):].strip("/")
            out += [f"{rel}/{f}" if rel else f for f in files]
    return sorted(out)


def size(path: str) -> int:
    with _op("stat", path):
        return int(_gfile().stat(path).length)


def makedirs(path: str) -> None:
    with _op("mkdir", path):
        _gfile().makedirs(path)


def read_bytes(path: str) -> bytes:
    with _op("read", path):
        with _gfile().GFile(path, "rb") as f:
            return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """One object: on GCS it becomes visible whole when the upload finishes."""
    with _op("write", path):
        g = _gfile()
        if is_local(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with g.GFile(path, "wb") as f:
            f.write(data)


def read_json(path: str, what: str = "file"):
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StorageError(f"read {path}: {what} is not valid JSON: line {e.lineno}: {e.msg}") from None


def write_json(path: str, obj) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8"))


def copy_file(src: str, dst: str) -> None:
    with _op("copy", f"{src} -> {dst}"):
        g = _gfile()
        if is_local(dst):
            os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        g.copy(src, dst, overwrite=True)


def remove(path: str) -> None:
    """Removes a file or a whole directory tree; absent is fine."""
    with _op("delete", path):
        g = _gfile()
        if not g.exists(path):
            return
        if g.isdir(path):
            g.rmtree(path)
        else:
            g.remove(path)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with _op("read", path):
        with _gfile().GFile(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def download_tree(src: str, dst_dir: str) -> list[str]:
    """Copies every file below `src` into the local directory `dst_dir`; returns relative paths."""
    files = walk_files(src)
    for rel in files:
        copy_file(join(src, rel), os.path.join(dst_dir, *rel.split("/")))
    return files
