"""One seed end to end, and every seed side by side.

Place in the data flow, per seed under WORK/seed{N}/ (any URI): `ebr data social` (raw logs) ->
`ebr pipeline examples` (the base examples artifact) -> training-set variants
(`experiments/ablations.py`, offline mining by `beam_pipelines.mine_negatives` over an exact
index of the unified model, `variants.restrict_ratio`) -> `trainer.task.train` (a tower pair per
model of the plan) -> `metrics` on the held-out split -> row -> metrics for the aggregation
(`claims.aggregate`). Every artifact is the stage's own (docs/contracts.md).

The source of the logs (`source_summary`, in every seed's facts and in results.json):
  generator  (default) each seed generates its own logs with `ebr data social --seed S`;
  raw        `PaperTablesConfig.raw`, any canonical raw logs (docs/data-format.md): one examples
             run before the seeds (`shared_examples`, WORK/shared/examples), so every seed has
             the same held-out split and the seed varies only initialisation, shuffling,
             sampling and mining.
Rows that need something such logs may lack are not measured, with the reason in the facts
(`not_measured`), instead of failing the run: non-clicked impressions (experiments 2 and 3),
failed searches followed by a clicked reformulation (experiment 6); recall by document type
covers the generator's types only. When the logs carry the generator's truth
(`RAW/truth/ceiling.jsonl[.gz]`), the pseudo-row `rows.CEILING` holds the Bayes-optimal
ranking's expected recall@K over the held-out examples.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from ebr import artifacts, features, storage
from beam_pipelines import mining
from experiments.paper_tables.config import PaperTablesConfig
from experiments.paper_tables.metrics import (DOC_TYPES, Embedded, ann_metrics, embed_split,
                                              ensemble_metrics, model_metrics)
from experiments.paper_tables.rows import CEILING, ModelSpec, Row, models_needed, ratio_tag
from experiments.paper_tables.variants import restrict_ratio

log = logging.getLogger(__name__)

GENERATOR, RAW = "generator", "raw"
NO_TRUTH = "no ceiling: logs without generator truth"


def train_config(cfg: PaperTablesConfig, spec: ModelSpec, data_dir: str, model_dir: str, seed: int):
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


class SeedRun:
    """Everything of one seed under `work/seed{N}/` (any URI), built on demand and cached for
    the run. `data` maps a training-set key to its committed examples version directory."""

    def __init__(self, cfg: PaperTablesConfig, models: dict[str, ModelSpec], seed: int, work: str,
                 shared: dict | None = None):
        self.cfg, self.models, self.seed = cfg, models, seed
        self.work = storage.join(work, f"seed{seed}")
        self.shared = shared  # `shared_examples` of --raw logs: the base examples every seed uses
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
        if "raw" not in self.data and self.cfg.raw:
            self.data["raw"] = self.cfg.raw
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
        if key == "base" and self.shared is not None:
            self.facts["examples"] = self.shared["written"]
            out = self.shared["examples"]
        elif key == "base":
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
                                  self.path("data", f"mined_{window}_{ratio_tag(ratio)}"), ratio, self.seed)
        else:
            raise ValueError(f"unknown data variant {key!r}")
        self.data[key] = out
        return out

    def _mine(self, window: str) -> str:
        from beam_pipelines.mine_negatives import run
        from index import build_index

        unified = self.model("unified")
        e = self.embed("unified")
        if "unified-exact" not in self.indexes:
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
        cfg = mining.MineConfig(examples=self.dataset("base"), model=storage.join(unified, "query_tower"),
                                index=index, output=out,
                                mining=mining.MiningConfig(start, end, self.cfg.hard_per_query, "0:1",
                                                           self.seed))
        summary = self._timed(f"mine negatives {window}", run, cfg, self.cfg.beam_args)
        self.facts[f"mined {window}"] = summary["counts"]
        return summary.get("output") or artifacts.resolve(out, "examples")

    def model(self, key: str) -> str:
        if key in self.trained:
            return self.trained[key]
        from trainer.task import train

        spec = self.models[key]
        data_dir = self.dataset(spec.data)
        model_dir = self.path("models", ratio_tag(key))
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

    def not_measured(self, row: Row) -> str | None:
        """Why `row` cannot be measured on these logs (None: it can). Builds the base examples,
        and the hard-positive variant when the row needs it, to find out."""
        if row.kind == "ensemble":
            reasons = [self._model_not_measured(k) for k in row.param("models")]
        else:
            reasons = [self._model_not_measured(row.model if row.kind == "model" else row.param("model"))]
        return next((r for r in reasons if r), None)

    def _model_not_measured(self, key: str) -> str | None:
        data = self.models[key].data
        if data in ("impression_negatives", "impression_positives"):
            self.dataset("base")
            if not self.facts.get("examples", {}).get("impressions/train", 0):
                return ("the logs show no non-clicked impressions in the training split "
                        "(sessions' `impressions` empty or all clicked)")
        if data == "hard_positives":
            self.dataset(data)
            if not self.facts.get("hard_positives", {}).get("hard_positives", 0):
                return (f"no failed search is followed within {self.cfg.hard_positive_window}s by a "
                        "clicked reformulation of the same searcher in the training split")
        return None

    def ceiling(self) -> dict | None:
        """The ceiling pseudo-row's metrics when the logs carry the generator's truth, else None
        (the facts say why)."""
        truth = truth_file(self.raw())
        if truth is None:
            self.facts["ceiling"] = NO_TRUTH
            return None
        metrics, note = self._timed("ceiling", ceiling_metrics, self.raw(), self.dataset("base"), self.cfg.ks)
        self.facts["ceiling"] = f"Bayes-optimal ranking from {truth}" + (f"; {note}" if note else "")
        return metrics

    def run(self, rows: list[Row]) -> dict[str, dict]:
        results: dict[str, dict] = {}
        skipped = {r.name: why for r in rows for why in [self.not_measured(r)] if why}
        self.facts["not_measured"] = skipped
        for name, why in skipped.items():
            log.warning("[seed %d] %s not measured: %s", self.seed, name, why)
        rows = [r for r in rows if r.name not in skipped]
        ceiling = self.ceiling()
        if ceiling:
            results[CEILING] = ceiling
        for key in models_needed(rows, self.models, self.cfg):
            self.embed(key)
        if self.embedded:
            self.facts["held_out_types"] = held_out_types(next(iter(self.embedded.values())))
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


def held_out_types(e: Embedded) -> dict[str, int]:
    """Held-out clicks by their document's type (a missing type counts as "")."""
    import collections

    types = collections.Counter(str(e.doc_types[p]) for p in e.positives if p >= 0)
    return dict(sorted(types.items()))


