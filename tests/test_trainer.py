"""Trainer: featurisation, towers, input, losses wired into the model, the training job
(hypertune, TensorBoard, evaluation protocols), resume after a kill and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(__file__))
import trainer_fixtures as tfx  # noqa: E402

from ebr import artifacts, features  # noqa: E402
from trainer import data, featurize, task  # noqa: E402
from trainer.corpus import load_corpus  # noqa: E402
from trainer.model import UnifiedEmbeddingModel  # noqa: E402
from trainer.towers import build_towers  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The real upstream: `ebr data social` -> `ebr pipeline examples` (docs/contracts.md s.2)."""
    from ebr import cli

    root = tmp_path_factory.mktemp("social")
    assert cli.main(["data", "social", "--out", str(root / "raw"), "--documents", "400",
                     "--sessions", "2500", "--seed", "3"]) == 0
    assert cli.main(["pipeline", "examples", "--input", str(root / "raw"), "--output", str(root / "out")]) == 0
    return str(root / "out")


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("model"))
    hp = str(tmp_path_factory.mktemp("hp") / "output.metrics")
    os.environ["CLOUD_ML_HP_METRIC_FILE"] = hp
    try:
        result = task.train(tfx.tiny_config(dataset, model_dir, "epochs=3"))
    finally:
        del os.environ["CLOUD_ML_HP_METRIC_FILE"]
    return result, model_dir, hp


def _vdir(data_dir):
    return artifacts.resolve(data_dir, "examples")


def _batch(data_dir, n=8, pattern="train/examples-*.tfrecord.gz"):
    ds = data.make_dataset(os.path.join(_vdir(data_dir), pattern), n, shuffle=False)
    return next(iter(ds))


# --------------------------------------------------------------------------- featurisation


def test_char_trigrams_have_word_boundaries_and_unicode_lowercase():
    words = featurize.words(tf.constant(["  Héllo\tWORLD  ", "", "   "]))
    assert words.to_list() == [["héllo".encode(), b"world"], [], []]
    grams = featurize.char_ngrams(words).to_list()[0]
    assert grams[:5] == [g.encode() for g in ["#hé", "hél", "éll", "llo", "lo#"]]
    assert b"#wo" in grams and b"ld#" in grams
    assert featurize.word_ngrams(words).to_list()[0] == ["héllo".encode(), b"world", "héllo world".encode()]
    chars, grams = featurize.text_ids(tf.constant(["a b", ""]), 50, 60)
    assert chars.row_lengths().numpy().tolist() == [2, 0] and grams.row_lengths().numpy().tolist() == [3, 0]
    assert int(tf.reduce_max(chars.flat_values)) < 50 and int(tf.reduce_max(grams.flat_values)) < 60


def test_in_graph_normalisation_matches_python_twin():
    texts = ["Ünïcode  TEXT\n here", " a\t\tb ", "", "ΣΊΣΥΦΟΣ x"]
    got = [t.decode() for t in featurize.normalize(tf.constant(texts)).numpy()]
    assert got == [features.normalize_text(t) for t in texts]


# --------------------------------------------------------------------------- towers


def _query_inputs(batch):
    return {k: batch[k] for k in features.QUERY_INPUTS}


