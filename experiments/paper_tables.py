"""`ebr experiment paper-tables`: the paper's training-data and serving findings, re-measured.

Place in the data flow: the whole stack end to end, per seed: `ebr data social` (raw logs) ->
`ebr pipeline examples` -> training-set variants (experiments/ablations.py,
`ebr mine-negatives`) -> `trainer.task.train` (exported towers) -> recall@K by exact search on the
held-out split -> ensembles (experiments/ensembles.py) and ANN indexes (index/) -> a Markdown
report with mean and standard deviation over seeds, and PNG plots.

The eight experiments (paper sections in brackets):
  1 unified vs text-only embedding, recall by document type             [2.3]
  2 random vs non-click-impression negatives                          [2.4]
  3 click vs click+impression positives                               [2.4]
  4 online hard negatives per positive (0, 1, 2, 4)                     [6.1.1]
  5 offline hard-negative rank windows and easy:hard ratios             [6.1.1]
  6 hard positives from failed sessions                                [6.1.2]
  7 weighted-concatenation and cascade ensembles vs single models       [6.2]
  8 ANN: pq_bytes, PQ vs OPQ, nprobe vs recall and documents scanned     [4.1]

Every row names the models (and their full configuration, in the appendix) it comes from, and
`--only ROW` reruns it alone. Verdicts against the paper are computed from the numbers by the
rules in `CLAIMS` (difference of means against twice its standard error over seeds); the
explanations printed next to a disagreement are fixed text about this data set, written
before any run and never adjusted to the outcome.

All models share one base recipe (the paper's: triplet loss on cosine distance with a margin
and random in-batch negatives, `HarnessConfig`); each row changes one thing.

Storage: every path is a URI (local or gs://). The report, `results.json` and the PNG plots are
written to OUT through `ebr.storage`. Each seed's artifacts live under WORK/seed{N}/ as the
stages' own artifacts (docs/contracts.md): raw logs, examples artifacts (the base one and every
training-set variant: `OUT/VERSION/...` + `_COMMITTED`, read through `ebr.artifacts.resolve`),
tower pairs and index versions. WORK defaults to OUT/work for a local OUT and to a local temp
directory (removed at the end) for a remote one.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time

import numpy as np

from ebr import artifacts, storage
from beam_pipelines import mining

log = logging.getLogger(__name__)

DOC_TYPES = ("person", "group", "page", "event")
# The text-only baseline of experiment 1: query text against document text.
TEXT_ONLY_FEATURES = ("query", "doc_text")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class HarnessConfig:
    # data (`ebr data social`)
    documents: int = 10_000
    sessions: int = 60_000
    # model and training (the base recipe; trainer.config.TrainConfig / trainer.losses.LossConfig)
    embedding_dim: int = 32
    feature_dim: int = 16
    text_dim: int = 32
    hidden_units: list[int] = dataclasses.field(default_factory=lambda: [128])
    hash_bucket_cap: int = 50_000
    text_buckets: int = 50_000
    batch_size: int = 128
    epochs: int = 4
    learning_rate: float = 0.003
    base_loss: str = "triplet"  # triplet (the paper's) | softmax
    margin: float = 0.2
    random_negatives: int = 1
    temperature: float = 0.05  # softmax only
    # evaluation
    ks: list[int] = dataclasses.field(default_factory=lambda: [10, 50, 100])
    primary_k: int = 10  # verdicts use recall at this K
    # experiment grids
    impression_negatives_max: int = 8
    online_hard: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 4])
    # > 0: experiment 1 also compares text-only and unified with this many online hard negatives
    # in both models (a second recipe beside the base one; not one of the paper's claims)
    e1_online_hard: int = 0
    windows: list[str] = dataclasses.field(default_factory=lambda: ["1-100", "101-500", "501-1000"])
    ratios: list[str] = dataclasses.field(default_factory=lambda: ["100:1", "10:1", "1:1", "0:1"])
    default_window: str = "101-500"
    default_ratio: str = "100:1"
    hard_per_query: int = 1
    hard_positive_window: int = 300
    ensemble_hard_model: str = "mined_101-500_0:1"  # the "hard" model of experiment 7
    ensemble_alphas: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0, 2.0])
    cascade_n: int = 100
    ann_nlist: int = 0  # 0 = about 2 * sqrt(documents), a power of two
    ann_pq_bytes: list[int] = dataclasses.field(default_factory=lambda: [4, 8, 16])
    ann_nprobes: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    beam_args: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        for w in self.windows + [self.default_window]:
            mining.parse_window(w)
        for r in self.ratios + [self.default_ratio]:
            mining.parse_ratio(r)
        if self.base_loss not in ("triplet", "softmax"):
            raise ValueError(f"base_loss must be triplet or softmax, got {self.base_loss!r}")
        if self.primary_k not in self.ks:
            raise ValueError(f"primary_k {self.primary_k} must be one of ks {self.ks}")
        if self.cascade_n < max(self.ks):
            raise ValueError(f"cascade_n {self.cascade_n} must be >= the largest K {max(self.ks)}")


# `--quick`: small data, and a grid without the intermediate easy:hard ratios. Batch 64 for six
# epochs (about 430 steps) because the unified model, unlike the text-only one, is far from
# trained after 70 steps (recall@10 0.53 -> 0.85 on seed 0; chosen on the unified model alone).
# One seed takes 3.4 min on an idle 2-core machine, keeping 1.2 cores busy (tracing and step
# dispatch are single-threaded Python), so the seeds run side by side in processes (`jobs`).
QUICK = {"documents": 2_000, "sessions": 6_000, "epochs": 6, "batch_size": 64,
         "hidden_units": [64], "hash_bucket_cap": 20_000, "text_buckets": 20_000,
         "ratios": ["100:1", "0:1"], "ann_pq_bytes": [4, 8, 16], "ann_nprobes": [1, 2, 4, 8, 16]}
SEEDS = 3


def make_config(quick: bool = False, overrides: list[str] | None = None) -> HarnessConfig:
    from ebr import config as ebr_config

    base = dict(QUICK) if quick else {}
    cfg = ebr_config.from_dict(HarnessConfig, base, "paper-tables")
    if overrides:
        data = dataclasses.asdict(cfg)
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"--set {item!r} is not KEY=VALUE")
            key, value = item.split("=", 1)
            if key not in data:
                raise ValueError(f"--set {key}: unknown field of HarnessConfig; known: {sorted(data)}")
            data[key] = value
        cfg = ebr_config.from_dict(HarnessConfig, data, "paper-tables")
    return cfg


# ---------------------------------------------------------------------------------------------
# The plan: models (what is trained on what) and rows (what the report shows)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    key: str
    data: str  # base | impression_negatives | impression_positives | hard_positives | mined:W:R
    loss: tuple = ()  # LossConfig overrides as (name, value) pairs
    extra_only: bool = False  # no random (easy) negatives: only the example's negative_doc_ids
    tower_features: tuple = ()  # TrainConfig.tower_features; () = every feature (unified)
    about: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    experiment: int
    name: str
    about: str
    kind: str = "model"  # model | ensemble | ann
    model: str = ""  # ModelSpec key for kind=model
    params: tuple = ()  # ensemble / ann parameters as (name, value) pairs
    baseline: bool = False

    def param(self, name, default=None):
        return dict(self.params).get(name, default)


def _tag(text: str) -> str:
    return text.replace(":", "to")


def mined_key(window: str, ratio: str) -> str:
    return f"mined_{window}_{ratio}"


def plan(cfg: HarnessConfig) -> tuple[dict[str, ModelSpec], list[Row]]:
    models: dict[str, ModelSpec] = {}

    def model(key, data, loss=(), extra_only=False, about="", tower_features=()):
        models[key] = ModelSpec(key, data, tuple(loss), extra_only, tuple(tower_features), about)
        return key

    unified = model("unified", "base", about="unified embedding, base recipe (random negatives, clicks)")
    text = model("text_only", "base", tower_features=TEXT_ONLY_FEATURES,
                 about="text-only embedding: the towers embed the query text and the document text only")
    rows = [
        Row(1, "e1.text_only", "text-only embedding", model=text, baseline=True),
        Row(1, "e1.unified", "unified embedding (text + searcher, social, location, history)", model=unified),
        Row(2, "e2.random_negatives", "random (in-batch) negatives", model=unified, baseline=True),
        Row(2, "e2.impression_negatives", "non-click impressions as the only negatives",
            model=model("impression_negatives", "impression_negatives", extra_only=True,
                        about="negatives: the session's non-clicked impressions, no random ones")),
        Row(3, "e3.click_positives", "positives: clicks", model=unified, baseline=True),
        Row(3, "e3.click_and_impression_positives", "positives: clicks and non-click impressions",
            model=model("impression_positives", "impression_positives",
                        about="positives: clicks plus non-clicked impressions")),
    ]

    def online_hard(k):
        return unified if k == 0 else model(f"online_hard_{k}", "base", loss=(("hard_negatives", k),),
                                            about=f"{k} hardest in-batch negatives per positive added")

    if cfg.e1_online_hard:
        k = cfg.e1_online_hard
        rows += [
            Row(1, f"e1.text_only.online_hard_{k}", f"text-only embedding, {k} online hard negatives",
                model=model(f"text_only_online_hard_{k}", "base", loss=(("hard_negatives", k),),
                            tower_features=TEXT_ONLY_FEATURES,
                            about=f"text-only embedding, {k} hardest in-batch negatives per positive added")),
            Row(1, f"e1.unified.online_hard_{k}", f"unified embedding, {k} online hard negatives",
                model=online_hard(k)),
        ]
    for k in cfg.online_hard:
        rows.append(Row(4, f"e4.online_hard_{k}", f"{k} online hard negatives per positive", model=online_hard(k),
                        baseline=k == 0))
    rows.append(Row(5, "e5.random_only", "random negatives only (easy:hard 1:0)", model=unified, baseline=True))
    grid = [(w, cfg.default_ratio) for w in cfg.windows]
    grid += [(cfg.default_window, r) for r in cfg.ratios if r != cfg.default_ratio]
    for window, ratio in grid:
        hard_only = mining.hard_fraction(ratio) == 1.0
        key = model(mined_key(window, ratio), f"mined:{window}:{ratio}", extra_only=hard_only,
                    about=f"offline hard negatives from ranks {window} of the unified model, "
                          f"easy:hard {ratio}" + (" (hard only: no random negatives)" if hard_only else ""))
        rows.append(Row(5, f"e5.window_{window}.ratio_{_tag(ratio)}",
                        f"ranks {window}, easy:hard {ratio}" + (" (hard only)" if hard_only else ""),
                        model=key))
    rows += [
        Row(6, "e6.clicks", "click positives", model=unified, baseline=True),
        Row(6, "e6.clicks_and_hard_positives", "click positives + hard positives from failed sessions",
            model=model("hard_positives", "hard_positives",
                        about=f"plus (failed query, later click) positives, window {cfg.hard_positive_window}s")),
    ]
    hard = cfg.ensemble_hard_model
    if hard not in models:
        window, ratio = hard[len("mined_"):].split("_", 1) if hard.startswith("mined_") else ("", "")
        if not window:
            raise ValueError(f"ensemble_hard_model {hard!r} is not a model of the plan: {sorted(models)}")
        model(hard, f"mined:{window}:{ratio}", extra_only=mining.hard_fraction(ratio) == 1.0,
              about=f"offline hard negatives from ranks {window}, easy:hard {ratio}")
    rows += [
        Row(7, "e7.single.unified", "single model: unified", model=unified, baseline=True),
        Row(7, "e7.single.text_only", "single model: text-only", model=text),
        Row(7, "e7.single.hard", f"single model: hard ({hard})", model=hard),
    ]
    for a in cfg.ensemble_alphas:
        rows.append(Row(7, f"e7.concat.unified+hard.alpha_{a:g}",
                        f"weighted concat: unified (1) + hard ({a:g})", kind="ensemble",
                        params=(("type", "concat"), ("models", (unified, hard)), ("alphas", (1.0, a)))))
    rows += [
        Row(7, "e7.concat.text+unified.alpha_1", "weighted concat: text-only (1) + unified (1)",
            kind="ensemble", params=(("type", "concat"), ("models", (text, unified)), ("alphas", (1.0, 1.0)))),
        Row(7, f"e7.cascade.text>unified.n_{cfg.cascade_n}",
            f"cascade: text-only top {cfg.cascade_n}, unified re-scores", kind="ensemble",
            params=(("type", "cascade"), ("models", (text, unified)), ("n", cfg.cascade_n))),
        Row(7, f"e7.cascade.unified>hard.n_{cfg.cascade_n}",
            f"cascade: unified top {cfg.cascade_n}, hard model re-scores", kind="ensemble",
            params=(("type", "cascade"), ("models", (unified, hard)), ("n", cfg.cascade_n))),
    ]
    rows.append(Row(8, "e8.exact", "exact search (FAISS flat inner product)", kind="ann",
                    params=(("model", unified), ("transform", "exact")), baseline=True))
    for transform in ("none", "OPQ"):
        for b in cfg.ann_pq_bytes:
            if cfg.embedding_dim % b:
                continue
            for nprobe in cfg.ann_nprobes:
                label = "PQ" if transform == "none" else "OPQ"
                rows.append(Row(8, f"e8.{label}{b}.nprobe_{nprobe}",
                                f"IVF-{label}, {b} bytes/vector, nprobe {nprobe}", kind="ann",
                                params=(("model", unified), ("transform", transform), ("pq_bytes", b),
                                        ("nprobe", nprobe))))
    return models, rows


def select_rows(rows: list[Row], only: list[str]) -> list[Row]:
    """Rows named in `only` (experiment numbers or row names) plus their experiments' baselines."""
    if not only:
        return rows
    names = {r.name for r in rows}
    unknown = [o for o in only if not o.isdigit() and o not in names]
    if unknown:
        raise ValueError(f"--only: unknown row(s) {unknown}; rows are: {sorted(names)}")
    picked = [r for r in rows if str(r.experiment) in only or r.name in only]
    experiments = {r.experiment for r in picked}
    return [r for r in rows if r in picked or (r.baseline and r.experiment in experiments)]


