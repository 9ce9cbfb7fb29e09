"""`ebr pipeline examples` (beam_pipelines/examples.py): every bad-input class dead-lettered with
nothing lost, examples and corpus content, history without leakage, a reproducible split, the
2-worker multi-processing runner equal to in-memory, reruns that commit new versions with no
stale files (the oldest pruned beyond 2), a run killed mid-publish that leaves the previous
version readable, and the same flow on gs:// (the Cloud Storage emulator)."""
import collections
import dataclasses
import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from beam_pipelines import example_bytes, examples, options, rawlog, split
from beam_pipelines.config import ExamplesConfig
from ebr import artifacts, cli, features, storage

# ---------------------------------------------------------------------------------------------
# A hand-written raw directory holding every bad-input class, with the reason each line gets.

LONG = "x" * (features.MAX_TEXT_CHARS + 1)


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


SEARCHERS = [  # (raw line, expected dead reason or None)
    (_j({"searcher_id": "u1", "city": "Seattle", "region": "wa", "country": "us",
         "language": "en", "attributes": {"age": "30", "tag": ["a", "b"]}, "friends": ["u2"]}), None),
    (_j({"searcher_id": "u2", "city": "portland", "friends": ["u1", "u3"]}), None),
    (_j({"searcher_id": "u3"}), None),
    (_j({"searcher_id": "u1", "city": "elsewhere"}), rawlog.DUPLICATE_SEARCHER),
    (_j({"searcher_id": "u4", "friends": "u1"}), rawlog.WRONG_TYPE),
    (_j({"city": "nowhere"}), rawlog.MISSING_FIELD),
]
DOCUMENTS = [
    (_j({"doc_id": "d1", "text": "John Smith", "type": "person", "city": "seattle",
         "attributes": {"tag": "spam"}, "members": ["u2"]}), None),
    (_j({"doc_id": "d2", "text": "Seattle Hikers", "type": "group", "members": ["u1", "u3"]}), None),
    (_j({"doc_id": "d3", "text": "Jon Smyth", "type": "person"}), None),
    (_j({"doc_id": "d4", "text": "Café Rouge", "type": "page"}), None),
    (_j({"doc_id": "d2", "text": "Another d2"}), rawlog.DUPLICATE_DOCUMENT),
    (_j({"doc_id": "d5", "text": "   "}), rawlog.EMPTY_TEXT),
    (_j({"doc_id": "d6", "text": LONG}), rawlog.TEXT_TOO_LONG),
    (_j({"doc_id": "d7", "text": "ok", "attributes": ["tag:x"]}), rawlog.WRONG_TYPE),
    (_j({"doc_id": "d8"}), rawlog.MISSING_FIELD),
]


def _s(sid, searcher, ts, query, clicks, impressions=None, **extra):
    rec = {"session_id": sid, "searcher_id": searcher, "timestamp": ts, "query": query,
           "clicks": clicks, **extra}
    if impressions is not None:
        rec["impressions"] = impressions
    return _j(rec)


