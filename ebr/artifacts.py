"""The artifact contracts of docs/contracts.md as code: layouts, versions, commit, metadata.

Place in the data flow: under every stage. Each artifact the flow hands on is a versioned
directory on any URI (`ebr.storage`), local disk and `gs://` alike:

    BASE/VERSION/...files...  BASE/VERSION/_COMMITTED

Object stores have no rename, so a version becomes visible by its last write: the commit
marker `_COMMITTED` (docs/contracts.md, "Commit protocol"). Readers list, resolve and load
only committed versions; a writer killed at any point leaves an uncommitted directory that
readers ignore (with a log line) and the next writer removes. The two towers of one training
run are one unit: a tower version counts as committed only when every tower under the same
MODEL_DIR has committed it (`versions`), so nothing pairs towers of different runs.

Writers either stage files on local disk and `publish_dir` them (towers, index), or write
straight into `begin_version`'s directory and `commit` it (Beam pipelines, whose workers may
be remote).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os

from ebr import storage
from ebr.storage import NotFound, StorageError

log = logging.getLogger(__name__)

COMMIT_MARKER = "_COMMITTED"
MODEL_METADATA = "ebr_metadata.json"  # beside saved_model.pb in every tower version
INDEX_MANIFEST = "manifest.json"
EMBEDDINGS_SUMMARY = "embeddings.json"
EXAMPLES_STATS = "stats.json"
SAVED_MODEL = "saved_model.pb"
# The towers of one export, in publishing order: the query tower commits last, so a query
# tower is never newer than the doc tower the index was embedded with.
TOWERS = ("doc_tower", "query_tower")


class ArtifactError(ValueError):
    """An artifact is missing, uncommitted, malformed or made for another model."""


class UncommittedVersion(ArtifactError):
    """A version directory exists but its publish never finished."""


class ModelMismatch(ArtifactError):
    """An index (or embeddings) made with another embedding model than the one given."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_version(name: str) -> bool:
    return name.isdigit() and int(name) > 0


def version_of(vdir: str) -> int:
    name = storage.basename(vdir)
    if not is_version(name):
        raise ArtifactError(f"{vdir}: not a version directory (expected BASE/VERSION)")
    return int(name)


def all_versions(base: str) -> list[int]:
    """Every numeric version directory under `base`, committed or not."""
    return sorted(int(n) for n in storage.listdir(base) if is_version(n))


def is_committed(vdir: str) -> bool:
    return storage.exists(storage.join(vdir, COMMIT_MARKER))


def _group(base: str) -> list[str]:
    """The bases that commit together with `base`: both towers of a MODEL_DIR, else itself."""
    base = storage.normalize(base)
    if storage.basename(base) in TOWERS:
        model_dir = storage.parent(base)
        present = set(storage.listdir(model_dir))
        if all(t in present for t in TOWERS):
            return [storage.join(model_dir, t) for t in TOWERS]
    return [base]


def _committed_in(base: str) -> set[int]:
    names = set(storage.listdir(base))
    found = set()
    for n in names:
        if is_version(n) and storage.exists(storage.join(base, n, COMMIT_MARKER)):
            found.add(int(n))
    return found


def versions(base: str) -> list[int]:
    """Committed versions of `base`, oldest first (for a tower: committed by both towers)."""
    group = _group(base)
    common = None
    for b in group:
        c = _committed_in(b)
        common = c if common is None else common & c
    return sorted(common or ())


def uncommitted(base: str) -> list[int]:
    done = set(versions(base))
    return [v for v in all_versions(base) if v not in done]


