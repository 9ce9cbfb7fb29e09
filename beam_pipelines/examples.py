"""`ebr pipeline examples`: raw logs in, training examples, corpus and statistics out.

Place in the data flow: `ebr data social|movielens` (raw logs, docs/data-format.md) -> this
pipeline (docs/contracts.md section 2) -> `ebr train` / `ebr embed` / `ebr mine-negatives`.
Each run commits a new version of the examples artifact (`beam_pipelines.outputs`):
`OUT/VERSION/{train,eval,impressions/{train,eval},corpus,doc_frequencies-*.tsv,dead_letter,
split.json,schema.json,stats.json,config.json,_COMMITTED}`; readers take OUT or OUT/VERSION
through `artifacts.resolve(path, "examples")`. Shards are written by Beam's sinks straight into
the version directory (any URI: local, gs://), the json files by the driver, the marker last.

The pipeline is `ReadRawLogs | RawLogsToExamples | WriteExamplesVersion` (`build`): reads and
writes at the edges, and between them one named transform per stage, each taking and returning
PCollections so it runs alone on `beam.Create` input. Stages (each GroupByKey is one shuffle;
everything between them fuses):
 1. `ParseRawLogs`: the three files, read in numbered chunks (file + line survive) and spread
    by `ReadRawLogs`, are parsed and validated line by line (`rawlog`); bad lines become dead
    letters. Valid records leave keyed for the groups below.
 2. `JoinDocuments`, by doc_id: documents (the first copy by line wins, later copies are dead
    letters) meet the lines of the sessions referencing them; a reference to no document
    marks that session line. The corpus Example of each document is made here.
 3. `MarkDuplicateSessions`, by session_id, ids only: every valid copy of a session after the
    first (by line) is marked as a duplicate.
 4. `BuildHistory`, by searcher_id: the searcher (first copy wins) meets its sessions, with the
    marks of stages 2-3 as a side input (by searcher). Marked sessions and sessions of an
    unknown searcher are dead letters; the rest get their split and, in time order, the
    history feature: the searcher's last N *training-split* clicks strictly before the
    session's timestamp, so no example (training or evaluation) sees an evaluation click or a
    click from its own second or later. Each session yields one event per clicked document
    and per non-clicked impression, keyed by doc_id.
 5. `JoinEvents`, by doc_id: events meet their document; the document's share of training
    clicks is its sampling probability (logQ, Yi et al. 2019) and every event becomes one
    Example of query, document and example features, concatenated from parts serialised once
    (`example_bytes`).
`RawLogsToExamples` chains the five and gathers every stage's dead letters and counts.

Records travel between stages in per-worker batches where order does not matter (session
references, events, output records), which keeps the element count through the runner far
below the record count; the local runner's per-element cost dominated the profile otherwise.

Counting: every file's records_in is counted at read time, records_out where a record is
finally accepted (stages 2-4) and records_dead from the dead letters, independently, so
`records_in == records_out + records_dead` in stats.json is a real check (the run fails if it
does not hold).
"""
from __future__ import annotations

import collections
import json
import logging
import time
import typing

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.window import GlobalWindows

from beam_pipelines import example_bytes, outputs, rawlog, split, tfrecords
from beam_pipelines.config import ExamplesConfig
from beam_pipelines.options import make_pipeline, normalize_args
from ebr import artifacts, config, features

log = logging.getLogger(__name__)

# Output tags.
TRAIN, EVAL, IMP_TRAIN, IMP_EVAL = "train", "eval", "impressions/train", "impressions/eval"
EXAMPLE_OUTPUTS = (TRAIN, EVAL, IMP_TRAIN, IMP_EVAL)
CORPUS, FREQ, DEAD, COUNTS, MISSING = "corpus", "freq", "dead", "counts", "missing"
BY_DOC, BY_SEARCHER, SESSION_IDS = "by_doc", "by_searcher", "session_ids"
DOCS, EVENTS, MARKS = "docs", "events", "marks"
# Events buffered per worker before being emitted grouped by document (fewer shuffle elements).
EVENT_BUFFER = 100_000
REF_BUFFER = 200_000
RECORD_BATCH = 2048


