"""`ebr mine-negatives`: offline hard negatives for the next model (paper section 6.1.1).

Place in the data flow: the examples artifact of `ebr pipeline examples` (docs/contracts.md 2) +
the current model's `query_tower` (3) + an index of its document embeddings (5) -> an
examples artifact of the same layout whose selected training examples carry
`negative_doc_ids`. Iterable: mine with
model N, train model N+1 on the output, mine again with N+1.

Steps (a Beam pipeline through `beam_pipelines.options.make_pipeline`: local FnApiRunner by
default, Dataflow/Flink/Spark by options):
1. read and parse `train/examples-*` (unparsable records are dead-lettered with file and reason);
2. group by searcher: every document the searcher clicked in training, plus the example's own
   history, is excluded from its negatives ("drop the query's positives and known clicks");
3. select examples by the easy:hard ratio (`beam_pipelines.mining`: the share of examples that
   carry hard negatives, by a seeded hash of session id and doc id); the others pass through;
4. embed selected examples' query features with the query tower, search the index for the top
   `window_end`, sample `per_query` documents from ranks `window_start..window_end`;
5. write `train/examples-*` (all examples, the selected ones with `negative_doc_ids` appended to
   any already there) straight into a new version `OUT/VERSION` (Beam's sinks), copy the other
   parts of the examples version into it (`ebr.storage`), write `mining.json` with the
   configuration and counts, then commit (`beam_pipelines.outputs`: marker last, the newest 2
   versions kept). Every path (examples, model, index, output) takes any URI; inputs are
   resolved to committed versions with `ebr.artifacts`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

import apache_beam as beam
import numpy as np

from beam_pipelines import outputs
from beam_pipelines.options import make_pipeline
from ebr import artifacts, features, storage
from beam_pipelines import mining

log = logging.getLogger(__name__)

TRAIN_GLOB = "train/examples-*.tfrecord.gz"
# Parts of the examples version carried over unchanged so the output is a complete data dir.
CARRIED = ("eval", "impressions", "corpus", "split.json", "schema.json", "stats.json")
CARRIED_GLOBS = ("doc_frequencies-*",)
SUMMARY = "mining.json"


@dataclasses.dataclass
class MineConfig:
    examples: str = ""  # examples artifact EX or EX/VERSION (any URI)
    model: str = ""  # MODEL_DIR/query_tower or MODEL_DIR/query_tower/VERSION (any URI)
    index: str = ""  # INDEX_BASE or INDEX_BASE/VERSION
    output: str = ""  # examples artifact base: each run commits a new version
    mining: mining.MiningConfig = dataclasses.field(default_factory=mining.MiningConfig)
    batch_size: int = 256
    search_params: dict | None = None  # backend search params, e.g. {"nprobe": 64}
    allow_model_mismatch: bool = False  # mine model N+1's queries against model N's index
    num_shards: int = 0  # 0 = let the runner decide


def resolve_model(path: str) -> tuple[str, dict]:
    """MODEL_DIR/query_tower[/VERSION] -> (committed version dir, its checked metadata)."""
    vdir = artifacts.resolve(path, "query tower")
    return vdir, artifacts.read_model_metadata(vdir, features.schema_hash())


def resolve_examples(path: str) -> tuple[str, str]:
    """EX or EX/VERSION -> (committed version dir, glob of its training examples)."""
    try:
        vdir = artifacts.resolve(path, "examples")
    except (artifacts.ArtifactError, storage.StorageError) as e:
        raise FileNotFoundError(f"no training examples: {e}") from None
    train_glob = storage.join(vdir, TRAIN_GLOB)
    if not storage.glob(train_glob):
        raise FileNotFoundError(f"no training examples match {train_glob}")
    return vdir, train_glob


def check_compatible(model_path: str, index_path: str, allow_mismatch: bool = False) -> dict:
    """Loads nothing heavy: the model's metadata against the index manifest. Returns a summary."""
    from index import open_index

    vdir, meta = resolve_model(model_path)
    version = int(meta["version"])
    manifest = open_index(index_path).manifest
    where = f"query tower {vdir} / index {index_path}"
    artifacts.check_compatible(where, manifest, dimension=int(meta["dimension"]),
                               schema_hash=meta["schema_hash"] if manifest.get("schema_hash")
                               else None)
    if manifest.get("model_version") not in (None, ""):
        try:
            artifacts.check_compatible(where, manifest, model_version=version)
        except artifacts.ModelMismatch as e:
            if not allow_mismatch:
                raise artifacts.ModelMismatch(
                    f"{e} (pass --allow-model-mismatch to mine across versions)") from None
            log.warning("%s", e)
    return {"model": vdir, "model_version": version, "index": str(index_path),
            "index_manifest": {k: manifest[k] for k in ("backend", "params", "dimension", "count",
                                                         "model_version") if k in manifest}}


