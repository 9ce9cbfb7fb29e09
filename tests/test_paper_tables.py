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
    assert {r for r in results["aggregate"] if "ceiling" not in r} == {r.name for r in rows}
    for row, metrics in results["aggregate"].items():
        if "ceiling" not in row:
            assert f"`{row}`" in text  # every row is named in the report, so it can be rerun alone
        for name, m in metrics.items():
            assert m["n"] == 2 and all(math.isfinite(v) for v in m["values"]), (row, name)
            if "recall" in name:
                assert 0.0 <= m["mean"] <= 1.0, (row, name, m)
    # experiment 1 under the second recipe: both models with 2 online hard negatives
    assert {"e1.text_only.online_hard_2", "e1.unified.online_hard_2"} <= set(results["aggregate"])
    assert "Second recipe (not a paper claim): with 2 online hard negatives in both models" in text
    # each claim gets a verdict from the numbers; a disagreement carries its explanation
    verdicts = re.findall(r"\| \*\*([a-z ,]+)\*\* \||\. \*\*([a-z ,]+)\*\*\.", text)
    verdicts = [a or b for a, b in verdicts]
    assert len(verdicts) == 2 * len(pt.claims(cfg))
    # two seeds: below the three a verdict needs, so nothing agrees or disagrees
    assert set(verdicts) <= {"inconclusive", "not measured"}, set(verdicts)
    assert text.count("Why it may differ") == len(verdicts) // 2
    assert "recall with ties broken at random in expectation" in text and "ties against" in text
    # the exact-search row of experiment 8 is the reference: recall 1 against itself
    assert results["aggregate"]["e8.exact"]["ann_recall@10"]["mean"] == 1.0
    # the seeds are different data: their numbers differ, and the report's ± is their spread
    # seed 0 tunes the settings and is never reported (PaperTablesConfig.first_seed)
    assert [f["seed"] for f in results["facts"]] == [1, 2]
    unified = results["aggregate"]["e1.unified"]["recall@10"]
    assert unified["values"][0] != unified["values"][1] and unified["std"] > 0
    assert results["aggregate"]["e8.PQ4.nprobe_1"]["scanned"]["mean"] < 400


def test_training_set_variants(smoke):
    out, _ = smoke
    work = out / "work" / "seed1"  # the first reported seed
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
    work = out / "work" / "seed1"  # the first reported seed
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
    report = pt.write_report(f"{gcs_root}/report", cfg, models, rows, results["aggregate"], [1, 2],
                             True, "test", results["facts"], 1.0, 2)
    assert report == f"{gcs_root}/report/report.md"
    text = storage.read_text(report)
    assert "## 8. " + pt.EXPERIMENT_TITLES[8] in text
    for png in ("e1_by_type.png", "e5.png", "e8_ann.png"):
        assert storage.read_bytes(f"{gcs_root}/report/{png}")[:4] == b"\x89PNG", png
    with pytest.raises(FileNotFoundError, match="no examples"):
        ablations.impression_positives(f"{gcs_root}/nothing", f"{gcs_root}/x")


# --------------------------------------------------------------------------- verdict rules
# Constructed per-seed numbers fed through `aggregate` to each claim's rule.

QUICK_CFG = pt.make_config(True)


def _agg(rows: dict[str, dict[str, list[float]]]) -> dict:
    n = len(next(iter(next(iter(rows.values())).values())))
    return pt.aggregate([{row: {m: v[i] for m, v in metrics.items()} for row, metrics in rows.items()}
                         for i in range(n)])


def _rule(experiment: int, words: str):
    found = [c for c in pt.claims(QUICK_CFG) if c["experiment"] == experiment and words in c["claim"]]
    assert len(found) == 1, (experiment, words)
    return found[0]["rule"]


def _near(mean: float, n: int = 3, spread: float = 0.005) -> list[float]:
    return [mean + spread * (i - (n - 1) / 2) for i in range(n)]


def test_compare_needs_three_seeds_and_two_standard_errors():
    two = _agg({"a": {"m": [0.5, 0.51]}, "b": {"m": [0.9, 0.91]}})
    c = pt.compare(two, "a", "b", "m")
    assert not c["clear"] and c["direction"] == 0 and "no verdict below 3" in c["verdict"]
    three = _agg({"a": {"m": _near(0.5)}, "b": {"m": _near(0.52)}, "c": {"m": _near(0.505)}})
    c = pt.compare(three, "a", "b", "m")
    assert c["clear"] and c["direction"] == 1 and c["relative"] == pytest.approx(0.04)
    lo, hi = c["interval"]
    assert lo < 0.04 < hi and hi - lo == pytest.approx(4 * c["relative_se"])
    assert not pt.compare(three, "a", "c", "m")["clear"]  # 0.005 apart, SE 0.004


