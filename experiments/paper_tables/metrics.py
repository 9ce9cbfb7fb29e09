"""Recall of one model, an ensemble or an ANN index on a seed's held-out split.

Place in the data flow: exported towers (`trainer.export`) and the examples artifact's corpus
and eval split -> `embed_split` (`Embedded`) -> recall@K by exact search (`model_metrics`),
through weighted concatenation or a cascade (`ensemble_metrics`, paper 6.2) or through IVF-PQ
indexes (`ann_metrics`, paper 4.1) -> the seed run's row -> metrics.

Every recall here is `ebr.recall`'s: exact search counts the documents above and tied with the
positive over the whole corpus; a cascade or an ANN index counts them within the ranked list it
returned, by the scores it returned. `recall@K` breaks ties at random in expectation;
`ties_against.recall@K` counts them against the positive (shown where text-only models are
compared: a text-only model scores every namesake exactly like the positive).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ebr import artifacts, features, recall, storage
from experiments.paper_tables.config import PaperTablesConfig
from experiments.paper_tables.rows import Row

DOC_TYPES = ("person", "group", "page", "event")


@dataclasses.dataclass
class Embedded:
    """One model's view of the held-out split: query and document embeddings."""
    queries: np.ndarray  # [Q, D]
    positives: np.ndarray  # [Q] corpus row of each query's clicked document
    docs: np.ndarray  # [N, D]
    doc_ids: list[str]
    doc_types: np.ndarray  # [N]


def embed_split(model_dir: str, data_dir: str) -> Embedded:
    """`model_dir`: MODEL_DIR of a tower pair; `data_dir`: examples artifact (EX or EX/VERSION)."""
    from trainer import data
    from trainer.corpus import load_corpus
    from trainer.export import load_tower

    query = load_tower(storage.join(model_dir, "query_tower"))
    doc = load_tower(storage.join(model_dir, "doc_tower"))
    data_dir = artifacts.resolve(data_dir, "examples")
    corpus = load_corpus(storage.join(data_dir, "corpus", "documents-*.tfrecord.gz"))
    docs = corpus.embed(doc, batch_size=2048)
    doc_ids = [str(d) for d in corpus.doc_ids]
    types = np.array([t.decode() for t in corpus.features[features.DOC_TYPE].numpy()])
    qs, pos = [], []
    ds = data.make_dataset(storage.join(data_dir, "eval", "examples-*.tfrecord.gz"), 1024,
                           shuffle=False, names=features.QUERY_INPUTS + (features.DOC_ID,))
    for batch in ds:
        qs.append(query({n: batch[n] for n in features.QUERY_INPUTS}))
        pos += [corpus.row_of.get(d.decode(), -1) for d in batch[features.DOC_ID].numpy()]
    return Embedded(np.concatenate(qs).astype(np.float32), np.asarray(pos), docs, doc_ids, types)


