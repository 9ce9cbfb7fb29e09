"""The paper's training-data ablations as training sets (paper section 2.4).

Place in the data flow: the examples artifact of `ebr pipeline examples` (`EX` or
`EX/VERSION`, docs/contracts.md 2) -> a new examples artifact of the same layout
(`OUT/VERSION/...` + `_COMMITTED`) whose `train/` is rewritten; the trainer reads it unchanged.

* `impression_negatives`: every training example carries its session's non-clicked impressions
  as `negative_doc_ids` (the paper's "non-click impressions as negatives"; it found -55% recall
  against random negatives, because impressions of a production engine are too hard and not
  representative of the whole corpus an embedding model must rank).
* `impression_positives`: the non-clicked impressions become positives too (the paper's
  "click + impression positives"; it found no gain over clicks alone).
* `hard_positive_examples`: the click examples plus hard positives from failed sessions (paper
  6.1.2, `experiments.hard_positives`), read from the raw logs beside the examples.

All three are Beam pipelines on the local runner by default (any runner by options). Every
path is a URI (local or gs://). Object stores have no rename, so nothing is moved
(docs/contracts.md, "Commit protocol"; `ebr.artifacts`): Beam's sink writes `train/` straight
into `artifacts.begin_version(OUT)`, the other parts of the examples version are copied beside
it (`ebr.storage`), then `ablation.json`, then the commit marker last. A failed run removes
its uncommitted version; a killed one leaves it for the next writer to remove.
"""
from __future__ import annotations

import json
import logging

from ebr import artifacts, features, storage
from beam_pipelines import mining

log = logging.getLogger(__name__)

TRAIN_GLOB = "train/examples-*.tfrecord.gz"
IMPRESSIONS_GLOB = "impressions/train/examples-*.tfrecord.gz"
SUMMARY = "ablation.json"


def _read(p, pattern: str, label: str):
    import apache_beam as beam

    if not storage.glob(pattern):
        raise FileNotFoundError(f"no TFRecords match {pattern}")
    return (p | f"Read{label}" >> beam.io.ReadFromTFRecord(pattern)
            | f"Parse{label}" >> beam.Map(features.parse_example))


def _clean(ex: dict) -> dict:
    return {k: v for k, v in ex.items() if k in features.BY_NAME}


def _session(ex: dict) -> str:
    return (ex.get(features.SESSION_ID) or [""])[0]


def _attach_impressions(kv, max_per_example: int, seed: int):
    """(session, {"train": [...], "impr": [...]}) -> train examples with negatives."""
    import apache_beam as beam

    _, groups = kv
    clicked = {d for ex in groups["train"] for d in ex.get(features.DOC_ID, [])}
    shown = sorted({d for ex in groups["impr"] for d in ex.get(features.DOC_ID, [])} - clicked)
    for ex in groups["train"]:
        negs = shown
        if len(negs) > max_per_example:
            rng = mining.rng_for(f"{_session(ex)}/{ex.get(features.DOC_ID, [''])[0]}", seed)
            negs = [negs[i] for i in sorted(rng.choice(len(negs), max_per_example, replace=False))]
        beam.metrics.Metrics.counter("ablation", "with_negatives" if negs else "without_negatives").inc()
        out = _clean(ex)
        out[features.NEGATIVE_DOC_IDS] = list(dict.fromkeys(list(ex.get(features.NEGATIVE_DOC_IDS, [])) + negs))
        yield features.make_example(out)


def resolve_examples(examples: str) -> str:
    """`EX` (newest committed version) or `EX/VERSION` -> the examples version directory."""
    try:
        return artifacts.resolve(examples, "examples")
    except (artifacts.ArtifactError, storage.StorageError) as e:
        raise FileNotFoundError(f"no examples: {e}") from None


def _rewrite(examples: str, output: str, build, beam_args, what: str,
             extra: dict | None = None) -> dict:
    """Runs `build(pipeline)` (-> serialised training examples) and commits them as `train/` of
    a new version of `output`, with the other parts of the `examples` version beside them."""
    from apache_beam.metrics.metric import MetricsFilter

    import apache_beam as beam
    from beam_pipelines import outputs
    from beam_pipelines.mine_negatives import carry_parts
    from beam_pipelines.options import make_pipeline

    with outputs.NewVersion(output, "examples") as out:
        p = make_pipeline(beam_args)
        records = build(p)
        _ = records | "WriteTrain" >> beam.io.WriteToTFRecord(
            out.path("train", "examples"), file_name_suffix=".tfrecord.gz",
            compression_type=beam.io.filesystem.CompressionTypes.GZIP)
        state = p.run()
        state.wait_until_finish()
        counts = {c.key.metric.name: int(c.committed or c.attempted or 0) for c in
                  state.metrics().query(MetricsFilter().with_namespace("ablation"))["counters"]}
        carry_parts(examples, out.dir)
        summary = {"ablation": what, "examples": examples, **(extra or {}), "counts": counts}
        out.commit({SUMMARY: summary}, {"schema_hash": features.schema_hash(), "ablation": what,
                                        "derived_from": examples})
    vdir = summary["output"] = out.dir
    log.info("%s: %s -> %s", what, counts, vdir)
    return summary