class _CountingDoFn(beam.DoFn):
    """Counts accumulated per bundle and emitted once on the COUNTS output; serialised records
    emitted in lists of up to RECORD_BATCH per output tag (fewer elements through the runner,
    one compression call per list in the writer)."""

    def start_bundle(self):
        self._counts = collections.Counter()
        self._records = collections.defaultdict(list)

    def record(self, tag: str, value: bytes):
        """Buffers one serialised record; returns the outputs to yield (a full batch or none)."""
        buf = self._records[tag]
        buf.append(value)
        self._counts[("written", tag)] += 1
        if len(buf) >= RECORD_BATCH:
            self._records[tag] = []
            return (TaggedOutput(tag, buf),)
        return ()

    def finish_bundle(self):
        for tag, buf in self._records.items():
            if buf:
                yield TaggedOutput(tag, GlobalWindows.windowed_value(buf))
        self._records.clear()
        for key, n in self._counts.items():
            yield TaggedOutput(COUNTS, GlobalWindows.windowed_value((key, n)))
        self._counts.clear()

    def dead(self, path, line, reason, detail, raw):
        return TaggedOutput(DEAD, rawlog.dead_letter(
            path, line, reason, detail,
            rawlog.display_record(raw) if isinstance(raw, bytes) else raw))


class ParseDoFn(_CountingDoFn):
    """Stage 1: a chunk of numbered lines of one file -> records keyed for the groups of
    stages 2-4, dead letters, and per-file counts. Every keyed output feeds one GroupByKey
    directly (a Flatten before a shuffle costs the local runner a full extra pass)."""

    def __init__(self, allow_empty_query: bool):
        self.allow_empty_query = allow_empty_query

    def start_bundle(self):
        super().start_bundle()
        self._refs = collections.defaultdict(list)
        self._n_refs = 0

    def _flush_refs(self):
        refs, self._refs, self._n_refs = self._refs, collections.defaultdict(list), 0
        return [TaggedOutput(BY_DOC, (doc_id, ("refs", sessions)))
                for doc_id, sessions in refs.items()]

    def finish_bundle(self):
        for out in self._flush_refs():
            yield TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
        yield from super().finish_bundle()

    def process(self, chunk):
        kind, path, lines = chunk
        self._counts[("in", path)] += len(lines)
        for line, raw in lines:
            try:
                rec = rawlog.validate(kind, raw, self.allow_empty_query)
            except rawlog.BadRecord as e:
                yield self.dead(path, line, e.reason, e.detail, raw)
                continue
            if kind == rawlog.SESSIONS:
                searcher_id = rec["searcher_id"]
                # The doc ids a session references, grouped by doc across the bundle so
                # stage 2 receives one element per document rather than per reference.
                docs = dict.fromkeys(rec["impressions"] + rec["clicks"])
                for doc_id in docs:
                    self._refs[doc_id].append((line, searcher_id))
                self._n_refs += len(docs)
                yield TaggedOutput(SESSION_IDS, (rec["session_id"], (line, searcher_id)))
                yield TaggedOutput(BY_SEARCHER, (searcher_id, ("session", (line, rec, raw))))
            elif kind == rawlog.SEARCHERS:
                yield TaggedOutput(BY_SEARCHER,
                                   (rec["searcher_id"], ("searcher", (line, rec, raw))))
            else:
                yield TaggedOutput(BY_DOC, (rec["doc_id"], ("doc", (line, rec, raw))))
        if self._n_refs >= REF_BUFFER:
            yield from self._flush_refs()


def duplicate_marks(element):
    """Stage 3 (by session_id, ids only): every valid copy after the first (by line) is
    marked, keyed by its own searcher so stage 4 can dead-letter it with its record."""
    session_id, copies = element
    copies = sorted(copies)
    first_line = copies[0][0]
    for line, searcher_id in copies[1:]:
        yield searcher_id, (rawlog.DUPLICATE_SESSION, line,
                            f"sessions.session_id {session_id!r} first seen at line {first_line}")


