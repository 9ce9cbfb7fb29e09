"""`ebr embed`: the exported doc tower over the document corpus, in batch.

Place in the data flow: the corpus of the examples artifact `EX[/VERSION]` of `ebr pipeline
examples` (docs/contracts.md section 2) + `MODEL_DIR/doc_tower[/VERSION]` of `ebr train`
(section 3) -> a new committed version `EMB/VERSION/{embeddings-*.tfrecord.gz,
embeddings.json, config.json, dead_letter/, _COMMITTED}` (section 4), which `ebr index build`
reads with `index.embeddings.read_embeddings`. Inputs are resolved with `ebr.artifacts`
(committed versions only).

The pipeline is `ReadCorpus | EmbedDocuments | WriteEmbeddingsVersion` (`build`; local runner
by default, Dataflow/Flink/Spark by options; shards through Beam's file systems, driver-side
files through `ebr.storage`, so gs:// paths work):
 1. `ReadCorpus` reads the corpus TFRecords with their file names;
 2. `EmbedDocuments` parses each record (one that does not parse as an Example, or lacks
    doc_id, is a dead letter naming the file) and runs `RunInference` with
    `DocTowerHandler`: the tower's `serving_default` takes a dict of named string tensors
    (scalar kinds [B], MULTI kinds [B, N] padded with ""), which the stock TF handlers
    (same-shaped tensor batches) cannot feed. A failing batch is retried one document at a
    time so one bad document is dead-lettered alone; a non-finite or wrong-dimension
    embedding is a dead letter too;
 3. `WriteEmbeddingsVersion` writes Examples {doc_id, embedding, filter_terms
    (`features.document_filter_terms`)} in GZIP TFRecord shards and dead letters as JSON lines
    straight into the new version directory; the driver then writes `embeddings.json` and
    `config.json` and commits the version (`beam_pipelines.outputs`: marker last, older
    versions pruned to the newest 2).
"""
from __future__ import annotations

import collections
import json
import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.window import GlobalWindows

from beam_pipelines import outputs, tfrecords
from beam_pipelines.config import EmbedConfig
from beam_pipelines.options import make_pipeline
from ebr import artifacts, config, features, storage

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
CORPUS_GLOB = "documents-*.tfrecord.gz"
DEAD, COUNTS, EMB = "dead", "counts", "embeddings"
RECORD_BATCH = 1024
# Keys of an embedding Example besides features.DOC_ID (docs/contracts.md section 4); the tower
# signature's output is named EMBEDDING too (trainer.export).
EMBEDDING, FILTER_TERMS = "embedding", "filter_terms"

# Dead-letter reasons.
UNPARSABLE = "unparsable_record"
MISSING_DOC_ID = "missing_doc_id"
INFERENCE_FAILED = "inference_failed"
BAD_EMBEDDING = "bad_embedding"


# ---------------------------------------------------------------------------------------------
# The model

def resolve_model(path: str) -> tuple[str, dict]:
    """`MODEL_DIR/doc_tower` (newest committed version) or `.../VERSION` -> (version dir,
    ebr_metadata.json), through `ebr.artifacts` (any URI). Checked in the driver so a wrong
    path or another schema's model fails before the run, naming the file."""
    vdir = artifacts.resolve(path, "doc tower")
    meta = artifacts.read_model_metadata(vdir, features.schema_hash())
    if meta.get("model_name") not in (None, "doc_tower"):
        raise artifacts.ArtifactError(
            f"{storage.join(vdir, artifacts.MODEL_METADATA)}: model_name is "
            f"{meta['model_name']!r}, expected doc_tower")
    return vdir, meta


def doc_inputs(rows: list[dict]) -> dict[str, np.ndarray]:
    """Signature inputs of the doc tower for a batch of document feature dicts."""
    return features.tower_inputs(rows, features.DOC_INPUTS)