def models_needed(rows: list[Row], models: dict[str, ModelSpec], cfg: HarnessConfig) -> list[str]:
    keys: list[str] = []

    def add(k):
        spec = models[k]
        if spec.data.startswith("mined:"):
            add("unified")  # the mining model (model N)
        if k not in keys:
            keys.append(k)

    for r in rows:
        if r.kind == "model":
            add(r.model)
        elif r.kind == "ensemble":
            for k in r.param("models"):
                add(k)
        else:
            add(r.param("model"))
    return keys


# ---------------------------------------------------------------------------------------------
# Data variants


def _rewrite_tfrecords(src_dir: str, dst_dir: str, fn) -> int:
    """Every `*.tfrecord.gz` of `src_dir` through `fn` (parsed example -> example or None) into
    a file of the same name in `dst_dir` (any URIs: tf.io writes through tf.io.gfile)."""
    import tensorflow as tf

    from ebr import features

    n = 0
    for path in storage.glob(storage.join(src_dir, "*.tfrecord.gz")):
        storage.makedirs(dst_dir)  # local disk needs the directory; gs:// has none
        out = storage.join(dst_dir, storage.basename(path))
        with tf.io.TFRecordWriter(out, tf.io.TFRecordOptions(compression_type="GZIP")) as w:
            for rec in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                ex = fn(features.parse_example(rec.numpy()))
                if ex is not None:
                    w.write(features.make_example(ex))
                    n += 1
    return n