def _parse(record, path_hint: str):
    beam.metrics.Metrics.counter("mine", "examples_read").inc()
    try:
        return features.parse_example(record)
    except Exception as e:  # noqa: BLE001 - any decode failure is a dead letter, not a crash
        raise ValueError(f"{path_hint}: unparsable tf.train.Example: {e}") from None


def _first(values, default=""):
    return values[0] if values else default


def example_key(ex: dict) -> str:
    return f"{_first(ex.get('session_id'))}/{_first(ex.get('doc_id'))}"


def query_row(ex: dict) -> dict:
    """Query-side values of a parsed example, as `ebr.features.tower_inputs` takes them."""
    row = {}
    for name in features.QUERY_INPUTS:
        vals = ex.get(name, [])
        row[name] = list(vals) if features.BY_NAME[name].kind == features.MULTI else _first(vals)
    return row


def with_negatives(ex: dict, negatives: list[str]) -> bytes:
    """The example re-serialised with `negatives` appended to its `negative_doc_ids`."""
    merged = list(dict.fromkeys(list(ex.get("negative_doc_ids", [])) + list(negatives)))
    limit = features.BY_NAME["negative_doc_ids"].max_values
    values = {k: v for k, v in ex.items() if k in features.BY_NAME}
    values["negative_doc_ids"] = merged[:limit]  # earlier (e.g. impression) negatives first
    return features.make_example(values)


def _exclusions(kv):
    """(searcher, [example dicts]) -> (example, excluded doc ids) for each example."""
    _, examples = kv
    examples = list(examples)
    clicked = {d for ex in examples for d in ex.get("doc_id", [])}
    for ex in examples:
        yield ex, clicked | set(ex.get("history_doc_ids", []))


class MineDoFn(beam.DoFn):
    """Embeds a batch of (example, exclusion) pairs, searches, samples the window."""

    def __init__(self, cfg: MineConfig, model_dir: str):
        super().__init__()
        self.cfg = cfg
        self.model_dir = model_dir  # the committed version the driver checked
        self.signature = None
        self.searcher = None

    def setup(self):
        import tensorflow as tf

        from index import open_index

        self._tf = tf
        self._loaded = tf.saved_model.load(self.model_dir)  # keeps the variables alive
        self.signature = self._loaded.signatures["serving_default"]
        self.searcher = open_index(self.cfg.index)

    def embed(self, rows: list[dict]) -> np.ndarray:
        tf = self._tf
        inputs = features.tower_inputs(rows, features.QUERY_INPUTS)
        out = self.signature(**{n: tf.constant(v, dtype=tf.string) for n, v in inputs.items()})
        return np.asarray(out["embedding"].numpy(), dtype=np.float32)

    def process(self, batch):
        batch = list(batch)
        embeddings = self.embed([query_row(ex) for ex, _ in batch])
        k = min(self.cfg.mining.fetch_k, int(self.searcher.manifest["count"]))
        result = self.searcher.search(embeddings, k, params=self.cfg.search_params)
        keys = [example_key(ex) for ex, _ in batch]
        # The ratio selected these examples already: sample with the hard-only ratio here.
        cfg = dataclasses.replace(self.cfg.mining, ratio="0:1")
        negatives = mining.mine_batch(result.doc_ids, [exc for _, exc in batch], keys, cfg)
        for (ex, _), negs in zip(batch, negatives):
            beam.metrics.Metrics.counter("mine", "examples_mined").inc()
            beam.metrics.Metrics.counter("mine", "examples_written").inc()
            if negs:
                beam.metrics.Metrics.counter("mine", "hard_negatives").inc(len(negs))
            else:
                beam.metrics.Metrics.counter("mine", "window_empty").inc()
            yield with_negatives(ex, negs)