def test_towers_share_schema_tables_and_normalise(dataset):
    config = tfx.tiny_config(dataset, "/unused")
    q, d = build_towers(config)
    assert q.tables[features.SEARCHER_FRIENDS] is d.tables[features.DOC_MEMBERS]  # the "entity" table
    assert q.tables[features.HISTORY_DOC_IDS] is d.tables[features.DOC_ID]
    assert q.tables[features.SEARCHER_CITY] is d.tables[features.DOC_CITY]
    assert q.text is d.text
    assert q.tables[features.SEARCHER_ATTRIBUTES] is not d.tables[features.DOC_ATTRIBUTES]
    batch = _batch(dataset)
    qe, de = q(q.select(batch)).numpy(), d(d.select(batch)).numpy()
    assert qe.shape == (8, 16) and de.shape == (8, 16)
    np.testing.assert_allclose(np.linalg.norm(qe, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(de, axis=1), 1.0, rtol=1e-5)
    # The same entity lands on the same row from both sides.
    ent = q.tables[features.SEARCHER_FRIENDS]
    a, _ = ent(tf.constant([["p17"]]))
    b, _ = d.tables[features.DOC_MEMBERS](tf.constant([["p17"]]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    q2, d2 = build_towers(tfx.tiny_config(dataset, "/unused", "share_text_tables=false"))
    assert q2.text is not d2.text


def test_tower_features_embed_only_the_listed_inputs(dataset):
    # The paper's text-only baseline: the towers still take every schema input (one serving
    # signature for all models) but embed only the query text and the document text.
    q, d = build_towers(tfx.tiny_config(dataset, "/unused", "tower_features=query,doc_text"))
    assert q.feature_names == (features.QUERY_TEXT,) and d.feature_names == (features.DOC_TEXT,)
    assert q.input_names == features.QUERY_INPUTS and d.input_names == features.DOC_INPUTS
    batch = _batch(dataset, 4)
    changed = dict(batch)
    for name in features.QUERY_INPUTS + features.DOC_INPUTS:
        if name not in (features.QUERY_TEXT, features.DOC_TEXT):
            changed[name] = tf.fill(tf.shape(batch[name]), "zz")
    np.testing.assert_array_equal(q(q.select(batch)).numpy(), q(q.select(changed)).numpy())
    np.testing.assert_array_equal(d(d.select(batch)).numpy(), d(d.select(changed)).numpy())
    # and the unified towers do see those inputs
    qu, du = build_towers(tfx.tiny_config(dataset, "/unused"))
    assert not np.allclose(qu(qu.select(batch)).numpy(), qu(qu.select(changed)).numpy())
    assert not np.allclose(du(du.select(batch)).numpy(), du(du.select(changed)).numpy())
    with pytest.raises(ValueError, match="without inputs"):
        tfx.tiny_config(dataset, "/unused", "tower_features=query")
    with pytest.raises(ValueError, match="not tower inputs"):
        tfx.tiny_config(dataset, "/unused", "tower_features=query,doc_txt")


def test_empty_query_text_and_empty_multi_values_work(dataset):
    q, _ = build_towers(tfx.tiny_config(dataset, "/unused"))
    batch = _query_inputs(_batch(dataset, 4))
    batch[features.QUERY_TEXT] = tf.constant(["", "", " ", ""])
    batch[features.HISTORY_DOC_IDS] = tf.fill([4, 3], "")
    batch[features.SEARCHER_FRIENDS] = tf.fill([4, 1], "")
    out = q(batch).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_history_attention_uses_query_text(dataset):
    q, _ = build_towers(tfx.tiny_config(dataset, "/unused"))
    batch = _query_inputs(_batch(dataset, 2))
    batch[features.HISTORY_DOC_IDS] = tf.constant([["d1", "d2", "d3"]] * 2)  # any strings
    batch[features.QUERY_TEXT] = tf.constant(["music club", "chess club"])
    emb, mask = q.tables[features.HISTORY_DOC_IDS](batch[features.HISTORY_DOC_IDS])
    text = q.text(batch[features.QUERY_TEXT])
    pooled = q._attend(text, emb, mask).numpy()
    assert not np.allclose(pooled[0], pooled[1])  # same history, different query text
    no_history = q._attend(text, tf.zeros_like(emb), tf.zeros_like(mask)).numpy()
    np.testing.assert_array_equal(no_history, 0.0)


# --------------------------------------------------------------------------- input


def test_parse_spec_comes_from_schema_and_multi_is_padded_dense(dataset):
    spec = data.parse_spec()
    assert set(spec) == {f.name for f in features.SCHEMA}
    batch = _batch(dataset, 16)
    friends = batch[features.SEARCHER_FRIENDS]
    assert friends.dtype == tf.string and friends.shape.rank == 2
    assert batch[features.QUERY_TEXT].shape == (16,)
    assert batch[features.DOC_SAMPLING_PROB].dtype == tf.float32
    assert batch[features.NEGATIVE_DOC_IDS].shape[1] >= 1  # no negatives -> one "" column
    assert float(tf.reduce_min(batch[features.DOC_SAMPLING_PROB])) > 0


def test_positive_rank_protocols():
    from trainer.evaluate import positive_rank

    # (greater, ties) under `all`, then under `exclude_train` (ebr.recall's tie rule)
    scores = np.array([0.9, 0.5, 0.7, 0.7, 0.1])
    assert positive_rank(scores, 2) == ((1, 1), (1, 1))  # 0.9 above, one 0.7 tie
    assert positive_rank(scores, 2, [0, 2]) == ((1, 1), (0, 1))  # training doc 0 removed, positive kept
    assert positive_rank(scores, 2, [3]) == ((1, 1), (1, 0))  # the tied training doc removed
    assert positive_rank(scores, 0, [1, 3, 4]) == ((0, 0), (0, 0))
    assert positive_rank(scores, 4, [0, 0, 1]) == ((4, 0), (2, 0))


def test_corrupt_tfrecord_error_names_the_file(dataset, tmp_path, capsys):
    import shutil

    bad = tmp_path / "data"
    vdir = _vdir(dataset)
    shutil.copytree(vdir, bad / os.path.basename(vdir))  # a committed version, then corrupted
    train = bad / os.path.basename(vdir) / "train"
    victim = sorted(train.glob("*.tfrecord.gz"))[-1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2] + b"\x00garbage" * 50)
    where = data.locate_bad_record(sorted(str(p) for p in train.glob("*.tfrecord.gz")))
    assert where is not None and str(victim) in where and "corrupted record" in where
    # A record that is not a tf.train.Example: named by file and record number.
    odd = tmp_path / "odd.tfrecord.gz"
    with tf.io.TFRecordWriter(str(odd), options="GZIP") as w:
        for i in range(700):
            w.write(features.make_example({features.QUERY_TEXT: "q", features.DOC_ID: f"d{i}"}))
        w.write(b"not an example")
    assert data.locate_bad_record([str(odd)]) == (
        f"{odd}: record 700: Could not parse example input, value: 'not an example'")
    # The job's entry point (`python -m trainer.task` = sys.exit(main(argv))), in process.
    code = task.main(tfx.task_command(str(bad), str(tmp_path / "model"), "epochs=1", "steps_per_epoch=3")[3:])
    err = capsys.readouterr().err
    assert code == task.EXIT_BAD_INPUT, err[-2000:]
    assert str(victim) in err and "corrupt" in err and "Traceback" not in err


def test_missing_data_and_bad_config_exit_with_clear_message(tmp_path, capsys):
    code = task.main(tfx.task_command(str(tmp_path / "nowhere"), str(tmp_path / "m"), "optimizer=rmsprop")[3:])
    assert code == task.EXIT_BAD_INPUT and "optimizer" in capsys.readouterr().err
    code = task.main(tfx.task_command(str(tmp_path / "nowhere"), str(tmp_path / "m"))[3:])
    assert code == task.EXIT_BAD_INPUT and "nowhere" in capsys.readouterr().err
    # An examples version whose publish never finished is named and refused.
    (tmp_path / "ex" / "1" / "train").mkdir(parents=True)
    code = task.main(tfx.task_command(str(tmp_path / "ex" / "1"), str(tmp_path / "m"))[3:])
    err = capsys.readouterr().err
    assert code == task.EXIT_BAD_INPUT and "not committed" in err and str(tmp_path / "ex" / "1") in err
    code = task.main(tfx.task_command(str(tmp_path), "", "epochs=1")[3:])
    assert code == task.EXIT_BAD_INPUT and "AIP_MODEL_DIR" in capsys.readouterr().err
    bad_config = tmp_path / "train.yaml"
    bad_config.write_text("epochs: 2\nlos:\n  temperature: 0.1\n")
    code = task.main(["--config", str(bad_config), "--data-dir", str(tmp_path), "--model-dir", str(tmp_path)])
    assert code == task.EXIT_BAD_INPUT and "unknown key(s) ['los']" in capsys.readouterr().err


# --------------------------------------------------------------------------- model + losses


def test_extra_negatives_and_mixed_negatives_reach_the_loss(tmp_path):
    out = str(tmp_path / "data")
    tfx.write_dataset(out, n_examples=200, negatives=3)
    corpus = load_corpus(os.path.join(_vdir(out), "corpus/*.tfrecord.gz"))
    batch = _batch(out, 16)
    assert bool(tf.reduce_any(batch[features.NEGATIVE_DOC_IDS] != b""))
    extra = UnifiedEmbeddingModel(tfx.tiny_config(out, "/unused"), corpus, extra_negatives=True)
    without = {k: v for k, v in batch.items() if k != features.NEGATIVE_DOC_IDS}
    base = float(extra.compute_loss(without, training=False))
    with_extra = float(extra.compute_loss(batch, training=False))
    assert with_extra > base  # more negatives in every row's softmax
    # Unknown negative ids are padding: same loss as without them.
    negatives = batch[features.NEGATIVE_DOC_IDS]
    unknown = {**batch, features.NEGATIVE_DOC_IDS: tf.fill(tf.shape(negatives), "nope")}
    np.testing.assert_allclose(float(extra.compute_loss(unknown, training=False)), base, rtol=1e-5)
    mixed = UnifiedEmbeddingModel(tfx.tiny_config(out, "/unused", "loss.mixed_negatives=8"), corpus)
    assert mixed.mixed_from_tower == 8
    q, p = mixed(without)
    alone = float(mixed.loss_layer(q, p, batch[features.DOC_ID], batch[features.DOC_SAMPLING_PROB],
                                   training=False))
    assert float(mixed.compute_loss(without, training=False)) > alone


def test_cache_mixed_negatives_and_queue_refresh_during_fit(dataset):
    from trainer.model import make_optimizer

    config = tfx.tiny_config(dataset, "/unused", "loss.mixed_negatives=16", "loss.mixed_source=cache",
                             "loss.cache_refresh_steps=2", "loss.queue_size=128", "loss.queue_warmup_steps=1")
    corpus = load_corpus(os.path.join(_vdir(dataset), config.corpus_pattern))
    model = UnifiedEmbeddingModel(config, corpus)
    assert model.mixed_from_tower == 0 and model.loss_layer.cache is not None
    model.compile(optimizer=make_optimizer(config))
    ds = data.make_dataset(os.path.join(_vdir(dataset), config.train_pattern), 32, repeat=True, drop_remainder=True)
    history = model.fit(ds, epochs=1, steps_per_epoch=5, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    cache = model.loss_layer.cache
    assert int(cache.refreshed_at.numpy()) == 4  # refreshed at steps 0, 2, 4 inside the train step
    assert int(model.loss_layer.queue.count.numpy()) == 128


# --------------------------------------------------------------------------- the job


def test_training_learns_and_reports(trained, dataset):
    result, model_dir, hp = trained
    ev = result["metrics"]["eval"]
    assert set(ev["protocols"]) == {"all", "exclude_train"}
    n_docs = ev["corpus_size"]
    # Random recall@10 is 10 / corpus size; the model must do far better.
    assert ev["protocols"]["all"]["recall_at_10"] > 5 * 10 / n_docs
    assert ev["protocols"]["exclude_train"]["recall_at_10"] >= ev["protocols"]["all"]["recall_at_10"]
    assert ev["protocols"]["all"]["recall_at_500"] == 1.0 and n_docs == 400
    assert ev["split"]["method"] == "hash" and ev["split"]["split_file"] and ev["split"]["eval_files"]
    # cloudml-hypertune format: JSON lines with the tag, value and global step as strings.
    lines = [json.loads(line) for line in open(hp)]
    assert lines[-1]["recall_at_100"] == str(ev["protocols"]["all"]["recall_at_100"])
    assert lines[-1]["global_step"] == str(result["steps"]) and lines[-1]["trial"] == "0"
    assert "timestamp" in lines[-1]
    logs = os.path.join(model_dir, "logs")
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(logs) for f in fs)
    assert not os.path.exists(os.path.join(model_dir, "checkpoints", "backup"))  # deleted on success
    assert os.path.exists(os.path.join(model_dir, "checkpoints", "final", "ckpt.index"))
    # Read from the newest committed examples version; exported as one committed pair.
    assert result["data_dir"] == _vdir(dataset)
    for name in ("query_tower", "doc_tower"):
        assert artifacts.versions(os.path.join(model_dir, name)) == [result["version"]]
    assert json.load(open(os.path.join(model_dir, f"train_result-{result['version']}.json")))["steps"] == result["steps"]


def test_evaluate_agrees_with_ebr_recall_on_a_text_only_model_with_ties(dataset, tmp_path):
    """A text-only model scores namesakes (documents sharing their text) exactly alike: `ebr
    evaluate` on its export gives the recall `ebr.recall` gives on the paper tables' embeddings
    of the same split, under both protocols and both tie rules."""
    from ebr import recall
    from experiments.paper_tables.metrics import embed_split
    from trainer.evaluate import evaluate, training_items

    model_dir = str(tmp_path / "text_only")
    task.train(tfx.tiny_config(dataset, model_dir, "epochs=1", "steps_per_epoch=10",
                               f"tower_features={features.QUERY_TEXT},{features.DOC_TEXT}"))
    vdir = _vdir(dataset)
    ev = evaluate(os.path.join(model_dir, "query_tower"), eval_pattern=os.path.join(vdir, "eval", "*.tfrecord.gz"),
                  corpus=os.path.join(vdir, "corpus", "*.tfrecord.gz"), ks=[1, 10, 50],
                  train_pattern=os.path.join(vdir, "train", "*.tfrecord.gz"))
    e = embed_split(model_dir, dataset)
    assert len(e.positives) == ev["examples"]
    all_counts = recall.exact_tie_counts(e.queries, e.docs, e.positives)
    assert ev["positives_tied"]["all"] == pytest.approx(float((all_counts[1] > 0).mean()), abs=1.01 / ev["examples"])
    assert ev["positives_tied"]["all"] > 0.05  # the namesakes do tie
    seen = training_items(os.path.join(vdir, "train", "*.tfrecord.gz"))
    searchers = []
    for batch in data.make_dataset(os.path.join(vdir, "eval", "*.tfrecord.gz"), 1024, shuffle=False,
                                   names=(features.SEARCHER_ID,)):
        searchers += [x.decode() for x in batch[features.SEARCHER_ID].numpy()]
    row_of = {d: i for i, d in enumerate(e.doc_ids)}
    excluded = [[row_of[d] for d in seen.get(s, ()) if d in row_of] for s in searchers]
    ex_counts = recall.exact_tie_counts(e.queries, e.docs, e.positives, exclude=excluded)
    # TF and numpy multiply in different orders: a distinct near-tie may flip one example
    for protocol, counts in (("all", all_counts), ("exclude_train", ex_counts)):
        assert ev["protocols"][protocol] == pytest.approx(
            recall.recall_at(*counts, [1, 10, 50], key="recall_at_{k}"), abs=1.01 / ev["examples"])
        assert ev["protocols_ties_against"][protocol] == pytest.approx(
            recall.recall_at(*counts, [1, 10, 50], "against", key="recall_at_{k}"), abs=1.01 / ev["examples"])
        assert ev["protocols"][protocol]["recall_at_1"] > ev["protocols_ties_against"][protocol]["recall_at_1"]
    assert "random" in ev["tie_rule"]


def test_export_holds_the_resolved_configuration(trained):
    result, model_dir, _ = trained
    for path in result["exports"].values():
        saved = json.load(open(os.path.join(path, "config.json")))
        assert saved["epochs"] == 3 and saved["model_dir"] == model_dir
        assert saved["checkpoint_dir"] == os.path.join(model_dir, "checkpoints")  # resolved
        assert saved["loss"]["temperature"] == tfx.tiny_config("", "").loss.temperature


def test_hypertune_file_is_the_runs_own_outside_vertex(monkeypatch, tmp_path):
    """cloudml-hypertune's file: where Vertex reads it in a tuning trial, else beside the export."""
    monkeypatch.delenv("CLOUD_ML_HP_METRIC_FILE", raising=False)
    monkeypatch.delenv("CLOUD_ML_TRIAL_ID", raising=False)
    model_dir = str(tmp_path / "m")
    path = task.hypertune_path(model_dir, 3)
    assert path == os.path.join(model_dir, "hypertune-3.metrics")
    task.report_hypertune(path, "recall_at_100", 0.5, 10)
    task.report_hypertune(path, "recall_at_100", 0.75, 20)
    lines = [json.loads(line) for line in open(path)]
    assert [(x["recall_at_100"], x["global_step"], x["trial"]) for x in lines] == [
        ("0.5", "10", "0"), ("0.75", "20", "0")]
    monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "7")
    assert task.hypertune_path(model_dir, 3) == "/tmp/hypertune/output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(tmp_path / "hp"))
    assert task.hypertune_path(model_dir, 3) == str(tmp_path / "hp")


def test_train_announces_its_configuration(tmp_path, caplog):
    from ebr import cli

    caplog.set_level("INFO", logger="ebr.config")
    code = cli.main(["train", "--data-dir", str(tmp_path / "nowhere"), "--model-dir", str(tmp_path / "m")])
    assert code == task.EXIT_BAD_INPUT
    (line,) = [r.getMessage() for r in caplog.records if "ebr train configuration" in r.getMessage()]
    announced = json.loads(line.split("configuration: ", 1)[1])
    assert announced["epochs"] == 1 and announced["model_dir"] == str(tmp_path / "m")


def test_cluster_spec_becomes_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "")  # recorded, so the TF_CONFIG written below is undone
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("CLUSTER_SPEC", json.dumps({
        "cluster": {"workerpool0": ["a:2222"], "workerpool1": ["b:2222", "c:2222"]},
        "task": {"type": "workerpool1", "index": 1}}))
    cfg = task.cluster_from_env()
    assert cfg == {"cluster": {"chief": ["a:2222"], "worker": ["b:2222", "c:2222"]},
                   "task": {"type": "worker", "index": 1}}
    assert json.loads(os.environ["TF_CONFIG"]) == cfg and not task.is_chief(cfg)
    assert task.is_chief({"cluster": {"worker": ["x", "y"]}, "task": {"type": "worker", "index": 0}})