def resolve(path: str, what: str = "artifact") -> str:
    """`BASE` (-> newest committed version) or `BASE/VERSION` (must be committed) -> version dir.

    Uncommitted directories are skipped with a log line; a version named explicitly that is
    not committed is an error, as is a base with no committed version."""
    path = storage.normalize(path)
    name = storage.basename(path)
    if is_version(name) and storage.exists(path):
        base = storage.parent(path)
        if int(name) not in versions(base):
            raise UncommittedVersion(
                f"{path}: {what} version {name} is not committed (no {COMMIT_MARKER}"
                + (" in every tower" if len(_group(base)) > 1 else "")
                + "): its publish is in progress or was interrupted")
        return path
    if not storage.exists(path):
        raise NotFound(f"resolve {path}: {what} does not exist")
    found = versions(path)
    skipped = [v for v in all_versions(path) if v not in found and v > (found[-1] if found else 0)]
    if skipped:
        log.warning("%s: ignoring uncommitted %s version(s) %s (publish in progress or "
                    "interrupted)", path, what, skipped)
    if not found:
        raise ArtifactError(f"{path}: no committed {what} version (expected BASE/VERSION/"
                            f"{COMMIT_MARKER})")
    return storage.join(path, found[-1])


def newest(base: str) -> int | None:
    found = versions(base)
    return found[-1] if found else None


def next_version(*bases: str) -> int:
    """One more than any version directory (committed or not) under any of `bases`."""
    existing = [v for b in bases for v in all_versions(b)]
    return max(existing, default=0) + 1


def clean_uncommitted(base: str) -> list[int]:
    """Removes leftovers of interrupted publishes under `base` (one writer per base): versions
    without a commit marker and, for a tower, versions the other tower never committed (a kill
    between the two towers' commits). A leftover's own marker goes first."""
    stale = uncommitted(base)
    for v in stale:
        log.warning("%s/%d: removing uncommitted leftover of an interrupted publish", base, v)
        vdir = storage.join(base, v)
        storage.remove(storage.join(vdir, COMMIT_MARKER))
        storage.remove(vdir)
    return stale


def prune(base: str, keep: int | None) -> list[int]:
    """Keeps the newest `keep` committed versions; older ones are uncommitted (marker first,
    so readers stop seeing them at once) and removed. None keeps everything."""
    if not keep:
        return []
    old = versions(base)[:-keep]
    for v in old:
        vdir = storage.join(base, v)
        storage.remove(storage.join(vdir, COMMIT_MARKER))
        storage.remove(vdir)
    return old


def begin_version(base: str, version: int | None = None) -> str:
    """Cleans leftovers and returns `BASE/VERSION` to write into (not yet committed).

    Version numbers of interrupted publishes are not reused: stock TF Serving may already
    have loaded one, and it never reloads a version number it has seen."""
    base = storage.normalize(base)
    version = int(version or next_version(base))
    clean_uncommitted(base)
    if version <= 0:
        raise ArtifactError(f"{base}: version must be a positive integer, got {version}")
    vdir = storage.join(base, version)
    if storage.exists(vdir):
        raise ArtifactError(f"{vdir} already exists; versions are immutable, pick a new one")
    return vdir


def commit(vdir: str, info: dict | None = None, files: dict | None = None) -> dict:
    """The last write of a version: the marker, listing every file with its size."""
    if files is None:
        files = {rel: {"bytes": storage.size(storage.join(vdir, rel))}
                 for rel in storage.walk_files(vdir) if rel != COMMIT_MARKER}
    marker = {**(info or {}), "version": version_of(vdir), "committed": _now(), "files": files}
    storage.write_json(storage.join(vdir, COMMIT_MARKER), marker)
    return marker


def read_commit(vdir: str) -> dict:
    return storage.read_json(storage.join(vdir, COMMIT_MARKER), "commit marker")


def _ordered(files: list[str], last: tuple[str, ...]) -> list[str]:
    """`files` with those whose name is in `last` moved to the end, in `last`'s order."""
    rank = {name: i for i, name in enumerate(last)}
    return sorted(files, key=lambda f: (rank.get(f.rsplit("/", 1)[-1], -1), f))