SESSIONS = [
    (_s("s1", "u1", 100, "john smith", ["d1"], ["d1", "d3"]), None),
    (_s("s2", "u1", 200, "hikers", ["d2", "d4"], ["d2", "d1", "d4"]), None),
    (_s("s3", "u2", 150, "jon", ["d3"]), None),  # no impressions given: no impressed check
    (_s("s4", "u2", 300, "nobody", [], ["d1", "d2"]), None),  # failed session: impressions only
    (_s("s5", "u1", 200, "same second", ["d3"], ["d3"]), None),  # ties with s2
    (_s("s6", "u1", 400, "later", ["d1"], ["d1"]), None),
    (_s("s7", "u3", 120.9, "float ts", ["d1"], []), None),
    (b"", None),  # blank line: not a record
    (b'{"session_id": "b1", "searcher_id": "u1", ', rawlog.MALFORMED_JSON),
    (_j({"session_id": "b2", "timestamp": 1, "query": "q", "clicks": []}), rawlog.MISSING_FIELD),
    (_s("b3", "u1", "100", "q", []), rawlog.WRONG_TYPE),
    (_s("b4", "ghost", 100, "q", ["d1"]), rawlog.UNKNOWN_SEARCHER),
    (_s("b5", "u1", 100, "q", ["d9"], ["d9", "d1"]), rawlog.UNKNOWN_DOCUMENT),
    (_s("b6", "u1", 100, "q", [], ["d1", "d404"]), rawlog.UNKNOWN_DOCUMENT),
    (_s("b7", "u1", 100, "", ["d1"]), rawlog.EMPTY_QUERY),
    (_s("b8", "u1", 100, "  ", ["d1"]), rawlog.EMPTY_QUERY),
    (_s("b9", "u1", 100, LONG, ["d1"]), rawlog.QUERY_TOO_LONG),
    (b'{"session_id": "b10", "searcher_id": "u1", "timestamp": 1, "query": "caf\xe9", '
     b'"clicks": []}', rawlog.INVALID_UTF8),
    (_s("s1", "u2", 999, "dup", ["d2"]), rawlog.DUPLICATE_SESSION),
    (_s("b11", "u1", 100, "q", ["d2"], ["d1"]), rawlog.CLICK_NOT_IMPRESSED),
    (b"[1, 2]", rawlog.NOT_AN_OBJECT),
    (_j({"session_id": "b12", "searcher_id": "u1", "timestamp": 1, "query": "q"}),
     rawlog.MISSING_FIELD),
    (_s("b13", "u1", 100, "q", [1]), rawlog.WRONG_TYPE),
    (_s("b14", "u1", True, "q", []), rawlog.WRONG_TYPE),
]
FILES = {"searchers.jsonl": SEARCHERS, "documents.jsonl.gz": DOCUMENTS,
         "sessions.jsonl": SESSIONS}
EVAL_FRACTION = 0.3
HISTORY = 3


def write_raw(directory) -> dict:
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, rows in FILES.items():
        data = b"\n".join(raw for raw, _ in rows) + b"\n"
        path = os.path.join(directory, name)
        with (gzip.open(path, "wb") if name.endswith(".gz") else open(path, "wb")) as f:
            f.write(data)
        paths[name.split(".")[0]] = path
    return paths


def read_examples(out, part) -> list[dict]:
    """All Examples of OUT/part/*.tfrecord.gz, parsed in plain Python (TFRecord framing)."""
    import struct

    rows = []
    for path in sorted(glob.glob(os.path.join(out, part, "*.tfrecord.gz"))):
        data = gzip.open(path).read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            rows.append(features.parse_example(data[pos + 12:pos + 12 + n]))
            pos += 16 + n
    return rows


def read_lines(pattern) -> list[str]:
    out = []
    for path in sorted(glob.glob(pattern)):
        out += [line for line in open(path, encoding="utf-8").read().splitlines() if line]
    return out


def key(ex: dict) -> tuple:
    return tuple(sorted((k, tuple(v)) for k, v in ex.items()))


def all_outputs(out) -> dict:
    parts = {p: sorted(map(key, read_examples(out, p)))
             for p in ("train", "eval", "impressions/train", "impressions/eval", "corpus")}
    parts["doc_frequencies"] = sorted(read_lines(os.path.join(out, "doc_frequencies-*.tsv")))
    parts["dead"] = sorted(read_lines(os.path.join(out, "dead_letter", "dead-*.jsonl")))
    return parts


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """The hand-written raw dir through the CLI (the same function users run)."""
    base = tmp_path_factory.mktemp("bad")
    paths = write_raw(base / "raw")
    out = str(base / "out")
    code = cli.main(["pipeline", "examples", "--input", str(base / "raw"), "--output", out,
                     "--set", f"split.eval_fraction={EVAL_FRACTION}", "--history", str(HISTORY)])
    assert code == 0
    vdir = artifacts.resolve(out, "examples")
    assert vdir == os.path.join(out, "1")
    return paths, vdir, json.load(open(os.path.join(vdir, "stats.json")))


def test_every_bad_input_class_is_dead_lettered_with_file_line_reason(bad_run):
    paths, out, _ = bad_run
    expected = set()
    for name, rows in FILES.items():
        for line, (raw, reason) in enumerate(rows, 1):
            if reason:
                expected.add((paths[name.split(".")[0]], line, reason))
    dead = [json.loads(d) for d in read_lines(os.path.join(out, "dead_letter", "dead-*.jsonl"))]
    assert {(d["file"], d["line"], d["reason"]) for d in dead} == expected
    assert len(dead) == len(expected)
    covered = {d["reason"] for d in dead}
    assert covered == set(rawlog.REASONS)  # every reason of docs/data-format.md "Validation rules"
    for d in dead:
        assert d["detail"] and d["record"]
    utf8 = next(d for d in dead if d["reason"] == rawlog.INVALID_UTF8)
    assert "\\xe9" in utf8["record"]  # the bad byte is kept, visibly
    missing = next(d for d in dead if d["reason"] == rawlog.MISSING_FIELD
                   and d["file"] == paths["sessions"] and d["line"] == 10)
    assert "searcher_id" in missing["detail"]
    dup = next(d for d in dead if d["reason"] == rawlog.DUPLICATE_SESSION)
    assert "line 1" in dup["detail"]  # the first copy (by line) is the one kept