class _Tower:
    def __init__(self, path: str, dimension: int):
        import tensorflow as tf

        self.tf = tf
        self.path = path
        self.dimension = dimension
        loaded = tf.saved_model.load(path)
        if SIGNATURE not in loaded.signatures:
            raise ValueError(f"{path}: no {SIGNATURE!r} signature "
                             f"(has {sorted(loaded.signatures)})")
        self._loaded = loaded  # keeps the variables alive
        self.fn = loaded.signatures[SIGNATURE]
        wanted = set(self.fn.structured_input_signature[1])
        if wanted != set(features.DOC_INPUTS):
            raise ValueError(f"{path}: signature inputs {sorted(wanted)} differ from "
                             f"ebr.features.DOC_INPUTS {sorted(features.DOC_INPUTS)}")

    def __call__(self, rows: list[dict]) -> np.ndarray:
        tf = self.tf
        feed = {k: tf.constant(v, dtype=tf.string) for k, v in doc_inputs(rows).items()}
        return np.asarray(self.fn(**feed)[EMBEDDING].numpy(), dtype=np.float32)


class DocTowerHandler(ModelHandler):
    """RunInference handler for the doc tower's string-dict signature.

    Elements are document feature dicts (schema names -> values, as parsed from the corpus);
    each PredictionResult's inference is the float32 embedding, or an error string when the
    document could not be embedded (routed to the dead letters downstream)."""

    def __init__(self, path: str, dimension: int, batch_size: int):
        super().__init__()
        self.path = path
        self.dimension = dimension
        self.batch_size = batch_size

    def load_model(self) -> _Tower:
        return _Tower(self.path, self.dimension)

    def run_inference(self, batch, model: _Tower, inference_args=None):
        try:
            embeddings = model(list(batch))
        except Exception:  # noqa: BLE001 - isolate the failing document(s) below
            embeddings = None
        if embeddings is not None and embeddings.shape == (len(batch), self.dimension):
            return [PredictionResult(doc, emb) for doc, emb in zip(batch, embeddings)]
        results = []
        for doc in batch:
            try:
                emb = model([doc])[0]
            except Exception as e:  # noqa: BLE001 - the document goes to the dead letters
                emb = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            results.append(PredictionResult(doc, emb))
        return results

    def batch_elements_kwargs(self):
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return "ebr_embed"


# ---------------------------------------------------------------------------------------------
# Pipeline steps

def parse_record(element):
    """(file, serialized Example) -> document feature dict, or a dead letter."""
    path, record = element
    try:
        values = features.parse_example(record)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
        yield TaggedOutput(DEAD, {"file": path, "doc_id": None, "reason": UNPARSABLE,
                                  "detail": f"not a tf.train.Example: {e}"})
        return
    doc_id = (values.get(features.DOC_ID) or [""])[0]
    if not doc_id:
        yield TaggedOutput(DEAD, {"file": path, "doc_id": None, "reason": MISSING_DOC_ID,
                                  "detail": "corpus record has no doc_id"})
        return
    doc = {}
    for name in features.DOC_INPUTS:
        vals = values.get(name, [])
        if features.BY_NAME[name].kind == features.MULTI:
            doc[name] = [str(v) for v in vals]
        else:
            doc[name] = str(vals[0]) if vals else ""
    doc["_file"] = path
    yield doc


