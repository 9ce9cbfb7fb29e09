"""`ebr mine-negatives`: offline hard negatives for the next model (paper section 6.1.1).

Place in the data flow: training examples of `ebr pipeline examples` (docs/contracts.md 2) +
the current model's `query_tower` (3) + an index of its document embeddings (5) -> a training
set of the same layout whose selected examples carry `negative_doc_ids`. Iterable: mine with
model N, train model N+1 on the output, mine again with N+1.

Steps (a Beam pipeline through `beam_pipelines.options.make_pipeline`: local FnApiRunner by
default, Dataflow/Flink/Spark by options):
1. read and parse `train/examples-*` (unparsable records are dead-lettered with file and reason);
2. group by searcher: every document the searcher clicked in training, plus the example's own
   history, is excluded from its negatives ("drop the query's positives and known clicks");
3. select examples by the easy:hard ratio (`experiments.mining`: the share of examples that
   carry hard negatives, by a seeded hash of session id and doc id); the others pass through;
4. embed selected examples' query features with the query tower, search the index for the top
   `window_end`, sample `per_query` documents from ranks `window_start..window_end`;
5. write `train/examples-*` (all examples, the selected ones with `negative_doc_ids` appended to
   any already there), copy the other parts of the examples directory, and `mining.json` with
   the configuration and counts. Output is written to a temp directory and renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import apache_beam as beam

from beam_pipelines.options import make_pipeline
from beam_pipelines.outputs import check_replaceable, publish, remove, temp_dir_for, write_json
from ebr import features
from experiments import mining

log = logging.getLogger(__name__)

TRAIN_GLOB = "train/examples-*.tfrecord.gz"
# Parts of the examples directory carried over unchanged so the output is a complete data dir.
CARRIED = ("eval", "impressions", "corpus", "split.json", "schema.json", "stats.json")
CARRIED_GLOBS = ("doc_frequencies-*",)
# An output holding one of these may be replaced by a rerun (outputs.check_replaceable).
MARKERS = ("mining.json", "ablation.json")


@dataclasses.dataclass
class MineConfig:
    examples: str = ""  # OUT of `ebr pipeline examples`
    model: str = ""  # MODEL_DIR/query_tower or MODEL_DIR/query_tower/VERSION
    index: str = ""  # INDEX_BASE or INDEX_BASE/VERSION
    output: str = ""
    mining: mining.MiningConfig = dataclasses.field(default_factory=mining.MiningConfig)
    batch_size: int = 256
    search_params: dict | None = None  # backend search params, e.g. {"nprobe": 64}
    allow_model_mismatch: bool = False  # mine model N+1's queries against model N's index
    num_shards: int = 0  # 0 = let the runner decide


def _split_model_path(path: str) -> tuple[Path, int | None]:
    p = Path(path)
    if p.name.isdigit():
        return p.parent, int(p.name)
    return p, None


def check_compatible(model_path: str, index_path: str, allow_mismatch: bool = False) -> dict:
    """Loads nothing heavy: the model's metadata against the index manifest. Returns a summary."""
    from index import open_index
    from serving.embedder import model_versions, read_metadata

    base, version = _split_model_path(model_path)
    if not base.is_dir():
        raise FileNotFoundError(f"query tower directory {base} does not exist")
    if version is None:
        versions = model_versions(base)
        if not versions:
            raise FileNotFoundError(f"no complete model version under {base}")
        version = versions[-1]
    meta = read_metadata(base / str(version))
    manifest = open_index(index_path).manifest
    problems = []
    if int(manifest["dimension"]) != int(meta["dimension"]):
        problems.append(f"dimension {meta['dimension']} (model) != {manifest['dimension']} (index)")
    if manifest.get("schema_hash") and manifest["schema_hash"] != meta["schema_hash"]:
        problems.append(f"schema_hash {meta['schema_hash']} (model) != {manifest['schema_hash']} (index)")
    if problems:
        raise ValueError(f"query tower {base}/{version} does not match index {index_path}: "
                         + "; ".join(problems))
    index_version = manifest.get("model_version")
    if index_version not in (None, "", version) and str(index_version) != str(version):
        msg = (f"index {index_path} was built from model version {index_version}, query tower "
               f"is version {version}")
        if not allow_mismatch:
            raise ValueError(msg + " (pass --allow-model-mismatch to mine across versions)")
        log.warning(msg)
    return {"model": str(base), "model_version": version, "index": str(index_path),
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
    """Query-side values of a parsed example, as `serving.embedder.build_inputs` takes them."""
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

    def __init__(self, cfg: MineConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = None
        self.searcher = None

    def setup(self):
        from index import open_index
        from serving.embedder import LocalModelSource

        base, version = _split_model_path(self.cfg.model)
        self.encoder = LocalModelSource(base).open(version)
        self.searcher = open_index(self.cfg.index)

    def process(self, batch):
        from serving.embedder import build_inputs

        batch = list(batch)
        embeddings = self.encoder.embed(build_inputs([query_row(ex) for ex, _ in batch]))
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


def copy_path(src: str, dst: str) -> None:
    """Copies a file or directory tree through Beam's file systems (local or gs:// ...)."""
    from apache_beam.io.filesystems import FileSystems

    from beam_pipelines.outputs import _is_local, list_files

    if _is_local(src) and _is_local(dst):
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        elif os.path.exists(src):
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            shutil.copy2(src, dst)
        return
    files = list_files(src)  # everything below src when it is a "directory"
    if files:
        FileSystems.copy(files, [dst.rstrip("/") + f[len(src.rstrip("/")):] for f in files])
    elif FileSystems.exists(src):
        FileSystems.copy([src], [dst])


def carry_parts(examples: str, dest: str, skip: tuple[str, ...] = ()) -> None:
    """Copies the examples directory's parts other than `train/` (eval, corpus, ...) to `dest`."""
    from apache_beam.io.filesystems import FileSystems

    for name in CARRIED:
        if name not in skip:
            copy_path(os.path.join(examples, name), os.path.join(dest, name))
    for pattern in CARRIED_GLOBS:
        for m in FileSystems.match([os.path.join(examples, pattern)])[0].metadata_list:
            copy_path(m.path, os.path.join(dest, os.path.basename(m.path)))


def run(cfg: MineConfig, beam_args: list[str] | None = None) -> dict:
    """Runs the pipeline; returns the `mining.json` summary."""
    from apache_beam.io.filesystems import FileSystems

    for field in ("examples", "model", "index", "output"):
        if not getattr(cfg, field):
            raise ValueError(f"mine-negatives: --{field} is required")
    if cfg.batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    train_glob = os.path.join(cfg.examples, TRAIN_GLOB)
    matches = FileSystems.match([train_glob])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"no training examples match {train_glob}")
    summary = check_compatible(cfg.model, cfg.index, cfg.allow_model_mismatch)
    fraction = mining.hard_fraction(cfg.mining.ratio)

    check_replaceable(cfg.output, MARKERS)
    tmp = temp_dir_for(cfg.output)
    started = time.time()
    try:
        mcfg = cfg.mining
        p = make_pipeline(beam_args)
        records = p | "ReadTrain" >> beam.io.ReadFromTFRecord(train_glob)
        parsed, dead = (records | "Parse" >> beam.Map(_parse, train_glob)
                        .with_exception_handling(use_subprocess=False))
        _ = (dead | "DeadJson" >> beam.Map(_dead_letter, train_glob)
             | "WriteDead" >> beam.io.WriteToText(os.path.join(tmp, "dead_letter", "dead"),
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
                 | "Mine" >> beam.ParDo(MineDoFn(cfg)))
        kept = passed | "Unchanged" >> beam.Map(_unchanged)
        _ = ((mined, kept) | beam.Flatten()
             | "WriteTrain" >> beam.io.WriteToTFRecord(
                 os.path.join(tmp, "train", "examples"), file_name_suffix=".tfrecord.gz",
                 num_shards=cfg.num_shards,
                 compression_type=beam.io.filesystem.CompressionTypes.GZIP))
        state = p.run()
        state.wait_until_finish()
        result = _counters(state)
        carry_parts(cfg.examples, tmp)
        summary.update({
            "examples": cfg.examples, "config": dataclasses.asdict(cfg.mining),
            "hard_fraction": fraction,
            "ratio_definition": "easy:hard = share of training examples carrying mined "
                                "negatives: H/(E+H); all examples keep easy negatives",
            "counts": result, "seconds": round(time.time() - started, 2)})
        write_json(os.path.join(tmp, "mining.json"), summary)
        publish(tmp, cfg.output, last="mining.json")
    except BaseException:
        remove(tmp)
        raise
    log.info("mined hard negatives: %s", summary["counts"])
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