def test_counts_add_up_per_file_and_reason(bad_run):
    paths, _, stats = bad_run
    for name, rows in FILES.items():
        f = stats["files"][paths[name.split(".")[0]]]
        records = [r for r in rows if r[0]]
        bad = collections.Counter(reason for _, reason in records if reason)
        assert f["records_in"] == len(records)
        assert f["records_dead"] == sum(bad.values())
        assert f["records_out"] == len(records) - sum(bad.values())
        assert f["records_in"] == f["records_out"] + f["records_dead"]
        assert f["dead_by_reason"] == dict(bad)
    t = stats["totals"]
    assert t["records_in"] == t["records_out"] + t["records_dead"]
    assert stats["timings"]["pipeline_s"] > 0


def test_examples_features_split_and_sampling_probabilities(bad_run):
    _, out, stats = bad_run
    cfg = split.load(os.path.join(out, "split.json"))
    assert cfg == split.SplitConfig(split.HASH, EVAL_FRACTION)
    valid = {}
    for raw, reason in SESSIONS:
        if raw and not reason:
            s = json.loads(raw)
            valid[s["session_id"]] = s
    want = collections.defaultdict(set)
    for sid, s in valid.items():
        ev = split.is_eval(cfg, sid, int(s["timestamp"]))
        for d in s["clicks"]:
            want["eval" if ev else "train"].add((sid, d))
        for d in s.get("impressions") or []:
            if d not in s["clicks"]:
                want["impressions/eval" if ev else "impressions/train"].add((sid, d))
    got = {part: read_examples(out, part)
           for part in ("train", "eval", "impressions/train", "impressions/eval")}
    for part, rows in got.items():
        pairs = [(r["session_id"][0], r["doc_id"][0]) for r in rows]
        assert len(pairs) == len(set(pairs))
        assert set(pairs) == want[part], part
        assert stats["written"][part] == len(rows)
    assert want["train"] and want["eval"]  # the fixture exercises both sides of the split

    train_clicks = collections.Counter(d for _, d in want["train"])
    total = sum(train_clicks.values())
    docs = {json.loads(r)["doc_id"]: json.loads(r) for r, reason in DOCUMENTS if not reason}
    searchers = {json.loads(r)["searcher_id"]: json.loads(r) for r, reason in SEARCHERS
                 if not reason}
    for rows in got.values():
        for ex in rows:
            assert set(ex) == {f.name for f in features.SCHEMA} - {"negative_doc_ids"}
            s = valid[ex["session_id"][0]]
            doc = docs[ex["doc_id"][0]]
            assert ex["timestamp"] == [int(s["timestamp"])]
            assert ex["query"] == [s["query"]]
            assert ex["doc_sampling_prob"][0] == pytest.approx(train_clicks[doc["doc_id"]] / total)
            q = features.query_values(s["query"], searchers[s["searcher_id"]], [])
            d = features.document_values(doc)
            for name, value in {**q, **d}.items():
                if name != "history_doc_ids":
                    want_v = value if isinstance(value, list) else [value]
                    assert ex[name] == want_v, name
    freqs = [line.split("\t") for line in
             read_lines(os.path.join(out, "doc_frequencies-*.tsv"))]
    assert {d: int(n) for d, n, _ in freqs} == dict(train_clicks)
    assert sum(float(p) for _, _, p in freqs) == pytest.approx(1.0)
    corpus = read_examples(out, "corpus")
    assert sorted(c["doc_id"][0] for c in corpus) == sorted(docs)
    d2 = next(c for c in corpus if c["doc_id"] == ["d2"])
    assert d2["doc_text"] == ["Seattle Hikers"]  # the first copy, not the duplicate
    assert set(d2) == set(features.DOC_INPUTS)
    schema = json.load(open(os.path.join(out, "schema.json")))
    assert schema["schema_hash"] == features.schema_hash()