class DocumentsDoFn(_CountingDoFn):
    """Stage 2: (doc_id, [("doc", copy) | ("refs", [(line, searcher_id)])])."""

    def __init__(self, path: str):
        self.path = path

    def process(self, element):
        doc_id, values = element
        copies = sorted((v for tag, v in values if tag == "doc"), key=lambda c: c[0])
        if not copies:
            for tag, refs in values:
                for line, searcher_id in refs:
                    yield TaggedOutput(MISSING, (searcher_id, (rawlog.UNKNOWN_DOCUMENT, line,
                                                               doc_id)))
            return
        first_line, doc, _ = copies[0]
        for line, _, raw in copies[1:]:
            yield self.dead(self.path, line, rawlog.DUPLICATE_DOCUMENT,
                            f"documents.doc_id {doc_id!r} first seen at line {first_line}", raw)
        self._counts[("out", self.path)] += 1
        doc_entries = example_bytes.entries(features.document_values(doc))
        yield from self.record(CORPUS, example_bytes.join(doc_entries))
        yield doc_id, doc_entries


class SearchersDoFn(_CountingDoFn):
    """Stage 4: (searcher_id, [("searcher", copy) | ("session", copy)]) plus the marks of
    stages 2-3 for this searcher's session lines -> (doc_id, [(output tag, query-side
    entries), ...]) events, buffered by doc."""

    def __init__(self, searchers_path: str, sessions_path: str, history: int,
                 split_cfg: split.SplitConfig):
        self.searchers_path = searchers_path
        self.sessions_path = sessions_path
        self.history = history
        self.split_cfg = split_cfg

    def start_bundle(self):
        super().start_bundle()
        self._events = collections.defaultdict(list)
        self._buffered = 0

    def _flush(self):
        for doc_id, events in self._events.items():
            yield doc_id, events
        self._events = collections.defaultdict(list)
        self._buffered = 0

    def finish_bundle(self):
        for kv in self._flush():
            yield GlobalWindows.windowed_value(kv)
        yield from super().finish_bundle()

    def process(self, element, marks):
        searcher_id, values = element
        copies, sessions = [], []
        for tag, value in values:
            (copies if tag == "searcher" else sessions).append(value)
        copies.sort(key=lambda c: c[0])
        # A duplicate copy is reported as such even if it also references a missing doc.
        duplicate, missing = {}, collections.defaultdict(list)
        for reason, line, detail in marks[searcher_id]:
            if reason == rawlog.DUPLICATE_SESSION:
                duplicate[line] = (reason, detail)
            else:
                missing[line].append(detail)
        by_line = {line: (rawlog.UNKNOWN_DOCUMENT,
                          f"doc ids not in documents: {sorted(ids)[:5]}")
                   for line, ids in missing.items()}
        by_line.update(duplicate)
        kept = []
        for line, session, raw in sessions:
            if line in by_line:
                reason, detail = by_line[line]
                yield self.dead(self.sessions_path, line, reason, detail, raw)
            elif not copies:
                yield self.dead(self.sessions_path, line, rawlog.UNKNOWN_SEARCHER,
                                f"sessions.searcher_id {searcher_id!r} is not in searchers", raw)
            else:
                kept.append((session, split.is_eval(self.split_cfg, session["session_id"],
                                                    session["timestamp"])))
        if not copies:
            return
        first_line, searcher, _ = copies[0]
        for line, _, raw in copies[1:]:
            yield self.dead(self.searchers_path, line, rawlog.DUPLICATE_SEARCHER,
                            f"searchers.searcher_id {searcher_id!r} first seen at line "
                            f"{first_line}", raw)
        self._counts[("out", self.searchers_path)] += 1
        if not kept:
            return
        static = features.query_values("", searcher, [])
        del static[features.QUERY_TEXT], static[features.HISTORY_DOC_IDS]
        static_entries = example_bytes.entries(static)
        kept.sort(key=lambda s: (s[0]["timestamp"], s[0]["session_id"]))
        clicks = collections.deque(maxlen=self.history) if self.history else None
        i = 0
        while i < len(kept):
            # Sessions sharing a timestamp never see each other's clicks (strictly before).
            ts = kept[i][0]["timestamp"]
            j = i
            while j < len(kept) and kept[j][0]["timestamp"] == ts:
                j += 1
            history = list(clicks) if clicks is not None else []
            for session, is_eval in kept[i:j]:
                self._add_events(session, is_eval, history, static_entries)
            if clicks is not None:
                for session, is_eval in kept[i:j]:
                    if not is_eval:
                        clicks.extend(session["clicks"])
            i = j
        self._counts[("out", self.sessions_path)] += len(kept)
        if self._buffered >= EVENT_BUFFER:
            yield from self._flush()

    def _add_events(self, session, is_eval, history, static_entries):
        q_entries = static_entries + example_bytes.entries({
            features.QUERY_TEXT: session["query"], features.HISTORY_DOC_IDS: history,
            features.SESSION_ID: session["session_id"], features.TIMESTAMP: session["timestamp"]})
        click_tag, imp_tag = (EVAL, IMP_EVAL) if is_eval else (TRAIN, IMP_TRAIN)
        clicked = session["clicks"]
        for doc_id in clicked:
            self._events[doc_id].append((click_tag, q_entries))
        clicked_set = set(clicked)
        shown = [d for d in session["impressions"] if d not in clicked_set]
        for doc_id in shown:
            self._events[doc_id].append((imp_tag, q_entries))
        self._buffered += len(clicked) + len(shown)