def truth_file(raw: str) -> str | None:
    """The generator's truth file beside the logs `raw` (any URI; `RAW/truth/ceiling.jsonl[.gz]`,
    `ebr.datasets.social_ceiling.ceiling_path`), or None."""
    from ebr.datasets.social_ceiling import ceiling_path

    try:
        return ceiling_path(raw)
    except FileNotFoundError:
        return None


def eval_session_ids(data_dir: str) -> list[str]:
    """The session of every held-out example of an examples artifact (EX or EX/VERSION), one
    entry per example (a session with several clicks counts once per click, as recall does)."""
    import tensorflow as tf

    vdir = artifacts.resolve(data_dir, "examples")
    spec = {features.SESSION_ID: tf.io.FixedLenFeature([], tf.string)}
    out = []
    for path in storage.glob(storage.join(vdir, "eval", "examples-*.tfrecord.gz")):
        for batch in tf.data.TFRecordDataset(path, compression_type="GZIP").batch(4096):
            out += [s.decode() for s in tf.io.parse_example(batch, spec)[features.SESSION_ID].numpy()]
    return out


def ceiling_metrics(raw: str, data_dir: str, ks) -> tuple[dict, str]:
    """The Bayes-optimal ranking's recall@K on the held-out split: the mean over held-out examples
    of their session's mass@K (`ebr.datasets.social_ceiling.read_ceiling`, the probability that
    the clicked document is in the top K of the ranking by click probability). -> ({"recall@K":
    ...} for every K of `ks` the truth file has, a note naming the Ks it lacks or "")."""
    from ebr.datasets.social_ceiling import read_ceiling

    mass = read_ceiling(raw)
    sessions = eval_session_ids(data_dir)
    if not sessions:
        raise ValueError(f"{data_dir}: no held-out examples to compute the ceiling over")
    missing = sorted({s for s in sessions if s not in mass})
    if missing:
        raise ValueError(f"{truth_file(raw)}: no ceiling for {len(missing)} held-out session(s) of "
                         f"{data_dir}, e.g. {missing[:5]}; was the truth written with these logs?")
    have = [k for k in ks if all(k in mass[s] for s in sessions)]
    metrics = {f"recall@{k}": float(np.mean([mass[s][k] for s in sessions])) for k in have}
    lacking = [k for k in ks if k not in have]
    return metrics, (f"the truth file has no mass@K for K={lacking}" if lacking else "")


