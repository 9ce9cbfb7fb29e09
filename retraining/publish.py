"""Publishing a gated candidate pair into the served bases (docs/contracts.md "Commit protocol").

Place in the data flow: the retraining pipeline's last step. In: the candidate towers committed
as version N under RUN/candidate and the index built from them under RUN/index (its manifest
naming model version N). Out: MODEL_DIR/{doc_tower,query_tower}/N and INDEX_BASE/VERSION, the
pair the retrieval service hot-reloads.

Order, so the retrieval service never pairs a model and an index of different runs and a kill at
any point leaves the previous pair in service:
 1. checks, before any write: both staged artifacts committed and complete, the index made for
    version N with the towers' schema and dimension, and N still the served MODEL_DIR's next
    version (nothing published there since the candidate was numbered);
 2. the towers as one version N (`ebr.artifacts.publish_towers`: every file, then the doc
    tower's marker, the query tower's last). TF Serving keeps the newest two versions, and the
    retrieval service keeps asking for the version its committed index names, so nothing
    changes for a query yet;
 3. the index (`index.persistence.publish`: files, manifest, then its marker): the marker is the
    moment the retrieval service reloads, and the pair it loads is (N, this index).
A rerun of the step after a kill finds its own towers at N (committed, or a partial upload of
the same files) and carries on; any other version at or above N is an error, nothing written.
"""
from __future__ import annotations

import logging
import os
import tempfile

from ebr import artifacts, features, storage

log = logging.getLogger(__name__)


def _files(vdir: str) -> dict:
    return artifacts.read_commit(vdir).get("files", {})


def _same_files(served_vdir: str, staged_files: dict) -> bool:
    """Every file present under `served_vdir` (a committed or partly uploaded tower version) is
    one of the staged candidate's, with its size and sha256."""
    for rel in storage.walk_files(served_vdir):
        if rel == artifacts.COMMIT_MARKER:
            continue
        want = staged_files.get(rel)
        path = storage.join(served_vdir, rel)
        if want is None or storage.size(path) != want["bytes"]:
            return False
        if "sha256" in want and storage.sha256_file(path) != want["sha256"]:
            return False
    return True


def _towers_state(model_dir: str, version: int, staged: dict[str, str]) -> str:
    """"publish" (N is free), "published" (N holds this candidate, committed: a rerun), or an
    error when MODEL_DIR moved on since the candidate was numbered."""
    bases = {name: artifacts.tower_base(model_dir, name) for name in artifacts.TOWERS}
    present = sorted({v for b in bases.values() for v in artifacts.all_versions(b)})
    newer = [v for v in present if v > version]
    if newer:
        raise artifacts.ArtifactError(
            f"{model_dir} has tower version(s) {newer} above the candidate's {version}: another "
            f"publisher wrote there since this run numbered its candidate; rerun the pipeline")
    if version not in present:
        return "publish"
    for name, base in bases.items():
        vdir = storage.join(base, version)
        if storage.exists(vdir) and not _same_files(vdir, _files(staged[name])):
            raise artifacts.ArtifactError(
                f"{vdir} exists and is not this run's candidate (another export took version "
                f"{version}); rerun the pipeline")
    return "published" if version in artifacts.versions(bases["query_tower"]) else "publish"


def check_pair(candidate: str, version: int, staged_index: str) -> tuple[dict, dict, dict]:
    """(staged tower dirs, doc tower metadata, index manifest) once the staged pair is checked."""
    from index import persistence

    towers = {name: artifacts.resolve(storage.join(artifacts.tower_base(candidate, name),
                                                   version), f"candidate {name}")
              for name in artifacts.TOWERS}
    for vdir in towers.values():
        artifacts.verify(vdir)
    meta = artifacts.read_model_metadata(towers["doc_tower"], features.schema_hash())
    index_vdir = persistence.resolve(staged_index)
    manifest = persistence.read_manifest(index_vdir)
    persistence.verify_files(index_vdir, manifest)
    artifacts.check_compatible(f"staged index {index_vdir}", manifest,
                               schema_hash=meta["schema_hash"], model_version=version,
                               dimension=int(meta["dimension"]))
    return towers, meta, manifest


def publish_pair(*, candidate: str, version: int, staged_index: str, model_dir: str,
                 index_base: str) -> dict:
    """Publishes the candidate towers as MODEL_DIR version `version`, then its index into
    INDEX_BASE (see the module doc); returns {"model_version", "towers", "index"}."""
    from index import persistence

    model_dir, index_base = storage.normalize(model_dir), storage.normalize(index_base)
    towers, meta, manifest = check_pair(candidate, version, staged_index)
    state = _towers_state(model_dir, version, towers)
    with tempfile.TemporaryDirectory(prefix="ebr-publish-") as tmp:
        if state == "published":
            log.info("%s already holds this candidate as version %d (a rerun): towers kept",
                     model_dir, version)
            served = {name: storage.join(artifacts.tower_base(model_dir, name), version)
                      for name in artifacts.TOWERS}
        else:
            local = {}
            for name, vdir in towers.items():  # publish_towers uploads local directories
                if storage.is_local(vdir):
                    local[name] = vdir
                else:
                    local[name] = os.path.join(tmp, name)
                    storage.download_tree(vdir, local[name])
            served = artifacts.publish_towers(local, model_dir, version)
        if artifacts.newest(artifacts.tower_base(model_dir, "query_tower")) != version:
            raise artifacts.ArtifactError(f"{model_dir}: version {version} is not the newest "
                                          f"committed pair after publishing")

        staged_vdir = persistence.resolve(staged_index)

        def copy_files(staging) -> list[str]:
            rels = sorted(manifest["files"])
            for rel in rels:
                storage.copy_file(storage.join(staged_vdir, rel),
                                  os.path.join(staging, *rel.split("/")))
            return rels

        # The manifest as built, renumbered by persistence.publish for INDEX_BASE (its format,
        # version, files and time are written anew).
        fields = {k: v for k, v in manifest.items()
                  if k not in ("format", "version", "files", "created")}
        index_vdir = persistence.publish(index_base, copy_files, {**fields, "staged": staged_vdir})
    published = persistence.read_manifest(index_vdir)
    artifacts.check_compatible(f"published index {index_vdir}", published,
                               schema_hash=meta["schema_hash"], model_version=version,
                               dimension=int(meta["dimension"]))
    log.info("published the pair: towers %s version %d, index %s", model_dir, version, index_vdir)
    return {"model_version": version, "towers": served, "index": index_vdir}