def _tag_with(kv, tag):
    return kv[0], (tag, kv[1])


def _regroup(kv, tags):
    grouped = {tag: [] for tag in tags}
    for tag, value in kv[1]:
        grouped[tag].append(value)
    return kv[0], grouped


def cogroup(inputs: dict, label: str):
    """`CoGroupByKey` with one explicit element type on every tagged branch: Beam's own
    infers a different coder per branch, which makes the local runner re-encode every element
    in an extra pass-through stage before the shuffle (a third of the CPU in the profile)."""
    kv_type = typing.Tuple[str, typing.Any]
    tagged = [pcoll | f"{label}Tag[{tag}]" >> beam.Map(_tag_with, tag).with_output_types(kv_type)
              for tag, pcoll in inputs.items()]
    return (tagged | f"{label}Flatten" >> beam.Flatten().with_output_types(kv_type)
            | f"{label}Group" >> beam.GroupByKey()
            | f"{label}Regroup" >> beam.Map(_regroup, tuple(inputs)))


def _read_file(kind_path, chunk_lines):
    kind, path = kind_path
    for _, lines in rawlog.read_chunks(path, chunk_lines):
        yield kind, path, lines


def _train_clicks(kv) -> int:
    return sum(1 for tag, _ in kv[1] if tag == TRAIN)


class JoinDoFn(_CountingDoFn):
    """Stage 5: (doc_id, {"doc": [entries], "events": [[(tag, query entries)], ...]}) ->
    Examples on the four example outputs, plus the doc_frequencies line."""

    def process(self, element, total_train_clicks):
        doc_id, grouped = element
        event_lists = grouped["events"]
        if not event_lists:
            return
        if not grouped["doc"]:
            # Stage 2 dead-letters every session that references a missing document.
            raise RuntimeError(f"internal error: events for unknown document {doc_id!r}")
        doc_entries = grouped["doc"][0]
        n = sum(1 for events in event_lists for tag, _ in events if tag == TRAIN)
        prob = n / total_train_clicks if total_train_clicks else 0.0
        tail = doc_entries + example_bytes.entries({features.DOC_SAMPLING_PROB: prob})
        join = example_bytes.join
        for events in event_lists:
            for tag, q_entries in events:
                yield from self.record(tag, join(q_entries, tail))
        if n:
            self._counts[("written", "doc_frequencies")] += 1
            yield TaggedOutput(FREQ, f"{doc_id}\t{n}\t{prob!r}")


def _dead_count(d):
    return ("dead", d["file"], d["reason"]), 1


def _outputs(result, tags, main: str | None = None) -> dict:
    """A multi-output ParDo's result as the {tag: PCollection} dict a stage returns."""
    out = {tag: result[tag] for tag in tags}
    if main:
        out[main] = result[main]
    return out


# ---------------------------------------------------------------------------------------------
# The stages, as named transforms: each takes and returns PCollections (or dicts of them) and
# touches no file, so each runs alone on `beam.Create` input. Counts leave every stage as
# (key, n) pairs on its COUNTS output; dead letters as dicts on DEAD.

