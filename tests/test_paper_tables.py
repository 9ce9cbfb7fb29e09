"""Smoke run of `ebr experiment paper-tables` end to end (two seeds in two worker processes,
minimal sizes), plus checks of the training-set variants it builds (hard positives, impression
negatives/positives, mined negatives) on the run's own artifacts: committed examples versions
(docs/contracts.md 2). One test writes the variants and the report to gs:// through the Cloud
Storage emulator (tests/gcs_emulator.py)."""
import json
import math
import re

import pytest

from ebr import artifacts, storage
from experiments import ablations
from experiments import paper_tables as pt

TINY = ["documents=400", "sessions=1500", "epochs=1", "batch_size=64", "embedding_dim=16",
        "feature_dim=8", "text_dim=16", "hidden_units=32", "hash_bucket_cap=2000",
        "text_buckets=2000", "online_hard=0,2", "windows=11-60", "default_window=11-60",
        "ratios=0:1", "default_ratio=0:1", "ensemble_hard_model=mined_11-60_0:1",
        "ensemble_alphas=1.0", "cascade_n=100", "ann_pq_bytes=4", "ann_nprobes=1,4",
        "impression_negatives_max=4", "e1_online_hard=2"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_tables")
    report = pt.main(quick=True, seeds=2, out=str(out), overrides=TINY, jobs=2)
    return out, report


def _read(pattern):
    import tensorflow as tf

    from ebr import features

    return [features.parse_example(r.numpy()) for f in storage.glob(str(pattern))
            for r in tf.data.TFRecordDataset(f, compression_type="GZIP")]


def _train(examples):
    """The training examples of the newest committed version of an examples artifact."""
    return _read(storage.join(artifacts.resolve(str(examples), "examples"), "train",
                              "*.tfrecord.gz"))


def test_report_structure_and_numbers(smoke):
    out, report = smoke
    text = open(report).read()
    for exp, title in pt.EXPERIMENT_TITLES.items():
        assert f"## {exp}. {title}" in text
    assert "## Summary against the paper" in text and "## Appendix: models" in text
    assert "Command: `ebr experiment paper-tables --quick --seeds 2" in text
    assert "with 2 seed(s) at a time" in text
    for png in ("e1_by_type.png", "e2.png", "e3.png", "e4.png", "e5.png", "e6.png", "e7.png", "e8_ann.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in text
    results = json.loads((out / "results.json").read_text())
    cfg = pt.make_config(True, TINY)
    _, rows = pt.plan(cfg)
    assert {r["name"] for r in results["rows"]} == {r.name for r in rows}
    assert set(results["aggregate"]) == {r.name for r in rows}
    for row, metrics in results["aggregate"].items():
        assert f"`{row}`" in text  # every row is named in the report, so it can be rerun alone
        for name, m in metrics.items():
            assert m["n"] == 2 and all(math.isfinite(v) for v in m["values"]), (row, name)
            if "recall" in name:
                assert 0.0 <= m["mean"] <= 1.0, (row, name, m)
    # experiment 1 under the second recipe: both models with 2 online hard negatives
    assert {"e1.text_only.online_hard_2", "e1.unified.online_hard_2"} <= set(results["aggregate"])
    assert "Second recipe (not a paper claim): with 2 online hard negatives in both models" in text
    # each claim gets a verdict from the numbers; a disagreement carries its explanation
    verdicts = re.findall(r"\*\*(agrees|disagrees|inconclusive|partly|not measured)\*\*", text)
    assert len(verdicts) >= 2 * len(pt.claims(cfg))
    assert text.count("Why it may differ") == sum(v != "agrees" for v in verdicts) // 2
    # the exact-search row of experiment 8 is the reference: recall 1 against itself
    assert results["aggregate"]["e8.exact"]["ann_recall@10"]["mean"] == 1.0
    # the seeds are different data: their numbers differ, and the report's ± is their spread
    assert [f["seed"] for f in results["facts"]] == [0, 1]
    unified = results["aggregate"]["e1.unified"]["recall@10"]
    assert unified["values"][0] != unified["values"][1] and unified["std"] > 0
    assert results["aggregate"]["e8.PQ4.nprobe_1"]["scanned"]["mean"] < 400


def test_training_set_variants(smoke):
    out, _ = smoke
    work = out / "work" / "seed0"
    # every training set is a committed examples artifact, the base one and each variant
    for name in ("examples", "data/hard_positives", "data/impression_negatives",
                 "data/impression_positives", "data/mined_11-60_all"):
        vdir = artifacts.resolve(str(work / name), "examples")
        marker = artifacts.read_commit(vdir)
        artifacts.verify(vdir, marker)
        assert any(f.startswith("train/") for f in marker["files"]), name
        assert {"corpus", "eval", "split.json"} <= set(storage.listdir(vdir)), name
    base = _train(work / "examples")
    sessions = [json.loads(line) for line in open(work / "raw" / "sessions.jsonl")]
    by_id = {s["session_id"]: s for s in sessions}

    # hard positives: base examples + copies carrying the failed query of a failed session
    hp = _train(work / "data" / "hard_positives")
    copies = [e for e in hp if e["session_id"][0].endswith("~hardpos")]
    assert len(hp) == len(base) + len(copies) and copies
    for e in copies:
        failed = by_id[e["session_id"][0][:-len("~hardpos")]]
        assert failed["clicks"] == [] and e["query"] == [failed["query"]]

    # impression negatives: the session's non-clicked impressions, never its clicks
    neg = _train(work / "data" / "impression_negatives")
    assert len(neg) == len(base) and any(e.get("negative_doc_ids") for e in neg)
    for e in neg:
        s = by_id[e["session_id"][0]]
        assert set(e.get("negative_doc_ids", [])) <= set(s["impressions"]) - set(s["clicks"])
        assert len(e.get("negative_doc_ids", [])) <= 4

    # impression positives: clicks plus the impressions output
    pos = _train(work / "data" / "impression_positives")
    imp = _read(storage.join(artifacts.resolve(str(work / "examples"), "examples"),
                             "impressions", "train", "*.tfrecord.gz"))
    assert len(pos) == len(base) + len(imp)

    # mined (hard only, 0:1): every example carries a negative that is not one of its searcher's clicks
    mined_dir = artifacts.resolve(str(work / "data" / "mined_11-60_all"), "examples")
    mined = _train(mined_dir)
    clicked = {}
    for e in base:
        clicked.setdefault(e["searcher_id"][0], set()).add(e["doc_id"][0])
    assert len(mined) == len(base)
    assert sum(bool(e.get("negative_doc_ids")) for e in mined) > 0.9 * len(mined)
    for e in mined:
        assert not set(e.get("negative_doc_ids", [])) & clicked[e["searcher_id"][0]]
    summary = storage.read_json(storage.join(mined_dir, "mining.json"))
    assert summary["hard_fraction"] == 1.0 and summary["counts"]["examples_read"] == len(base)


def test_rows_and_config_errors():
    cfg = pt.make_config(True, TINY)
    _, rows = pt.plan(cfg)
    picked = pt.select_rows(rows, ["e4.online_hard_2"])
    assert [r.name for r in picked] == ["e4.online_hard_0", "e4.online_hard_2"]  # with its baseline
    with pytest.raises(ValueError, match="unknown row"):
        pt.select_rows(rows, ["e9.nothing"])
    with pytest.raises(ValueError, match="unknown field"):
        pt.make_config(True, ["no_such_field=1"])
    with pytest.raises(ValueError, match="START-END"):
        pt.make_config(True, ["windows=1to100"])


def test_variants_and_report_on_gcs(smoke, gcs_root):
    """The training-set variants and the report written to gs:// (the emulator): derived
    examples artifacts committed there, ratio restriction equal to the local one, plots and
    results.json as objects."""
    out, _ = smoke
    work = out / "work" / "seed0"
    base = artifacts.publish_dir(artifacts.resolve(str(work / "examples"), "examples"),
                                 f"{gcs_root}/examples", info={"kind": "examples"})

    pos = ablations.impression_positives(f"{gcs_root}/examples", f"{gcs_root}/impression_positives")
    assert pos["output"] == f"{gcs_root}/impression_positives/1"
    assert artifacts.resolve(f"{gcs_root}/impression_positives", "examples") == pos["output"]
    assert storage.read_json(f"{pos['output']}/ablation.json")["counts"] == pos["counts"]
    assert len(_train(f"{gcs_root}/impression_positives")) == len(_train(work / "data" / "impression_positives"))
    assert storage.listdir(f"{pos['output']}/corpus") == storage.listdir(f"{base}/corpus")

    # a 10:1 cut of the hard-only mining run: same examples whether written locally or to gs://
    mined = str(work / "data" / "mined_11-60_all")
    remote = pt.restrict_ratio(mined, f"{gcs_root}/mined_10to1", "10:1", seed=0)
    local = pt.restrict_ratio(mined, str(out / "mined_10to1_local"), "10:1", seed=0)
    assert remote == f"{gcs_root}/mined_10to1/1" and artifacts.is_committed(remote)
    assert _train(remote) == _train(local)
    both = _train(mined)
    kept = sum(bool(e.get("negative_doc_ids")) for e in _train(remote))
    assert 0 < kept < sum(bool(e.get("negative_doc_ids")) for e in both)
    assert storage.exists(f"{remote}/mining.json")

    # the report, its plots and results.json through ebr.storage
    results = json.loads((out / "results.json").read_text())
    cfg = pt.make_config(True, TINY)
    models, rows = pt.plan(cfg)
    report = pt.write_report(f"{gcs_root}/report", cfg, models, rows, results["aggregate"], [0, 1],
                             True, "test", results["facts"], 1.0, 2)
    assert report == f"{gcs_root}/report/report.md"
    text = storage.read_text(report)
    assert "## 8. " + pt.EXPERIMENT_TITLES[8] in text
    for png in ("e1_by_type.png", "e5.png", "e8_ann.png"):
        assert storage.read_bytes(f"{gcs_root}/report/{png}")[:4] == b"\x89PNG", png
    with pytest.raises(FileNotFoundError, match="no examples"):
        ablations.impression_positives(f"{gcs_root}/nothing", f"{gcs_root}/x")
