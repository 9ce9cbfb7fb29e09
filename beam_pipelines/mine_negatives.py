"""`ebr mine-negatives`: offline hard negatives for the next model (paper section 6.1.1).

Place in the data flow: the examples artifact of `ebr pipeline examples` (docs/contracts.md 2) +
the current model's `query_tower` (3) + an index of its document embeddings (5) -> an
examples artifact of the same layout whose selected training examples carry
`negative_doc_ids`. Iterable: mine with model N, train model N+1 on the output, mine again
with N+1.

The pipeline is `ReadTrain | MineHardNegatives | WriteMinedTrain` (`build`; a Beam pipeline
through `beam_pipelines.options.make_pipeline`: local FnApiRunner by default,
Dataflow/Flink/Spark by options). Steps:
1. read `train/examples-*` with each record's file name; `MineHardNegatives` parses them (a
   record that is not a tf.train.Example is a dead letter naming its file and the reason);
2. groups by searcher: every document the searcher clicked in training, plus the example's own
   history, is excluded from its negatives ("drop the query's positives and known clicks");
3. selects examples by the easy:hard ratio (`beam_pipelines.mining`: the share of examples that
   carry hard negatives, by a seeded hash of session id and doc id); the others pass through;
4. embeds selected examples' query features with the query tower, searches the index for the top
   `window_end`, samples `per_query` documents from ranks `window_start..window_end`;
5. `WriteMinedTrain` writes `train/examples-*` (all examples, the selected ones with
   `negative_doc_ids` appended to any already there) straight into a new version `OUT/VERSION`
   (Beam's sinks); the driver copies the other parts of the examples version into it
   (`ebr.storage`), writes `mining.json` with the configuration and counts and `config.json`
   (`ebr.config.save`), then commits (`beam_pipelines.outputs`: marker last, the newest 2
   versions kept). Every path (examples, model, index, output) takes any URI; inputs are
   resolved to committed versions with `ebr.artifacts`.

Counting, as in `ebr pipeline examples`: every file's records_in is counted at read time,
records_out from the records handed to the writer and records_dead from the dead letters,
independently, so `records_in == records_out + records_dead` (per file, in `mining.json`) is a
real check: the run fails without committing when it does not hold. The mined-negative counts
are taken from the records as written: `hard_negatives` is the number of mined documents that
made it into `negative_doc_ids` (capped at its `max_values`, earlier negatives first), and
`hard_negatives_cut` the sampled ones that did not (the list was full, or held them already).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.runner import PipelineState

from beam_pipelines import mining, outputs
from beam_pipelines.embed import EMBEDDING, SIGNATURE
from beam_pipelines.mining import MineConfig
from beam_pipelines.options import make_pipeline
from ebr import artifacts, config, features, storage

log = logging.getLogger(__name__)

TRAIN_GLOB = "train/examples-*.tfrecord.gz"
# Parts of the examples version carried over unchanged so the output is a complete data dir.
CARRIED = ("eval", "impressions", "corpus", "split.json", "schema.json", "stats.json")
CARRIED_GLOBS = ("doc_frequencies-*",)
SUMMARY = "mining.json"
TRAIN, DEAD, COUNTS = "train", "dead", "counts"
# Dead-letter reason of a record that does not parse as a tf.train.Example.
UNPARSABLE = "unparsable_record"


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


def parse_record(element):
    """(file, serialised record) -> (file, parsed example), or a dead letter naming the file."""
    path, record = element
    try:
        yield path, features.parse_example(record)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends: a dead letter
        yield TaggedOutput(DEAD, {"file": path, "reason": UNPARSABLE,
                                  "detail": f"not a tf.train.Example: {e}",
                                  "record": repr(bytes(record)[:200])})


def _first(values, default=""):
    return values[0] if values else default


def example_key(ex: dict) -> str:
    return f"{_first(ex.get(features.SESSION_ID))}/{_first(ex.get(features.DOC_ID))}"


def query_row(ex: dict) -> dict:
    """Query-side values of a parsed example, as `ebr.features.tower_inputs` takes them."""
    row = {}
    for name in features.QUERY_INPUTS:
        vals = ex.get(name, [])
        row[name] = list(vals) if features.BY_NAME[name].kind == features.MULTI else _first(vals)
    return row


def merge_negatives(existing: list[str], mined: list[str]) -> tuple[list[str], int]:
    """`existing` negatives, then the `mined` ones not among them, cut to the feature's
    `max_values` (earlier, e.g. impression, negatives first) -> (the list, how many mined
    documents it holds)."""
    limit = features.BY_NAME[features.NEGATIVE_DOC_IDS].max_values
    merged = list(dict.fromkeys(list(existing) + list(mined)))[:limit]
    kept_existing = len(dict.fromkeys(existing))
    return merged, max(0, len(merged) - kept_existing)


def with_negatives(ex: dict, negatives: list[str]) -> tuple[bytes, int]:
    """The example re-serialised with `negatives` appended to its `negative_doc_ids` ->
    (record, how many of `negatives` it carries: see `merge_negatives`)."""
    merged, added = merge_negatives(ex.get(features.NEGATIVE_DOC_IDS, []), negatives)
    values = {k: v for k, v in ex.items() if k in features.BY_NAME}
    values[features.NEGATIVE_DOC_IDS] = merged
    return features.make_example(values), added


def _exclusions(kv):
    """(searcher, [(file, example)]) -> (file, example, excluded doc ids) for each example."""
    _, examples = kv
    examples = list(examples)
    clicked = {d for _, ex in examples for d in ex.get(features.DOC_ID, [])}
    for path, ex in examples:
        yield path, ex, clicked | set(ex.get(features.HISTORY_DOC_IDS, []))


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
        self.signature = self._loaded.signatures[SIGNATURE]
        self.searcher = open_index(self.cfg.index)

    def embed(self, rows: list[dict]) -> np.ndarray:
        tf = self._tf
        inputs = features.tower_inputs(rows, features.QUERY_INPUTS)
        out = self.signature(**{n: tf.constant(v, dtype=tf.string) for n, v in inputs.items()})
        return np.asarray(out[EMBEDDING].numpy(), dtype=np.float32)

    def process(self, batch):
        """[(file, example, excluded ids)] -> (file, record, counts) per example, `counts`
        as `_written_counts` reads them."""
        batch = list(batch)
        embeddings = self.embed([query_row(ex) for _, ex, _ in batch])
        k = min(self.cfg.mining.fetch_k, int(self.searcher.manifest["count"]))
        result = self.searcher.search(embeddings, k, params=self.cfg.search_params)
        keys = [example_key(ex) for _, ex, _ in batch]
        # The ratio selected these examples already: sample with the hard-only ratio here.
        cfg = dataclasses.replace(self.cfg.mining, ratio="0:1")
        negatives = mining.mine_batch(result.doc_ids, [exc for _, _, exc in batch], keys, cfg)
        for (path, ex, _), negs in zip(batch, negatives):
            record, added = with_negatives(ex, negs)
            yield path, record, {"examples_mined": 1, "hard_negatives": added,
                                 "hard_negatives_cut": len(negs) - added,
                                 "window_empty": int(not negs)}


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


def _by_searcher(parsed):
    path, ex = parsed
    return _first(ex.get(features.SEARCHER_ID)), (path, ex)


class MineHardNegatives(beam.PTransform):
    """`(file, serialised training example)` -> {TRAIN: every example re-serialised, the ones
    the ratio selects with mined `negative_doc_ids`; DEAD: dead letters of unparsable records,
    naming their file; COUNTS: (key, n) summed over the run (`assemble_counts` reads them)}:
    steps 1-4 of the module docstring after the read. Touches no file but the query tower and
    the index."""

    def __init__(self, cfg: MineConfig, model_dir: str):
        super().__init__()
        self.cfg = cfg
        self.model_dir = model_dir  # the committed version the driver checked

    def expand(self, records):
        mcfg = self.cfg.mining
        read = records | "CountIn" >> beam.Map(lambda r: (("in", r[0]), 1))
        parsed = records | "Parse" >> beam.FlatMap(parse_record).with_outputs(DEAD, main="examples")
        with_exc = (parsed.examples
                    | "BySearcher" >> beam.Map(_by_searcher)
                    | "Group" >> beam.GroupByKey()
                    | "Exclusions" >> beam.FlatMap(_exclusions))
        selected, passed = (with_exc | "Select" >> beam.Partition(
            lambda item, n: 0 if mining.carries_hard_negatives(
                example_key(item[1]), mcfg.ratio, mcfg.seed) else 1, 2))
        mined = (selected
                 | "Batch" >> beam.BatchElements(min_batch_size=1,
                                                 max_batch_size=self.cfg.batch_size)
                 | "Mine" >> beam.ParDo(MineDoFn(self.cfg, self.model_dir)))
        kept = passed | "Unchanged" >> beam.Map(_unchanged)
        written = (mined, kept) | "AllTrain" >> beam.Flatten()
        dead = parsed[DEAD]
        counts = ((read,
                   written | "CountWritten" >> beam.FlatMap(_written_counts),
                   dead | "CountDead" >> beam.Map(lambda d: (("dead", d["file"], d["reason"]), 1)))
                  | "AllCounts" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum))
        return {TRAIN: written | "Records" >> beam.Map(lambda w: w[1]), DEAD: dead,
                COUNTS: counts}


class WriteMinedTrain(beam.PTransform):
    """The edge out: `MineHardNegatives`' outputs -> `train/examples-*.tfrecord.gz`,
    `dead_letter/dead-*.jsonl` and the run's counts (`outputs.COUNTS_DIR`, read and removed by
    the driver) in the version directory `out_dir`."""

    def __init__(self, out_dir: str, num_shards: int):
        super().__init__()
        self.out_dir = out_dir
        self.num_shards = num_shards

    def expand(self, outs):
        _ = (outs[DEAD] | "DeadJson" >> beam.Map(json.dumps)
             | "WriteDead" >> beam.io.WriteToText(
                 storage.join(self.out_dir, "dead_letter", "dead"), file_name_suffix=".jsonl"))
        _ = outs[TRAIN] | "WriteTrain" >> beam.io.WriteToTFRecord(
            storage.join(self.out_dir, "train", "examples"), file_name_suffix=".tfrecord.gz",
            num_shards=self.num_shards, compression_type=beam.io.filesystem.CompressionTypes.GZIP)
        _ = (outs[COUNTS] | "CountJson" >> beam.Map(lambda kv: json.dumps([list(kv[0]), kv[1]]))
             | "WriteCounts" >> beam.io.WriteToText(
                 storage.join(self.out_dir, outputs.COUNTS_DIR, "counts"), file_name_suffix=".jsonl"))
        return pvalue.PDone(outs[TRAIN].pipeline)


def build(p, cfg: MineConfig, train_glob: str, model_dir: str, out_dir: str) -> None:
    """Adds the whole pipeline to `p`: read the training examples, mine, write below `out_dir`
    (the version directory)."""
    _ = (p | "TrainGlob" >> beam.Create([train_glob])
         | "ReadTrain" >> beam.io.ReadAllFromTFRecord(with_filename=True)
         | "MineHardNegatives" >> MineHardNegatives(cfg, model_dir)
         | "WriteMinedTrain" >> WriteMinedTrain(out_dir, cfg.num_shards))


def run(cfg: MineConfig, beam_args: list[str] | None = None) -> dict:
    """Runs the pipeline and commits a new version of OUT; returns the `mining.json` summary."""
    for field in ("examples", "model", "index", "output"):
        if not getattr(cfg, field):
            raise ValueError(f"mine-negatives: --{field} is required")
    examples, train_glob = resolve_examples(cfg.examples)
    summary = check_compatible(cfg.model, cfg.index, cfg.allow_model_mismatch)
    fraction = mining.hard_fraction(cfg.mining.ratio)

    started = time.time()
    with outputs.NewVersion(cfg.output, "examples") as out:
        p = make_pipeline(beam_args)
        build(p, cfg, train_glob, summary["model"], out.dir)
        state = p.run().wait_until_finish()
        if state != PipelineState.DONE:
            raise RuntimeError(f"mine-negatives pipeline ended in state {state}")
        result, files = assemble_counts(out.take_counts())
        unbalanced = {f: c for f, c in files.items()
                      if c["records_in"] != c["records_out"] + c["records_dead"]}
        if unbalanced:
            raise RuntimeError(f"records lost: records_in != records_out + records_dead for "
                               f"{json.dumps(unbalanced)}")
        carry_parts(examples, out.dir)
        summary.update({
            "examples": examples, "config": dataclasses.asdict(cfg.mining),
            "hard_fraction": fraction,
            "ratio_definition": "easy:hard = share of training examples carrying mined "
                                "negatives: H/(E+H); all examples keep easy negatives",
            "counts": result, "files": files, "seconds": round(time.time() - started, 2)})
        config.save(cfg, out.dir)
        out.commit({SUMMARY: summary},
                   info={"schema_hash": features.schema_hash(), "mined_from": examples})
    summary["output"] = out.dir
    log.info("mined hard negatives: %s -> %s", summary["counts"], out.dir)
    return summary


def _written_counts(written):
    """(file, record, counts) as handed to the writer -> ((key...), n) for `assemble_counts`."""
    path, _, counts = written
    yield ("out", path), 1
    for name, n in counts.items():
        if n:
            yield (name,), n


def assemble_counts(counts: list) -> tuple[dict, dict]:
    """The run's (key, n) lines -> (totals, per input file {records_in, records_out,
    records_dead, dead_by_reason}). Totals: examples_read / examples_written / dead_letter
    (the three accounts), examples_mined (selected by the ratio and searched), hard_negatives
    and hard_negatives_cut (mined documents written / sampled but not written), window_empty
    (selected examples whose window held no candidate)."""
    def account() -> dict:
        return {"records_in": 0, "records_out": 0, "records_dead": 0, "dead_by_reason": {}}

    per_file: dict[str, dict] = {}
    totals = collections.Counter({k: 0 for k in (
        "examples_read", "examples_written", "examples_mined", "hard_negatives",
        "hard_negatives_cut", "window_empty", "dead_letter")})
    for key, n in counts:
        kind = key[0]
        if kind in ("in", "out", "dead"):
            entry = per_file.setdefault(key[1], account())
            if kind == "in":
                entry["records_in"] += n
                totals["examples_read"] += n
            elif kind == "out":
                entry["records_out"] += n
                totals["examples_written"] += n
            else:
                entry["records_dead"] += n
                entry["dead_by_reason"][key[2]] = entry["dead_by_reason"].get(key[2], 0) + n
                totals["dead_letter"] += n
        else:
            totals[kind] += n
    return dict(totals), per_file


def _unchanged(item):
    path, ex, _ = item
    return path, features.make_example({k: v for k, v in ex.items() if k in features.BY_NAME}), {}