class OutputDoFn(beam.DoFn):
    """PredictionResult -> serialized embedding Example (batched) or a dead letter."""

    def __init__(self, dimension: int):
        self.dimension = dimension

    def start_bundle(self):
        self._batch = []
        self._counts = collections.Counter()

    def process(self, result: PredictionResult):
        from tensorflow.core.example import example_pb2, feature_pb2

        doc, emb = dict(result.example), result.inference
        path = doc.pop("_file", None)
        if isinstance(emb, str):
            yield TaggedOutput(DEAD, {"file": path, "doc_id": doc[features.DOC_ID],
                                      "reason": INFERENCE_FAILED, "detail": emb})
            return
        emb = np.asarray(emb, dtype=np.float32)
        if emb.shape != (self.dimension,) or not np.all(np.isfinite(emb)):
            finite = bool(np.all(np.isfinite(emb)))
            yield TaggedOutput(DEAD, {"file": path, "doc_id": doc[features.DOC_ID],
                                      "reason": BAD_EMBEDDING,
                                      "detail": f"shape {emb.shape}, finite={finite} "
                                                f"(expected [{self.dimension}] finite)"})
            return
        ex = example_pb2.Example(features=feature_pb2.Features(feature={
            features.DOC_ID: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(
                value=[doc[features.DOC_ID].encode("utf-8")])),
            EMBEDDING: feature_pb2.Feature(float_list=feature_pb2.FloatList(value=emb.tolist())),
            FILTER_TERMS: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(
                value=[t.encode("utf-8") for t in features.document_filter_terms(doc)])),
        }))
        self._counts["written"] += 1
        self._batch.append(ex.SerializeToString())
        if len(self._batch) >= RECORD_BATCH:
            batch, self._batch = self._batch, []
            yield batch

    def finish_bundle(self):
        if self._batch:
            yield GlobalWindows.windowed_value(self._batch)
        for key, n in self._counts.items():
            yield TaggedOutput(COUNTS, GlobalWindows.windowed_value((key, n)))
        self._batch = []
        self._counts.clear()


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def resolve_corpus(corpus: str) -> tuple[str, str | None]:
    """`--corpus` -> (glob of corpus TFRecords, examples version dir or None).

    Accepted: the examples artifact `EX` (newest committed version) or `EX/VERSION`; the
    corpus directory itself (`EX/VERSION/corpus`, or any directory of corpus shards); the old
    form `EX/corpus`, read as the newest committed version's corpus; a glob of TFRecords."""
    corpus = storage.normalize(corpus)
    if _is_glob(corpus):
        pattern, examples = corpus, None
    elif storage.glob(storage.join(corpus, CORPUS_GLOB)):
        pattern, examples = storage.join(corpus, CORPUS_GLOB), None
    else:
        base = storage.parent(corpus) if storage.basename(corpus) == "corpus" else corpus
        try:
            examples = artifacts.resolve(base, "examples")
        except (artifacts.ArtifactError, storage.StorageError) as e:
            raise FileNotFoundError(
                f"no corpus files match {storage.join(corpus, CORPUS_GLOB)} and {base} is not "
                f"an examples artifact of `ebr pipeline examples` ({e})") from None
        pattern = storage.join(examples, "corpus", CORPUS_GLOB)
    if not storage.glob(pattern):
        raise FileNotFoundError(f"no corpus files match {pattern} (expected the examples "
                                "artifact of `ebr pipeline examples`, EX or EX/VERSION)")
    return pattern, examples


class EmbedDocuments(beam.PTransform):
    """Corpus records `(file, serialised Example)` -> {EMB: serialised embedding Examples
    (batched), DEAD: dead letters, COUNTS: (key, n) summed over the run}: parse, `RunInference`
    with the doc tower, check each embedding. Touches no file but the model."""

    def __init__(self, model_path: str, dimension: int, batch_size: int):
        super().__init__()
        self.model_path = model_path
        self.dimension = dimension
        self.batch_size = batch_size

    def expand(self, records):
        parsed = records | "Parse" >> beam.FlatMap(parse_record).with_outputs(DEAD, main="docs")
        inferred = parsed.docs | "Embed" >> RunInference(
            DocTowerHandler(self.model_path, self.dimension, self.batch_size))
        out = inferred | "Output" >> beam.ParDo(OutputDoFn(self.dimension)).with_outputs(
            DEAD, COUNTS, main=EMB)
        dead = (parsed[DEAD], out[DEAD]) | "AllDead" >> beam.Flatten()
        counts = (
            (out[COUNTS],
             dead | "DeadCount" >> beam.Map(lambda d: (f"dead:{d['reason']}", 1)),
             parsed.docs | "InCount" >> beam.Map(lambda _: ("parsed", 1)))
            | "AllCounts" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum))
        return {EMB: out[EMB], DEAD: dead, COUNTS: counts}