def upload(local_dir: str, vdir: str, last: tuple[str, ...] = (),
           checksums: dict | None = None) -> dict:
    """Copies a staged local directory into `vdir`, the files named in `last` last (stock TF
    Serving loads a version once `saved_model.pb` exists); returns {rel: {bytes, sha256}}.
    `checksums` ({rel: {bytes, sha256}}) are those the writer already computed (an index
    manifest's), not hashed again."""
    files = {}
    known = checksums or {}
    # A staged copy of a published version may hold its old marker: only `commit` writes one.
    staged = [rel for rel in storage.walk_files(local_dir) if rel != COMMIT_MARKER]
    for rel in _ordered(staged, last):
        src = os.path.join(local_dir, *rel.split("/"))
        files[rel] = ({"bytes": known[rel]["bytes"], "sha256": known[rel]["sha256"]} if rel in known
                      else {"bytes": os.path.getsize(src), "sha256": storage.sha256_file(src)})
        storage.copy_file(src, storage.join(vdir, rel))
    return files


def publish_dir(local_dir: str, base: str, *, version: int | None = None,
                last: tuple[str, ...] = (), info: dict | None = None,
                keep: int | None = None, checksums: dict | None = None) -> str:
    """Publishes a staged local directory as the next (or given) version of `base`."""
    vdir = begin_version(base, version)
    files = upload(local_dir, vdir, last, checksums)
    commit(vdir, info, files)
    prune(storage.normalize(base), keep)
    log.info("published %s (%d files)", vdir, len(files))
    return vdir


def verify(vdir: str, marker: dict | None = None, checksums: bool = False,
           listed_in: str = COMMIT_MARKER) -> None:
    """Every file `marker["files"]` lists (default: the commit marker's; an index passes its
    manifest's) exists with its size, and its sha256 when asked; the error names the file."""
    marker = marker if marker is not None else read_commit(vdir)
    for rel, want in sorted(marker.get("files", {}).items()):
        path = storage.join(vdir, rel)
        if not storage.exists(path):
            raise ArtifactError(f"{path} is missing (listed in {vdir}/{listed_in})")
        got = storage.size(path)
        if got != want["bytes"]:
            raise ArtifactError(f"{path} is truncated or altered: {got} bytes, {listed_in} "
                                f"says {want['bytes']}")
        if checksums and "sha256" in want and storage.sha256_file(path) != want["sha256"]:
            raise ArtifactError(f"{path} fails its sha256 checksum (corrupt file)")


def local_copy(vdir: str, cache_root: str, keep: int = 2) -> str:
    """A local copy of the committed version `vdir` (for readers that need local files, e.g.
    FAISS / ScaNN): CACHE_ROOT/<hash of BASE>/<VERSION>, reused while its copied commit marker
    equals the source's and every listed file has its size; else copied again (into a temp
    directory renamed into place, so a killed copy is never taken as complete). After a copy,
    only the newest `keep` cached versions of BASE stay: a service hot-reloading a new index
    every day must not fill its disk (an index already opened keeps its memory, and on Linux
    its memory-mapped files, after their names are removed)."""
    import hashlib
    import shutil
    import tempfile

    vdir = storage.normalize(vdir)
    marker = read_commit(vdir)
    key = hashlib.sha256(storage.parent(vdir).encode("utf-8")).hexdigest()[:16]
    root = os.path.join(cache_root, key)
    dst = os.path.join(root, storage.basename(vdir))
    if _local_copy_complete(dst, marker):
        return dst
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{storage.basename(vdir)}.tmp-", dir=root)
    try:
        for rel in sorted(marker.get("files", {})):
            storage.copy_file(storage.join(vdir, rel), os.path.join(tmp, *rel.split("/")))
        with open(os.path.join(tmp, COMMIT_MARKER), "w") as f:
            json.dump(marker, f)
        verify(tmp, marker)
        shutil.rmtree(dst, ignore_errors=True)
        try:
            os.rename(tmp, dst)
        except OSError:  # another process finished the same copy first
            if not _local_copy_complete(dst, marker):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("copied %s to %s", vdir, dst)
    cached = sorted(int(n) for n in os.listdir(root) if is_version(n))
    for v in cached[:-keep] if keep else []:
        shutil.rmtree(os.path.join(root, str(v)), ignore_errors=True)
    return dst