class ParseRawLogs(beam.PTransform):
    """Stage 1: chunks `(kind, path, [(line, raw bytes)])` -> {BY_DOC, BY_SEARCHER, SESSION_IDS,
    DEAD, COUNTS}: the valid records keyed for stages 2-4, dead letters, per-file counts."""

    def __init__(self, allow_empty_query: bool):
        super().__init__()
        self.allow_empty_query = allow_empty_query

    def expand(self, chunks):
        tags = (BY_DOC, BY_SEARCHER, SESSION_IDS, DEAD, COUNTS)
        return _outputs(chunks | "Parse" >> beam.ParDo(ParseDoFn(self.allow_empty_query))
                        .with_outputs(*tags), tags)


class JoinDocuments(beam.PTransform):
    """Stage 2: BY_DOC records -> {DOCS: (doc_id, document entries), CORPUS: serialised corpus
    Examples (batched), MISSING: marks of sessions referencing no document, DEAD, COUNTS}."""

    def __init__(self, documents_path: str):
        super().__init__()
        self.documents_path = documents_path

    def expand(self, by_doc):
        tags = (DEAD, COUNTS, CORPUS, MISSING)
        return _outputs(by_doc | "ByDocument" >> beam.GroupByKey()
                        | "Documents" >> beam.ParDo(DocumentsDoFn(self.documents_path))
                        .with_outputs(*tags, main=DOCS), tags, DOCS)


class MarkDuplicateSessions(beam.PTransform):
    """Stage 3: (session_id, (line, searcher_id)) -> (searcher_id, mark) for every copy of a
    session after the first."""

    def expand(self, session_ids):
        return (session_ids | "BySessionId" >> beam.GroupByKey()
                | "Duplicates" >> beam.FlatMap(duplicate_marks))


class BuildHistory(beam.PTransform):
    """Stage 4: {BY_SEARCHER: searcher and session records, MARKS: (searcher_id, mark)} ->
    {EVENTS: (doc_id, [(output tag, query-side entries)]), DEAD, COUNTS}."""

    def __init__(self, searchers_path: str, sessions_path: str, history: int,
                 split_cfg: split.SplitConfig):
        super().__init__()
        self.dofn = SearchersDoFn(searchers_path, sessions_path, history, split_cfg)

    def expand(self, inputs):
        tags = (DEAD, COUNTS)
        return _outputs(inputs[BY_SEARCHER] | "BySearcher" >> beam.GroupByKey()
                        | "History" >> beam.ParDo(self.dofn,
                                                  beam.pvalue.AsMultiMap(inputs[MARKS]))
                        .with_outputs(*tags, main=EVENTS), tags, EVENTS)


class JoinEvents(beam.PTransform):
    """Stage 5: {DOCS, EVENTS} -> {TRAIN, EVAL, IMP_TRAIN, IMP_EVAL: serialised Examples
    (batched), FREQ: doc_frequencies lines, COUNTS}; the sampling probability is each
    document's share of all training clicks."""

    def expand(self, inputs):
        total = (inputs[EVENTS] | "TrainClicks" >> beam.Map(_train_clicks)
                 | "TotalTrainClicks" >> beam.CombineGlobally(sum))
        tags = (COUNTS, FREQ, *EXAMPLE_OUTPUTS)
        return _outputs(cogroup({"doc": inputs[DOCS], "events": inputs[EVENTS]}, "ByEventDocument")
                        | "Join" >> beam.ParDo(JoinDoFn(), beam.pvalue.AsSingleton(total))
                        .with_outputs(*tags), tags)