def counts_exact(queries: np.ndarray, docs: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(greater, ties) of each query's positive among all documents by exact inner-product
    search (`ebr.recall.exact_tie_counts`; a positive missing from the corpus is a miss)."""
    return recall.exact_tie_counts(queries, docs, positives)


def recall_metrics(counts: tuple[np.ndarray, np.ndarray], ks, pos_types: np.ndarray | None = None) -> dict:
    """recall@K (ties at random in expectation), the ties-against figures, the share of positives
    tied with another document and, given the positives' types, recall@K by type."""
    g, t = counts
    out = {**recall.recall_at(g, t, ks), "ties_against": recall.recall_at(g, t, ks, "against"),
           "positives_tied": float((t > 0).mean())}
    if pos_types is not None:
        out["by_type"] = {ty: recall.recall_at(g[pos_types == ty], t[pos_types == ty], ks)
                          for ty in DOC_TYPES if (pos_types == ty).any()}
    return out


def _pos_types(e: Embedded) -> np.ndarray:
    return np.where(e.positives >= 0, e.doc_types[np.maximum(e.positives, 0)], "")


def model_metrics(e: Embedded, ks) -> dict:
    return recall_metrics(counts_exact(e.queries, e.docs, e.positives), ks, _pos_types(e))


def _aligned(a: Embedded, b: Embedded) -> None:
    if a.doc_ids != b.doc_ids or not np.array_equal(a.positives, b.positives):
        raise ValueError("ensemble members were evaluated on different corpora or splits")


def ensemble_metrics(row: Row, emb: dict[str, Embedded], ks, work: str,
                     indexes: dict[str, str] | None = None) -> dict:
    """`indexes` caches the cascade's first-stage index versions built under `work` (name ->
    committed version directory) across the rows of one run."""
    from experiments.ensembles import Cascade
    from serving.retrieval.ensembles import EmbeddingTable, concat_documents, weighted_concat_queries

    a, b = (emb[k] for k in row.param("models"))
    _aligned(a, b)
    if row.param("type") == "concat":
        q = weighted_concat_queries([a.queries, b.queries], row.param("alphas"))
        d = concat_documents([a.docs, b.docs])
        return recall_metrics(counts_exact(q, d, a.positives), ks, _pos_types(a))
    # cascade: the first model's real (exact) index retrieves n, the second re-scores
    from index import build_index, open_index

    n = int(row.param("n"))
    indexes = {} if indexes is None else indexes
    name = f"{row.param('models')[0]}-exact"
    if name not in indexes:
        path = storage.join(work, "index", name)
        storage.remove(path)  # a previous run's index was built from another model
        indexes[name] = build_index((a.doc_ids, a.docs, [[] for _ in a.doc_ids],
                                     {"source": row.param("models")[0]}), path, backend="exact")
    first = open_index(indexes[name])
    cascade = Cascade(lambda q, k: first.search(q, k).doc_ids, EmbeddingTable(b.doc_ids, b.docs), n=n)
    ids, scores = cascade.search(a.queries, b.queries, k=max(ks))
    row_of = {d: i for i, d in enumerate(a.doc_ids)}
    rows = [[row_of[d] for d in got] for got in ids]
    # ties among the second stage's scores are broken at random in expectation, not by list order
    return recall_metrics(recall.tie_counts_in_list(scores, rows, a.positives), ks, _pos_types(a))


def ann_metrics(rows: list[Row], e: Embedded, cfg: PaperTablesConfig, work: str, seed: int) -> dict[str, dict]:
    """Experiment 8 over one model's embeddings: per row, recall@10 against exact search, click
    recall@K through the index, and documents scanned per query."""
    import faiss

    # One OpenMP thread: on shared cores FAISS's spinning threads turn a 5 s sweep into minutes.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _ann_metrics(rows, e, cfg, work, seed)
    finally:
        faiss.omp_set_num_threads(threads)


def _ann_metrics(rows: list[Row], e: Embedded, cfg: PaperTablesConfig, work: str, seed: int) -> dict[str, dict]:
    from index import build_index, open_index
    from index.ivf_pq import IVFPQBackend, IVFPQConfig

    k = cfg.primary_k
    n, d = e.docs.shape
    nlist = cfg.ann_nlist or max(4, 2 ** round(math.log2(2 * math.sqrt(n))))
    exact_top = np.argsort(-(e.queries @ e.docs.T), axis=1, kind="stable")[:, :k]
    row_of = {doc: i for i, doc in enumerate(e.doc_ids)}
    emb = (e.doc_ids, e.docs, [[] for _ in e.doc_ids], {"source": "experiment 8"})
    out: dict[str, dict] = {}
    built: dict[tuple, object] = {}
    for row in rows:
        transform = row.param("transform")
        if transform == "exact":
            out[row.name] = {**recall_metrics(counts_exact(e.queries, e.docs, e.positives), cfg.ks), f"ann_recall@{k}": 1.0,
                             "scanned": float(n), "scanned_fraction": 1.0, "bytes_per_vector": 4.0 * d}
            continue
        key = (transform, row.param("pq_bytes"))
        if key not in built:
            factory = IVFPQConfig(nlist=nlist, transform=transform, pq_bytes=key[1]).factory_string(d)
            path = storage.join(work, "index", f"ann-{transform}-{key[1]}")
            storage.remove(path)
            vdir = build_index(emb, path, backend_object=IVFPQBackend.build(e.docs, factory, seed=seed))
            built[key] = (open_index(vdir), factory)
        searcher, factory = built[key]
        kmax = max(cfg.ks)
        res = searcher.search(e.queries, kmax, params={"nprobe": int(row.param("nprobe"))})
        got = [[row_of[x] for x in ids] for ids in res.doc_ids]
        overlap = np.mean([len(set(g[:k]) & set(t)) / k for g, t in zip(got, exact_top)])
        # click recall through the index: ties among the index's own scores at random in expectation
        counts = recall.tie_counts_in_list(res.scores, got, e.positives)
        out[row.name] = {**recall_metrics(counts, cfg.ks), f"ann_recall@{k}": float(overlap),
                         "scanned": float(res.scanned.mean()), "scanned_fraction": float(res.scanned.mean() / n),
                         "bytes_per_vector": float(searcher.backend.bytes_per_vector()), "factory": factory,
                         "nlist": nlist}
    return out
