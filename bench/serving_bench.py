"""Serving benchmark: QPS and p50/p99 latency over loopback gRPC against the same work
called in-process in the same run; the ratio is the serving overhead.

Measured, each at concurrency 1, 8 and 32 (closed loop, `--seconds` per point, median of
`--repeats`):
  predict             TF Serving API Predict of the query tower (`ebr serve model`)
  predict_inprocess   the same SavedModel signature called in this process
  retrieve            Retrieve on `ebr serve retrieval` (in-process query tower + IVF-PQ index)
  retrieve_remote     Retrieve with the query tower behind the model server (the k8s topology)
  retrieve_inprocess  embedding + index search called in this process
Where the time goes comes from the servers' own per-stage debug latencies (embed, search) and
the client-observed latency (the rest is gRPC, Python and queueing).

The index holds `--docs` (default 1M, `--quick` 100k) clustered unit vectors at the query
tower's dimension, built as FAISS IVF-PQ by `index.build_index`; the query tower is the real
exported architecture (default TrainConfig), untrained: serving cost does not depend on weights.
Servers run as separate processes (`ebr serve ...`), as in production; the load generator uses
gRPC futures from one thread so it competes as little as possible for the 2 cores.

    python bench/serving_bench.py --quick --out serving_bench.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ebr  # noqa: E402,F401  (legacy Keras before TensorFlow)
from ebr import features  # noqa: E402

log = logging.getLogger("serving_bench")
WORDS = ("music hiking chess cooking python soccer poetry cycling gardening movies travel physics "
         "club group page seattle paris tokyo lagos lima jon smith anna lee").split()


# ---------------------------------------------------------------------------------------------
# Fixtures: model, embeddings, index, queries


def export_model(model_dir: Path, n_docs: int) -> Path:
    """The real query/doc tower architecture (default TrainConfig), exported untrained."""
    import tensorflow as tf

    from serving.retrieval.embedder import build_inputs
    from trainer.config import TrainConfig
    from trainer.export import export_towers
    from trainer.model import UnifiedEmbeddingModel

    tf.keras.utils.set_random_seed(0)
    model = UnifiedEmbeddingModel(TrainConfig(), corpus_size=n_docs)
    # Build the variables eagerly (the exporter tracks the variables that exist).
    q = build_inputs([{features.QUERY_TEXT: "warm up"}])
    model.query_tower({k: tf.constant(v) for k, v in q.items()})
    d = {}
    for name in features.DOC_INPUTS:
        multi = features.BY_NAME[name].kind == features.MULTI
        d[name] = tf.constant([[b""]] if multi else [b"x"])
    model.doc_tower(d)
    export_towers(model, str(model_dir), 1)
    return model_dir / "query_tower"


def clustered_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 2,000 centres: IVF sees cluster structure, unlike i.i.d. noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, dim)).astype(np.float32)
    X = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


def build_index(work: Path, n_docs: int, dim: int, model_version: int) -> Path:
    import index
    from index.embeddings import write_embeddings

    X = clustered_vectors(n_docs, dim)
    ids = [f"d{i}" for i in range(n_docs)]
    terms = [[f"city:c{i % 50}", f"type:{'group' if i % 3 else 'page'}"] for i in range(n_docs)]
    emb = work / "emb"
    t = time.perf_counter()
    write_embeddings(emb, ids, X, terms, schema_hash=features.schema_hash(),
                     model_version=model_version, shards=4)
    log.info("wrote %d embeddings in %.1fs", n_docs, time.perf_counter() - t)
    t = time.perf_counter()
    base = work / "index"
    index.build_index(str(emb), str(base), backend="faiss")
    log.info("built IVF-PQ index in %.1fs", time.perf_counter() - t)
    return base


def make_queries(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        # SearcherFeatures field names (`searcher_id`, `history_doc_ids` are also feature names)
        out.append({features.QUERY_TEXT: text, features.SEARCHER_ID: f"u{rng.integers(10_000)}",
                    "city": str(rng.choice(["seattle", "paris", "tokyo"])),
                    "friends": [f"u{rng.integers(10_000)}" for _ in range(int(rng.integers(0, 20)))],
                    features.HISTORY_DOC_IDS: [f"d{rng.integers(1000)}" for _ in range(int(rng.integers(0, 10)))]})
    return out


def feature_values(q: dict) -> dict:
    from serving.retrieval.validation import SEARCHER_INPUTS, TEXT_INPUT

    values = {TEXT_INPUT: q[features.QUERY_TEXT]}
    for field, name in SEARCHER_INPUTS.items():
        if field in q:
            values[name] = q[field]
    return values


# ---------------------------------------------------------------------------------------------
# Load generation


def percentiles(lat: list[float]) -> dict:
    a = np.asarray(lat) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def closed_loop_grpc(call_future, requests: list, concurrency: int, seconds: float) -> dict:
    """`concurrency` requests always outstanding, each completion issuing the next."""
    lat, errors, debug = [], [], []
    lock = threading.Lock()
    done = threading.Event()
    state = {"live": concurrency, "i": 0}
    stop_at = time.perf_counter() + seconds

    def launch():
        with lock:
            req = requests[state["i"] % len(requests)]
            state["i"] += 1
        t = time.perf_counter()
        call_future(req).add_done_callback(lambda f, t=t: finish(f, t))

    def finish(f, t):
        elapsed = time.perf_counter() - t
        exc = f.exception()
        with lock:
            if exc is None:
                lat.append(elapsed)
                r = f.result()
                if hasattr(r, "debug"):
                    debug.append({s.stage: s.micros for s in r.debug.latency})
            else:
                errors.append(exc.code().name)
        if time.perf_counter() < stop_at:
            launch()
        else:
            with lock:
                state["live"] -= 1
                if state["live"] == 0:
                    done.set()

    start = time.perf_counter()
    for _ in range(concurrency):
        launch()
    done.wait(seconds + 60)
    wall = time.perf_counter() - start
    out = {"qps": len(lat) / wall, "requests": len(lat), "errors": len(errors), **percentiles(lat)}
    if errors:
        out["error_codes"] = sorted(set(errors))
    if debug:
        for stage in debug[0]:
            out[f"server_{stage}_mean_ms"] = float(np.mean([d.get(stage, 0) for d in debug]) / 1000)
    return out


def closed_loop_threads(fn, items: list, concurrency: int, seconds: float) -> dict:
    lat: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(offset):
        i, mine = offset, []
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            fn(items[i % len(items)])
            mine.append(time.perf_counter() - t)
            i += concurrency
        with lock:
            lat.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"qps": len(lat) / wall, "requests": len(lat), "errors": 0, **percentiles(lat)}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of a process (this one when pid is None), from /proc."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(fn, pids: list[int | None]):
    """Runs fn() and adds CPU milliseconds per request spent by `pids` (None = this process).

    On a shared machine wall-clock QPS mostly measures the neighbours; CPU per request does
    not, and 2 cores / (CPU per request) is the capacity the service would have alone."""
    before = [cpu_seconds(p) for p in pids]
    out = fn()
    used = sum(cpu_seconds(p) - b for p, b in zip(pids, before))
    n = max(1, out["requests"])
    out["cpu_ms_per_request"] = used * 1000 / n
    out["capacity_qps_2_cores"] = 2000.0 / max(out["cpu_ms_per_request"], 1e-9)
    return out


def scrape_batches(port: int) -> tuple[float, float]:
    """(queries embedded, tower calls) so far, from the service's Prometheus metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("ebr_retrieval_embed_batch_size_sum") or \
                line.startswith("ebr_retrieval_embed_batch_size_count"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return (values.get("ebr_retrieval_embed_batch_size_sum", 0.0),
            values.get("ebr_retrieval_embed_batch_size_count", 0.0))