def impression_negatives(examples: str, output: str, max_per_example: int = 0, seed: int = 0,
                         beam_args: list[str] | None = None) -> dict:
    """Training set whose examples carry their session's non-clicked impressions as negatives,
    committed as a new version of `output`; returns the `ablation.json` summary plus `output`
    (the committed version directory).

    `max_per_example` = 0 means the schema's limit (`negative_doc_ids.max_values`)."""
    import apache_beam as beam

    limit = features.BY_NAME[features.NEGATIVE_DOC_IDS].max_values
    n = limit if max_per_example <= 0 else min(max_per_example, limit)

    examples = resolve_examples(examples)

    def build(p):
        train = _read(p, storage.join(examples, TRAIN_GLOB), "Train")
        impr = _read(p, storage.join(examples, IMPRESSIONS_GLOB), "Impressions")
        return ({"train": train | "KeyTrain" >> beam.Map(lambda ex: (_session(ex), ex)),
                 "impr": impr | "KeyImpr" >> beam.Map(lambda ex: (_session(ex), ex))}
                | beam.CoGroupByKey()
                | beam.FlatMap(_attach_impressions, n, seed))

    return _rewrite(examples, output, build, beam_args, "impression_negatives")


def impression_positives(examples: str, output: str,
                         beam_args: list[str] | None = None) -> dict:
    """Training set of the click examples plus the non-clicked impressions as positives (a new
    version of `output`, as `impression_negatives`)."""
    import apache_beam as beam

    def count(name):
        def fn(ex):
            beam.metrics.Metrics.counter("ablation", name).inc()
            return features.make_example(_clean(ex))
        return fn

    examples = resolve_examples(examples)

    def build(p):
        train = _read(p, storage.join(examples, TRAIN_GLOB), "Train")
        impr = _read(p, storage.join(examples, IMPRESSIONS_GLOB), "Impressions")
        return ((train | "Clicks" >> beam.Map(count("click_positives")),
                 impr | "Impr" >> beam.Map(count("impression_positives"))) | beam.Flatten())

    return _rewrite(examples, output, build, beam_args, "impression_positives")


def _read_sessions(p, raw_dir: str):
    """Canonical sessions (docs/data-format.md) as dicts; malformed lines are skipped here
    because `ebr pipeline examples` already dead-letters them (they have no examples to join)."""
    import apache_beam as beam

    from beam_pipelines import rawlog

    path = rawlog.resolve_inputs(raw_dir)["sessions"]

    def parse(line):
        try:
            rec = json.loads(line)
        except ValueError:
            beam.metrics.Metrics.counter("ablation", "sessions_unparsable").inc()
            return
        if isinstance(rec, dict) and {"session_id", "searcher_id", "timestamp"} <= set(rec):
            yield rec
        else:
            beam.metrics.Metrics.counter("ablation", "sessions_incomplete").inc()

    return (p | "ReadSessions" >> beam.io.ReadFromText(path)
            | "ParseSessions" >> beam.FlatMap(parse))


def _hard_positive_copies(kv):
    """((later session, doc), {"hp": [HardPositive], "ex": [train example]}) -> new examples.

    The later session's training example already holds the searcher's features and the clicked
    document's; the copy swaps in the failed query and a session id of its own. Only training
    examples are joined, so no evaluation click becomes a training positive."""
    import apache_beam as beam

    from experiments.hard_positives import SESSION_SUFFIX

    _, groups = kv
    for ex in groups["ex"]:
        for hp in groups["hp"]:
            out = _clean(ex)
            out[features.QUERY_TEXT] = hp.query
            out[features.SESSION_ID] = hp.failed_session_id + SESSION_SUFFIX
            out[features.TIMESTAMP] = hp.timestamp
            beam.metrics.Metrics.counter("ablation", "hard_positives").inc()
            yield features.make_example(out)


def hard_positive_examples(raw: str, examples: str, output: str,
                           window_seconds: float | None = None,
                           beam_args: list[str] | None = None) -> dict:
    """Training set of the click examples plus hard positives (paper 6.1.2): for every failed
    search followed within `window_seconds` by a clicking reformulation whose example is in the
    training split, a copy of that example with the failed query. `raw` is the plain directory of
    canonical logs the examples were made from (any URI); the result is a new version of
    `output`, as `impression_negatives`."""
    import apache_beam as beam

    from experiments.hard_positives import DEFAULT_WINDOW_SECONDS, ExtractHardPositives

    window = DEFAULT_WINDOW_SECONDS if window_seconds is None else window_seconds
    examples = resolve_examples(examples)

    def build(p):
        train = _read(p, storage.join(examples, TRAIN_GLOB), "Train")
        hps = _read_sessions(p, raw) | "HardPositives" >> ExtractHardPositives(window)
        keyed_hp = hps | "KeyHP" >> beam.FlatMap(
            lambda hp: [((hp.later_session_id, d), hp) for d in hp.doc_ids])
        keyed_ex = train | "KeyEx" >> beam.Map(
            lambda ex: ((_session(ex), (ex.get(features.DOC_ID) or [""])[0]), ex))
        copies = ({"hp": keyed_hp, "ex": keyed_ex} | "JoinHP" >> beam.CoGroupByKey()
                  | "Copies" >> beam.FlatMap(_hard_positive_copies))
        originals = train | "Originals" >> beam.Map(lambda ex: features.make_example(_clean(ex)))
        return (originals, copies) | "All" >> beam.Flatten()

    return _rewrite(examples, output, build, beam_args, "hard_positives",
                    {"raw": raw, "window_seconds": window})
