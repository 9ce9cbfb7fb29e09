"""`ebr demo`: the whole flow end to end on the embedded default data, everything under --out.

generate social-search logs -> Beam examples pipeline -> train the unified model and export the
towers -> evaluate -> embed the corpus (Beam) -> build the IVF-PQ index -> start the model server
(TF Serving API) and the retrieval service as real processes -> ask a few queries over gRPC.
Each stage is the same `ebr` subcommand a user would run; the commands are printed as they go.
--out is any URI (`gs://BUCKET/demo` included): every artifact lands there and the servers load
from there; only the servers' own log files stay on local disk.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ebr import config, storage

log = logging.getLogger("ebr.demo")

# Small enough for a laptop-sized run (a few minutes on 2 cores), large enough that the
# generator's structure (shared names, communities, typos) shows up in the results.
@dataclasses.dataclass
class DemoConfig:
    out: str = "ebr-demo"  # everything the demo makes goes here (any URI, e.g. gs://BUCKET/demo)
    documents: int = 5_000  # documents the generator makes
    sessions: int = 40_000  # search sessions the generator logs
    seed: int = 7  # the generator's seed
    # Training settings (trainer.config.TrainConfig keys) passed on to `ebr train --set`.
    train: dict = dataclasses.field(default_factory=lambda: {
        "epochs": 3, "batch_size": 512, "hash_bucket_cap": 50000, "text_char_buckets": 50000,
        "text_word_buckets": 50000, "eval_ks": "10,50,100"})


NUM_QUERIES = 4


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole stack end to end on generated data")
    config.add_arguments(p, DemoConfig)
    p.set_defaults(func=run)


def _stage(title: str, argv: list[str]) -> None:
    from ebr.cli import main

    print(f"\n=== {title}\n$ ebr {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    code = main(argv)
    if code:
        raise SystemExit(f"ebr demo: stage '{title}' failed with exit code {code}")
    print(f"--- {title}: {time.perf_counter() - started:.1f} s", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_queries(raw: str, n: int) -> list[dict]:
    """Distinct clicked queries from the logs, with the searcher who asked them."""
    path = _raw_file(raw, "sessions")
    data = storage.read_bytes(path)
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    seen, out = set(), []
    for line in data.decode("utf-8").splitlines():
        s = json.loads(line)
        if s.get("query") and s.get("clicks") and s["query"] not in seen:
            seen.add(s["query"])
            out.append(s)
            if len(out) == n:
                break
    return out


def _start(argv: list[str], log_path: Path) -> subprocess.Popen:
    print(f"$ ebr {shlex.join(argv)} &", flush=True)
    return subprocess.Popen([sys.executable, "-m", "ebr.cli", *argv], stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # graceful drain
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args) -> int:
    cfg = config.from_args(DemoConfig, args)
    config.announce("demo", cfg)
    out = storage.normalize(cfg.out)
    config.save(cfg, out)
    raw, examples, models = (storage.join(out, d) for d in ("raw", "examples", "models"))
    embeddings, index = storage.join(out, "embeddings"), storage.join(out, "index")

    _stage("generate social-search logs", ["data", "social", "--out", str(raw), "--documents",
                                            str(cfg.documents), "--sessions", str(cfg.sessions),
                                            "--seed", str(cfg.seed)])
    _stage("examples pipeline (Beam)", ["pipeline", "examples", "--input", str(raw), "--output",
                                        str(examples)])
    train_sets = [x for k, v in cfg.train.items() for x in ("--set", f"{k}={v}")]
    _stage("train and export towers", ["train", "--data-dir", examples, "--model-dir", models,
                                       "--output", storage.join(out, "train.json"), *train_sets])
    query_tower, doc_tower = storage.join(models, "query_tower"), storage.join(models, "doc_tower")
    _stage("evaluate (exact search over the corpus)",
           ["evaluate", "--model", query_tower, "--doc-model", doc_tower, "--data-dir", examples,
            "--output", storage.join(out, "eval.json")])
    _stage("embed the corpus (Beam)", ["embed", "--model", doc_tower, "--corpus", examples,
                                       "--output", embeddings])
    _stage("build the ANN index", ["index", "build", "--embeddings", str(embeddings), "--output",
                                   str(index)])

    print("\n=== serve: model server (TF Serving API) + retrieval service", flush=True)
    model_port, retrieval_port = _free_port(), _free_port()
    logs = Path(out, "logs") if storage.is_local(out) else Path(tempfile.mkdtemp(prefix="ebr-demo-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    servers = [_start(["serve", "model", "--model-base-path", str(models), "--port", str(model_port),
                       "--rest-port", "0"], logs / "model_server.log")]
    try:
        servers.append(_start(["serve", "retrieval", "--index", str(index), "--model-address",
                               f"localhost:{model_port}", "--model", query_tower,
                               "--port", str(retrieval_port)], logs / "retrieval.log"))
        from serving.retrieval.client import RetrievalClient

        address = f"localhost:{retrieval_port}"
        with RetrievalClient(address) as client:
            try:
                client.wait_ready(timeout=180)
            except Exception as e:
                raise SystemExit(f"ebr demo: retrieval service did not become ready ({e}); "
                                 f"see {logs}") from None
        for session in _sample_queries(raw, NUM_QUERIES):
            _stage(f"query {session['query']!r} (the log: {session['searcher_id']} clicked "
                   f"{', '.join(session['clicks'])})", ["query", session["query"], "--address", address,
                                                   "--searcher", session["searcher_id"], "--searchers",
                                                   _raw_file(raw, "searchers"), "-k", "5"])
        first = _sample_queries(raw, 1)[0]
        _stage("filtered query", ["query", first["query"], "--address", address, "--searcher",
                                  first["searcher_id"], "--searchers", _raw_file(raw, "searchers"),
                                  "-k", "5", "--filter", "NOT type:person"])
    finally:
        for proc in reversed(servers):
            _stop(proc)

    metrics = storage.read_json(storage.join(out, "eval.json"))
    print(f"\nDone. Everything is under {out}.\nHeld-out recall: {json.dumps(_recalls(metrics))}")
    return 0


def _raw_file(raw: str, name: str) -> str:
    plain = storage.join(raw, f"{name}.jsonl")
    return plain if storage.exists(plain) else f"{plain}.gz"


def _recalls(metrics: dict) -> dict:
    """The recall@K numbers wherever `ebr evaluate` nests them."""
    found = {}

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, (int, float)) and "recall" in prefix:
            found[prefix.rstrip(".")] = round(float(node), 4)

    walk(metrics)
    return found