def test_vertex_env_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("AIP_MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", str(tmp_path / "t"))
    cfg = task.resolve_paths(tfx.tiny_config("/data", ""))
    assert (cfg.model_dir, cfg.checkpoint_dir, cfg.tensorboard_dir) == (
        str(tmp_path / "m"), str(tmp_path / "c"), str(tmp_path / "t"))
    # As Vertex sets them: gs:// URIs with a trailing slash.
    monkeypatch.setenv("AIP_MODEL_DIR", "gs://b/job/model/")
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", "gs://b/job/checkpoints/")
    monkeypatch.delenv("AIP_TENSORBOARD_LOG_DIR")
    cfg = task.resolve_paths(tfx.tiny_config("/data", ""))
    assert (cfg.model_dir, cfg.checkpoint_dir, cfg.tensorboard_dir) == (
        "gs://b/job/model", "gs://b/job/checkpoints", "gs://b/job/model/logs")
    # Vertex hyperparameter tuning passes trial values as --name=value flags.
    parser = __import__("argparse").ArgumentParser()
    task.add_arguments(parser)
    args = parser.parse_args(["--data-dir", "/d", "--learning-rate=0.5", "--set", "loss.temperature=0.1"])
    cfg = task.config_from_args(args)
    assert (cfg.learning_rate, cfg.loss.temperature, cfg.data_dir) == (0.5, 0.1, "/d")