def restrict_ratio(mined_all: str, output: str, ratio: str, seed: int) -> str:
    """From a run mined with ratio 0:1 (every example carries hard negatives), the same run at
    `ratio`: examples the ratio does not select lose their mined negatives. Exactly what
    `ebr mine-negatives --ratio RATIO` writes (same selection hash, same per-example RNG), at
    the cost of one mining pass for all ratios.

    `mined_all` is the examples artifact of that run (`BASE` or `BASE/VERSION`); the result is
    committed as a new version of the examples artifact `output` (any URI; commit marker
    last); returns its version directory."""
    from beam_pipelines import outputs
    from beam_pipelines.mine_negatives import SUMMARY, carry_parts, example_key
    from ebr import features
    from experiments.ablations import resolve_examples

    src = resolve_examples(mined_all)

    def keep(ex):
        if not mining.carries_hard_negatives(example_key(ex), ratio, seed):
            ex = {k: v for k, v in ex.items() if k != "negative_doc_ids"}
        return ex

    with outputs.NewVersion(output, "examples") as out:
        n = _rewrite_tfrecords(storage.join(src, "train"), out.path("train"), keep)
        carry_parts(src, out.dir)
        if storage.exists(storage.join(src, SUMMARY)):  # the mining run's configuration
            storage.copy_file(storage.join(src, SUMMARY), out.path(SUMMARY))
        out.commit({}, {"schema_hash": features.schema_hash(), "derived_from": src,
                        "restricted_to_ratio": ratio, "seed": seed, "train_examples": n})
    return out.dir


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def train_config(cfg: HarnessConfig, spec: ModelSpec, data_dir: str, model_dir: str, seed: int):
    from trainer.config import TrainConfig
    from trainer.losses import LossConfig

    loss_kwargs = {"loss": cfg.base_loss, "margin": cfg.margin, "temperature": cfg.temperature,
                   "random_negatives": cfg.random_negatives, "seed": seed,
                   "logq": "none" if cfg.base_loss == "triplet" else "pipeline"}
    if spec.extra_only:  # "instead of random negatives": only the example's negative_doc_ids
        loss_kwargs.update(random_negatives=0, hard_negatives=0)
    loss_kwargs.update(dict(spec.loss))
    return TrainConfig(
        data_dir=data_dir, model_dir=model_dir, eval_pattern="eval/__not_evaluated_here__-*",
        embedding_dim=cfg.embedding_dim, feature_dim=cfg.feature_dim, text_dim=cfg.text_dim,
        hidden_units=list(cfg.hidden_units), hash_bucket_cap=cfg.hash_bucket_cap,
        text_char_buckets=cfg.text_buckets, text_word_buckets=cfg.text_buckets,
        batch_size=cfg.batch_size, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        tower_features=list(spec.tower_features), seed=seed, version=1,
        checkpoint_every_steps=1_000_000, loss=LossConfig(**loss_kwargs))


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
    from ebr import features
    from trainer import data
    from trainer.corpus import load_corpus
    from trainer.export import load_tower

    query = load_tower(storage.join(model_dir, "query_tower"))
    doc = load_tower(storage.join(model_dir, "doc_tower"))
    data_dir = artifacts.resolve(data_dir, "examples")
    corpus = load_corpus(storage.join(data_dir, "corpus", "documents-*.tfrecord.gz"))
    docs = corpus.embed(doc, batch_size=2048)
    doc_ids = [str(d) for d in corpus.doc_ids]
    types = np.array([t.decode() for t in corpus.features["doc_type"].numpy()])
    qs, pos = [], []
    ds = data.make_dataset(storage.join(data_dir, "eval", "examples-*.tfrecord.gz"), 1024,
                           shuffle=False, names=features.QUERY_INPUTS + ("doc_id",))
    for batch in ds:
        qs.append(query({n: batch[n] for n in features.QUERY_INPUTS}))
        pos += [corpus.row_of.get(d.decode(), -1) for d in batch["doc_id"].numpy()]
    return Embedded(np.concatenate(qs).astype(np.float32), np.asarray(pos), docs, doc_ids, types)