class ReadCorpus(beam.PTransform):
    """The edge in: corpus TFRecords matching `pattern` -> `(file, serialised record)`."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin):
        return (pbegin | "Pattern" >> beam.Create([self.pattern])
                | "ReadCorpus" >> beam.io.ReadAllFromTFRecord(with_filename=True))


class WriteEmbeddingsVersion(beam.PTransform):
    """The edge out: `EmbedDocuments`' outputs -> `embeddings-*.tfrecord.gz`,
    `dead_letter/dead-*.jsonl` and the run's counts (`outputs.COUNTS_DIR`, read and removed by
    the driver) in the version directory `out_dir`."""

    def __init__(self, out_dir: str, num_shards: int):
        super().__init__()
        self.out_dir = out_dir
        self.num_shards = num_shards

    def expand(self, outs):
        out_dir = self.out_dir
        _ = outs[EMB] | "Write" >> tfrecords.WriteTFRecordBatches(
            f"{out_dir}/embeddings", self.num_shards)
        _ = (outs[DEAD] | "DeadJson" >> beam.Map(json.dumps)
             | "WriteDead" >> beam.io.WriteToText(f"{out_dir}/dead_letter/dead",
                                                  file_name_suffix=".jsonl"))
        _ = (outs[COUNTS] | "CountJson" >> beam.Map(json.dumps)
             | "WriteCounts" >> beam.io.WriteToText(f"{out_dir}/{outputs.COUNTS_DIR}/counts",
                                                    file_name_suffix=".jsonl"))
        return pvalue.PDone(outs[EMB].pipeline)


def build(p, cfg: EmbedConfig, pattern: str, model_path: str, dimension: int,
          out_dir: str) -> None:
    """Adds the whole pipeline to `p`: read the corpus, embed, write below `out_dir` (the
    version directory)."""
    _ = (p | "ReadCorpus" >> ReadCorpus(pattern)
         | "EmbedDocuments" >> EmbedDocuments(model_path, dimension, cfg.batch_size)
         | "WriteEmbeddingsVersion" >> WriteEmbeddingsVersion(out_dir, cfg.num_shards))


def run(cfg: EmbedConfig, beam_args: list[str] | None = None) -> dict:
    """Runs the pipeline and commits a new version of EMB; returns the embeddings.json content."""
    started = time.time()
    model_path, meta = resolve_model(cfg.model)
    pattern, examples = resolve_corpus(cfg.corpus)
    dimension = int(meta["dimension"])
    with outputs.NewVersion(cfg.output, "embeddings") as out:
        log.info("embedding %s with %s (dimension %d) -> %s", pattern, model_path, dimension,
                 out.dir)
        p = make_pipeline(beam_args)
        build(p, cfg, pattern, model_path, dimension, out.dir)
        state = p.run().wait_until_finish()
        if state != PipelineState.DONE:
            raise RuntimeError(f"embed pipeline ended in state {state}")
        counts = collections.Counter()
        for key, n in out.take_counts():
            counts[key] += n
        dead = {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith("dead:")}
        written = counts.get("written", 0)
        parsed = counts.get("parsed", 0)
        records_in = parsed + sum(n for r, n in dead.items() if r in (UNPARSABLE, MISSING_DOC_ID))
        if parsed != written + sum(n for r, n in dead.items()
                                   if r in (INFERENCE_FAILED, BAD_EMBEDDING)):
            raise RuntimeError(f"documents lost: {parsed} parsed, {written} written, dead {dead}")
        summary = {
            "dimension": dimension, "count": written, "schema_hash": meta["schema_hash"],
            "model_version": meta.get("version"), "model_path": model_path, "corpus": pattern,
            "examples": examples, "records_in": records_in,
            "records_dead": sum(dead.values()), "dead_by_reason": dead,
            "seconds": round(time.time() - started, 3),
        }
        config.save(cfg, out.dir)
        out.commit({artifacts.EMBEDDINGS_SUMMARY: summary},
                   info={k: summary[k] for k in ("dimension", "count", "schema_hash",
                                                 "model_version")})
    summary["output"] = out.dir
    log.info("embedded %d documents (%d dead) in %.1fs -> %s", written, summary["records_dead"],
             summary["seconds"], out.dir)
    return summary
