"""Warm start: training begins from an exported tower pair (the model in service) on any URI,
restored through the object the export was saved from (`trainer.export.tower_root`); an
export with other tower settings, other variable shapes or no committed pair is a clear error."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import trainer_fixtures as tfx  # noqa: E402

from ebr import artifacts, storage  # noqa: E402
from trainer import data, task  # noqa: E402
from trainer.config import architecture_mismatch  # noqa: E402
from trainer.export import ExportError, load_tower, restore_tower  # noqa: E402
from trainer.towers import build_towers  # noqa: E402

FAST = ["steps_per_epoch=5", "eval_ks=10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Model A: a few real training steps, exported as version 1 of its MODEL_DIR."""
    root = tmp_path_factory.mktemp("warm")
    data_dir = str(root / "data")
    tfx.write_dataset(data_dir, n_examples=400)
    model_dir = str(root / "a")
    result = task.train(tfx.tiny_config(data_dir, model_dir, *FAST))
    return root, data_dir, model_dir, result


def _batch(data_dir, n=16):
    vdir = artifacts.resolve(data_dir, "examples")
    return next(iter(data.make_dataset(os.path.join(vdir, "eval/*.tfrecord.gz"), n, shuffle=False)))


def a_config(model_dir) -> dict:
    return artifacts.read_model_metadata(os.path.join(model_dir, "query_tower", "1"))["config"]


def _embeddings(exports: dict, batch) -> dict:
    return {name: load_tower(path)(batch) for name, path in exports.items()}


def test_warm_start_from_served_pair_on_gcs_keeps_its_embeddings(trained, gcs_root):
    root, data_dir, model_dir, a = trained
    # The pair in service lives in Cloud Storage as version 3; version 4 is a half-published
    # leftover (only the query tower committed it), which the resolver must pass over.
    served = f"{gcs_root}/served"
    artifacts.publish_towers(a["exports"], served, 3)
    storage.copy_file(os.path.join(a["exports"]["query_tower"], artifacts.SAVED_MODEL),
                      f"{served}/query_tower/4/{artifacts.SAVED_MODEL}")
    artifacts.commit(f"{served}/query_tower/4")
    storage.write_bytes(f"{served}/doc_tower/4/{artifacts.SAVED_MODEL}", b"partial")

    # learning_rate 0: the steps run, the weights stay where the warm start put them.
    b = task.train(tfx.tiny_config(data_dir, str(root / "b"), *FAST, "learning_rate=0",
                                   f"warm_start={served}"))
    cold = task.train(tfx.tiny_config(data_dir, str(root / "cold"), *FAST, "learning_rate=0"))
    assert b["steps"] == 5 and cold["warm_start"] is None
    want = {"model_dir": served, "version": 3,
            "towers": {"query_tower": f"{served}/query_tower/3", "doc_tower": f"{served}/doc_tower/3"}}
    assert {k: v for k, v in b["warm_start"].items() if k != "variables"} == want
    assert b["warm_start"]["variables"] > 10
    batch = _batch(data_dir)
    ea, eb, ec = (_embeddings(r["exports"], batch) for r in (a, b, cold))
    for name in ("query_tower", "doc_tower"):
        np.testing.assert_allclose(eb[name], ea[name], rtol=1e-5, atol=1e-6)
        assert not np.allclose(ec[name], ea[name], atol=1e-3)  # a cold start is another model
    assert b["metrics"]["eval"]["protocols"] == a["metrics"]["eval"]["protocols"]
    # Recorded with the new pair: the setting in its config, the resolved versions in metadata.
    meta = json.load(open(os.path.join(b["exports"]["query_tower"], artifacts.MODEL_METADATA)))
    assert meta["config"]["warm_start"] == served
    assert meta["training"]["warm_start"]["version"] == 3
    assert json.load(open(os.path.join(b["exports"]["doc_tower"], "config.json")))["warm_start"] == served