def source_summary(cfg: PaperTablesConfig, facts: list[dict]) -> dict:
    """Where the run's logs came from and what they could not measure, from the seeds' facts:
    {"kind": generator|raw, "logs", "split", "ceiling", "not_measured": {row: reason},
    "notes": [...]}."""
    if cfg.raw:
        kind, logs = RAW, cfg.raw
        split = ("one examples run over these logs (WORK/shared/examples): every seed has the same "
                 "held-out split; the seed varies initialisation, shuffling, sampling and mining")
    else:
        kind = GENERATOR
        logs = (f"ebr data social --documents {cfg.documents} --sessions {cfg.sessions} --seed S "
                "(each seed its own logs, WORK/seed{S}/raw)")
        split = "each seed's own examples run over its own logs"
    not_measured: dict[str, str] = {}
    for f in facts:
        not_measured.update(f.get("not_measured", {}))
    ceilings = list(dict.fromkeys(f["ceiling"] for f in facts if f.get("ceiling")))
    if len(ceilings) > 1:  # generated logs: one truth file per seed
        ceilings = [f"{ceilings[0]} (and each other seed's own)"]
    notes = []
    types = set().union(*(f.get("held_out_types", {}) for f in facts)) if facts else set()
    other = sorted(types - set(DOC_TYPES))
    if other:
        notes.append(f"recall by document type covers the generator's types {list(DOC_TYPES)} "
                     f"only; held-out clicks on other types ({other}) count in every overall "
                     "recall but in no per-type row")
    return {"kind": kind, "logs": logs, "split": split,
            "ceiling": ceilings[0] if ceilings else NO_TRUTH,
            "ceiling_row": CEILING, "not_measured": not_measured, "notes": notes}


def shared_examples(cfg: PaperTablesConfig, work: str) -> dict:
    """--raw logs: the one examples run every seed shares (WORK/shared/examples), made before the
    seeds start -> {"examples": version dir, "written": counts per output}. Fails, naming the
    logs and the dead-letter reasons, when they yield no training or no held-out example."""
    from beam_pipelines import rawlog
    from beam_pipelines.examples import ExamplesConfig, run

    rawlog.resolve_inputs(cfg.raw)  # a missing or unreadable file is an error naming it
    base = storage.join(work, "shared", "examples")
    stats = run(ExamplesConfig(input=cfg.raw, output=base), cfg.beam_args)
    written = stats.get("written", {})
    if not written.get("train") or not written.get("eval"):
        raise ValueError(f"--raw {cfg.raw}: the examples pipeline wrote {written.get('train', 0)} "
                         f"training and {written.get('eval', 0)} held-out examples; dead letters "
                         f"by reason: {stats.get('totals', {}).get('dead_by_reason')} "
                         "(docs/data-format.md)")
    return {"examples": artifacts.resolve(base, "examples"), "written": written}


def run_seed(cfg: PaperTablesConfig, models: dict[str, ModelSpec], rows: list[Row], seed: int,
             work: str, log_level: int | None = None, shared: dict | None = None) -> tuple[dict, dict]:
    """One seed end to end: (row -> metrics, facts). A worker process's entry point."""
    if log_level is not None:  # a spawned worker starts without the parent's logging set-up
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = SeedRun(cfg, models, seed, work, shared)
    results = run.run(rows)
    facts = {"seed": seed, **run.facts, "timings": run.timings}
    facts["source"] = source_summary(cfg, [facts])
    return results, facts


def run_seeds(cfg: PaperTablesConfig, models: dict[str, ModelSpec], rows: list[Row], seeds: list[int],
              work: str, jobs: int) -> list[tuple[dict, dict]]:
    """Every seed, `jobs` at a time in spawned processes (TensorFlow does not survive a fork);
    jobs=1 runs them here. Seeds share nothing but the code and, with --raw logs, the one
    examples run made here first (`shared_examples`), so the results do not depend on `jobs`."""
    shared = shared_examples(cfg, work) if cfg.raw else None
    if jobs <= 1 or len(seeds) == 1:
        return [run_seed(cfg, models, rows, s, work, shared=shared) for s in seeds]
    import concurrent.futures
    import multiprocessing

    level = logging.getLogger().getEffectiveLevel()
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_seed, cfg, models, rows, s, work, level, shared) for s in seeds]
        return [f.result() for f in futures]


def default_jobs(n_seeds: int) -> int:
    # One process keeps about 1.2 cores busy (see QUICK), so one more process than cores.
    return max(1, min(n_seeds, (os.cpu_count() or 1) + 1))
