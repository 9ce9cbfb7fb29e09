"""Versioned, checksummed index directories on any URI (docs/contracts.md section 5).

    INDEX_BASE/VERSION/{manifest.json, backend files, doc_ids.txt, filters.bin, _COMMITTED}
    (+ config.json, the settings of the `ebr index build` that made it)

Place in the data flow: `index.builder` publishes a version here; `index.searcher.open_index`
(the retrieval service, `ebr mine-negatives`, the experiments) resolves and loads one.

Publishing follows the commit protocol of `ebr.artifacts` (docs/contracts.md, "Commit
protocol"): the files are built in a local staging directory (FAISS and ScaNN write local
files), `manifest.json` (format, version, sha256 and size of every file) is written beside
them, and `artifacts.publish_dir` uploads everything to INDEX_BASE/VERSION with the manifest
last and the `_COMMITTED` marker after it. A reader lists and resolves committed versions
only, so a build killed mid-upload leaves a directory nobody opens, which the next build
removes.

Loading: a local version is read in place; a remote one (gs://...) is first copied to a local
cache directory (`artifacts.local_copy`), because the FAISS and ScaNN readers need local files.
Either way every file is re-hashed against the manifest and the index is refused when it was
built from another embedding model (`artifacts.check_compatible`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from ebr import artifacts, storage
from index.errors import CorruptIndexFile, IndexDataError, ModelMismatch, UncommittedIndex

MANIFEST = artifacts.INDEX_MANIFEST
FORMAT = 1
REQUIRED = ("format", "version", "backend", "params", "dimension", "count", "schema_hash",
            "model_version", "files")
# Local copies of remote index versions: CACHE_ROOT/<hash of INDEX_BASE>/<VERSION>.
CACHE_ENV = "EBR_INDEX_CACHE"


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "ebr-index-cache")


def versions(base) -> list[int]:
    """Committed index versions under INDEX_BASE, oldest first."""
    return artifacts.versions(storage.normalize(base))


def resolve(path) -> str:
    """INDEX_BASE (-> newest committed version) or INDEX_BASE/VERSION (must be committed) ->
    the version directory's URI."""
    try:
        return artifacts.resolve(str(path), "index")
    except artifacts.UncommittedVersion as e:
        raise UncommittedIndex(str(e)) from None
    except artifacts.ArtifactError as e:
        raise IndexDataError(str(e)) from None


def publish(base, write_files: Callable[[Path], list[str]], manifest: dict) -> str:
    """Writes files with `write_files(staging_dir)` (returns their relative paths), checksums
    them, writes the manifest and publishes the whole as the next version of INDEX_BASE.
    Returns the committed version directory's URI."""
    base = storage.normalize(base)
    with tempfile.TemporaryDirectory(prefix="ebr-index-staging-") as staging:
        files = write_files(Path(staging))
        checksums = {f: {"sha256": storage.sha256_file(os.path.join(staging, f)),
                         "bytes": os.path.getsize(os.path.join(staging, f))} for f in files}
        # The number is fixed before the staging is uploaded (it is in the manifest); the
        # leftovers of a killed build are removed by publish_dir, their number not reused.
        version = artifacts.next_version(base)
        full = {**manifest, "format": FORMAT, "version": version, "files": checksums,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(full, f, indent=1, sort_keys=True)
        return artifacts.publish_dir(staging, base, version=version, last=(MANIFEST,),
                                     info={"artifact": "index", "backend": full.get("backend")},
                                     checksums=checksums)  # hashed once, for the manifest


def local_dir(vdir: str) -> str:
    """A local directory holding the committed version `vdir`: itself when local, else a
    verified copy in the cache (reused when it is complete for this commit)."""
    if storage.is_local(vdir):
        return vdir
    return artifacts.local_copy(vdir, cache_root())


def read_manifest(vdir) -> dict:
    mpath = storage.join(str(vdir), MANIFEST)
    try:
        text = storage.read_text(mpath)
    except storage.NotFound:
        raise CorruptIndexFile(f"{mpath} is missing") from None
    except UnicodeDecodeError as e:
        raise CorruptIndexFile(f"{mpath} is not valid JSON ({e})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptIndexFile(f"{mpath} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CorruptIndexFile(f"{mpath} is not a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise CorruptIndexFile(f"{mpath} lacks field(s) {missing}")
    if manifest["format"] != FORMAT:
        raise IndexDataError(f"{mpath}: index format {manifest['format']} is not supported (want {FORMAT})")
    return manifest


def verify_files(vdir, manifest: dict) -> None:
    """Every listed file exists with its size and sha256; the error names the first bad one."""
    try:
        artifacts.verify(str(vdir), manifest, checksums=True, listed_in=MANIFEST)
    except artifacts.ArtifactError as e:
        raise CorruptIndexFile(str(e)) from None


def check_model(vdir, manifest: dict, schema_hash: str | None, model_version) -> None:
    """Refuses an index built from another embedding model (docs/contracts.md section 5)."""
    try:
        artifacts.check_compatible(f"index {storage.join(str(vdir), MANIFEST)}", manifest,
                                   schema_hash=schema_hash, model_version=model_version)
    except artifacts.ModelMismatch as e:
        raise ModelMismatch(str(e)) from None
