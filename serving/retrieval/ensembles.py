"""Embedding ensembles at serving time (paper section 6.2): weighted concatenation and cascade.

Place in the data flow: after training several models (e.g. a text-only and a unified one, or
models trained with easy and with hard negatives), these combine them for indexing and serving.
The retrieval service answers a request naming an ensemble with the ensemble's entry in its
registry (`load_registry`, a `{name: callable(EnsembleCall) -> EnsembleResult}` handed to
`RetrievalServer` or named by `ServeConfig.ensembles`) instead of the serving pair.

Weighted concatenation. Each model's embeddings are L2-normalised; the query side multiplies
model i's sub-embedding by its weight alpha_i; documents are concatenated unweighted; one index
holds the concatenation. Then

    <q_ens, d_ens> = sum_i alpha_i * cos_i(q, d)

and, because ||q_ens|| = sqrt(sum alpha_i^2) and ||d_ens|| = sqrt(M) for M models,

    cos(q_ens, d_ens) = sum_i alpha_i * cos_i(q, d) / (sqrt(sum alpha_i^2) * sqrt(M)).

The constant does not change any ranking, so the ensemble's outputs can be re-normalised to
meet the towers' contract (unit-norm `embedding`, docs/contracts.md section 3) and served and
indexed like any single model: `export_weighted_concat` writes such a pair of towers, and
`serving_weighted_concat` computes the same query embedding from the member towers at request
time.

Cascade. A cheap model (text-only) retrieves the top N from its own index; the unified model
re-scores those N with its own embeddings and keeps the top K (`cascade_rescore`,
`serving_cascade`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence

import numpy as np

from ebr import artifacts, storage
from ebr.config import read_file
from serving.retrieval.embedder import LocalModelSource
from serving.retrieval.pairs import Pair


@dataclasses.dataclass(frozen=True)
class EnsembleCall:
    """What an ensemble gets: the serving pair, the request's tower inputs and search options."""
    pair: Pair
    inputs: dict  # tower inputs for one query, as from embedder.build_inputs
    k: int
    filter: str | None
    radius: float | None
    timeout: float | None  # seconds left before the request's deadline


@dataclasses.dataclass(frozen=True)
class EnsembleResult:
    doc_ids: Sequence[str]
    scores: Sequence[float]
    scanned: int = 0


# name -> the ensemble answering requests that name it
Registry = dict[str, Callable[[EnsembleCall], EnsembleResult]]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _check_parts(parts: Sequence[np.ndarray], alphas: Sequence[float] | None = None) -> None:
    if not parts:
        raise ValueError("an ensemble needs at least one model's embeddings")
    rows = {np.asarray(p).shape[0] for p in parts}
    if len(rows) != 1:
        raise ValueError(f"ensemble parts have different row counts {sorted(rows)}")
    if alphas is not None:
        if len(alphas) != len(parts):
            raise ValueError(f"{len(alphas)} weights for {len(parts)} models")
        if any(not math.isfinite(a) or a < 0 for a in alphas) or not any(alphas):
            raise ValueError(f"ensemble weights must be finite, >= 0 and not all 0, got {list(alphas)}")


def weighted_concat_queries(parts: Sequence[np.ndarray], alphas: Sequence[float],
                            renormalize: bool = False) -> np.ndarray:
    """[B, D_i] per model -> [B, sum D_i]: normalised sub-embeddings times alpha_i."""
    _check_parts(parts, alphas)
    out = np.concatenate([a * l2_normalize(p) for p, a in zip(parts, alphas)], axis=1)
    return l2_normalize(out) if renormalize else out


def concat_documents(parts: Sequence[np.ndarray], renormalize: bool = False) -> np.ndarray:
    """[N, D_i] per model -> [N, sum D_i]: normalised sub-embeddings, unweighted."""
    _check_parts(parts)
    out = np.concatenate([l2_normalize(p) for p in parts], axis=1)
    return l2_normalize(out) if renormalize else out


def normalisation_constant(alphas: Sequence[float]) -> float:
    """cos(q_ens, d_ens) * this = sum_i alpha_i cos_i(q, d)."""
    return math.sqrt(sum(a * a for a in alphas)) * math.sqrt(len(alphas))


