"""`ebr demo`, the README's first command, end to end on a small generated data set: every
stage runs as the CLI runs it, both servers start as real processes and answer over gRPC."""
import json

from ebr.cli import main


def test_demo_runs_every_stage_and_answers_queries(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--documents", "800", "--sessions", "4000",
                 "--train", "epochs=1"]) == 0
    printed = capsys.readouterr().out
    for stage in ("examples pipeline", "train and export", "embed the corpus", "build the ANN index",
                  "filtered query"):
        assert f"=== {stage}" in printed
    # each sample query came back over gRPC as a ranked table from the served model/index pair
    assert printed.count("(model v1, index v1 faiss") == 5
    metrics = json.loads((out / "eval.json").read_text())
    assert 0.0 < metrics["protocols"]["all"]["recall_at_10"] <= 1.0
    for sub in ("raw", "examples", "models/query_tower/1", "models/doc_tower/1", "embeddings", "index/1",
                "logs/model_server.log", "logs/retrieval.log"):
        assert (out / sub).exists(), sub


def test_demo_on_the_bucket_leaves_every_artifact_there_and_serves_from_it(tmp_path, gcs_root,
                                                                           gcs_env):
    """`ebr demo --out gs://...` as a user runs it (a fresh process), against the emulator of
    tests/gcs_emulator.py: TensorFlow's and Beam's own gs:// code, nothing local but logs."""
    import subprocess
    import sys

    from ebr import artifacts, storage

    proc = subprocess.run([sys.executable, "-m", "ebr.cli", "demo", "--out", gcs_root,
                           "--documents", "600", "--sessions", "3000", "--train", "epochs=1"],
                          cwd=tmp_path, env=gcs_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("(model v1, index v1 faiss") == 5
    assert not (tmp_path / "gs:").exists() and list(tmp_path.iterdir()) == []
    assert storage.exists(storage.join(gcs_root, "raw", "sessions.jsonl")) or storage.exists(
        storage.join(gcs_root, "raw", "sessions.jsonl.gz"))
    for base in ("examples", "models/query_tower", "models/doc_tower", "embeddings", "index"):
        vdir = artifacts.resolve(storage.join(gcs_root, base))
        assert vdir.endswith(f"{base}/1")
        artifacts.verify(vdir)
    metrics = storage.read_json(storage.join(gcs_root, "eval.json"))
    assert 0.0 < metrics["protocols"]["all"]["recall_at_10"] <= 1.0
