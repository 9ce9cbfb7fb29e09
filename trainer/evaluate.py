"""Offline evaluation (`ebr evaluate`): recall@K by exact search over the full corpus.

Every held-out example's query is embedded by the query tower, scored against the embedding of
every corpus document, and the documents scoring above the positive and tied with it counted
(`ebr.recall`, the project's one tie rule): `protocols` holds recall@K with ties broken at random
in expectation (what a deployed index gives on average), `protocols_ties_against` the same with
every tie counted against the positive, `tie_rule` says so in words. Two protocols:
`all` ranks the held-out document among every document (the TFRS tutorial metric); `exclude_train`
first removes the searcher's training documents other than the positive (the usual offline
protocol for recommendation data such as MovieLens). The split used (`EX/VERSION/split.json`
and the files read) is written with the numbers so other tools can reproduce it.

Place in the data flow: reads one committed examples version (docs/contracts.md s.2) and the
towers (s.3, or the in-memory model during training), all on any URI (`ebr.storage`); writes
its JSON report to any URI.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict

import numpy as np
import tensorflow as tf

from ebr import features, recall, storage
from trainer import data
from trainer.config import DEFAULT_KS
from trainer.corpus import Corpus, load_corpus

log = logging.getLogger(__name__)

_SCORE_BUDGET = 16_000_000  # query x document scores held at once (64 MB of float32)


def _towers(model_or_query_tower_path, doc_tower_path: str | None):
    """(query callable, doc callable, description) from a model object or an export path."""
    if isinstance(model_or_query_tower_path, (str, os.PathLike)):
        from trainer.export import load_tower

        qpath = os.fspath(model_or_query_tower_path)
        query = load_tower(qpath)
        if doc_tower_path is None:
            # MODEL_DIR/query_tower[/VERSION] -> MODEL_DIR/doc_tower/(same VERSION)
            version = storage.basename(query.path)
            doc_tower_path = storage.join(storage.parent(storage.parent(query.path)),
                                          "doc_tower", version)
        doc = load_tower(os.fspath(doc_tower_path))
        if query.dimension != doc.dimension or query.metadata.get("version") != doc.metadata.get("version"):
            raise ValueError(f"{query.path} and {doc.path} are not from the same export "
                             f"(dimension/version differ)")
        return query, doc, {"query_tower": query.path, "doc_tower": doc.path}
    model = model_or_query_tower_path
    q = tf.function(lambda x: model.query_tower(model.query_tower.select(x), training=False),
                    reduce_retracing=True)
    d = tf.function(lambda x: model.doc_tower(model.doc_tower.select(x), training=False),
                    reduce_retracing=True)
    return q, d, {"model": "in-memory"}


def training_items(pattern: str) -> dict[str, set[str]]:
    """searcher_id -> documents clicked in the training split."""
    items: dict[str, set[str]] = defaultdict(set)
    files = data.list_files(pattern)
    ds = data.make_dataset(files, 8192, shuffle=False, names=(features.SEARCHER_ID, features.DOC_ID))
    with data.named_errors(files):
        for batch in ds:
            for s, d in zip(batch[features.SEARCHER_ID].numpy(), batch[features.DOC_ID].numpy()):
                items[s.decode()].add(d.decode())
    return items


def _read_split(data_dir: str | None) -> dict:
    if not data_dir:
        return {}
    path = storage.join(data_dir, "split.json")
    if not storage.exists(path):
        return {"split_file": None}
    return {"split_file": path, **storage.read_json(path, "split description")}


def positive_rank(scores: np.ndarray, row: int, excluded_rows=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(greater, ties) of document `row` among `scores` [N] (`ebr.recall.tie_counts`), and the
    same once `excluded_rows` (the searcher's training documents; the positive itself is never
    excluded) are removed from the candidates."""
    scores = np.asarray(scores)[None, :]
    g, t = recall.tie_counts(scores, [row])
    if not excluded_rows:
        return (int(g[0]), int(t[0])), (int(g[0]), int(t[0]))
    ge, te = recall.tie_counts(scores, [row], exclude=[list(excluded_rows)])
    return (int(g[0]), int(t[0])), (int(ge[0]), int(te[0]))