def median_of(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = float(np.median(vals)) if len(vals) == len(runs) else runs[-1][key]
    return out


# ---------------------------------------------------------------------------------------------
# Servers


def spawn(args: list[str], log_file: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "ebr.cli", "serve", *args], cwd=str(REPO),
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log_file, "wb"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(address: str, proc: subprocess.Popen, log_file: Path, timeout: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_file.read_text()[-2000:]}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                channel.close()
                return
        except grpc.RpcError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{address} not serving: {log_file.read_text()[-2000:]}")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from serving.retrieval.config import ServeConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100k documents, shorter runs")
    p.add_argument("--docs", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", default="1,8,32")
    # The retrieval service's own defaults (ServeConfig), varied here for the comparison.
    p.add_argument("--workers", type=int, default=ServeConfig.workers,
                   help="retrieval service worker threads")
    p.add_argument("--embed-batch", type=int, default=ServeConfig.embed_batch,
                   help="retrieval service --embed-batch")
    p.add_argument("--embed-threads", type=int, default=ServeConfig.embed_threads,
                   help="retrieval service --embed-threads")
    p.add_argument("--tf-threads", type=int, default=ServeConfig.tf_threads,
                   help="retrieval service --tf-threads")
    p.add_argument("--nprobe", type=int, default=0, help="search param (0 = index default)")
    p.add_argument("--workdir", help="keep fixtures here (reused when present)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    n_docs = args.docs or (100_000 if args.quick else 1_000_000)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    import index
    from serving.retrieval import embedder, retrieval_pb2_grpc
    from serving.retrieval.client import make_request

    model_dir = work / "models"
    if not (model_dir / "query_tower").exists():
        export_model(model_dir, n_docs)
    source = embedder.LocalModelSource(model_dir / "query_tower")
    encoder = source.open(None)
    dim = encoder.info.dimension
    index_base = work / "index"
    from ebr import artifacts

    if not artifacts.versions(str(index_base)):
        build_index(work, n_docs, dim, encoder.info.version)
    searcher = index.open_index(str(index_base))
    params = {"nprobe": args.nprobe} if args.nprobe else None

    queries = make_queries(512)
    inputs = [embedder.build_inputs([feature_values(q)]) for q in queries]
    retrieve_requests = [make_request(q[features.QUERY_TEXT],
                                      searcher={k: v for k, v in q.items() if k != features.QUERY_TEXT},
                                      k=10) for q in queries]
    predict_requests = []
    for x in inputs:
        r = predict_pb2.PredictRequest()
        r.model_spec.name = "query_tower"
        r.model_spec.signature_name = embedder.SIGNATURE
        for name, arr in x.items():
            r.inputs[name].CopyFrom(embedder.tensor_proto(arr))
        predict_requests.append(r)

    from serving.retrieval.threads import set_search_threads

    results: dict = {"config": {"docs": n_docs, "dimension": dim, "seconds": seconds,
                                "repeats": args.repeats, "concurrency": levels,
                                "workers": args.workers, "cpus": os.cpu_count(),
                                "embed_batch": args.embed_batch, "embed_threads": args.embed_threads,
                                "tf_threads": args.tf_threads,
                                "loadavg_before": os.getloadavg(),
                                "index": dict(searcher.manifest), "search_params": params}}

    def in_process_retrieve(x):
        set_search_threads(1)  # as the service's workers do (--search-threads 1)
        return searcher.search(encoder.embed(x), 10, params=params)

    for x in inputs[:8]:
        in_process_retrieve(x)
    set_search_threads(1)
    stage = {"embed": [], "search": []}
    for x in inputs[:200]:
        t = time.perf_counter()
        v = encoder.embed(x)
        t2 = time.perf_counter()
        searcher.search(v, 10, params=params)
        stage["embed"].append(t2 - t)
        stage["search"].append(time.perf_counter() - t2)
    results["inprocess_stage_ms"] = {k: percentiles(v) for k, v in stage.items()}

    procs = []
    try:
        ms_port, r_port, rr_port = free_port(), free_port(), free_port()
        r_metrics, rr_metrics = free_port(), free_port()
        search_flags = [f"--search-param=nprobe={args.nprobe}"] if args.nprobe else []
        search_flags += [f"--embed-batch={args.embed_batch}", f"--embed-threads={args.embed_threads}"]
        search_flags += [f"--tf-threads={args.tf_threads}"]
        ms = spawn(["model", "--model-base-path", str(model_dir), "--host", "127.0.0.1",
                    "--port", str(ms_port), "--threads", "32"], work / "model_server.log")
        procs.append(ms)
        rs = spawn(["retrieval", "--index", str(index_base), "--model", str(model_dir / "query_tower"),
                    "--host", "127.0.0.1", "--port", str(r_port), "--workers", str(args.workers),
                    "--metrics-port", str(r_metrics),
                    "--max-queue", "64", *search_flags], work / "retrieval.log")
        procs.append(rs)
        wait_health(f"127.0.0.1:{ms_port}", ms, work / "model_server.log")
        rr = spawn(["retrieval", "--index", str(index_base), "--model", str(model_dir / "query_tower"),
                    "--model-address", f"127.0.0.1:{ms_port}", "--host", "127.0.0.1",
                    "--port", str(rr_port), "--workers", str(args.workers), "--max-queue", "64",
                    "--metrics-port", str(rr_metrics),
                    *search_flags], work / "retrieval_remote.log")
        procs.append(rr)
        wait_health(f"127.0.0.1:{r_port}", rs, work / "retrieval.log")
        wait_health(f"127.0.0.1:{rr_port}", rr, work / "retrieval_remote.log")

        predict = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{ms_port}")).Predict
        retrieve = retrieval_pb2_grpc.RetrievalStub(
            grpc.insecure_channel(f"127.0.0.1:{r_port}")).Retrieve
        retrieve_remote = retrieval_pb2_grpc.RetrievalStub(
            grpc.insecure_channel(f"127.0.0.1:{rr_port}")).Retrieve
        for r in predict_requests[:8]:
            predict(r, timeout=30)
        for r in retrieve_requests[:8]:
            retrieve(r, timeout=30)
            retrieve_remote(r, timeout=30)

        # Interleaved (in-process, served, ...) per repeat, so a busy shared machine slows
        # the baseline and the served run alike and their ratio stays meaningful.
        # CPU per request counts the serving processes only (the load generator is not part
        # of the service); in-process cases count this process, which is all of their work.
        cases = {
            "predict_inprocess": lambda c: with_cpu(
                lambda: closed_loop_threads(encoder.embed, inputs, c, seconds), [None]),
            "predict": lambda c: with_cpu(lambda: closed_loop_grpc(
                lambda r: predict.future(r, timeout=30), predict_requests, c, seconds), [ms.pid]),
            "retrieve_inprocess": lambda c: with_cpu(
                lambda: closed_loop_threads(in_process_retrieve, inputs, c, seconds), [None]),
            "retrieve": lambda c: with_cpu(lambda: closed_loop_grpc(
                lambda r: retrieve.future(r, timeout=30), retrieve_requests, c, seconds), [rs.pid]),
            "retrieve_remote": lambda c: with_cpu(lambda: closed_loop_grpc(
                lambda r: retrieve_remote.future(r, timeout=30), retrieve_requests, c, seconds),
                [rr.pid, ms.pid]),
        }
        for name in cases:
            results[name] = {}
        seen = {"retrieve": scrape_batches(r_metrics), "retrieve_remote": scrape_batches(rr_metrics)}
        for c in levels:
            runs: dict = {name: [] for name in cases}
            for _ in range(args.repeats):
                for name, fn in cases.items():
                    runs[name].append(fn(c))
            for name in cases:
                results[name][str(c)] = median_of(runs[name])
            for name, port in (("retrieve", r_metrics), ("retrieve_remote", rr_metrics)):
                batches = scrape_batches(port)
                results[name][str(c)]["mean_embed_batch"] = (
                    (batches[0] - seen[name][0]) / max(1.0, batches[1] - seen[name][1]))
                seen[name] = batches
                log.info("%s c=%d %s", name, c, json.dumps(results[name][str(c)]))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    results["config"]["loadavg_after"] = os.getloadavg()

    ratios = {}
    for served, local in (("predict", "predict_inprocess"), ("retrieve", "retrieve_inprocess"),
                          ("retrieve_remote", "retrieve_inprocess")):
        ratios[served] = {c: {"qps_ratio": results[served][c]["qps"] / results[local][c]["qps"],
                              "cpu_per_request_ratio": results[served][c]["cpu_ms_per_request"]
                              / results[local][c]["cpu_ms_per_request"],
                              "p50_ratio": results[served][c]["p50_ms"] / results[local][c]["p50_ms"],
                              "p99_ratio": results[served][c]["p99_ms"] / results[local][c]["p99_ms"]}
                          for c in results[served]}
    results["serving_overhead"] = ratios
    c8 = results["retrieve"].get("8")
    if c8:
        results["target"] = {"retrieve_p99_ms_at_8": c8["p99_ms"], "p99_target_ms": 10.0,
                             "qps_at_8": c8["qps"], "qps_target": 1500.0,
                             "capacity_qps_2_cores_at_8": c8["capacity_qps_2_cores"],
                             "met": bool(c8["p99_ms"] <= 10.0 and c8["qps"] >= 1500.0)}
        # Where the time goes at concurrency 8: the server's stages vs what the client saw.
        total = c8["mean_ms"]
        results["time_breakdown_c8_ms"] = {
            "client_observed_mean": total,
            "server_queue": c8.get("server_queue_mean_ms"),
            "server_embed": c8.get("server_embed_mean_ms"),
            "server_search": c8.get("server_search_mean_ms"),
            "server_total": c8.get("server_total_mean_ms"),
            "grpc_python_and_queueing": total - (c8.get("server_total_mean_ms") or 0.0)}
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
