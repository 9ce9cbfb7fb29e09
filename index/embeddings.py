"""Reads and writes document embeddings (docs/contracts.md section 4).

Place in the data flow: `ebr embed` (beam_pipelines/embed.py) commits versions
`EMB/VERSION/{embeddings-*.tfrecord.gz, embeddings.json, _COMMITTED}` on any URI;
`read_embeddings` (EMB -> newest committed version, or EMB/VERSION, via `ebr.artifacts`) is
what the index builder, the sweep and the benchmark read, through tf.data (local or gs://).
`write_embeddings` publishes the same layout from arrays, for tests and benches.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

import numpy as np

from ebr import artifacts, features, storage
from index.errors import EmbeddingsError

log = logging.getLogger(__name__)

META = "embeddings.json"
PATTERN = "embeddings-*.tfrecord.gz"
# Record fields: the document's id feature, its embedding and its filter terms.
DOC_ID, EMBEDDING, FILTER_TERMS = features.DOC_ID, "embedding", "filter_terms"
_BATCH = 8192


def _meta(vdir: str) -> dict:
    meta_file = storage.join(vdir, META)
    if not storage.exists(meta_file):
        raise EmbeddingsError(f"{meta_file} does not exist (not an embeddings version)")
    try:
        meta = storage.read_json(meta_file, "embeddings summary")
    except storage.StorageError as e:
        raise EmbeddingsError(str(e)) from None
    for key in ("dimension", "count"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise EmbeddingsError(f"{meta_file}: field {key!r} must be a non-negative integer, "
                                  f"got {meta.get(key)!r}")
    return meta


def read_embeddings(path) -> tuple[list[str], np.ndarray, list[list[str]], dict]:
    """EMB or EMB/VERSION (any URI) -> (doc_ids, X float32 [N, D], filter_terms per doc,
    meta from embeddings.json). EMB resolves to its newest committed version.

    Files are read in name order so the row order (the index's internal ids) is reproducible.
    Errors name the file (and the record range) at fault."""
    import tensorflow as tf

    try:
        vdir = artifacts.resolve(str(path), "embeddings")
    except (artifacts.ArtifactError, storage.StorageError) as e:
        raise EmbeddingsError(str(e)) from None
    meta = _meta(vdir)
    dim = meta["dimension"]
    files = storage.glob(storage.join(vdir, PATTERN))
    if not files and meta["count"]:
        raise EmbeddingsError(f"{vdir}: no {PATTERN} files but {META} says count={meta['count']}")
    spec = {DOC_ID: tf.io.FixedLenFeature([], tf.string),
            EMBEDDING: tf.io.FixedLenFeature([dim], tf.float32),
            FILTER_TERMS: tf.io.VarLenFeature(tf.string)}
    doc_ids: list[str] = []
    terms: list[list[str]] = []
    chunks: list[np.ndarray] = []
    for f in files:
        ds = tf.data.TFRecordDataset(f, compression_type="GZIP").batch(_BATCH)
        start = 0
        try:
            for batch in ds:
                parsed = tf.io.parse_example(batch, spec)
                n = int(parsed[DOC_ID].shape[0])
                doc_ids.extend(v.decode("utf-8") for v in parsed[DOC_ID].numpy())
                chunks.append(parsed[EMBEDDING].numpy().astype(np.float32, copy=False))
                ft = parsed[FILTER_TERMS]
                rows = [[] for _ in range(n)]
                for (r, _), v in zip(ft.indices.numpy(), ft.values.numpy()):
                    rows[r].append(v.decode("utf-8"))
                terms.extend(rows)
                start += n
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            msg = str(e).splitlines()[0][:300]
            raise EmbeddingsError(f"{f}: bad record in records {start}..{start + _BATCH - 1} "
                                  f"(expected {EMBEDDING} of dimension {dim}): {msg}") from None
        log.debug("read %s: %d records", f, start)
    X = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    if len(doc_ids) != meta["count"]:
        raise EmbeddingsError(f"{storage.join(vdir, META)}: count={meta['count']} but the files hold "
                              f"{len(doc_ids)} records")
    if len(set(doc_ids)) != len(doc_ids):
        seen, dup = set(), None
        for d in doc_ids:
            if d in seen:
                dup = d
                break
            seen.add(d)
        raise EmbeddingsError(f"{vdir}: duplicate doc_id {dup!r}")
    if not np.all(np.isfinite(X)):
        bad = int(np.nonzero(~np.isfinite(X).all(axis=1))[0][0])
        raise EmbeddingsError(f"{vdir}: embedding of doc_id {doc_ids[bad]!r} is not finite")
    return doc_ids, X, terms, meta


def write_embeddings(path, doc_ids, X, filter_terms=None, *, schema_hash: str | None = None,
                     model_version: int | None = None, shards: int = 1, extra: dict | None = None,
                     keep: int | None = None):
    """Arrays -> a new committed version of the embeddings artifact `path` (any URI), in the
    layout `ebr embed` writes; staged in a local temp directory and published with
    `artifacts.publish_dir` (embeddings.json last). Returns `path` as given (the base), which
    `read_embeddings` resolves to this version."""
    import tensorflow as tf

    X = np.asarray(X, dtype=np.float32)
    n = len(doc_ids)
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"X must be [N, D] with N={n} doc ids, got shape {X.shape}")
    filter_terms = filter_terms if filter_terms is not None else [[] for _ in range(n)]
    with tempfile.TemporaryDirectory(prefix="ebr-embeddings-") as tmp:
        opts = tf.io.TFRecordOptions(compression_type="GZIP")
        bounds = np.linspace(0, n, shards + 1).astype(int)
        for s in range(shards):
            name = os.path.join(tmp, f"embeddings-{s:05d}-of-{shards:05d}.tfrecord.gz")
            with tf.io.TFRecordWriter(name, opts) as w:
                for i in range(bounds[s], bounds[s + 1]):
                    ex = tf.train.Example(features=tf.train.Features(feature={
                        DOC_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[doc_ids[i].encode()])),
                        EMBEDDING: tf.train.Feature(float_list=tf.train.FloatList(value=X[i])),
                        FILTER_TERMS: tf.train.Feature(bytes_list=tf.train.BytesList(
                            value=[t.encode() for t in filter_terms[i]])),
                    }))
                    w.write(ex.SerializeToString())
        meta = {"dimension": int(X.shape[1]), "count": n,
                "schema_hash": schema_hash if schema_hash is not None else features.schema_hash(),
                "model_version": model_version, **(extra or {})}
        with open(os.path.join(tmp, META), "w") as f:
            f.write(json.dumps(meta, indent=1))
        artifacts.publish_dir(tmp, str(path), last=(META,), keep=keep,
                              info={"kind": "embeddings", "dimension": meta["dimension"],
                                    "count": n, "schema_hash": meta["schema_hash"],
                                    "model_version": model_version})
    return path