def test_nan_loss_stops_the_run_with_nonzero_exit(dataset, tmp_path, capsys):
    from ebr import cli

    # Through `ebr train` (same flags as `python -m trainer.task`).
    code = cli.main(["train"] + tfx.task_command(dataset, str(tmp_path / "m"), "optimizer=sgd",
                                                 "learning_rate=1e38", "epochs=1", "steps_per_epoch=20")[3:])
    err = capsys.readouterr().err
    assert code == task.EXIT_NAN, err[-2000:]
    assert "loss became nan" in err and "TerminateOnNaN" in err
    assert not os.path.exists(tmp_path / "m" / "query_tower")  # nothing exported


def test_resume_after_kill(dataset, tmp_path):
    model_dir = tmp_path / "m"
    cmd = tfx.task_command(dataset, str(model_dir), "epochs=2", "steps_per_epoch=100",
                           "checkpoint_every_steps=10") + ["--output", str(tmp_path / "r.json")]
    backup = model_dir / "checkpoints" / "backup"
    proc = subprocess.Popen(cmd, env=tfx.subprocess_env(), cwd=tfx.REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        # "checkpoint" is written after the checkpoint's data: a complete backup exists.
        if backup.exists() and any(p.name == "checkpoint" for p in backup.rglob("*")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished (or died) before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (model_dir / "query_tower").exists()
    proc = subprocess.run(cmd, env=tfx.subprocess_env(), cwd=tfx.REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["resumed_from_step"] >= 10 and result["resumed_from_step"] % 10 == 0
    assert result["steps"] == 200  # finished the run, not restarted it
    assert "resumed from backup at step" in proc.stderr
