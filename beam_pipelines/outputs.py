"""Publishing a pipeline's output directory whole, through Beam's file systems.

Place in the data flow: every pipeline writes into `OUT.tmp-<uuid>` (a sibling of OUT) and
calls `publish(tmp, OUT)` once the run succeeded, so a rerun never leaves a mix of old and new
files and a failed run leaves OUT as it was.

  local paths:  OUT is renamed aside, the temp directory renamed into place (atomic renames),
                then the old copy is removed.
  gs:// etc.:   object stores have no directory rename: the old objects under OUT/ are deleted
                first, then the new ones are moved (copy + delete) into OUT/, `stats.json` /
                `embeddings.json` last, so a reader that waits for that file never sees a
                partial or mixed output.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

log = logging.getLogger(__name__)


def _is_local(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.get_scheme(path) in (None, "file")


def temp_dir_for(out: str) -> str:
    """A fresh sibling of `out` to write into."""
    from apache_beam.io.filesystems import FileSystems

    out = out.rstrip("/")
    if _is_local(out):
        out = os.path.abspath(out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:12]}"
    FileSystems.mkdirs(tmp)
    return tmp


def write_json(path: str, obj) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def read_json(path: str):
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def list_files(prefix: str) -> list[str]:
    """Every file below a directory prefix (recursive)."""
    from apache_beam.io.filesystems import FileSystems

    prefix = prefix.rstrip("/") + "/"
    if _is_local(prefix):
        out = []
        for root, _, files in os.walk(prefix):
            out += [os.path.join(root, f) for f in files]
        return sorted(out)
    return sorted(m.path for m in FileSystems.match([prefix + "**"])[0].metadata_list)


def remove(path: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if _is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        files = list_files(path)
        if files:
            FileSystems.delete(files)


def check_replaceable(out: str, markers: tuple[str, ...]) -> None:
    """Refuses to later replace an unrelated non-empty directory: `out` must be absent, empty,
    or an earlier output of the same pipeline (holding one of `markers`). Called before a run
    so a wrong --output fails fast instead of deleting someone's files."""
    from apache_beam.io.filesystems import FileSystems

    out = out.rstrip("/")
    if _is_local(out):
        if not os.path.exists(out):
            return
        if not os.path.isdir(out):
            raise ValueError(f"{out}: output exists and is not a directory")
        if not os.listdir(out) or any(os.path.exists(os.path.join(out, m)) for m in markers):
            return
    else:
        if not list_files(out) or any(FileSystems.exists(f"{out}/{m}") for m in markers):
            return
    raise ValueError(f"{out}: is a non-empty directory that is not an earlier output of this "
                     f"pipeline (none of {list(markers)}); refusing to replace it")


def publish(tmp: str, out: str, last: str | None = None) -> None:
    """Moves the finished `tmp` directory to `out`, replacing any earlier output whole."""
    from apache_beam.io.filesystems import FileSystems

    out = out.rstrip("/")
    if _is_local(out):
        out = os.path.abspath(out)
        old = None
        if os.path.exists(out):
            old = f"{out}.old-{uuid.uuid4().hex[:12]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    remove(out)
    files = list_files(tmp)
    ordered = [f for f in files if not (last and f.endswith("/" + last))]
    ordered += [f for f in files if last and f.endswith("/" + last)]
    dests = [out + f[len(tmp.rstrip("/")):] for f in ordered]
    for src, dst in zip(ordered, dests):
        FileSystems.rename([src], [dst])
    remove(tmp)
    log.info("published %d files to %s", len(dests), out)
