"""Versioned, checksummed index directories (docs/contracts.md section 5).

    INDEX_BASE/VERSION/manifest.json + backend files + doc_ids.txt + filters.bin

A version is written into a temp directory under INDEX_BASE and renamed into place whole, so a
reader (the retrieval service polls INDEX_BASE) never sees half an index. Loading re-hashes
every file the manifest lists and refuses an index built from another embedding model.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from index.errors import CorruptIndexFile, IndexError_, ModelMismatch

MANIFEST = "manifest.json"
FORMAT = 1
REQUIRED = ("format", "version", "backend", "params", "dimension", "count", "schema_hash",
            "model_version", "files")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions(base: Path) -> list[int]:
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir()
                  if p.name.isdigit() and (p / MANIFEST).exists())


def resolve(path) -> Path:
    """INDEX_BASE (-> newest complete version) or INDEX_BASE/VERSION -> the version dir."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if not path.exists():
        raise FileNotFoundError(f"index path {path} does not exist")
    found = versions(path)
    if not found:
        raise IndexError_(f"{path}: no index version (no VERSION/{MANIFEST} under it)")
    return path / str(found[-1])


def publish(base, write_files: Callable[[Path], list[str]], manifest: dict) -> Path:
    """Writes files with `write_files(tmpdir)` (returns their relative paths), checksums them,
    writes the manifest and renames the directory to INDEX_BASE/<next version>."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        files = write_files(tmp)
        checksums = {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size}
                     for f in files}
        version = (versions(base) or [0])[-1] + 1
        while True:
            full = {**manifest, "format": FORMAT, "version": version, "files": checksums,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(full, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            target = base / str(version)
            try:
                os.rename(tmp, target)  # atomic; fails if another writer took this version
                return target
            except OSError:
                if not target.exists():
                    raise
                version += 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(vdir: Path) -> dict:
    mpath = Path(vdir) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CorruptIndexFile(f"{mpath} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptIndexFile(f"{mpath} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CorruptIndexFile(f"{mpath} is not a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise CorruptIndexFile(f"{mpath} lacks field(s) {missing}")
    if manifest["format"] != FORMAT:
        raise IndexError_(f"{mpath}: index format {manifest['format']} is not supported (want {FORMAT})")
    return manifest


def verify_files(vdir: Path, manifest: dict) -> None:
    """Every listed file exists with its size and sha256; the error names the first bad one."""
    vdir = Path(vdir)
    for rel, want in sorted(manifest["files"].items()):
        f = vdir / rel
        if not f.is_file():
            raise CorruptIndexFile(f"{f} is missing (listed in {vdir / MANIFEST})")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CorruptIndexFile(f"{f} is truncated or altered: {size} bytes, manifest says "
                                   f"{want['bytes']}")
        if sha256_file(f) != want["sha256"]:
            raise CorruptIndexFile(f"{f} fails its sha256 checksum (corrupt file)")


def check_model(vdir: Path, manifest: dict, schema_hash: str | None, model_version) -> None:
    problems = []
    if schema_hash is not None and manifest["schema_hash"] != schema_hash:
        problems.append(f"schema_hash {manifest['schema_hash']} (index) != {schema_hash} (expected)")
    if model_version is not None and str(manifest["model_version"]) != str(model_version):
        problems.append(f"model_version {manifest['model_version']} (index) != {model_version} (expected)")
    if problems:
        raise ModelMismatch(f"{Path(vdir) / MANIFEST}: index was built for another embedding "
                            "model: " + "; ".join(problems))