def test_stages_run_alone_on_in_memory_input(bad_run):
    """`RawLogsToExamples` (stages 1-5, no I/O) over chunks made in memory gives the examples,
    corpus, frequencies and dead letters that the full pipeline wrote."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    paths, vdir, _ = bad_run
    want = all_outputs(vdir)
    chunks = [(name.split(".")[0], paths[name.split(".")[0]],
               [(line, raw) for line, (raw, _) in enumerate(rows, 1) if raw])
              for name, rows in FILES.items()]
    cfg = ExamplesConfig(os.path.dirname(paths["sessions"]), "unused",
                         split.SplitConfig(eval_fraction=EVAL_FRACTION), history=HISTORY)
    with options.make_pipeline() as p:
        outs = (p | beam.Create(chunks)
                | examples.RawLogsToExamples(cfg, {k: paths[k] for k in rawlog.KINDS}))
        for tag in examples.EXAMPLE_OUTPUTS + (examples.CORPUS,):
            got = (outs[tag] | f"Flat[{tag}]" >> beam.FlatMap(lambda batch: batch)
                   | f"Key[{tag}]" >> beam.Map(lambda r: key(features.parse_example(r))))
            assert_that(got, equal_to(want[tag]), label=f"Check[{tag}]")
        assert_that(outs[examples.FREQ], equal_to(want["doc_frequencies"]), label="CheckFreq")
        dead = outs[examples.DEAD] | beam.Map(lambda d: json.dumps(d, ensure_ascii=False))
        assert_that(dead, equal_to(want["dead"]), label="CheckDead")


def test_resolved_configuration_is_written_into_the_version(bad_run):
    """`config.json` beside the output holds every setting, defaults included, and read back
    with `--config` it configures the same run."""
    import argparse

    from beam_pipelines import cli as pipeline_cli
    from ebr import config

    paths, vdir, _ = bad_run
    saved = config.read_file(os.path.join(vdir, config.CONFIG_FILE))
    want = ExamplesConfig(os.path.dirname(paths["sessions"]), os.path.dirname(vdir),
                          split.SplitConfig(eval_fraction=EVAL_FRACTION), history=HISTORY)
    assert config.from_dict(ExamplesConfig, saved) == want
    assert config.CONFIG_FILE in artifacts.read_commit(vdir)["files"]
    parser = argparse.ArgumentParser()
    pipeline_cli.register(parser.add_subparsers())
    args = parser.parse_args(["pipeline", "examples", "--config",
                              os.path.join(vdir, config.CONFIG_FILE), "--history", "2"])
    assert config.from_args(ExamplesConfig, args) == dataclasses.replace(want, history=2)


def test_history_is_earlier_training_clicks_only(bad_run):
    _, out, _ = bad_run
    cfg = split.load(os.path.join(out, "split.json"))
    by_sid = {}
    for part in ("train", "eval", "impressions/train", "impressions/eval"):
        for ex in read_examples(out, part):
            by_sid.setdefault(ex["session_id"][0], ex["history_doc_ids"])
    # u1: s1@100 (d1), s2@200 (d2, d4), s5@200 (d3), s6@400 (d1): s2 and s5 share a second.
    train = {sid: not split.is_eval(cfg, sid, ts) for sid, ts in
             (("s1", 100), ("s2", 200), ("s5", 200), ("s6", 400))}
    before_200 = ["d1"] if train["s1"] else []
    assert by_sid["s1"] == []
    assert by_sid["s2"] == before_200 and by_sid["s5"] == before_200
    at_400 = before_200 + (["d2", "d4"] if train["s2"] else []) + (["d3"] if train["s5"] else [])
    assert by_sid["s6"] == at_400[-HISTORY:]


# ---------------------------------------------------------------------------------------------
# Generated social data: leakage against an independent reference, runners, reruns.

@pytest.fixture(scope="module")
def social(tmp_path_factory):
    from ebr.datasets.social import generate_social

    base = tmp_path_factory.mktemp("social")
    generate_social(base / "raw", documents=300, sessions=1500, seed=7, progress=False)
    out = str(base / "out")
    stats = examples.run(ExamplesConfig(str(base / "raw"), out,
                                        split.SplitConfig(eval_fraction=0.25)))
    return base, artifacts.resolve(out, "examples"), stats


def _raw_sessions(raw_dir):
    path = rawlog.resolve_inputs(str(raw_dir))["sessions"]
    opener = gzip.open if path.endswith(".gz") else open
    return [json.loads(line) for line in opener(path, "rt") if line.strip()]


def test_history_has_no_leakage_against_reference(social):
    base, out, stats = social
    assert stats["totals"]["records_dead"] == 0
    cfg = split.load(os.path.join(out, "split.json"))
    sessions = _raw_sessions(base / "raw")
    click_times = collections.defaultdict(list)  # searcher -> [(ts, doc, is_eval)]
    for s in sessions:
        ev = split.is_eval(cfg, s["session_id"], s["timestamp"])
        for d in s["clicks"]:
            click_times[s["searcher_id"]].append((s["timestamp"], s["session_id"], d, ev))
    by_sid = {s["session_id"]: s for s in sessions}
    checked = nonempty = 0
    for part in ("train", "eval", "impressions/train", "impressions/eval"):
        for ex in read_examples(out, part):
            s = by_sid[ex["session_id"][0]]
            ts = s["timestamp"]
            earlier = sorted((t, sid) for t, sid, _, ev in click_times[s["searcher_id"]]
                             if t < ts and not ev)
            reference = [d for t, sid in dict.fromkeys(earlier)
                         for tt, ss, d, ev in click_times[s["searcher_id"]]
                         if ss == sid and tt == t]
            assert ex["history_doc_ids"] == reference[-features.HISTORY_LENGTH:]
            # every history entry is a training click strictly before the example's time
            allowed = collections.Counter(d for t, _, d, ev in click_times[s["searcher_id"]]
                                          if t < ts and not ev)
            assert not collections.Counter(ex["history_doc_ids"]) - allowed
            checked += 1
            nonempty += bool(ex["history_doc_ids"])
    assert checked == sum(stats["written"][p] for p in examples.EXAMPLE_OUTPUTS)
    assert nonempty > checked // 4  # the data really exercises history


def test_multiprocessing_two_workers_matches_in_memory(social):
    base, out, _ = social
    out_mp = str(base / "out_mp")
    examples.run(ExamplesConfig(str(base / "raw"), out_mp,
                                split.SplitConfig(eval_fraction=0.25)),
                 ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    out_mp = artifacts.resolve(out_mp, "examples")
    a, b = all_outputs(out), all_outputs(out_mp)
    assert a == b
    assert len(a["train"]) > 500 and a["impressions/train"] and a["eval"]
    sa = json.load(open(os.path.join(out, "stats.json")))
    sb = json.load(open(os.path.join(out_mp, "stats.json")))
    assert sa["files"] == sb["files"] and sa["written"] == sb["written"]
    assert "--direct_running_mode=multi_processing" in sb["runner"]


def _files(vdir) -> list[str]:
    return sorted(os.path.relpath(p, vdir) for p in glob.glob(os.path.join(vdir, "**"),
                                                              recursive=True)
                  if os.path.isfile(p))


def test_rerun_over_same_output_commits_a_new_version_with_no_stale_files(tmp_path):
    write_raw(tmp_path / "raw")
    out = str(tmp_path / "out")
    first = examples.run(ExamplesConfig(str(tmp_path / "raw"), out, num_shards=3))
    v1 = artifacts.resolve(out, "examples")
    assert first["split"]["method"] == split.HASH and first["output"] == v1
    assert len(glob.glob(os.path.join(v1, "train", "*-of-00003.tfrecord.gz"))) == 3
    cutoff = 200
    second = examples.run(ExamplesConfig(
        str(tmp_path / "raw"), out, split.SplitConfig(split.TIME, time_cutoff=cutoff),
        num_shards=1))
    v2 = artifacts.resolve(out, "examples")
    assert v2 == os.path.join(out, "2") and artifacts.versions(out) == [1, 2]
    files = _files(v2)
    assert not [f for f in files if "-of-00003" in f]
    assert all("-of-00001" in f for f in files if f.endswith((".gz", ".tsv", ".jsonl")))
    assert not [f for f in files if f.startswith(("_counts", "beam-temp"))]
    assert set(artifacts.read_commit(v2)["files"]) == set(files) - {artifacts.COMMIT_MARKER}
    assert json.load(open(os.path.join(v2, "split.json")))["method"] == split.TIME
    assert second["totals"] == first["totals"]
    assert all(e["timestamp"][0] >= cutoff for e in read_examples(v2, "eval"))
    assert all(e["timestamp"][0] < cutoff for e in read_examples(v2, "train"))
    # The previous version stays readable (keep=2) until a third run prunes it.
    assert json.load(open(os.path.join(v1, "split.json")))["method"] == split.HASH
    examples.run(ExamplesConfig(str(tmp_path / "raw"), out, num_shards=1))
    assert artifacts.versions(out) == [2, 3] and artifacts.all_versions(out) == [2, 3]
    assert not os.path.exists(v1)
    assert sorted(os.listdir(tmp_path)) == ["out", "raw"]  # no temp or old copies beside OUT


def _kill_mid_publish(argv: list[str], vdir: str, env: dict | None = None,
                      timeout: float = 300) -> None:
    """Runs `ebr ARGV` in a subprocess and SIGKILLs it once `vdir` (the version it writes)
    has content, before its commit marker appears."""
    log = open(os.path.join(os.path.dirname(vdir) + ".kill.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ebr.cli", *argv], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    marker = os.path.join(vdir, artifacts.COMMIT_MARKER)
    deadline = time.monotonic() + timeout
    try:
        while not (os.path.isdir(vdir) and os.listdir(vdir)):
            assert proc.poll() is None, (
                f"ebr exited ({proc.returncode}) before {vdir} appeared: "
                + open(log.name, errors="replace").read()[-2000:])
            assert time.monotonic() < deadline, f"{vdir} did not appear within {timeout}s"
            time.sleep(0.01)
        assert not os.path.exists(marker), "the run committed before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.isdir(vdir) and not os.path.exists(marker)


def test_run_killed_mid_publish_leaves_previous_version_and_next_run_cleans_up(tmp_path):
    write_raw(tmp_path / "raw")
    out = str(tmp_path / "out")
    first = examples.run(ExamplesConfig(str(tmp_path / "raw"), out))
    v1 = artifacts.resolve(out, "examples")
    before = all_outputs(v1)
    _kill_mid_publish(["pipeline", "examples", "--input", str(tmp_path / "raw"),
                       "--output", out], os.path.join(out, "2"))
    # Readers still resolve and read the previous version; the leftover is ignored.
    assert artifacts.resolve(out, "examples") == v1
    assert artifacts.uncommitted(out) == [2]
    assert all_outputs(artifacts.resolve(out, "examples")) == before
    with pytest.raises(artifacts.UncommittedVersion, match="not committed"):
        artifacts.resolve(os.path.join(out, "2"), "examples")
    leftover = os.path.join(out, "2", "left-by-the-killed-run")
    open(leftover, "w").write("x")
    # The next writer removes the leftover and commits the next version number (a number
    # once used is never reused: docs/contracts.md, "Commit protocol").
    second = examples.run(ExamplesConfig(str(tmp_path / "raw"), out))
    v2 = artifacts.resolve(out, "examples")
    assert v2 == os.path.join(out, "3") and artifacts.versions(out) == [1, 3]
    assert artifacts.uncommitted(out) == [] and not os.path.exists(os.path.dirname(leftover))
    artifacts.verify(v2)
    assert all_outputs(v2) == before and second["totals"] == first["totals"]


def test_examples_on_gcs(gcs_root, tmp_path):
    """Raw logs in and examples out on gs:// (Beam's gcsio sinks, ebr.storage in the driver)."""
    import tensorflow as tf

    paths = write_raw(tmp_path / "raw")
    raw = storage.join(gcs_root, "raw")
    for path in paths.values():
        storage.copy_file(path, storage.join(raw, os.path.basename(path)))
    out = storage.join(gcs_root, "examples")
    stats = examples.run(ExamplesConfig(raw, out, num_shards=1))
    vdir = artifacts.resolve(out, "examples")
    assert vdir == f"{out}/1" and stats["output"] == vdir
    artifacts.verify(vdir)
    got = storage.read_json(storage.join(vdir, "stats.json"))
    assert got["totals"] == stats["totals"] and got["files"][f"{raw}/sessions.jsonl"]
    train = storage.glob(storage.join(vdir, "train", "examples-*.tfrecord.gz"))
    rows = [features.parse_example(r.numpy())
            for r in tf.data.TFRecordDataset(train, compression_type="GZIP")]
    assert len(rows) == stats["written"]["train"] > 0
    assert not [f for f in storage.walk_files(vdir) if f.startswith(("_counts", "beam-temp"))]