def evaluate(model_or_query_tower_path, *, eval_pattern: str, corpus: Corpus | str,
             doc_tower_path: str | None = None, train_pattern: str | None = None,
             ks=DEFAULT_KS, batch_size: int = 1024, data_dir: str | None = None,
             output: str | None = None, max_examples: int = 0) -> dict:
    """Recall@K of held-out examples (and the split used) as a dict; also written to `output`.

    `model_or_query_tower_path`: a trained `UnifiedEmbeddingModel` or an exported
    `BASE/query_tower[/VERSION]` (its doc tower is the sibling of the same version unless
    `doc_tower_path` is given). `corpus`: a loaded `Corpus` or a corpus file pattern.
    `train_pattern` enables the `exclude_train` protocol.
    """
    start = time.time()
    ks = sorted(int(k) for k in ks)
    query_fn, doc_fn, described = _towers(model_or_query_tower_path, doc_tower_path)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    doc_emb = tf.constant(corpus.embed(
        lambda x: doc_fn({n: x[n] for n in features.DOC_INPUTS}), batch_size=batch_size))
    rows_per_chunk = max(1, _SCORE_BUDGET // len(corpus))
    seen = training_items(train_pattern) if train_pattern else None
    files = data.list_files(eval_pattern)
    ds = data.make_dataset(files, batch_size, shuffle=False)
    protocols = ["all", "exclude_train"] if seen is not None else ["all"]
    counts = {p: ([], []) for p in protocols}  # protocol -> (greater, ties) per example
    n = missing = 0
    with data.named_errors(files):
        for batch in ds:
            q = tf.convert_to_tensor(query_fn({k: batch[k] for k in features.QUERY_INPUTS}))
            # Exact scores against the whole corpus, a few rows at a time (bounded memory).
            scores = np.concatenate([tf.matmul(q[s:s + rows_per_chunk], doc_emb, transpose_b=True).numpy()
                                     for s in range(0, int(q.shape[0]), rows_per_chunk)])
            ids = [d.decode() for d in batch[features.DOC_ID].numpy()]
            if max_examples:
                ids = ids[:max_examples - n]
            # a positive not in the corpus (-1) is a miss under every protocol
            rows = np.array([corpus.row_of.get(d, -1) for d in ids], dtype=np.int64)
            missing += int((rows < 0).sum())
            n += len(ids)
            g, t = recall.tie_counts(scores[:len(ids)], rows)
            counts["all"][0].append(g)
            counts["all"][1].append(t)
            if seen is not None:
                searchers = [s.decode() for s in batch[features.SEARCHER_ID].numpy()[:len(ids)]]
                excluded = [[corpus.row_of[d] for d in seen.get(s, ()) if d in corpus.row_of]
                            for s in searchers]
                g, t = recall.tie_counts(scores[:len(ids)], rows, exclude=excluded)
                counts["exclude_train"][0].append(g)
                counts["exclude_train"][1].append(t)
            if max_examples and n >= max_examples:
                break
    if n == 0:
        raise ValueError(f"no evaluation examples in {eval_pattern}")
    counts = {p: (np.concatenate(g), np.concatenate(t)) for p, (g, t) in counts.items()}
    result = {
        "protocols": {p: recall.recall_at(g, t, ks, "random", key="recall_at_{k}")
                      for p, (g, t) in counts.items()},
        "protocols_ties_against": {p: recall.recall_at(g, t, ks, "against", key="recall_at_{k}")
                                   for p, (g, t) in counts.items()},
        "tie_rule": "protocols: " + recall.TIE_RULE,
        "positives_tied": {p: float((t > 0).mean()) for p, (_, t) in counts.items()},
        "examples": n, "positives_missing_from_corpus": missing, "corpus_size": len(corpus),
        "ks": ks, "split": {**_read_split(data_dir), "eval_files": files,
                            "train_files": storage.glob(train_pattern) if train_pattern else []},
        **described, "seconds": round(time.time() - start, 3),
    }
    log.info("evaluation over %d examples, %d documents: %s", n, len(corpus), result["protocols"])
    if output:  # one object write: on GCS it appears whole (ebr.storage.write_bytes)
        storage.write_bytes(output, json.dumps(result, indent=2, sort_keys=True).encode("utf-8"))
    return result