def test_unified_vs_text_only_by_type_rule():
    rule = _rule(1, "events")
    metric = "by_type.event.recall@10"

    def verdict(text_only, unified):
        return rule(_agg({"e1.text_only": {metric: text_only}, "e1.unified": {metric: unified}}))

    assert verdict(_near(0.5), _near(0.59))[0] == "agrees in direction and size"  # +18%, as the paper
    status, detail = verdict(_near(0.5), _near(0.8))
    assert status == "agrees in direction, size differs"
    assert "+60.0% [" in detail and "paper +18%" in detail
    assert verdict(_near(0.5), _near(0.4))[0] == "disagrees"
    assert verdict(_near(0.5, spread=0.1), _near(0.55, spread=0.1))[0] == "inconclusive"
    assert verdict([0.5, 0.5], [0.9, 0.9])[0] == "inconclusive"  # two seeds
    assert rule(_agg({"e1.text_only": {"recall@10": _near(0.5)}}))[0] == "not measured"


def test_direction_rule_compares_size():
    rule = _rule(2, "impressions as negatives")  # paper: -55%

    def verdict(impressions):
        return rule(_agg({"e2.random_negatives": {"recall@10": _near(0.8)},
                          "e2.impression_negatives": {"recall@10": impressions}}))

    assert verdict(_near(0.36))[0] == "agrees in direction and size"  # -55%
    status, detail = verdict(_near(0.0256, spread=0.001))  # -96.8%: the same direction, not the size
    assert status == "agrees in direction, size differs" and "-96.8%" in detail and "paper -55%" in detail
    assert verdict(_near(0.85))[0] == "disagrees"
    assert verdict(_near(0.78, spread=0.05))[0] == "inconclusive"
    # no magnitude in the paper: direction only
    rule = _rule(6, "hard positives")
    agg = _agg({"e6.clicks": {"recall@10": _near(0.8)},
                "e6.clicks_and_hard_positives": {"recall@10": _near(0.82)}})
    assert rule(agg)[0] == "agrees"


def test_no_gain_rule():
    rule = _rule(3, "no gain")

    def verdict(both, spread=0.005):
        return rule(_agg({"e3.click_positives": {"recall@10": _near(0.8)},
                          "e3.click_and_impression_positives": {"recall@10": _near(both, spread=spread)}}))[0]

    assert verdict(0.8) == "agrees"  # the interval rules out a gain above 2%
    assert verdict(0.7) == "agrees"  # a loss is no gain
    assert verdict(0.85) == "disagrees"
    assert verdict(0.8, spread=0.05) == "inconclusive"  # too noisy to rule out a gain


def test_best_of_k_rule():
    rule = _rule(4, "2 per positive")

    def verdict(means, spreads=None):
        spreads = spreads or {}
        return rule(_agg({f"e4.online_hard_{k}": {"recall@10": _near(v, spread=spreads.get(k, 0.004))}
                          for k, v in means.items()}))

    assert verdict({0: 0.90, 1: 0.91, 2: 0.95, 4: 0.92})[0] == "agrees"
    status, detail = verdict({0: 0.90, 1: 0.91, 2: 0.92, 4: 0.96})
    assert status == "disagrees" and "best e4.online_hard_4" in detail
    # the case: 0.957 ± 0.006 against 0.956 ± 0.002 is no clear winner
    assert verdict({0: 0.90, 1: 0.956, 2: 0.957, 4: 0.93}, {2: 0.006, 1: 0.002})[0] == "inconclusive"
    # the winner is not clear over the runner-up, but the paper's setting is clearly below the best
    status, detail = verdict({0: 0.90, 1: 0.955, 2: 0.90, 4: 0.956})
    assert status == "disagrees" and "clearly below the best" in detail
    assert rule(_agg({"e4.online_hard_0": {"recall@10": _near(0.9)}}))[0] == "not measured"


def test_ensemble_rule():
    rule = _rule(7, "ensembles")

    def verdict(single, ensemble, spread=0.004):
        return rule(_agg({"e7.single.unified": {"recall@10": _near(single)},
                          "e7.single.text_only": {"recall@10": _near(single - 0.1)},
                          "e7.concat.unified+hard.alpha_1": {"recall@10": _near(ensemble, spread=spread)}}))[0]

    assert verdict(0.8, 0.85) == "agrees"
    assert verdict(0.8, 0.7) == "disagrees"
    assert verdict(0.8, 0.8, spread=0.05) == "inconclusive"