def _local_copy_complete(dst: str, marker: dict) -> bool:
    try:
        with open(os.path.join(dst, COMMIT_MARKER)) as f:
            if json.load(f) != marker:
                return False
        verify(dst, marker)
        return True
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Towers (docs/contracts.md section 3)

def tower_base(model_dir: str, name: str) -> str:
    if name not in TOWERS:
        raise ArtifactError(f"unknown tower {name!r}; towers are {list(TOWERS)}")
    return storage.join(model_dir, name)


def publish_towers(staged: dict[str, str], model_dir: str, version: int | None = None) -> dict:
    """Publishes staged tower SavedModels as one version of MODEL_DIR; returns name -> dir.

    Every file of every tower is written first (`saved_model.pb` last in each), then the
    towers' commit markers, the query tower's last: a kill at any point leaves both towers
    at the previous pair for every reader."""
    model_dir = storage.normalize(model_dir)
    bases = {name: tower_base(model_dir, name) for name in TOWERS if name in staged}
    version = int(version or next_version(*bases.values()))
    dirs = {name: begin_version(b, version) for name, b in bases.items()}
    listings = {name: upload(staged[name], dirs[name], last=(MODEL_METADATA, SAVED_MODEL))
                for name in bases}
    for name in bases:  # TOWERS order: the query tower commits last
        commit(dirs[name], {"model_name": name}, listings[name])
    log.info("published towers %s version %d under %s", sorted(bases), version, model_dir)
    return dirs


def read_model_metadata(vdir: str, schema_hash: str | None = None) -> dict:
    """`ebr_metadata.json` of a tower version, checked against this code's schema hash."""
    path = storage.join(vdir, MODEL_METADATA)
    if not storage.exists(path):
        raise ArtifactError(f"{path} is missing: not a complete ebr tower export")
    try:
        meta = storage.read_json(path, "tower metadata")
    except StorageError as e:
        raise ArtifactError(str(e)) from None
    for key in ("dimension", "schema_hash"):
        if key not in meta:
            raise ArtifactError(f"{path}: missing key {key!r}")
    if schema_hash is not None and meta["schema_hash"] != schema_hash:
        raise ArtifactError(f"{path}: schema_hash {meta['schema_hash']!r} does not match this "
                            f"code's feature schema {schema_hash!r}; re-train or use matching code")
    meta.setdefault("version", version_of(vdir))
    return meta


# ---------------------------------------------------------------------------------------------
# Model / index compatibility (docs/contracts.md sections 4-6)

def check_compatible(where: str, artifact: dict, *, schema_hash: str | None = None,
                     model_version=None, dimension: int | None = None) -> None:
    """An index manifest or embeddings summary (`artifact`) against the model that will query
    it: same feature schema, same tower version, same dimension (each checked when given)."""
    problems = []
    if schema_hash is not None and artifact.get("schema_hash") != schema_hash:
        problems.append(f"schema_hash {artifact.get('schema_hash')} (artifact) != {schema_hash} (model)")
    if model_version is not None and str(artifact.get("model_version")) != str(model_version):
        problems.append(f"model_version {artifact.get('model_version')} (artifact) != "
                        f"{model_version} (model)")
    if dimension is not None and int(artifact.get("dimension", -1)) != int(dimension):
        problems.append(f"dimension {artifact.get('dimension')} (artifact) != {dimension} (model)")
    if problems:
        raise ModelMismatch(f"{where}: made with another embedding model: " + "; ".join(problems))
