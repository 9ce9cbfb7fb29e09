"""The offline hard-negative window: ranks, exclusion of positives, the easy:hard ratio, and
`ebr mine-negatives` end to end (examples artifact in, a new examples version out)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from tower_fixtures import write_hashed_query_tower

from beam_pipelines import mining


def ranked(n):
    return [f"d{r}" for r in range(1, n + 1)]  # d{r} sits at 1-based rank r


def test_window_is_one_based_and_inclusive():
    assert mining.window_candidates(ranked(600), [], (101, 500)) == [f"d{r}" for r in range(101, 501)]
    assert mining.window_candidates(ranked(600), [], (1, 1)) == ["d1"]
    # results shorter than the window: whatever lies inside
    assert mining.window_candidates(ranked(150), [], (101, 500)) == [f"d{r}" for r in range(101, 151)]
    assert mining.window_candidates(ranked(50), [], (101, 500)) == []


def test_positives_and_clicks_excluded_whatever_their_rank():
    exclude = {"d101", "d250", "d500", "d3"}
    cands = mining.window_candidates(ranked(600), exclude, (101, 500))
    assert len(cands) == 400 - 3 and not exclude & set(cands)
    rng = np.random.default_rng(0)
    for _ in range(50):
        picks = mining.sample_window(ranked(600), exclude, 8, rng, (101, 500))
        assert len(picks) == len(set(picks)) == 8
        assert not exclude & set(picks)
        assert all(101 <= int(p[1:]) <= 500 for p in picks)
    # fewer candidates than asked: all of them
    assert mining.sample_window(ranked(103), {"d102"}, 5, rng, (101, 500)) == ["d101", "d103"]


def test_sampling_covers_window_uniformly_and_is_seeded():
    rng = np.random.default_rng(1)
    counts = np.zeros(3)
    for _ in range(3000):
        (p,) = mining.sample_window(ranked(10), [], 1, rng, (4, 6))
        counts[int(p[1:]) - 4] += 1
    assert np.all(np.abs(counts / 3000 - 1 / 3) < 0.04)
    cfg = mining.MiningConfig(window_start=2, window_end=40, per_query=3, ratio="0:1", seed=7)
    a = mining.mine_batch([ranked(50)] * 4, [set()] * 4, ["k1", "k2", "k3", "k4"], cfg)
    b = mining.mine_batch([ranked(50)] * 4, [set()] * 4, ["k1", "k2", "k3", "k4"], cfg)
    assert a == b and all(len(x) == 3 for x in a) and len({tuple(x) for x in a}) > 1
    c = mining.mine_batch([ranked(50)] * 4, [set()] * 4, ["k1", "k2", "k3", "k4"],
                          mining.MiningConfig(2, 40, 3, "0:1", seed=8))
    assert c != a


@pytest.mark.parametrize("ratio,fraction", [("100:1", 1 / 101), ("1:1", 0.5), ("1:0", 0.0),
                                            ("0:1", 1.0), ("3:1", 0.25)])
def test_ratio_is_share_of_examples_with_hard_negatives(ratio, fraction):
    assert mining.hard_fraction(ratio) == pytest.approx(fraction)
    n = 40_000
    cfg = mining.MiningConfig(ratio=ratio, window_start=1, window_end=5)
    out = mining.mine_batch([ranked(5)] * n, [set()] * n, [f"s{i}/d" for i in range(n)], cfg)
    share = sum(bool(x) for x in out) / n
    sd = max((fraction * (1 - fraction) / n) ** 0.5, 1e-9)
    assert abs(share - fraction) <= 4 * sd
    # selection depends only on the key: a rerun selects the same examples
    again = mining.mine_batch([ranked(5)] * 100, [set()] * 100, [f"s{i}/d" for i in range(100)], cfg)
    assert again == out[:100]


def test_bad_config_is_clear():
    with pytest.raises(ValueError, match="START-END"):
        mining.parse_window("101_500")
    with pytest.raises(ValueError, match="1 <= START <= END"):
        mining.parse_window("500-101")
    with pytest.raises(ValueError, match="EASY:HARD"):
        mining.parse_ratio("100/1")
    with pytest.raises(ValueError, match="not both 0"):
        mining.parse_ratio("0:0")
    with pytest.raises(ValueError, match="max_values"):
        mining.MiningConfig(per_query=1000)
    with pytest.raises(ValueError, match="same length"):
        mining.mine_batch([ranked(5)], [], ["k"], mining.MiningConfig())


# --------------------------------------------------------------------------------------------
# `ebr mine-negatives` end to end: a real Beam run over a real exact index. The query tower is a
# small SavedModel written here to the export contract (docs/contracts.md 3), so the ranks each
# query sees are known independently of any training.

DIM, N_DOCS, TEXT_BUCKETS = 8, 700, 40


def _write_examples(path, examples):
    import tensorflow as tf

    from ebr import features

    path.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(path / "examples-00000-of-00001.tfrecord.gz"),
                              tf.io.TFRecordOptions(compression_type="GZIP")) as w:
        for ex in examples:
            w.write(features.make_example(ex))


def _read_examples(pattern):
    import glob

    import tensorflow as tf

    from ebr import features

    out = []
    for f in sorted(glob.glob(pattern)):
        for rec in tf.data.TFRecordDataset(f, compression_type="GZIP"):
            out.append(features.parse_example(rec.numpy()))
    return out


@pytest.fixture(scope="module")
def mining_setup(tmp_path_factory):
    from index import build_index
    from index.embeddings import write_embeddings

    root = tmp_path_factory.mktemp("mine")
    rng = np.random.default_rng(3)
    doc_ids = [f"d{i}" for i in range(N_DOCS)]
    X = rng.normal(size=(N_DOCS, DIM)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    emb = write_embeddings(root / "emb", doc_ids, X, model_version=1)
    build_index(emb, root / "index", backend="exact")
    (root / "model" / "query_tower").mkdir(parents=True)
    write_hashed_query_tower(root / "model" / "query_tower" / "1", DIM, seed=0, buckets=TEXT_BUCKETS)

    examples = []
    for i in range(120):
        searcher = f"u{i % 15}"
        examples.append({"query": f"name {i % 23}", "searcher_id": searcher, "session_id": f"s{i}",
                         "doc_id": doc_ids[int(rng.integers(N_DOCS))], "timestamp": i,
                         "history_doc_ids": [doc_ids[int(j)] for j in rng.integers(0, N_DOCS, 3)],
                         "doc_sampling_prob": 0.01})
    from ebr import artifacts

    ex_dir = root / "examples" / "1"  # an examples artifact, version 1 (docs/contracts.md 2)
    _write_examples(ex_dir / "train", examples)
    _write_examples(ex_dir / "eval", examples[:5])
    (ex_dir / "split.json").write_text('{"method": "hash"}')
    (ex_dir / "doc_frequencies-00000-of-00001.tsv").write_text("d1\t1\t1.0\n")
    artifacts.commit(str(ex_dir))
    return root, examples, X, doc_ids


def test_mine_negatives_pipeline_window_exclusions_and_ratio(mining_setup):
    from beam_pipelines.mine_negatives import run
    from beam_pipelines.mining import MineConfig
    from serving.retrieval.embedder import LocalEncoder, build_inputs
    from ebr import config

    root, examples, X, doc_ids = mining_setup
    cfg = MineConfig(examples=str(root / "examples"), model=str(root / "model" / "query_tower"),
                     index=str(root / "index"), output=str(root / "mined"), batch_size=16,
                     mining=mining.MiningConfig(window_start=11, window_end=60, per_query=3,
                                                ratio="1:1", seed=5))
    from ebr import artifacts

    summary = run(cfg)
    mined = artifacts.resolve(str(root / "mined"), "examples")
    assert summary["output"] == mined == str(root / "mined" / "1")
    assert summary["examples"] == str(root / "examples" / "1")
    out = _read_examples(os.path.join(mined, "train", "*.tfrecord.gz"))
    assert len(out) == len(examples) == summary["counts"]["examples_written"]
    by_key = {(e["session_id"][0], e["doc_id"][0]): e for e in out}
    selected = {(e["session_id"], e["doc_id"]) for e in examples
                if mining.carries_hard_negatives(f"{e['session_id']}/{e['doc_id']}", "1:1", 5)}
    assert 0 < len(selected) < len(examples)
    assert summary["counts"]["examples_mined"] == len(selected)

    encoder = LocalEncoder(root / "model" / "query_tower" / "1")
    clicked = {}
    for e in examples:
        clicked.setdefault(e["searcher_id"], set()).add(e["doc_id"])
    for e in examples:
        got = by_key[(e["session_id"], e["doc_id"])]
        negs = got.get("negative_doc_ids", [])
        if (e["session_id"], e["doc_id"]) not in selected:
            assert negs == []
            continue
        assert len(negs) == 3 and len(set(negs)) == 3
        q = encoder.embed(build_inputs([{"query": e["query"]}]))[0]
        rank = {doc_ids[j]: r + 1 for r, j in enumerate(np.argsort(-(X @ q), kind="stable"))}
        assert all(11 <= rank[n] <= 60 for n in negs), [rank[n] for n in negs]
        assert not set(negs) & (clicked[e["searcher_id"]] | set(e["history_doc_ids"]))
        assert got["query"] == [e["query"]] and got["history_doc_ids"] == e["history_doc_ids"]
    # the other parts of the examples version come along; the summary says what was done
    assert os.path.isdir(os.path.join(mined, "eval"))
    assert os.path.exists(os.path.join(mined, "split.json"))
    assert os.path.exists(os.path.join(mined, "doc_frequencies-00000-of-00001.tsv"))
    assert json.load(open(os.path.join(mined, "mining.json")))["counts"] == summary["counts"]
    saved = config.read_file(os.path.join(mined, config.CONFIG_FILE))
    assert config.from_dict(MineConfig, saved) == cfg
    artifacts.verify(mined)
    assert summary["hard_fraction"] == 0.5 and summary["model_version"] == 1

    # a rerun commits a new version with the same (seeded) negatives; the output is itself an
    # examples artifact, so mining it again (model N+1) takes it as --examples
    run(cfg)
    assert artifacts.versions(str(root / "mined")) == [1, 2]
    again = _read_examples(os.path.join(artifacts.resolve(str(root / "mined")), "train",
                                        "*.tfrecord.gz"))
    assert sorted(map(str, again)) == sorted(map(str, out))


def test_mine_negatives_refuses_a_mismatched_index(mining_setup, tmp_path):
    from beam_pipelines.mine_negatives import run
    from beam_pipelines.mining import MineConfig
    from index import build_index
    from index.embeddings import write_embeddings

    root, *_ = mining_setup
    emb = write_embeddings(tmp_path / "emb", ["a", "b"], np.eye(2, 4, dtype=np.float32), model_version=1)
    build_index(emb, tmp_path / "index", backend="exact")
    cfg = MineConfig(examples=str(root / "examples"), model=str(root / "model" / "query_tower"),
                     index=str(tmp_path / "index"), output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="dimension"):
        run(cfg)
    with pytest.raises(FileNotFoundError, match="no training examples"):
        run(MineConfig(examples=str(tmp_path), model=cfg.model, index=cfg.index, output=cfg.output))
    assert not (tmp_path / "out").exists()


def test_mine_negatives_flags_come_from_mine_config(tmp_path):
    """`ebr mine-negatives` flags are MineConfig's fields; the window and the mix are set in its
    `mining` section; a missing path is one error line naming the flag."""
    import argparse

    from beam_pipelines import cli as pipeline_cli
    from beam_pipelines.mining import MineConfig
    from ebr import cli, config

    parser = argparse.ArgumentParser()
    pipeline_cli.register(parser.add_subparsers())
    args = parser.parse_args([
        "mine-negatives", "--examples", "EX", "--model", "M", "--index", "I", "--output", "O",
        "--batch-size", "16", "--search-params", "nprobe=64", "--set", "mining.window_start=11",
        "--set", "mining.window_end=60", "--set", "mining.ratio=1:1", "--", "--runner=X"])
    assert config.from_args(MineConfig, args) == MineConfig(
        examples="EX", model="M", index="I", output="O", batch_size=16,
        search_params={"nprobe": 64},
        mining=mining.MiningConfig(window_start=11, window_end=60, ratio="1:1"))
    assert "--runner=X" in args.beam_args
    with pytest.raises(ValueError, match="--index is required"):
        config.from_args(MineConfig, parser.parse_args(
            ["mine-negatives", "--examples", "EX", "--model", "M", "--output", "O"]))
    with pytest.raises(ValueError, match="mining window"):
        config.from_args(MineConfig, parser.parse_args(
            ["mine-negatives", "--examples", "EX", "--model", "M", "--index", "I", "--output",
             "O", "--set", "mining.window_start=600"]))
    assert cli.main(["mine-negatives", "--examples", str(tmp_path), "--model", "M",
                     "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def _versioned_examples(root, files: dict, eval_examples):
    """An examples artifact, version 1, whose train/ holds one GZIP TFRecord file per entry of
    `files` (name -> list of example dicts, or raw bytes for a record that is not an Example)."""
    import tensorflow as tf

    from ebr import artifacts, features

    vdir = root / "1"
    (vdir / "train").mkdir(parents=True)
    for name, records in files.items():
        with tf.io.TFRecordWriter(str(vdir / "train" / name),
                                  tf.io.TFRecordOptions(compression_type="GZIP")) as w:
            for r in records:
                w.write(r if isinstance(r, bytes) else features.make_example(r))
    _write_examples(vdir / "eval", eval_examples)
    (vdir / "split.json").write_text('{"method": "hash"}')
    artifacts.commit(str(vdir))
    return vdir


def test_mine_negatives_accounts_for_every_record(mining_setup, tmp_path):
    """Counters are what the files hold: with 62 earlier negatives and 5 mined per example,
    `negative_doc_ids` (at most 64) keeps 2 of them, and `hard_negatives` says 2 per example,
    not 5; a record that is not an Example is a dead letter naming its own file (not the
    glob); per file and in total, records in = written + dead."""
    from beam_pipelines.mine_negatives import UNPARSABLE, run
    from beam_pipelines.mining import MineConfig
    from ebr import artifacts, features

    root, examples, _, doc_ids = mining_setup
    limit = features.BY_NAME[features.NEGATIVE_DOC_IDS].max_values
    earlier = [f"imp{j}" for j in range(limit - 2)]  # not corpus documents: never mined again
    full = [{**e, "negative_doc_ids": earlier} for e in examples[:40]]
    plain = examples[40:60]
    ex_dir = _versioned_examples(tmp_path / "examples", {
        "examples-00000-of-00002.tfrecord.gz": full,
        "examples-00001-of-00002.tfrecord.gz": plain[:10] + [b"\xff\xfe not an example"] + plain[10:],
    }, examples[:5])
    cfg = MineConfig(examples=str(tmp_path / "examples"), model=str(root / "model" / "query_tower"),
                     index=str(root / "index"), output=str(tmp_path / "mined"), batch_size=16,
                     mining=mining.MiningConfig(window_start=11, window_end=60, per_query=5,
                                                ratio="0:1", seed=1))
    summary = run(cfg)
    counts = summary["counts"]
    mined = artifacts.resolve(str(tmp_path / "mined"), "examples")
    out = _read_examples(os.path.join(mined, "train", "*.tfrecord.gz"))
    before = {e["session_id"]: len(e.get("negative_doc_ids", [])) for e in full + plain}
    added = [len(e.get("negative_doc_ids", [])) - before[e["session_id"][0]] for e in out]

    # what the counters say is what was written
    assert len(out) == counts["examples_written"] == len(full) + len(plain)
    assert counts["hard_negatives"] == sum(added) == 2 * len(full) + 5 * len(plain)
    assert counts["hard_negatives_cut"] == 3 * len(full)
    assert counts["examples_mined"] == len(out) and counts["window_empty"] == 0
    assert all(len(e["negative_doc_ids"]) == limit for e in out if e["session_id"][0] in
               {x["session_id"] for x in full})

    # the corrupt record: one dead letter naming its file and the reason
    bad_file = str(ex_dir / "train" / "examples-00001-of-00002.tfrecord.gz")
    dead = [json.loads(line) for f in sorted((Path(mined) / "dead_letter").glob("dead-*"))
            for line in f.read_text().splitlines() if line]
    assert len(dead) == counts["dead_letter"] == 1
    assert dead[0]["file"] == bad_file and dead[0]["reason"] == UNPARSABLE
    assert "*" not in dead[0]["file"]

    # in = written + dead, per file and in total, also in the committed mining.json
    files = json.load(open(os.path.join(mined, "mining.json")))["files"]
    assert files == summary["files"]
    assert {f: (c["records_in"], c["records_out"], c["records_dead"]) for f, c in files.items()} == {
        str(ex_dir / "train" / "examples-00000-of-00002.tfrecord.gz"): (40, 40, 0),
        bad_file: (21, 20, 1)}
    assert files[bad_file]["dead_by_reason"] == {UNPARSABLE: 1}
    assert counts["examples_read"] == counts["examples_written"] + counts["dead_letter"] == 61


def test_merge_negatives_counts_only_what_fits():
    from beam_pipelines.mine_negatives import merge_negatives
    from ebr import features

    limit = features.BY_NAME[features.NEGATIVE_DOC_IDS].max_values
    assert merge_negatives(["a", "b"], ["c", "a", "d"]) == (["a", "b", "c", "d"], 2)
    earlier = [f"e{j}" for j in range(limit - 1)]
    merged, added = merge_negatives(earlier, ["x", "y", "z"])
    assert merged == earlier + ["x"] and added == 1
    assert merge_negatives([f"e{j}" for j in range(limit + 3)], ["x"])[1] == 0