def carry_parts(examples: str, dest: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Copies the parts of an examples version other than `train/` (eval, corpus, split.json,
    ...) into the version directory `dest` being written (any URIs, through `ebr.storage`).
    `examples` is the artifact EX or EX/VERSION; returns the copied relative paths."""
    src = artifacts.resolve(examples, "examples")
    copied = []
    for name in CARRIED:
        if name in skip:
            continue
        path = storage.join(src, name)
        rels = [storage.join(name, r) for r in storage.walk_files(path)] if storage.isdir(path) \
            else ([name] if storage.exists(path) else [])
        copied += rels
    for pattern in CARRIED_GLOBS:
        copied += [storage.basename(m) for m in storage.glob(storage.join(src, pattern))]
    for rel in copied:
        storage.copy_file(storage.join(src, rel), storage.join(dest, rel))
    return copied


def run(cfg: MineConfig, beam_args: list[str] | None = None) -> dict:
    """Runs the pipeline and commits a new version of OUT; returns the `mining.json` summary."""
    for field in ("examples", "model", "index", "output"):
        if not getattr(cfg, field):
            raise ValueError(f"mine-negatives: --{field} is required")
    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    examples, train_glob = resolve_examples(cfg.examples)
    summary = check_compatible(cfg.model, cfg.index, cfg.allow_model_mismatch)
    fraction = mining.hard_fraction(cfg.mining.ratio)

    started = time.time()
    with outputs.NewVersion(cfg.output, "examples") as out:
        mcfg = cfg.mining
        p = make_pipeline(beam_args)
        records = p | "ReadTrain" >> beam.io.ReadFromTFRecord(train_glob)
        parsed, dead = (records | "Parse" >> beam.Map(_parse, train_glob)
                        .with_exception_handling(use_subprocess=False))
        _ = (dead | "DeadJson" >> beam.Map(_dead_letter, train_glob)
             | "WriteDead" >> beam.io.WriteToText(out.path("dead_letter", "dead"),
                                                  file_name_suffix=".jsonl"))
        with_exc = (parsed
                    | "BySearcher" >> beam.Map(lambda ex: (_first(ex.get("searcher_id")), ex))
                    | "Group" >> beam.GroupByKey()
                    | "Exclusions" >> beam.FlatMap(_exclusions))
        selected, passed = (with_exc | "Select" >> beam.Partition(
            lambda pair, n: 0 if mining.carries_hard_negatives(
                example_key(pair[0]), mcfg.ratio, mcfg.seed) else 1, 2))
        mined = (selected
                 | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=cfg.batch_size)
                 | "Mine" >> beam.ParDo(MineDoFn(cfg, summary["model"])))
        kept = passed | "Unchanged" >> beam.Map(_unchanged)
        _ = ((mined, kept) | beam.Flatten()
             | "WriteTrain" >> beam.io.WriteToTFRecord(
                 out.path("train", "examples"), file_name_suffix=".tfrecord.gz",
                 num_shards=cfg.num_shards,
                 compression_type=beam.io.filesystem.CompressionTypes.GZIP))
        state = p.run()
        state.wait_until_finish()
        result = _counters(state)
        carry_parts(examples, out.dir)
        summary.update({
            "examples": examples, "config": dataclasses.asdict(cfg.mining),
            "hard_fraction": fraction,
            "ratio_definition": "easy:hard = share of training examples carrying mined "
                                "negatives: H/(E+H); all examples keep easy negatives",
            "counts": result, "seconds": round(time.time() - started, 2)})
        out.commit({SUMMARY: summary},
                   info={"schema_hash": features.schema_hash(), "mined_from": examples})
    summary["output"] = out.dir
    log.info("mined hard negatives: %s -> %s", summary["counts"], out.dir)
    return summary


def _counters(state) -> dict:
    from apache_beam.metrics.metric import MetricsFilter

    out = {"examples_read": 0, "examples_written": 0, "examples_mined": 0, "hard_negatives": 0,
           "window_empty": 0, "dead_letter": 0}
    for c in state.metrics().query(MetricsFilter().with_namespace("mine"))["counters"]:
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    return out


def _dead_letter(bad, path_hint: str) -> str:
    beam.metrics.Metrics.counter("mine", "dead_letter").inc()
    record, (_, exc, _tb) = bad[0], bad[1]
    return json.dumps({"file": path_hint, "reason": str(exc), "record": repr(record)[:200]})


def _unchanged(pair) -> bytes:
    beam.metrics.Metrics.counter("mine", "examples_written").inc()
    return features.make_example({k: v for k, v in pair[0].items() if k in features.BY_NAME})
