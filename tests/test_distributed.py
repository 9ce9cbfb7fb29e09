"""MultiWorkerMirroredStrategy: two worker processes on loopback (TF_CONFIG) train to the same
quality as one process with the same global batch; only the chief exports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import trainer_fixtures as tfx  # noqa: E402

from trainer import task  # noqa: E402

STEPS = ["epochs=2", "steps_per_epoch=25", "batch_size=64", "loss.queue_size=64",
         "loss.queue_warmup_steps=5", "checkpoint_every_steps=20"]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_match_one_process(tmp_path):
    data_dir = str(tmp_path / "data")
    tfx.write_dataset(data_dir, n_examples=1500)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = tfx.subprocess_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                                 CLOUD_ML_HP_METRIC_FILE=str(tmp_path / f"hp{i}"))
        cmd = tfx.task_command(data_dir, str(tmp_path / "multi"), *STEPS) + ["--output", str(tmp_path / f"w{i}.json")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tfx.REPO, stdout=subprocess.DEVNULL,
                                      stderr=open(tmp_path / f"w{i}.log", "w")))
    # The single-process baseline in this process while the workers run.
    single = task.train(tfx.tiny_config(data_dir, str(tmp_path / "single"), *STEPS))
    for i, p in enumerate(procs):
        assert p.wait(timeout=400) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    chief = json.loads((tmp_path / "w0.json").read_text())
    other = json.loads((tmp_path / "w1.json").read_text())
    assert chief["chief"] and not other["chief"]
    log0 = (tmp_path / "w0.log").read_text()
    assert "on 2 replica(s)" in log0  # really distributed
    assert chief["steps"] == single["steps"] == 50
    # Only the chief's export and hypertune report exist.
    assert sorted(os.listdir(tmp_path / "multi" / "query_tower")) == ["1"]
    assert (tmp_path / "hp0").exists() and not (tmp_path / "hp1").exists()
    multi_r = chief["metrics"]["eval"]["protocols"]["all"]
    single_r = single["metrics"]["eval"]["protocols"]["all"]
    random_r10 = 10 / single["metrics"]["eval"]["corpus_size"]
    assert single_r["recall_at_10"] > 3 * random_r10
    for k in ("recall_at_10", "recall_at_50"):
        assert abs(multi_r[k] - single_r[k]) <= 0.08, (multi_r, single_r)
    # Both workers evaluated the same synchronised model.
    assert other["metrics"]["eval"]["protocols"] == chief["metrics"]["eval"]["protocols"]
