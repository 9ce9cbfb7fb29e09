"""`ebr experiment paper-tables --raw DIR`: the harness on logs it did not generate.

One run of every experiment (minimal sizes, one seed) over canonical raw logs that differ from
the generator's the way a team's own logs do: no impressions, a document type the generator
does not have, and the generator's truth file written by hand (so the ceiling row's numbers
are known). The run must name its source, share one examples run, report the rows these logs
cannot measure with the reason instead of failing, and carry the ceiling pseudo-row."""
import gzip
import json
import math

import pytest

from ebr import artifacts, features, storage
from experiments import paper_tables as pt
from experiments.paper_tables import seed_run
from experiments.paper_tables.rows import CEILING

TINY = ["epochs=1", "batch_size=64", "embedding_dim=16", "feature_dim=8", "text_dim=16",
        "hidden_units=32", "hash_bucket_cap=2000", "text_buckets=2000", "online_hard=0",
        "windows=11-60", "default_window=11-60", "ratios=0:1", "default_ratio=0:1",
        "ensemble_hard_model=mined_11-60_0:1", "ensemble_alphas=1.0", "cascade_n=100",
        "ann_pq_bytes=4", "ann_nprobes=1", "impression_negatives_max=4"]
TRUTH_KS = (1, 5, 10, 50)  # no 100: the run's ks are 10, 50, 100


def _rewrite_jsonl(path, fn):
    """Rewrites RAW/NAME.jsonl or .jsonl.gz line by line through `fn` (dict -> dict)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(fn(r)) + "\n")
    return rows


def _mass(session_id: str) -> dict[int, float]:
    """A hand-written ceiling, distinct per session, increasing in K."""
    base = (sum(map(ord, session_id)) % 7) / 10
    return {k: min(1.0, base + 0.05 * i) for i, k in enumerate(TRUTH_KS)}


@pytest.fixture(scope="module")
def raw_logs(tmp_path_factory):
    from ebr.datasets.social import generate_social

    raw = tmp_path_factory.mktemp("team_logs")
    generate_social(str(raw), documents=400, sessions=1500, seed=3)
    files = {p.name.split(".")[0]: p for p in raw.iterdir() if ".jsonl" in p.name}

    # a team's logs: nothing about what was shown, and a type of document the generator lacks
    sessions = _rewrite_jsonl(files["sessions"], lambda s: {**s, "impressions": []})
    _rewrite_jsonl(files["documents"], lambda d: {**d, "type": "meetup"} if d.get("type") == "event" else d)
    storage.remove(str(raw / "truth"))  # whatever the generator wrote: ours is known
    (raw / "truth").mkdir()
    with open(raw / "truth" / "ceiling.jsonl", "w") as f:
        for s in sessions:
            f.write(json.dumps({"session_id": s["session_id"],
                                "mass": {str(k): v for k, v in _mass(s["session_id"]).items()}}) + "\n")
    return raw


@pytest.fixture(scope="module")
def raw_run(raw_logs, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_tables_raw")
    report = pt.main(quick=True, seeds=1, out=str(out), overrides=TINY, jobs=1, raw=str(raw_logs))
    return out, report, json.loads((out / "results.json").read_text())


def test_every_experiment_runs_on_raw_logs_and_names_the_source(raw_logs, raw_run):
    out, report, results = raw_run
    source = results["source"]
    assert source["kind"] == "raw" and source["logs"] == str(raw_logs)
    assert "same held-out split" in source["split"]
    assert results["config"]["raw"] == str(raw_logs)
    assert all(f["source"]["kind"] == "raw" for f in results["facts"])
    text = open(report).read()
    assert f"--raw {raw_logs} " in text  # the command that reproduces it names the logs
    for exp, title in pt.EXPERIMENT_TITLES.items():
        assert f"## {exp}. {title}" in text

    # one examples run shared by the seeds; no seed generated logs of its own
    work = out / "work"
    shared = artifacts.resolve(str(work / "shared" / "examples"), "examples")
    artifacts.verify(shared)
    seed_dir = work / f"seed{results['seeds'][0]}"
    assert not (seed_dir / "raw").exists() and not (seed_dir / "examples").exists()
    assert "generator" not in results["facts"][0]

    # rows these logs cannot measure are reported with the reason, not a crash
    impression_rows = {"e2.impression_negatives", "e3.click_and_impression_positives"}
    assert set(source["not_measured"]) == impression_rows
    assert all("impressions" in why for why in source["not_measured"].values())
    assert not impression_rows & set(results["aggregate"])
    assert any("meetup" in n for n in source["notes"])  # per-type rows: generator types only
    measured = {r["name"] for r in results["rows"]} - impression_rows
    assert measured <= set(results["aggregate"])
    for row in measured:
        for name, m in results["aggregate"][row].items():
            assert all(math.isfinite(v) for v in m["values"]), (row, name)
    by_type = {k.split(".")[1] for k in results["aggregate"]["e1.unified"] if k.startswith("by_type.")}
    assert "person" in by_type and "event" not in by_type


def test_ceiling_row_is_the_mean_truth_over_held_out_examples(raw_run):
    out, _, results = raw_run
    shared = artifacts.resolve(str(out / "work" / "shared" / "examples"), "examples")
    import tensorflow as tf

    held_out = [features.parse_example(r.numpy())[features.SESSION_ID][0]
                for f in storage.glob(storage.join(shared, "eval", "*.tfrecord.gz"))
                for r in tf.data.TFRecordDataset(f, compression_type="GZIP")]
    assert held_out
    ceiling = results["aggregate"][CEILING]
    for k in (10, 50):
        want = sum(_mass(s)[k] for s in held_out) / len(held_out)
        assert ceiling[f"recall@{k}"]["mean"] == pytest.approx(want, abs=1e-9)
    assert "recall@100" not in ceiling  # the truth file has no mass@100: said, not invented
    assert "truth/ceiling.jsonl" in results["source"]["ceiling"]
    assert "K=[100]" in results["source"]["ceiling"]
    assert results["source"]["ceiling_row"] == CEILING == "e0.ceiling"


def test_logs_without_truth_have_no_ceiling_and_bad_paths_are_named(tmp_path):
    (tmp_path / "logs").mkdir()
    cfg = pt.make_config(True, TINY + [f"raw={tmp_path / 'logs'}"])
    models, _ = pt.plan(cfg)
    run = seed_run.SeedRun(cfg, models, 1, str(tmp_path / "work"))
    assert run.ceiling() is None
    summary = seed_run.source_summary(cfg, [run.facts])
    assert summary["ceiling"] == seed_run.NO_TRUTH == "no ceiling: logs without generator truth"
    assert summary["kind"] == "raw"
    assert seed_run.source_summary(pt.make_config(True, TINY), [])["kind"] == "generator"
    with pytest.raises(FileNotFoundError, match="searchers.jsonl"):
        seed_run.shared_examples(cfg, str(tmp_path / "work"))
    with pytest.raises(ValueError, match="raw must be"):
        pt.make_config(True, ["raw= "])
