"""Builds and publishes an index version from document embeddings.

embeddings (contracts section 4: EMB or EMB/VERSION on any URI, read by
`index.embeddings.read_embeddings`) -> backend (exact | faiss | scann) + doc ids + attribute
inverted index (bitmaps for boolean filters), plus the building command's config.json when
given, built in a local staging directory ->
INDEX_BASE/VERSION on any URI, committed last (`persistence.publish`, docs/contracts.md
section 5).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ebr import config, storage
from index import persistence
from index.defaults import DEFAULTS
from index.errors import DimensionMismatch

log = logging.getLogger(__name__)

DOC_IDS = "doc_ids.txt"
FILTERS = "filters.bin"
BACKENDS = ("exact", "faiss", "scann")


def build_backend(X: np.ndarray, backend: str, *, factory: str | None = None,
                  nprobe: int | None = None, k_factor: int | None = None, scann=None, seed: int = 0):
    if backend == "exact":
        from index.exact import ExactBackend

        return ExactBackend.build(X)
    if backend == "faiss":
        from index.ivf_pq import IVFPQBackend

        return IVFPQBackend.build(X, factory or DEFAULTS.factory_for(*X.shape),
                                  nprobe=nprobe or DEFAULTS.nprobe,
                                  k_factor=k_factor or DEFAULTS.k_factor, seed=seed)
    if backend == "scann":
        from index.scann_backend import ScaNNBackend, ScaNNConfig

        num_leaves, leaves = DEFAULTS.scann_leaves_for(len(X))
        cfg = scann or ScaNNConfig(num_leaves=num_leaves, leaves=leaves, reorder=DEFAULTS.scann_reorder)
        return ScaNNBackend.build(X, cfg)
    raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")


def write_doc_ids(path: Path, doc_ids: list[str]) -> None:
    for i, d in enumerate(doc_ids):
        if "\n" in d or "\r" in d or not d:
            raise ValueError(f"doc_id #{i} {d!r} is empty or holds a line break")
    path.write_text("\n".join(doc_ids) + "\n", encoding="utf-8")


def build_index(embeddings, output, *, backend: str = "faiss", factory: str | None = None,
                nprobe: int | None = None, k_factor: int | None = None, scann=None,
                model_version=None, schema_hash: str | None = None, seed: int = 0,
                backend_object=None, command_config=None) -> str:
    """EMB (or a `(doc_ids, X, filter_terms, meta)` tuple) -> the committed version dir's URI.

    `model_version` / `schema_hash` default to those in embeddings.json; when given they must
    agree with it (an index must not mix one model's embeddings with another's label).
    `command_config`, the resolved settings of the command that builds (a dataclass), is saved
    as config.json inside the version and listed in its manifest like every other file."""
    from index.embeddings import read_embeddings
    from index.filters import AttributeIndex

    if isinstance(embeddings, (str, Path)):
        doc_ids, X, terms, meta = read_embeddings(str(embeddings))
        source = str(embeddings)
    else:
        doc_ids, X, terms, meta = embeddings
        source = meta.get("source", "arrays")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] != len(doc_ids) or len(terms) != len(doc_ids):
        raise DimensionMismatch(f"{source}: {len(doc_ids)} doc ids, {len(terms)} term lists, "
                                f"embeddings of shape {X.shape}")
    if meta.get("dimension") not in (None, X.shape[1]):
        raise DimensionMismatch(f"{source}: embeddings.json dimension {meta['dimension']} != "
                                f"{X.shape[1]} in the records")
    for key, given in (("schema_hash", schema_hash), ("model_version", model_version)):
        if given is not None and meta.get(key) is not None and str(meta[key]) != str(given):
            raise ValueError(f"{source}: embeddings were made with {key}={meta[key]}, "
                             f"not {given} as requested")
    t0 = time.perf_counter()
    be = backend_object or build_backend(X, backend, factory=factory, nprobe=nprobe,
                                         k_factor=k_factor, scann=scann, seed=seed)
    build_seconds = time.perf_counter() - t0
    attributes = AttributeIndex.build(terms)
    log.info("built %s index over %d x %d in %.1fs", be.name, *X.shape, build_seconds)

    def write(tmp: Path) -> list[str]:
        files = be.save(tmp)
        write_doc_ids(tmp / DOC_IDS, doc_ids)
        attributes.save(tmp / FILTERS)
        files = [*files, DOC_IDS, FILTERS]
        if command_config is not None:
            files.append(storage.basename(config.save(command_config, str(tmp))))
        return files

    params = be.manifest_params() if hasattr(be, "manifest_params") else {}
    manifest = {
        "backend": be.name, "params": params, "dimension": int(X.shape[1]), "count": len(doc_ids),
        "schema_hash": schema_hash or meta.get("schema_hash"),
        "model_version": _version(model_version if model_version is not None
                                  else meta.get("model_version")),
        "embeddings": source, "build_seconds": round(build_seconds, 3),
        "filter_terms": len(attributes.postings),
    }
    return persistence.publish(output, write, manifest)


def _version(value):
    """Model versions are integers (docs/contracts.md section 3), also when given as a flag."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def build_from_config(cfg) -> str:
    """`ebr index build`'s single-process build from its `index.config.IndexBuildConfig`; the
    resolved settings are saved in the version (config.json). Returns the version dir's URI."""
    from index.defaults import DEFAULTS
    from index.scann_backend import ScaNNConfig

    scann = None
    if cfg.backend == "scann" and (cfg.scann_leaves or cfg.scann_search_leaves
                                   or cfg.scann_reorder is not None):
        # otherwise build_index scales the swept leaves to the corpus size
        scann = ScaNNConfig(num_leaves=cfg.scann_leaves or DEFAULTS.scann_num_leaves,
                            leaves=cfg.scann_search_leaves or DEFAULTS.scann_leaves,
                            reorder=DEFAULTS.scann_reorder if cfg.scann_reorder is None
                            else cfg.scann_reorder)
    return build_index(cfg.embeddings, cfg.output, backend=cfg.backend, factory=cfg.factory,
                       nprobe=cfg.nprobe, k_factor=cfg.k_factor, scann=scann,
                       model_version=cfg.model_version, schema_hash=cfg.schema_hash,
                       command_config=cfg)