def ranks_exact(queries: np.ndarray, docs: np.ndarray, positives: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """0-based rank of each query's positive among all documents (ties count against it); a
    positive missing from the corpus gets rank = number of documents (a miss at every K)."""
    out = np.full(len(queries), len(docs), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        scores = queries[s:s + chunk] @ docs.T
        for i, p in enumerate(positives[s:s + chunk]):
            if p >= 0:
                out[s + i] = int((scores[i] > scores[i, p]).sum())
    return out


def recall_metrics(ranks: np.ndarray, ks, pos_types: np.ndarray | None = None) -> dict:
    out = {f"recall@{k}": float((ranks < k).mean()) for k in ks}
    if pos_types is not None:
        out["by_type"] = {t: {f"recall@{k}": float((ranks[pos_types == t] < k).mean()) for k in ks}
                          for t in DOC_TYPES if (pos_types == t).any()}
    return out


def _pos_types(e: Embedded) -> np.ndarray:
    return np.where(e.positives >= 0, e.doc_types[np.maximum(e.positives, 0)], "")


def model_metrics(e: Embedded, ks) -> dict:
    return recall_metrics(ranks_exact(e.queries, e.docs, e.positives), ks, _pos_types(e))


def _aligned(a: Embedded, b: Embedded) -> None:
    if a.doc_ids != b.doc_ids or not np.array_equal(a.positives, b.positives):
        raise ValueError("ensemble members were evaluated on different corpora or splits")


def ensemble_metrics(row: Row, emb: dict[str, Embedded], ks, work: str,
                     indexes: dict[str, str] | None = None) -> dict:
    """`indexes` caches the cascade's first-stage index versions built under `work` (name ->
    committed version directory) across the rows of one run."""
    from experiments import ensembles as ens

    a, b = (emb[k] for k in row.param("models"))
    _aligned(a, b)
    if row.param("type") == "concat":
        q = ens.weighted_concat_queries([a.queries, b.queries], row.param("alphas"))
        d = ens.concat_documents([a.docs, b.docs])
        return recall_metrics(ranks_exact(q, d, a.positives), ks, _pos_types(a))
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
    cascade = ens.Cascade(lambda q, k: first.search(q, k).doc_ids,
                          ens.EmbeddingTable(b.doc_ids, b.docs), n=n)
    ids, _ = cascade.search(a.queries, b.queries, k=max(ks))
    row_of = {d: i for i, d in enumerate(a.doc_ids)}
    ranks = np.full(len(ids), len(a.doc_ids), dtype=np.int64)
    for i, (got, p) in enumerate(zip(ids, a.positives)):
        rows = [row_of[d] for d in got]
        if p in rows:
            ranks[i] = rows.index(p)
    return recall_metrics(ranks, ks, _pos_types(a))


def ann_metrics(rows: list[Row], e: Embedded, cfg: HarnessConfig, work: str, seed: int) -> dict[str, dict]:
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


def _ann_metrics(rows: list[Row], e: Embedded, cfg: HarnessConfig, work: str, seed: int) -> dict[str, dict]:
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
            ranks = ranks_exact(e.queries, e.docs, e.positives)
            out[row.name] = {**recall_metrics(ranks, cfg.ks), f"ann_recall@{k}": 1.0,
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
        ranks = np.array([g.index(p) if p in g else n for g, p in zip(got, e.positives)])
        out[row.name] = {**recall_metrics(ranks, cfg.ks), f"ann_recall@{k}": float(overlap),
                         "scanned": float(res.scanned.mean()), "scanned_fraction": float(res.scanned.mean() / n),
                         "bytes_per_vector": float(searcher.backend.bytes_per_vector()), "factory": factory,
                         "nlist": nlist}
    return out


# ---------------------------------------------------------------------------------------------
# One seed, end to end


class SeedRun:
    """Everything of one seed under `work/seed{N}/` (any URI), built on demand and cached for
    the run. `data` maps a training-set key to its committed examples version directory."""

    def __init__(self, cfg: HarnessConfig, models: dict[str, ModelSpec], seed: int, work: str):
        self.cfg, self.models, self.seed = cfg, models, seed
        self.work = storage.join(work, f"seed{seed}")
        self.data: dict[str, str] = {}
        self.indexes: dict[str, str] = {}
        self.trained: dict[str, str] = {}
        self.embedded: dict[str, Embedded] = {}
        self.timings: dict[str, float] = {}
        self.facts: dict = {}

    def _timed(self, label: str, fn, *args, **kwargs):
        t0 = time.time()
        log.info("[seed %d] %s ...", self.seed, label)
        out = fn(*args, **kwargs)
        self.timings[label] = round(time.time() - t0, 2)
        log.info("[seed %d] %s done in %.1fs", self.seed, label, self.timings[label])
        return out

    def path(self, *parts) -> str:
        return storage.join(self.work, *parts)

    def raw(self) -> str:
        if "raw" not in self.data:
            from ebr.datasets.social import generate_social

            out = self.path("raw")
            summary = self._timed("generate social logs", generate_social, out,
                                  documents=self.cfg.documents, sessions=self.cfg.sessions,
                                  seed=self.seed, progress=False)
            self.facts["generator"] = {k: summary[k] for k in ("documents", "documents_by_type",
                                                               "sessions", "failed", "reformulations",
                                                               "clicks") if k in summary}
            self.data["raw"] = out
        return self.data["raw"]

    def dataset(self, key: str) -> str:
        if key in self.data:
            return self.data[key]
        from experiments import ablations

        beam_args = self.cfg.beam_args
        if key == "base":
            from beam_pipelines.examples import ExamplesConfig, run

            base = self.path("examples")
            stats = self._timed("examples pipeline", run, ExamplesConfig(input=self.raw(), output=base),
                                beam_args)
            self.facts["examples"] = stats.get("written", {})
            out = artifacts.resolve(base, "examples")
        elif key == "impression_negatives":
            out = self.path("data", key)
            s = self._timed("impression negatives", ablations.impression_negatives, self.dataset("base"), out,
                            self.cfg.impression_negatives_max, self.seed, beam_args)
            self.facts[key] = s["counts"]
            out = s["output"]
        elif key == "impression_positives":
            out = self.path("data", key)
            s = self._timed("impression positives", ablations.impression_positives, self.dataset("base"),
                            out, beam_args)
            self.facts[key] = s["counts"]
            out = s["output"]
        elif key == "hard_positives":
            out = self.path("data", key)
            s = self._timed("hard positives", ablations.hard_positive_examples, self.raw(),
                            self.dataset("base"), out, self.cfg.hard_positive_window, beam_args)
            self.facts[key] = s["counts"]
            out = s["output"]
        elif key.startswith("mined:"):
            _, window, ratio = key.split(":", 2)
            all_key = f"mined:{window}:0:1"
            if ratio == "0:1" or mining.hard_fraction(ratio) == 1.0:
                out = self._mine(window)
            else:
                out = self._timed(f"ratio {ratio} of window {window}", restrict_ratio, self.dataset(all_key),
                                  self.path("data", f"mined_{window}_{_tag(ratio)}"), ratio, self.seed)
        else:
            raise ValueError(f"unknown data variant {key!r}")
        self.data[key] = out
        return out

    def _mine(self, window: str) -> str:
        from beam_pipelines.mine_negatives import MineConfig, run
        from index import build_index

        unified = self.model("unified")
        e = self.embed("unified")
        if "unified-exact" not in self.indexes:
            from ebr import features

            doc_tower = artifacts.resolve(storage.join(unified, "doc_tower"), "doc tower")
            meta = artifacts.read_model_metadata(doc_tower, features.schema_hash())
            path = self.path("index", "unified-exact")
            storage.remove(path)  # a previous run's index was built from another model
            self.indexes["unified-exact"] = build_index(
                (e.doc_ids, e.docs, [[] for _ in e.doc_ids],
                 {"schema_hash": meta["schema_hash"], "model_version": meta["version"]}),
                path, backend="exact")
        index = self.indexes["unified-exact"]
        start, end = mining.parse_window(window)
        out = self.path("data", f"mined_{window}_all")
        cfg = MineConfig(examples=self.dataset("base"), model=storage.join(unified, "query_tower"),
                         index=index, output=out,
                         mining=mining.MiningConfig(start, end, self.cfg.hard_per_query, "0:1", self.seed))
        summary = self._timed(f"mine negatives {window}", run, cfg, self.cfg.beam_args)
        self.facts[f"mined {window}"] = summary["counts"]
        return summary.get("output") or artifacts.resolve(out, "examples")

    def model(self, key: str) -> str:
        if key in self.trained:
            return self.trained[key]
        from trainer.task import train

        spec = self.models[key]
        data_dir = self.dataset(spec.data)
        model_dir = self.path("models", key.replace(":", "to"))
        storage.remove(model_dir)  # never resume an older run's backup or reuse its towers
        result = self._timed(f"train {key}", train, train_config(self.cfg, spec, data_dir, model_dir, self.seed))
        self.facts.setdefault("training", {})[key] = {"steps": result["steps"],
                                                      "loss": result["metrics"].get("loss")}
        self.trained[key] = model_dir
        return model_dir

    def embed(self, key: str) -> Embedded:
        if key not in self.embedded:
            self.embedded[key] = self._timed(f"embed {key}", embed_split, self.model(key), self.dataset("base"))
        return self.embedded[key]

    def run(self, rows: list[Row]) -> dict[str, dict]:
        results: dict[str, dict] = {}
        for key in models_needed(rows, self.models, self.cfg):
            self.embed(key)
        ks = self.cfg.ks
        for row in rows:
            if row.kind == "model":
                results[row.name] = model_metrics(self.embed(row.model), ks)
            elif row.kind == "ensemble":
                results[row.name] = ensemble_metrics(row, self.embedded, ks, self.work, self.indexes)
        ann_rows = [r for r in rows if r.kind == "ann"]
        if ann_rows:
            results.update(self._timed("ANN sweep", ann_metrics, ann_rows,
                                       self.embed(ann_rows[0].param("model")), self.cfg, self.work, self.seed))
        return results


# ---------------------------------------------------------------------------------------------
# Aggregation, verdicts and the report


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """row -> metric -> {"mean", "std", "n", "values"} (std: sample std, 0 for one seed)."""
    out: dict[str, dict[str, dict]] = {}
    for seed_result in per_seed:
        for row, metrics in seed_result.items():
            for name, value in flatten(metrics).items():
                out.setdefault(row, {}).setdefault(name, {"values": []})["values"].append(value)
    for row in out.values():
        for m in row.values():
            v = np.asarray(m["values"], dtype=float)
            m.update(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n=len(v))
    return out


def compare(agg: dict, a: str, b: str, metric: str) -> dict:
    """b against a: difference of means, relative change and whether it exceeds 2 standard errors."""
    ma, mb = agg[a][metric], agg[b][metric]
    diff = mb["mean"] - ma["mean"]
    se = math.sqrt(ma["std"] ** 2 / ma["n"] + mb["std"] ** 2 / mb["n"])
    rel = diff / ma["mean"] if ma["mean"] > 0 else float("nan")
    if min(ma["n"], mb["n"]) < 2:
        sign = "higher" if diff > 0 else "lower" if diff < 0 else "equal"
        verdict = f"{sign} (one seed: no error bar)"
        clear = diff != 0
    else:
        clear = abs(diff) > 2 * se
        verdict = ("higher" if diff > 0 else "lower") if clear else "no clear difference"
    return {"diff": diff, "relative": rel, "se": se, "clear": clear, "verdict": verdict,
            "direction": (1 if diff > 0 else -1 if diff < 0 else 0) if clear else 0}


# Each claim: (experiment, the paper's statement, rule over the aggregate -> (status, detail),
# fixed text on why this data set may disagree).
def _best(agg, names, metric):
    present = [n for n in names if n in agg and metric in agg[n]]
    return max(present, key=lambda n: agg[n][metric]["mean"]) if present else None


def claims(cfg: HarnessConfig) -> list[dict]:
    k = cfg.primary_k
    m = f"recall@{k}"
    windows = [f"e5.window_{w}.ratio_{_tag(cfg.default_ratio)}" for w in cfg.windows]
    ratios = [f"e5.window_{cfg.default_window}.ratio_{_tag(r)}" for r in cfg.ratios] + ["e5.random_only"]
    hard_only = [f"e5.window_{cfg.default_window}.ratio_{_tag(r)}" for r in cfg.ratios
                 if mining.hard_fraction(r) == 1.0]

    def c_type(t, paper):
        def rule(agg):
            metric = f"by_type.{t}.{m}"
            if not all(metric in agg.get(r, {}) for r in ("e1.text_only", "e1.unified")):
                return "not measured", f"no {t} documents among the held-out clicks"
            c = compare(agg, "e1.text_only", "e1.unified", metric)
            status = "agrees" if c["direction"] > 0 else "disagrees" if c["direction"] < 0 else "inconclusive"
            return status, f"unified vs text-only on {t}s: {c['relative']:+.1%} ({c['verdict']}); paper {paper}"
        return rule

    def c_lower(base, other, paper, expect):
        def rule(agg):
            if base not in agg or other not in agg:
                return "not measured", ""
            c = compare(agg, base, other, m)
            if expect == "lower":
                status = "agrees" if c["direction"] < 0 else "disagrees" if c["direction"] > 0 else "inconclusive"
            elif expect == "higher":
                status = "agrees" if c["direction"] > 0 else "disagrees" if c["direction"] < 0 else "inconclusive"
            else:  # "no gain"
                status = "disagrees" if c["direction"] > 0 else "agrees"
            return status, f"{other} vs {base}: {c['relative']:+.1%} {m} ({c['verdict']}); paper {paper}"
        return rule

    def c_best(names, target, paper, what):
        def rule(agg):
            best = _best(agg, names, m)
            if best is None or target not in agg:
                return "not measured", ""
            if best == target:
                return "agrees", f"best {what}: {target}; paper {paper}"
            c = compare(agg, target, best, m)
            status = "inconclusive" if not c["clear"] else "disagrees"
            return status, (f"best {what}: {best} ({c['relative']:+.1%} over {target}, {c['verdict']}); "
                            f"paper {paper}")
        return rule

    def c_ensemble(agg):
        singles = [r for r in agg if r.startswith("e7.single.")]
        ensembles = [r for r in agg if r.startswith(("e7.concat.", "e7.cascade."))]
        bs, be = _best(agg, singles, m), _best(agg, ensembles, m)
        if not bs or not be:
            return "not measured", ""
        c = compare(agg, bs, be, m)
        status = "agrees" if c["direction"] > 0 else "disagrees" if c["direction"] < 0 else "inconclusive"
        return status, f"best ensemble {be} vs best single {bs}: {c['relative']:+.1%} ({c['verdict']})"

    def c_ann(agg):
        notes, ok = [], True
        for label in ("PQ", "OPQ"):
            for b in cfg.ann_pq_bytes:
                series = [agg.get(f"e8.{label}{b}.nprobe_{p}", {}).get(f"ann_recall@{k}", {}).get("mean")
                          for p in cfg.ann_nprobes]
                series = [s for s in series if s is not None]
                if len(series) > 1 and any(b2 < a2 - 1e-9 for a2, b2 in zip(series, series[1:])):
                    ok = False
                    notes.append(f"{label}{b} recall falls somewhere as nprobe grows")
        top = max(cfg.ann_nprobes)
        for label in ("PQ", "OPQ"):
            vals = [agg.get(f"e8.{label}{b}.nprobe_{top}", {}).get(f"ann_recall@{k}", {}).get("mean")
                    for b in cfg.ann_pq_bytes]
            vals = [v for v in vals if v is not None]
            if len(vals) > 1 and vals != sorted(vals):
                ok = False
                notes.append(f"{label}: recall at nprobe {top} does not grow with pq_bytes")
        opq_better = []
        for b in cfg.ann_pq_bytes:
            pq = agg.get(f"e8.PQ{b}.nprobe_{top}", {}).get(f"ann_recall@{k}", {}).get("mean")
            opq = agg.get(f"e8.OPQ{b}.nprobe_{top}", {}).get(f"ann_recall@{k}", {}).get("mean")
            if pq is not None and opq is not None:
                opq_better.append(opq >= pq - 0.005)
        if opq_better and not all(opq_better):
            notes.append("OPQ below PQ at some pq_bytes")
        status = "agrees" if ok and all(opq_better or [True]) else "partly"
        return status, "; ".join(notes) or "recall grows with nprobe and pq_bytes; OPQ >= PQ"

    generator = ("the generator's documents are short names drawn from one shared pool, so text "
                 "alone separates few same-named candidates and the social/location signals "
                 "carry most of the click model")
    return [
        {"experiment": 1, "claim": "unified embedding beats text-only: +18% recall on events",
         "rule": c_type("event", "+18%"),
         "why": "events are the rarest type in the generator (6% of documents by default), so their "
                "held-out count is small and noisy, and names are drawn from one shared pool, so a short "
                "training may not yet use the social and location signals that separate namesakes."},
        {"experiment": 1, "claim": "unified embedding beats text-only: +16% recall on groups",
         "rule": c_type("group", "+16%"),
         "why": "group clicks depend on membership, which the unified model sees through the shared "
                "entity table; with few training clicks per group that signal is learnt slowly."},
        {"experiment": 2, "claim": "non-click impressions as negatives: about -55% recall against random",
         "rule": c_lower("e2.random_negatives", "e2.impression_negatives", "-55%", "lower"),
         "why": "the generator's boolean engine shows only name matches and many sessions show a single "
                "document, so impression negatives are few and all share the query's name; the "
                "direction should hold, the size depends on how many sessions have negatives."},
        {"experiment": 3, "claim": "click + impression positives: no gain over clicks",
         "rule": c_lower("e3.click_positives", "e3.click_and_impression_positives", "no gain", "no gain"),
         "why": "impressions here are name matches chosen by a text engine; adding them as positives "
                "teaches text matching, which a small model may still lack after a short training."},
        {"experiment": 4, "claim": "online hard negatives: 2 per positive is best",
         "rule": c_best([f"e4.online_hard_{k2}" for k2 in cfg.online_hard], "e4.online_hard_2", "k=2",
                        "number of online hard negatives"),
         "why": "with small batches the hardest in-batch documents are rarely hard; the best k depends "
                "on batch size and the share of same-named documents in a batch."},
        {"experiment": 5, "claim": "offline hard negatives: ranks 101-500 are the best window",
         "rule": c_best(windows, f"e5.window_101-500.ratio_{_tag(cfg.default_ratio)}", "101-500", "window"),
         "why": f"rank windows are absolute, but this corpus is tiny next to the paper's: ranks 101-500 "
                f"of a {cfg.documents}-document corpus are a far larger, easier slice than in billions, "
                "and at easy:hard 100:1 only 1% of the examples carry a hard negative."},
        {"experiment": 5, "claim": "offline hard negatives: easy:hard 100:1 is the best blend",
         "rule": c_best(ratios, f"e5.window_{cfg.default_window}.ratio_{_tag(cfg.default_ratio)}", "100:1",
                        "easy:hard ratio"),
         "why": "the value of a ratio depends on how many hard examples exist in absolute terms; with "
                "thousands of training examples 100:1 adds only tens of them."},
        {"experiment": 5, "claim": "hard negatives only is worse than random negatives only",
         "rule": c_lower("e5.random_only", hard_only[0] if hard_only else "", "worse", "lower"),
         "why": "if the window's documents are mostly unrelated in a small corpus, 'hard' negatives "
                "behave like random ones."},
        {"experiment": 6, "claim": "hard positives from failed sessions improve recall",
         "rule": c_lower("e6.clicks", "e6.clicks_and_hard_positives", "improves", "higher"),
         "why": "the generator's failed queries are typo'd, prefix or nickname forms of the same "
                "names; character 3-grams already cover much of that, so extra pairs add less."},
        {"experiment": 7, "claim": "ensembles beat the single models",
         "rule": c_ensemble,
         "why": "ensembles help when their members make different mistakes; models trained on the same "
                "small data with the same features are highly correlated."},
        {"experiment": 8, "claim": "recall rises with nprobe (documents scanned) and pq_bytes; OPQ helps",
         "rule": c_ann,
         "why": "with few documents per inverted list the curves saturate early, and OPQ's rotation is "
                "learnt from few vectors."},
    ]


def _fmt(m: dict | None, pct: bool = False) -> str:
    if not m:
        return "-"
    if pct:
        return f"{m['mean']:.1%} ± {m['std']:.1%}"
    return f"{m['mean']:.3f} ± {m['std']:.3f}"


def _save_png(fig, path: str) -> None:
    """A matplotlib figure as one PNG object at `path` (any URI, through `ebr.storage`)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def _plot(path: str, title: str, labels: list[str], series: dict[str, list[tuple[float, float]]],
          ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + i * width, [v[0] for v in vals], width, yerr=[v[1] for v in vals], label=name, capsize=3)
    ax.set_xticks(x + width * (len(series) - 1) / 2)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def _plot_ann(path: str, agg: dict, cfg: HarnessConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = cfg.primary_k
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in ("PQ", "OPQ"):
        for b in cfg.ann_pq_bytes:
            pts = [(agg[r]["scanned"]["mean"], agg[r][f"ann_recall@{k}"]["mean"])
                   for r in (f"e8.{label}{b}.nprobe_{p}" for p in cfg.ann_nprobes) if r in agg]
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if label == "PQ" else "--", label=f"IVF-{label}{b}")
    ax.set_xscale("log")
    ax.set_xlabel("documents scanned per query (mean)")
    ax.set_ylabel(f"recall@{k} against exact search")
    ax.set_title("Experiment 8: IVF-PQ recall vs documents scanned (nprobe sweep)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


EXPERIMENT_TITLES = {
    1: "Unified embedding vs text-only embedding",
    2: "Random negatives vs non-click impressions as negatives",
    3: "Click positives vs click + impression positives",
    4: "Online hard negatives per positive",
    5: "Offline hard negatives: rank windows and easy:hard ratios",
    6: "Hard positives from failed sessions",
    7: "Ensembles: weighted concatenation and cascade",
    8: "ANN: pq_bytes, PQ vs OPQ, nprobe",
}


def write_report(out: str, cfg: HarnessConfig, models: dict[str, ModelSpec], rows: list[Row],
                 agg: dict, seeds: list[int], quick: bool, command: str, facts: list[dict],
                 seconds: float, jobs: int = 1) -> str:
    """Writes OUT/report.md and its PNG plots (any URI, through `ebr.storage`); returns the
    report's path."""
    ks = cfg.ks
    k = cfg.primary_k
    lines = [
        "# The paper's findings on generated social-search logs",
        "",
        f"Command: `{command}`  ",
        f"Seeds: {seeds} ({'quick mode' if quick else 'full mode'}); wall time {seconds / 60:.1f} min "
        f"with {jobs} seed(s) at a time on {os.cpu_count()} CPU(s).  ",
        f"Data per seed: `ebr data social --documents {cfg.documents} --sessions {cfg.sessions} --seed S`, "
        "then `ebr pipeline examples` (hash split, 10% of sessions held out).  ",
        f"Metric: recall@K = share of held-out (query, clicked document) pairs whose document ranks in "
        f"the top K of the whole corpus by exact search (mean ± sample std over seeds). Verdicts use "
        f"recall@{k}: a difference counts when it exceeds twice its standard error.",
        "",
        "Base recipe of every model (each row changes one thing): "
        f"{cfg.base_loss} loss" + (f" (margin {cfg.margin}, {cfg.random_negatives} random in-batch "
                                  "negative per positive)" if cfg.base_loss == "triplet" else "")
        + f", {cfg.embedding_dim}-d towers, batch {cfg.batch_size}, {cfg.epochs} epochs, "
        f"Adam lr {cfg.learning_rate}. Rerun a row alone with "
        f"`ebr experiment paper-tables{' --quick' if quick else ''} --seeds {len(seeds)} --only ROW`.",
        "",
    ]
    verdicts = []
    for c in claims(cfg):
        status, detail = c["rule"](agg)
        verdicts.append({**{k2: v for k2, v in c.items() if k2 != "rule"}, "status": status, "detail": detail})
    lines += ["## Summary against the paper", "", "| # | paper | here | verdict |", "|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['experiment']} | {v['claim']} | {v['detail']} | **{v['status']}** |")
    lines.append("")
    by_exp: dict[int, list[Row]] = {}
    for r in rows:
        by_exp.setdefault(r.experiment, []).append(r)
    for exp, exp_rows in sorted(by_exp.items()):
        lines += [f"## {exp}. {EXPERIMENT_TITLES[exp]}", ""]
        base = next((r for r in exp_rows if r.baseline), None)
        if exp == 8:
            lines += ["| row | configuration | recall@%d vs exact | click recall@%d | documents scanned | "
                      "bytes/vector |" % (k, k), "|---|---|---|---|---|---|"]
            for r in exp_rows:
                a = agg.get(r.name, {})
                if "scanned" not in a:
                    lines.append(f"| `{r.name}` | {r.about} | - | - | - | - |")
                    continue
                lines.append(f"| `{r.name}` | {r.about} | {_fmt(a.get(f'ann_recall@{k}'))} | "
                             f"{_fmt(a.get(f'recall@{k}'))} | {a['scanned']['mean']:.0f} "
                             f"({a['scanned_fraction']['mean']:.1%}) | {a['bytes_per_vector']['mean']:.1f} |")
            _plot_ann(storage.join(out, "e8_ann.png"), agg, cfg)
            lines += ["", "![experiment 8](e8_ann.png)", ""]
        else:
            header = "| row | what | " + " | ".join(f"recall@{x}" for x in ks) + f" | Δ recall@{k} vs baseline |"
            lines += [header, "|" + "---|" * (len(ks) + 3)]
            for r in exp_rows:
                a = agg.get(r.name, {})
                delta = "baseline" if r.baseline or base is None else "-"
                if base is not None and not r.baseline and r.name in agg and base.name in agg:
                    c = compare(agg, base.name, r.name, f"recall@{k}")
                    delta = f"{c['relative']:+.1%} ({c['verdict']})"
                model = f" (model `{r.model}`)" if r.model else ""
                lines.append(f"| `{r.name}` | {r.about}{model} | "
                             + " | ".join(_fmt(a.get(f"recall@{x}")) for x in ks) + f" | {delta} |")
            if exp == 1:
                lines += ["", f"Recall@{k} by document type:", "",
                          "| row | " + " | ".join(DOC_TYPES) + " |", "|" + "---|" * (len(DOC_TYPES) + 1)]
                for r in exp_rows:
                    a = agg.get(r.name, {})
                    lines.append(f"| `{r.name}` | " + " | ".join(
                        _fmt(a.get(f"by_type.{t}.recall@{k}")) for t in DOC_TYPES) + " |")
                series = {r.name: [(agg.get(r.name, {}).get(f"by_type.{t}.recall@{k}", {}).get("mean", 0.0),
                                    agg.get(r.name, {}).get(f"by_type.{t}.recall@{k}", {}).get("std", 0.0))
                                   for t in DOC_TYPES] for r in exp_rows}
                _plot(storage.join(out, "e1_by_type.png"), f"Experiment 1: recall@{k} by document type",
                      list(DOC_TYPES), series, f"recall@{k}")
                lines += ["", "![experiment 1](e1_by_type.png)"]
                hard = cfg.e1_online_hard
                pair = (f"e1.text_only.online_hard_{hard}", f"e1.unified.online_hard_{hard}")
                if hard and all(p in agg for p in pair):
                    c = compare(agg, *pair, f"recall@{k}")
                    lines += ["", f"Second recipe (not a paper claim): with {hard} online hard negatives in "
                              f"both models, unified vs text-only recall@{k} {c['relative']:+.1%} "
                              f"({c['verdict']})."]
            else:
                series = {f"recall@{x}": [(agg.get(r.name, {}).get(f"recall@{x}", {}).get("mean", 0.0),
                                          agg.get(r.name, {}).get(f"recall@{x}", {}).get("std", 0.0))
                                         for r in exp_rows] for x in ks}
                png = f"e{exp}.png"
                _plot(storage.join(out, png), f"Experiment {exp}: {EXPERIMENT_TITLES[exp]}",
                      [r.name.split(".", 1)[1] for r in exp_rows], series, "recall")
                lines += ["", f"![experiment {exp}]({png})"]
            lines.append("")
        for v in verdicts:
            if v["experiment"] == exp:
                lines.append(f"- Paper: {v['claim']}. Here: {v['detail']}. **{v['status']}**.")
                if v["status"] not in ("agrees",):
                    lines.append(f"  Why it may differ: {v['why']}")
        lines.append("")
    lines += [
        "## Notes",
        "",
        f"- Text-only model: `TrainConfig.tower_features = {list(TEXT_ONLY_FEATURES)}`; same data, "
        "loss and training as the unified model, its towers embed nothing else.",
        "- Hard only (easy:hard 0:1) and impression negatives train with no random negatives: "
        "the triplet loss sees only the example's `negative_doc_ids`.",
        f"- Offline mining: the unified model of the same seed is model N; the index is exact over its "
        f"document embeddings; {cfg.hard_per_query} negative(s) sampled per selected example; the "
        "ratio is the share of training examples carrying mined negatives, H/(E+H); ratios are cut "
        "from one mining pass per window (same selection hash and per-example RNG as a direct run).",
        f"- Ensembles are evaluated by exact search over the concatenation (weighted concat) or "
        f"through an exact index of the first model (cascade, N = {cfg.cascade_n}).",
        "",
        "## Appendix: models",
        "",
        "| model | training data | overrides | about |",
        "|---|---|---|---|",
    ]
    for key in sorted(models):
        s = models[key]
        over = dict(s.loss)
        if s.extra_only:
            over.update(random_negatives=0, hard_negatives=0)
        if s.tower_features:
            over["tower_features"] = list(s.tower_features)
        lines.append(f"| `{key}` | {s.data} | `{json.dumps(over)}` | {s.about} |")
    lines += ["", "Harness configuration:", "", "```json", json.dumps(dataclasses.asdict(cfg), indent=1), "```", "",
              "Per-seed facts (data sizes, mined counts, training steps, timings):", "", "```json",
              json.dumps(facts, indent=1, default=str)[:20000], "```", ""]
    path = storage.join(out, "report.md")
    storage.write_bytes(path, "\n".join(lines).encode("utf-8"))  # one object, written whole
    return path


def run_seed(cfg: HarnessConfig, models: dict[str, ModelSpec], rows: list[Row], seed: int,
             work: str, log_level: int | None = None) -> tuple[dict, dict]:
    """One seed end to end: (row -> metrics, facts). A worker process's entry point."""
    if log_level is not None:  # a spawned worker starts without the parent's logging set-up
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = SeedRun(cfg, models, seed, work)
    results = run.run(rows)
    return results, {"seed": seed, **run.facts, "timings": run.timings}


def run_seeds(cfg: HarnessConfig, models: dict[str, ModelSpec], rows: list[Row], seeds: list[int],
              work: str, jobs: int) -> list[tuple[dict, dict]]:
    """Every seed, `jobs` at a time in spawned processes (TensorFlow does not survive a fork);
    jobs=1 runs them here. Seeds share nothing but the code, so the results do not depend on
    `jobs`."""
    if jobs <= 1 or len(seeds) == 1:
        return [run_seed(cfg, models, rows, s, work) for s in seeds]
    import concurrent.futures
    import multiprocessing

    level = logging.getLogger().getEffectiveLevel()
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_seed, cfg, models, rows, s, work, level) for s in seeds]
        return [f.result() for f in futures]


def default_jobs(n_seeds: int) -> int:
    # One process keeps about 1.2 cores busy (see QUICK), so one more process than cores.
    return max(1, min(n_seeds, (os.cpu_count() or 1) + 1))


def main(quick: bool = False, seeds: int | None = None, out: str = "paper_tables",
         only: list[str] | None = None, overrides: list[str] | None = None,
         command: str | None = None, jobs: int | None = None, work: str | None = None) -> str:
    """Runs the selected rows over `seeds` seeds (`jobs` processes at a time); returns the
    report path.

    `out` (any URI) receives report.md, results.json and the plots. `work` (any URI) holds every
    seed's artifacts; by default OUT/work when OUT is local, else a local temp directory that
    is removed when the run ends."""
    started = time.time()
    cfg = make_config(quick, overrides)
    n_seeds = seeds if seeds is not None else SEEDS
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    jobs = default_jobs(n_seeds) if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    models, rows = plan(cfg)
    rows = select_rows(rows, only or [])
    scratch = None
    if work is None:
        if storage.is_local(out):
            work = storage.join(out, "work")
        else:  # FAISS / TF scratch stays on local disk; only the results go to OUT
            work = scratch = tempfile.mkdtemp(prefix="ebr-paper-tables-work-")
            log.info("OUT %s is remote: work directory %s (removed at the end)", out, work)
    try:
        done = run_seeds(cfg, models, rows, list(range(n_seeds)), work, jobs)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    per_seed, facts = [r for r, _ in done], [f for _, f in done]
    agg = aggregate(per_seed)
    results = {"config": dataclasses.asdict(cfg), "seeds": list(range(n_seeds)),
               "rows": [dataclasses.asdict(r) for r in rows], "per_seed": per_seed,
               "aggregate": agg, "facts": facts}
    storage.write_bytes(storage.join(out, "results.json"),
                        json.dumps(results, indent=1, default=str).encode("utf-8"))
    if command is None:
        command = (f"ebr experiment paper-tables{' --quick' if quick else ''} --seeds {n_seeds} "
                   f"--out {out}" + (f" --only {','.join(only)}" if only else "")
                   + "".join(f" --set {o}" for o in overrides or []))
    return write_report(out, cfg, models, rows, agg, list(range(n_seeds)), quick, command, facts,
                        time.time() - started, jobs)
