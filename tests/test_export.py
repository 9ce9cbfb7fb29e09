"""Export: TF Serving layout, atomic versions, metadata, stock-TF loading in a fresh process
(no project, no TFRS imports), clean op sets, the checked loader and evaluation from exports."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(__file__))
import trainer_fixtures as tfx  # noqa: E402

from ebr import features  # noqa: E402
from trainer import data  # noqa: E402
from trainer.corpus import load_corpus  # noqa: E402
from trainer.evaluate import evaluate  # noqa: E402
from trainer.export import (ExportError, FORBIDDEN_OP_MARKERS, exported_op_types, export_towers,  # noqa: E402
                            load_tower, next_version)
from trainer.model import UnifiedEmbeddingModel, make_optimizer  # noqa: E402

FRESH = r"""
import json, sys
import numpy as np
import tensorflow as tf
spec = json.load(open(sys.argv[1]))
for name, job in spec.items():
    sig = tf.saved_model.load(job["path"]).signatures["serving_default"]
    feed = {k: tf.constant(np.array(v, dtype=object), dtype=tf.string) for k, v in job["inputs"].items()}
    np.save(job["out"], sig(**feed)["embedding"].numpy())
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("ebr", "trainer", "tensorflow_recommenders",
                                                           "scann"))
json.dump(ours, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data_dir = str(root / "data")
    tfx.write_dataset(data_dir, n_examples=600)
    config = tfx.tiny_config(data_dir, str(root / "models"))
    corpus = load_corpus(os.path.join(data_dir, "corpus/*.tfrecord.gz"))
    model = UnifiedEmbeddingModel(config, corpus)
    model.compile(optimizer=make_optimizer(config))
    ds = data.make_dataset(os.path.join(data_dir, "train/*.tfrecord.gz"), 64, repeat=True, drop_remainder=True)
    model.fit(ds, epochs=1, steps_per_epoch=15, verbose=0)
    paths = export_towers(model, config.model_dir, None, {"config": {"note": "test"}, "metrics": {"x": 1.0}})
    return model, paths, data_dir, config, corpus


def _inputs(data_dir, n=12):
    batch = next(iter(data.make_dataset(os.path.join(data_dir, "eval/*.tfrecord.gz"), n, shuffle=False)))
    batch["query"] = tf.concat([batch["query"][:-1], tf.constant([""])], 0)  # empty text too
    return batch


def test_layout_metadata_and_atomic_versions(exported):
    model, paths, _, config, _ = exported
    assert paths == {"query_tower": os.path.join(config.model_dir, "query_tower", "1"),
                     "doc_tower": os.path.join(config.model_dir, "doc_tower", "1")}
    for name, path in paths.items():
        assert sorted(os.listdir(os.path.dirname(path))) == ["1"]  # no temp dirs left behind
        assert {"saved_model.pb", "variables", "ebr_metadata.json"} <= set(os.listdir(path))
        meta = json.load(open(os.path.join(path, "ebr_metadata.json")))
        assert meta["model_name"] == name and meta["version"] == 1 and meta["dimension"] == 16
        assert meta["schema_hash"] == features.schema_hash()
        assert meta["config"] == {"note": "test"} and meta["metrics"] == {"x": 1.0} and meta["created"]
    assert next_version(config.model_dir) == 2
    with pytest.raises(ExportError, match="already exists"):
        export_towers(model, config.model_dir, 1)
    assert sorted(os.listdir(os.path.join(config.model_dir, "query_tower"))) == ["1"]


def test_signatures_take_named_raw_strings(exported):
    _, paths, *_ = exported
    for name, names in (("query_tower", features.QUERY_INPUTS), ("doc_tower", features.DOC_INPUTS)):
        sig = tf.saved_model.load(paths[name]).signatures["serving_default"]
        spec = sig.structured_input_signature[1]
        assert set(spec) == set(names)
        for n, s in spec.items():
            assert s.dtype == tf.string
            assert s.shape.rank == (2 if features.BY_NAME[n].kind == features.MULTI else 1)
        assert list(sig.structured_outputs) == ["embedding"]


def test_no_tfrs_scann_or_pyfunc_ops(exported):
    _, paths, *_ = exported
    for path in paths.values():
        ops = exported_op_types(path)
        assert "StringToHashBucketFast" in ops and "MatMul" in ops  # really the tower graph
        bad = [op for op in ops if any(m.lower() in op.lower() for m in FORBIDDEN_OP_MARKERS)]
        assert not bad
        # Every op is a stock TensorFlow op.
        from tensorflow.python.framework import op_def_registry
        assert all(op_def_registry.get(op) is not None for op in ops)


def test_fresh_stock_tensorflow_process_reproduces_embeddings(exported, tmp_path):
    model, paths, data_dir, *_ = exported
    batch = _inputs(data_dir)
    spec = {}
    for name, tower in (("query_tower", model.query_tower), ("doc_tower", model.doc_tower)):
        inputs = {k: [[x.decode() for x in row] if np.ndim(row) else row.decode() for row in v.numpy()]
                  for k, v in tower.select(batch).items()}
        spec[name] = {"path": paths[name], "inputs": inputs, "out": str(tmp_path / f"{name}.npy")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
    proc = subprocess.run([sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "spec.json"),
                           str(tmp_path / "mods.json")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "mods.json").read_text()) == []
    for name, tower in (("query_tower", model.query_tower), ("doc_tower", model.doc_tower)):
        expected = tower(tower.select(batch), training=False).numpy()
        got = np.load(spec[name]["out"])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_load_tower_checks_and_matches(exported, tmp_path):
    import shutil

    model, paths, data_dir, config, _ = exported
    batch = _inputs(data_dir)
    q = load_tower(os.path.join(config.model_dir, "query_tower"))  # newest version
    assert q.path == paths["query_tower"] and q.dimension == 16
    np.testing.assert_allclose(q(batch), model.query_tower(model.query_tower.select(batch)).numpy(),
                               rtol=1e-5, atol=1e-6)
    lists = {k: [[x.decode() for x in row] if np.ndim(row) else row.decode() for row in v.numpy()]
             for k, v in model.doc_tower.select(batch).items()}
    np.testing.assert_allclose(load_tower(paths["doc_tower"])(lists),
                               model.doc_tower(model.doc_tower.select(batch)).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="missing input"):
        q({"query": ["x"]})
    broken = tmp_path / "query_tower" / "3"
    shutil.copytree(paths["query_tower"], broken)
    meta = json.loads((broken / "ebr_metadata.json").read_text())
    (broken / "ebr_metadata.json").write_text(json.dumps(dict(meta, schema_hash="0" * 16)))
    with pytest.raises(ExportError, match=str(broken / "ebr_metadata.json")):
        load_tower(str(broken.parent))
    (broken / "ebr_metadata.json").unlink()
    with pytest.raises(ExportError, match="missing"):
        load_tower(str(broken))
    with pytest.raises(ExportError, match="no saved_model.pb"):
        load_tower(str(tmp_path / "empty"))


def test_evaluate_from_exports_matches_in_memory_model(exported, tmp_path):
    model, paths, data_dir, _, corpus = exported
    kw = dict(eval_pattern=os.path.join(data_dir, "eval/*.tfrecord.gz"), corpus=corpus,
              train_pattern=os.path.join(data_dir, "train/*.tfrecord.gz"), data_dir=data_dir, ks=(1, 5, 10))
    in_memory = evaluate(model, **kw)
    out = tmp_path / "eval.json"
    from ebr import cli
    code = cli.main(["evaluate", "--model", paths["query_tower"], "--data-dir", data_dir,
                     "--ks", "1,5,10", "--output", str(out)])
    assert code == 0
    from_export = json.loads(out.read_text())
    # Same graph and weights: equal up to a float tie flipping one example's rank.
    for protocol, values in in_memory["protocols"].items():
        assert from_export["protocols"][protocol] == pytest.approx(values, abs=1.01 / in_memory["examples"])
    assert from_export["query_tower"] == paths["query_tower"] and from_export["doc_tower"] == paths["doc_tower"]
    assert from_export["split"]["method"] == "hash" and from_export["examples"] == in_memory["examples"]