def cascade_rescore(candidates: Sequence[Sequence[str]], queries: np.ndarray,
                    doc_lookup: Callable[[Sequence[str]], np.ndarray],
                    k: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """Second stage of the cascade: re-score each query's candidates by the unified model.

    `candidates[i]` are the first stage's top-N doc ids for query i, `queries` the unified
    query embeddings [Q, D], `doc_lookup(ids)` the unified document embeddings [len(ids), D].
    Returns the top `k` ids per query and their cosine scores (ties keep first-stage order)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    queries = l2_normalize(queries)
    if len(candidates) != queries.shape[0]:
        raise ValueError(f"{len(candidates)} candidate lists for {queries.shape[0]} queries")
    ids_out, scores_out = [], []
    for q, cand in zip(queries, candidates):
        cand = list(cand)
        if not cand:
            ids_out.append([])
            scores_out.append(np.zeros(0, np.float32))
            continue
        docs = l2_normalize(doc_lookup(cand))
        scores = docs @ q
        order = np.argsort(-scores, kind="stable")[:k]
        ids_out.append([cand[i] for i in order])
        scores_out.append(scores[order].astype(np.float32))
    return ids_out, scores_out


class EmbeddingTable:
    """Doc id -> embedding lookup over an in-memory matrix (e.g. `index.embeddings.read_embeddings`)."""

    def __init__(self, doc_ids: Sequence[str], embeddings: np.ndarray):
        embeddings = np.asarray(embeddings, np.float32)
        if len(doc_ids) != embeddings.shape[0]:
            raise ValueError(f"{len(doc_ids)} doc ids for {embeddings.shape[0]} embeddings")
        self.row = {d: i for i, d in enumerate(doc_ids)}
        self.embeddings = embeddings

    def __call__(self, ids: Sequence[str]) -> np.ndarray:
        try:
            rows = [self.row[d] for d in ids]
        except KeyError as e:
            raise KeyError(f"document {e.args[0]!r} has no embedding in the re-scoring model") from None
        return self.embeddings[rows]


# ---------------------------------------------------------------------------------------------
# Weighted concatenation as a pair of ordinary towers (servable and indexable unchanged)

def _version_dir(path: str) -> str:
    """A member tower `BASE` (newest committed version) or `BASE/VERSION` -> its version dir."""
    return artifacts.resolve(os.fspath(path), "tower")


def export_weighted_concat(members: Sequence[str], alphas: Sequence[float], output_base: str,
                           version: int = 1, model_name: str = "") -> str:
    """Publishes one tower (`output_base/VERSION/`, any URI) computing the weighted
    concatenation of the member towers' embeddings (all query towers or all doc towers of
    models sharing the schema); returns the version directory.

    Output `embedding` = l2norm(concat_i alpha_i * l2norm(e_i)): unit-norm as the contract asks;
    use alphas = 1 for the document side. Saved to a local staging dir, then published with
    `ebr.artifacts.publish_dir` (saved_model.pb and the commit marker last)."""
    import json
    import tempfile
    import time

    import tensorflow as tf

    if len(members) != len(alphas):
        raise ValueError(f"{len(alphas)} weights for {len(members)} member towers")
    _check_parts([np.zeros((1, 1))] * len(members), alphas)
    dirs = [_version_dir(m) for m in members]
    metas = [artifacts.read_model_metadata(d) for d in dirs]
    hashes = {m["schema_hash"] for m in metas}
    if len(hashes) != 1:
        raise ValueError(f"ensemble members have different schema hashes {sorted(hashes)}: "
                         f"{[str(d) for d in dirs]}")
    loaded = [tf.saved_model.load(d) for d in dirs]
    fns = [m.signatures["serving_default"] for m in loaded]
    spec = fns[0].structured_input_signature[1]
    for d, fn in zip(dirs[1:], fns[1:]):
        if set(fn.structured_input_signature[1]) != set(spec):
            raise ValueError(f"{d}: signature inputs differ from {dirs[0]}'s")

    module = tf.Module()
    module.members = loaded  # tracked: the members' variables are saved with the ensemble
    weights = [float(a) for a in alphas]

    @tf.function(input_signature=[{k: tf.TensorSpec(v.shape, v.dtype, name=k) for k, v in spec.items()}])
    def serve(inputs):
        parts = []
        for fn, a in zip(fns, weights):
            e = fn(**inputs)["embedding"]
            parts.append(a * tf.math.l2_normalize(e, axis=-1))
        return {"embedding": tf.math.l2_normalize(tf.concat(parts, axis=-1), axis=-1)}

    module.serve = serve
    base = storage.normalize(os.fspath(output_base))
    final = storage.join(base, version)
    if artifacts.is_committed(final):
        raise FileExistsError(f"{final} exists: pick a new version")
    with tempfile.TemporaryDirectory(prefix="ebr-ensemble-") as staging:
        tf.saved_model.save(module, staging, signatures={"serving_default": _kwargs_signature(serve, spec)})
        dimension = sum(int(m["dimension"]) for m in metas)
        with open(os.path.join(staging, artifacts.MODEL_METADATA), "w") as f:
            json.dump({
                "model_name": model_name or storage.basename(base), "version": version,
                "dimension": dimension, "schema_hash": metas[0]["schema_hash"],
                "config": {"ensemble": "weighted_concat", "members": list(dirs), "alphas": weights},
                "metrics": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                f, indent=2)
        return artifacts.publish_dir(staging, base, version=version,
                                     last=(artifacts.MODEL_METADATA, artifacts.SAVED_MODEL),
                                     info={"model_name": model_name or storage.basename(base)})


def _kwargs_signature(serve, spec):
    """A concrete function taking the inputs as keyword tensors (the signature's named inputs)."""
    import tensorflow as tf

    names = sorted(spec)

    @tf.function(input_signature=[tf.TensorSpec(spec[k].shape, spec[k].dtype, name=k) for k in names])
    def fn(*args):
        return serve(dict(zip(names, args)))

    return fn.get_concrete_function()


# ---------------------------------------------------------------------------------------------
# Registry entries: what the retrieval service calls for a request naming an ensemble


def _open_encoder(path: str):
    vdir = _version_dir(path)
    return LocalModelSource(storage.parent(vdir)).open(artifacts.version_of(vdir))


def serving_cascade(first_model: str, first_index: str, embeddings: str, n: int = 500,
                    second_model: str | None = None, search_params: dict | None = None):
    """Registry entry: a text-only model (`first_model` query tower, `first_index`) retrieves
    the top `n` (the request's filter applies here), the unified model re-scores them with its
    document embeddings (`embeddings`, an `ebr embed` output) and keeps the request's k.

    The unified query embedding comes from `second_model` when set, else from the serving pair's
    own query tower (the service's main model is then the unified one)."""
    from index import open_index
    from index.embeddings import read_embeddings

    first_enc = _open_encoder(first_model)
    first = open_index(first_index)
    second_enc = _open_encoder(second_model) if second_model else None
    doc_ids, vectors, _terms, _meta = read_embeddings(embeddings)
    table = EmbeddingTable(doc_ids, vectors)

    def call(req):
        enc = second_enc or req.pair.encoder
        if req.k > n:
            raise ValueError(f"k={req.k} exceeds the cascade's first-stage n={n}")
        res = first.search(first_enc.embed(req.inputs, timeout=req.timeout), n,
                           filter=req.filter, params=search_params)
        ids, scores = cascade_rescore(res.doc_ids, enc.embed(req.inputs, timeout=req.timeout),
                                      table, req.k)
        if req.radius is not None:
            keep = scores[0] >= req.radius
            ids, scores = [[d for d, k in zip(ids[0], keep) if k]], [scores[0][keep]]
        return EnsembleResult(ids[0], scores[0].tolist(), int(res.scanned[0]))

    return call


def serving_weighted_concat(members: Sequence[str], alphas: Sequence[float], index: str,
                            search_params: dict | None = None):
    """Registry entry: embeds the query with every member query tower, concatenates the
    normalised parts weighted by alpha (re-normalised, as `export_weighted_concat` does), and
    searches `index`, built from the members' concatenated document embeddings."""
    from index import open_index

    _check_parts([np.zeros((1, 1))] * len(members), alphas)
    encoders = [_open_encoder(m) for m in members]
    searcher = open_index(index)
    dim = sum(e.info.dimension for e in encoders)
    if int(searcher.manifest["dimension"]) != dim:
        raise ValueError(f"index {index} has dimension {searcher.manifest['dimension']}, the "
                         f"concatenation of {list(members)} has {dim}")

    def call(req):
        parts = [e.embed(req.inputs, timeout=req.timeout) for e in encoders]
        q = weighted_concat_queries(parts, alphas, renormalize=True)
        res = searcher.search(q, req.k, filter=req.filter, radius=req.radius, params=search_params)
        return EnsembleResult(list(res.doc_ids[0]), np.asarray(res.scores[0]).tolist(),
                              int(res.scanned[0]))

    return call


def load_registry(path: str) -> Registry:
    """`{name: callable}` for the retrieval service from a JSON/YAML file:

        cascade:  {kind: cascade, first_model: M/query_tower, first_index: I, embeddings: E, n: 500}
        concat:   {kind: weighted_concat, members: [A/query_tower, B/query_tower],
                   alphas: [1.0, 0.5], index: I}
    """
    spec = read_file(path, "ensemble registry file")
    builders = {"cascade": serving_cascade, "weighted_concat": serving_weighted_concat}
    out = {}
    for name, entry in spec.items():
        entry = dict(entry)
        kind = entry.pop("kind", None)
        if kind not in builders:
            raise ValueError(f"{path}: ensemble {name!r}: kind must be one of {sorted(builders)}, got {kind!r}")
        try:
            out[name] = builders[kind](**entry)
        except TypeError as e:
            raise ValueError(f"{path}: ensemble {name!r}: {e}") from None
    return out