class RawLogsToExamples(beam.PTransform):
    """Stages 1-5: raw-log chunks (`ReadRawLogs`) -> {TRAIN, EVAL, IMP_TRAIN, IMP_EVAL, CORPUS:
    serialised Examples (batched), FREQ: doc_frequencies lines, DEAD: every dead letter,
    COUNTS: (key, n) summed over the run}. `inputs` is {kind: path} of the files read, which
    the dead letters and counts name."""

    def __init__(self, cfg: ExamplesConfig, inputs: dict[str, str]):
        super().__init__()
        self.cfg = cfg
        self.inputs = inputs

    def expand(self, chunks):
        cfg, inputs = self.cfg, self.inputs
        parsed = chunks | "ParseRawLogs" >> ParseRawLogs(cfg.allow_empty_query)
        docs = parsed[BY_DOC] | "JoinDocuments" >> JoinDocuments(inputs[rawlog.DOCUMENTS])
        duplicates = parsed[SESSION_IDS] | "MarkDuplicateSessions" >> MarkDuplicateSessions()
        marks = (docs[MISSING], duplicates) | "Marks" >> beam.Flatten()
        events = ({BY_SEARCHER: parsed[BY_SEARCHER], MARKS: marks}
                  | "BuildHistory" >> BuildHistory(inputs[rawlog.SEARCHERS],
                                                   inputs[rawlog.SESSIONS], cfg.history,
                                                   cfg.split))
        joined = {DOCS: docs[DOCS], EVENTS: events[EVENTS]} | "JoinEvents" >> JoinEvents()

        dead = (parsed[DEAD], docs[DEAD], events[DEAD]) | "AllDead" >> beam.Flatten()
        counts = ((parsed[COUNTS], docs[COUNTS], events[COUNTS], joined[COUNTS],
                   dead | "DeadCounts" >> beam.Map(_dead_count))
                  | "AllCounts" >> beam.Flatten() | "SumCounts" >> beam.CombinePerKey(sum))
        return {**{tag: joined[tag] for tag in EXAMPLE_OUTPUTS}, CORPUS: docs[CORPUS],
                FREQ: joined[FREQ], DEAD: dead, COUNTS: counts}


# ---------------------------------------------------------------------------------------------
# The edges: reading the raw logs, writing the version directory.

class ReadRawLogs(beam.PTransform):
    """The three raw-log files `{kind: path}` -> chunks `(kind, path, [(line, raw bytes)])`,
    spread over the workers (line numbers travel with the lines)."""

    def __init__(self, inputs: dict[str, str], chunk_lines: int):
        super().__init__()
        self.files = [(kind, inputs[kind]) for kind in rawlog.KINDS]
        self.chunk_lines = chunk_lines

    def expand(self, pbegin):
        return (pbegin | "ListFiles" >> beam.Create(self.files)
                | "Read" >> beam.FlatMap(_read_file, self.chunk_lines)
                | "Spread" >> beam.Reshuffle())


class WriteExamplesVersion(beam.PTransform):
    """`RawLogsToExamples`' outputs -> the shards of the version directory `out_dir`:
    `{train,eval,impressions/{train,eval}}/examples-*`, `corpus/documents-*`,
    `doc_frequencies-*.tsv`, `dead_letter/dead-*.jsonl`, and the run's counts (`outputs.COUNTS_DIR`,
    read and removed by the driver before the commit)."""

    def __init__(self, out_dir: str, num_shards: int):
        super().__init__()
        self.out_dir = out_dir
        self.num_shards = num_shards

    def expand(self, outs):
        out_dir, num_shards = self.out_dir, self.num_shards
        for tag in EXAMPLE_OUTPUTS:
            _ = outs[tag] | f"Write[{tag}]" >> tfrecords.WriteTFRecordBatches(
                f"{out_dir}/{tag}/examples", num_shards)
        _ = outs[CORPUS] | "Write[corpus]" >> tfrecords.WriteTFRecordBatches(
            f"{out_dir}/corpus/documents", num_shards)
        _ = outs[FREQ] | "WriteFrequencies" >> beam.io.WriteToText(
            f"{out_dir}/doc_frequencies", file_name_suffix=".tsv", num_shards=num_shards)
        _ = (outs[DEAD] | "DeadJson" >> beam.Map(lambda d: json.dumps(d, ensure_ascii=False))
             | "WriteDead" >> beam.io.WriteToText(f"{out_dir}/dead_letter/dead",
                                                  file_name_suffix=".jsonl",
                                                  num_shards=num_shards))
        _ = (outs[COUNTS] | "CountJson" >> beam.Map(lambda kv: json.dumps([list(kv[0]), kv[1]]))
             | "WriteCounts" >> beam.io.WriteToText(f"{out_dir}/{outputs.COUNTS_DIR}/counts",
                                                    file_name_suffix=".jsonl"))
        return pvalue.PDone(outs[COUNTS].pipeline)


