"""One seed end to end, and every seed side by side.

Place in the data flow, per seed under WORK/seed{N}/ (any URI): `ebr data social` (raw logs) ->
`ebr pipeline examples` (the base examples artifact) -> training-set variants
(`experiments/ablations.py`, offline mining by `beam_pipelines.mine_negatives` over an exact
index of the unified model, `variants.restrict_ratio`) -> `trainer.task.train` (a tower pair per
model of the plan) -> `metrics` on the held-out split -> row -> metrics for the aggregation
(`claims.aggregate`). Every artifact is the stage's own (docs/contracts.md).
"""
from __future__ import annotations

import logging
import os
import time

from ebr import artifacts, features, storage
from beam_pipelines import mining
from experiments.paper_tables.config import PaperTablesConfig
from experiments.paper_tables.metrics import (Embedded, ann_metrics, embed_split, ensemble_metrics,
                                              model_metrics)
from experiments.paper_tables.rows import ModelSpec, Row, models_needed, ratio_tag
from experiments.paper_tables.variants import restrict_ratio

log = logging.getLogger(__name__)


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

    def __init__(self, cfg: PaperTablesConfig, models: dict[str, ModelSpec], seed: int, work: str):
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


def run_seed(cfg: PaperTablesConfig, models: dict[str, ModelSpec], rows: list[Row], seed: int,
             work: str, log_level: int | None = None) -> tuple[dict, dict]:
    """One seed end to end: (row -> metrics, facts). A worker process's entry point."""
    if log_level is not None:  # a spawned worker starts without the parent's logging set-up
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = SeedRun(cfg, models, seed, work)
    results = run.run(rows)
    return results, {"seed": seed, **run.facts, "timings": run.timings}


def run_seeds(cfg: PaperTablesConfig, models: dict[str, ModelSpec], rows: list[Row], seeds: list[int],
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