def test_warm_start_under_multi_worker_mirrored_strategy(trained, tmp_path):
    """Two worker processes (TF_CONFIG on loopback): each restores into its mirrored variables."""
    root, data_dir, model_dir, a = trained
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]}
    for s in socks:
        s.close()
    procs = []
    for i in range(2):
        env = tfx.subprocess_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                                 CLOUD_ML_HP_METRIC_FILE=str(tmp_path / f"hp{i}"))
        cmd = tfx.task_command(data_dir, str(tmp_path / "multi"), *FAST, "learning_rate=0",
                               f"warm_start={model_dir}") + ["--output", str(tmp_path / f"w{i}.json")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tfx.REPO, stdout=subprocess.DEVNULL,
                                      stderr=open(tmp_path / f"w{i}.log", "w")))
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    results = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(results):
        log = (tmp_path / f"w{i}.log").read_text()
        assert "on 2 replica(s)" in log and "warm start: restored" in log
        assert r["warm_start"]["version"] == 1
        # Each worker evaluates its own copy of the variables: both hold A's.
        assert r["metrics"]["eval"]["protocols"] == a["metrics"]["eval"]["protocols"]
    batch = _batch(data_dir)
    ea, em = _embeddings(a["exports"], batch), _embeddings(results[0]["exports"], batch)
    for name in ("query_tower", "doc_tower"):
        np.testing.assert_allclose(em[name], ea[name], rtol=1e-5, atol=1e-6)


def test_warm_start_with_other_tower_settings_fails_naming_the_setting(trained):
    root, data_dir, model_dir, a = trained
    with pytest.raises(ValueError, match=rf"warm start from {re.escape(model_dir)}: version 1 of \w+_tower "
                                         r"was trained with other tower settings.*embedding_dim: "
                                         r"8 here, 16 in the export"):
        task.train(tfx.tiny_config(data_dir, str(root / "dim"), *FAST, "embedding_dim=8",
                                   f"warm_start={model_dir}"))
    with pytest.raises(ValueError, match=r"hidden_units: \[16\] here, \[32\] in the export"):
        task.train(tfx.tiny_config(data_dir, str(root / "mlp"), *FAST, "hidden_units=16",
                                   f"warm_start={model_dir}"))
    assert not os.path.exists(root / "dim") and not os.path.exists(root / "mlp")  # failed up front
    # Caps at or above every table's size give the schema's tables: no difference.
    config = tfx.tiny_config(data_dir, "/unused", "hash_bucket_cap=0")
    exported = {**dataclasses.asdict(config), "hash_bucket_cap": 1 << 40}
    assert architecture_mismatch(config, exported) is None
    assert "hash_bucket_cap: 0 here, 2000" in architecture_mismatch(config, a_config(model_dir))
    # The restore itself names a variable whose shape differs from the export's.
    query, _ = build_towers(tfx.tiny_config(data_dir, "/unused", "embedding_dim=8"))
    query(query.select(_batch(data_dir, 2)))
    with pytest.raises(ExportError, match=r"variable .*kernel.* has shape \[32, 8\] here but "
                                          r"\[32, 16\] in the export"):
        restore_tower(query, a["exports"]["query_tower"])


def test_warm_start_without_committed_pair_fails_naming_the_dir(trained):
    root, data_dir, model_dir, a = trained
    # An interrupted publish: both version directories written, neither committed.
    half = str(root / "half")
    for name, path in a["exports"].items():
        shutil.copytree(path, os.path.join(half, name, "1"))
        os.remove(os.path.join(half, name, "1", artifacts.COMMIT_MARKER))
    with pytest.raises(ValueError, match=rf"warm start from {re.escape(half)}: .*no committed tower version"):
        task.train(tfx.tiny_config(data_dir, str(root / "c1"), f"warm_start={half}"))
    with pytest.raises(ValueError, match=rf"warm start from {re.escape(half)}: .*version 1 is not committed"):
        task.train(tfx.tiny_config(data_dir, str(root / "c2"), f"warm_start={half}",
                                   "warm_start_version=1"))
    with pytest.raises(ValueError, match=rf"warm start from {re.escape(model_dir)}: .*/2: tower does not exist"):
        task.train(tfx.tiny_config(data_dir, str(root / "c3"), f"warm_start={model_dir}",
                                   "warm_start_version=2"))
    missing = str(root / "nowhere")
    with pytest.raises(ValueError, match=rf"warm start from {re.escape(missing)}: .*does not exist"):
        task.train(tfx.tiny_config(data_dir, str(root / "c4"), f"warm_start={missing}"))
    with pytest.raises(ValueError, match="warm_start_version 2 needs warm_start"):
        tfx.tiny_config(data_dir, str(root / "c5"), "warm_start_version=2")
    # The command line: bad input, exit 2, one line naming the directory.
    assert task.main(["--data-dir", data_dir, "--model-dir", str(root / "c6"),
                      "--warm-start", missing]) == task.EXIT_BAD_INPUT
