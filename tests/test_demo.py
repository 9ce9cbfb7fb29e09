"""`ebr demo`, the README's first command, end to end on a small generated data set: every
stage runs as the CLI runs it, both servers start as real processes and answer over gRPC."""
import json

from ebr.cli import main


def test_demo_runs_every_stage_and_answers_queries(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--documents", "800", "--sessions", "4000",
                 "--set", "epochs=1"]) == 0
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