def build(p, cfg: ExamplesConfig, inputs: dict[str, str], out_dir: str) -> None:
    """Adds the whole pipeline to `p`: read, stages 1-5, write below `out_dir` (the version
    directory)."""
    _ = (p | "ReadRawLogs" >> ReadRawLogs(inputs, cfg.chunk_lines)
         | "RawLogsToExamples" >> RawLogsToExamples(cfg, inputs)
         | "WriteExamplesVersion" >> WriteExamplesVersion(out_dir, cfg.num_shards))


def assemble_stats(counts: list, inputs: dict[str, str]) -> dict:
    files = {path: {"kind": kind, "records_in": 0, "records_out": 0, "records_dead": 0,
                    "dead_by_reason": {}} for kind, path in inputs.items()}
    written = {name: 0 for name in EXAMPLE_OUTPUTS + (CORPUS, "doc_frequencies")}
    for key, n in counts:
        if key[0] == "written":
            written[key[1]] = written.get(key[1], 0) + n
            continue
        entry = files[key[1]]
        if key[0] == "in":
            entry["records_in"] += n
        elif key[0] == "out":
            entry["records_out"] += n
        else:
            entry["records_dead"] += n
            entry["dead_by_reason"][key[2]] = entry["dead_by_reason"].get(key[2], 0) + n
    totals = {k: sum(f[k] for f in files.values())
              for k in ("records_in", "records_out", "records_dead")}
    by_reason = collections.Counter()
    for f in files.values():
        by_reason.update(f["dead_by_reason"])
    totals["dead_by_reason"] = dict(sorted(by_reason.items()))
    return {"files": files, "totals": totals, "written": written}


def run(cfg: ExamplesConfig, beam_args: list[str] | None = None) -> dict:
    """Runs the pipeline and commits a new version of OUT; returns the stats.json content."""
    started = time.time()
    inputs = rawlog.resolve_inputs(cfg.input)
    with outputs.NewVersion(cfg.output, "examples") as out:
        log.info("examples pipeline: %s -> %s", cfg.input, out.dir)
        p = make_pipeline(beam_args)
        build(p, cfg, inputs, out.dir)
        t0 = time.time()
        result = p.run()
        state = result.wait_until_finish()
        if state != PipelineState.DONE:
            raise RuntimeError(f"examples pipeline ended in state {state}")
        pipeline_s = time.time() - t0
        stats = assemble_stats(out.take_counts(), inputs)
        unbalanced = {p_: f for p_, f in stats["files"].items()
                      if f["records_in"] != f["records_out"] + f["records_dead"]}
        if unbalanced:
            raise RuntimeError(f"records lost: records_in != records_out + records_dead for "
                               f"{json.dumps(unbalanced)}")
        argv, _ = normalize_args(beam_args)
        stats.update({
            "input": cfg.input, "output": out.dir,
            "config": {"history": cfg.history, "allow_empty_query": cfg.allow_empty_query,
                       "num_shards": cfg.num_shards},
            "split": split.to_json(cfg.split),
            "runner": [a for a in argv if a.startswith(("--runner", "--direct_"))],
            "schema_hash": features.schema_hash(),
        })
        stats["timings"] = {"pipeline_s": round(pipeline_s, 3),
                            "total_s": round(time.time() - started, 3)}
        config.save(cfg, out.dir)
        out.commit({"split.json": split.to_json(cfg.split),
                    "schema.json": {"schema": features.schema_dict(),
                                    "schema_hash": features.schema_hash()},
                    artifacts.EXAMPLES_STATS: stats},
                   info={"schema_hash": features.schema_hash(), "totals": stats["totals"]})
    t = stats["totals"]
    log.info("examples pipeline done in %.1fs: %d records in, %d out, %d dead %s; written %s",
             time.time() - started, t["records_in"], t["records_out"], t["records_dead"],
             t["dead_by_reason"], stats["written"])
    return stats