def _ann(pq: dict[int, list[float]], opq: dict[int, list[float]], spread=0.002) -> dict:
    """ann_recall@10 per nprobe (QUICK_CFG's 1, 2, 4, 8, 16) for each pq_bytes."""
    rows = {}
    for label, series in (("PQ", pq), ("OPQ", opq)):
        for b, values in series.items():
            for nprobe, v in zip(QUICK_CFG.ann_nprobes, values):
                rows[f"e8.{label}{b}.nprobe_{nprobe}"] = {"ann_recall@10": _near(v, spread=spread)}
    return _agg(rows)


def test_ann_rule_has_no_slack_for_opq():
    rule = _rule(8, "OPQ")
    pq = {4: [0.3, 0.4, 0.5, 0.55, 0.56], 8: [0.4, 0.5, 0.6, 0.65, 0.66], 16: [0.5, 0.6, 0.7, 0.75, 0.76]}
    up = {b: [v + 0.02 for v in s] for b, s in pq.items()}
    assert rule(_ann(pq, up))[0] == "agrees"
    # OPQ 0.005 below PQ everywhere, with tight seeds: that part disagrees (no 0.005 allowance)
    down = {b: [v - 0.005 for v in s] for b, s in pq.items()}
    status, detail = rule(_ann(pq, down, spread=0.001))
    assert status == "partly" and "OPQ4 vs PQ4: -0.9%" in detail and "(disagrees)" in detail
    # OPQ within noise of PQ: that part is inconclusive, the rest agrees
    assert rule(_ann(pq, pq))[0] == "partly"
    # recall falling with nprobe and pq_bytes, OPQ below: nothing agrees
    falling = {b: [0.9 - 0.1 * i - 0.05 * j for i in range(5)] for j, b in enumerate((4, 8, 16))}
    assert rule(_ann(falling, {b: [v - 0.05 for v in s] for b, s in falling.items()}))[0] == "disagrees"
    assert rule(_ann(pq, up, spread=0.3))[0] == "inconclusive"


def test_every_rule_is_inconclusive_below_three_seeds():
    cfg = QUICK_CFG
    _, rows = pt.plan(cfg)
    names = [r.name for r in rows]

    def per_seed(i):
        out = {}
        for j, name in enumerate(names):
            v = 0.1 + 0.8 * ((j * 37 + i * 11) % 50) / 50  # clear differences between rows
            out[name] = {"recall@10": v, "ann_recall@10": v,
                         "by_type": {t: {"recall@10": v} for t in ("person", "group", "page", "event")}}
        return out

    two = pt.aggregate([per_seed(0), per_seed(1)])
    for c in pt.claims(cfg):
        assert c["rule"](two)[0] == "inconclusive", c["claim"]
    three = pt.aggregate([per_seed(0), per_seed(1), per_seed(2)])
    assert any(c["rule"](three)[0] != "inconclusive" for c in pt.claims(cfg))


def test_report_documents_the_rules_and_shows_the_ceiling(tmp_path):
    cfg = pt.make_config(True, TINY)
    models, rows = pt.plan(cfg)

    def per_seed(i, ceiling):
        out = {r.name: {"recall@10": 0.5 + 0.01 * i, "recall@50": 0.7, "recall@100": 0.8,
                        "ties_against": {"recall@10": 0.4}, "ann_recall@10": 0.9, "scanned": 50.0,
                        "scanned_fraction": 0.1, "bytes_per_vector": 4.0,
                        "by_type": {"event": {"recall@10": 0.3}}} for r in rows}
        if ceiling:
            out[pt.row_key(0, "ceiling")] = {"recall@10": 0.93, "recall@50": 0.99, "recall@100": 1.0}
        return out

    for ceiling in (True, False):
        out = tmp_path / str(ceiling)
        agg = pt.aggregate([per_seed(i, ceiling) for i in range(3)])
        text = open(pt.write_report(str(out), cfg, models, rows, agg, [1, 2, 3], True, "test", [], 1.0)).read()
        assert "Seed 0 is the tuning seed" in text and "twice its standard error" in text
        assert "agrees in direction and size" in text and "best of k" in text
        assert text.count("recall with ties broken at random in expectation") >= 8
        assert "recall@10 ties against" in text and "0.400 ± 0.000" in text
        assert ("| ceiling (Bayes-optimal) | the generator's click model ranks every document | "
                "0.930 ± 0.000 | 0.990 ± 0.000 | 1.000 ± 0.000 |" in text) == ceiling
        assert text.count("ceiling (Bayes-optimal)") == (8 if ceiling else 0)


def test_first_seed_skips_the_tuning_seed():
    assert pt.make_config(True).first_seed == pt.make_config(False).first_seed == 1
    with pytest.raises(ValueError, match="seed 0 is the tuning seed"):
        pt.make_config(True, ["first_seed=0"])