# ---------------------------------------------------------------------------------------------
# Fast checks (no pipeline run)

def test_missing_or_unreadable_input_is_an_error_naming_the_file(tmp_path):
    write_raw(tmp_path / "raw")
    os.remove(tmp_path / "raw" / "sessions.jsonl")
    with pytest.raises(FileNotFoundError, match="sessions.jsonl"):
        examples.run(ExamplesConfig(str(tmp_path / "raw"), str(tmp_path / "out")))
    (tmp_path / "raw" / "sessions.jsonl.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(OSError, match="sessions.jsonl.gz"):
        examples.run(ExamplesConfig(str(tmp_path / "raw"), str(tmp_path / "out")))
    assert cli.main(["pipeline", "examples", "--input", str(tmp_path / "nope"),
                     "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_an_unrelated_directory(tmp_path):
    write_raw(tmp_path / "raw")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="refusing"):
        examples.run(ExamplesConfig(str(tmp_path / "raw"), str(tmp_path / "home")))
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
    assert os.listdir(tmp_path / "home") == ["thesis.tex"]


def test_empty_query_allowed_only_when_asked():
    raw = _s("m1", "u1", 5, "", ["d1"])
    with pytest.raises(rawlog.BadRecord) as e:
        rawlog.validate(rawlog.SESSIONS, raw)
    assert e.value.reason == rawlog.EMPTY_QUERY and "--allow-empty-query" in e.value.detail
    assert rawlog.validate(rawlog.SESSIONS, raw, allow_empty_query=True)["query"] == ""
    assert rawlog.validate(rawlog.SESSIONS, _s("m2", "u1", 5, " \t", []),
                           allow_empty_query=True)["query"] == ""
    with pytest.raises(rawlog.BadRecord, match=rawlog.QUERY_TOO_LONG):
        rawlog.validate(rawlog.SESSIONS, _s("m3", "u1", 5, LONG, []), allow_empty_query=True)


def test_split_is_deterministic_and_near_the_fraction():
    cfg = split.SplitConfig(eval_fraction=0.2, salt="abc")
    ids = [f"s{i}" for i in range(20_000)]
    first = [split.is_eval(cfg, s, 0) for s in ids]
    assert first == [split.is_eval(split.from_json(split.to_json(cfg)), s, 0) for s in ids]
    assert abs(sum(first) / len(ids) - 0.2) < 0.015
    other = [split.is_eval(split.SplitConfig(eval_fraction=0.2, salt="xyz"), s, 0) for s in ids]
    assert other != first  # the salt matters
    tcfg = split.SplitConfig(split.TIME, time_cutoff=100)
    assert split.is_eval(tcfg, "a", 100) and not split.is_eval(tcfg, "a", 99)
    with pytest.raises(ValueError, match="time_cutoff"):
        split.SplitConfig(split.TIME)


def test_fast_example_bytes_equal_make_example():
    values = {
        "query": "café ☕ " * 30, "searcher_id": "u1", "searcher_friends": [f"u{i}" for i in range(90)],
        "history_doc_ids": [], "searcher_attributes": ["age:30", "x" * 300],
        "timestamp": -1_546_300_800, "doc_sampling_prob": 1e-7, "session_id": "s1",
        "doc_members": ["a"], "negative_doc_ids": ["n1", "n2"],
    }
    for name, value in values.items():
        assert example_bytes.join(example_bytes.entries({name: value})) == \
            features.make_example({name: value}), name
    merged = example_bytes.join(example_bytes.entries({k: values[k] for k in list(values)[:5]}),
                                example_bytes.entries({k: values[k] for k in list(values)[5:]}))
    assert features.parse_example(merged) == features.parse_example(features.make_example(values))
    with pytest.raises(KeyError):
        example_bytes.entries({"no_such_feature": "x"})


def test_local_runner_needs_no_download():
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    for args in (None, ["--runner=DirectRunner"], ["--direct_running_mode=multi_processing",
                                                   "--direct_num_workers=2"]):
        p = options.make_pipeline(args)
        assert isinstance(p.runner, fn_runner.FnApiRunner), args  # never the Prism path
    argv, local = options.normalize_args(["--runner=DataflowRunner", "--project=p"])
    assert not local and "--runner=DataflowRunner" in argv
