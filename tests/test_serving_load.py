"""Load and failure: 8 clients for 10 s while a new model version and a new index
version are published, through the production topology (retrieval service -> model server over
TF Serving's PredictionService); kill -9 of a server mid-load, restart on the same ports, and a
graceful drain on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc

from serving_fixtures import free_port, shared_stack, start_cli_server, wait_serving

CLIENTS = 8
SECONDS = 10.0


def _start_hammers(address: str, n: int):
    """n client threads calling Retrieve until `stop` is set: (stop, out, errors, threads)."""
    stop, out, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_hammer, args=(address, stop, out, errors)) for _ in range(n)]
    for t in threads:
        t.start()
    return stop, out, errors, threads


def _hammer(address: str, stop: threading.Event, out: list, errors: list, pause: float = 0.0):
    from serving.retrieval.client import RetrievalClient

    with RetrievalClient(address) as c:
        i = 0
        while not stop.is_set():
            try:
                r = c.retrieve(f"club t{i % 120}x", k=10, timeout=10)
                out.append((time.monotonic(), r.model_version, r.index_version))
            except grpc.RpcError as e:
                errors.append((time.monotonic(), e.code().name, e.details()))
            i += 1
            if pause:
                time.sleep(pause)


def test_publish_model_and_index_under_load(tmp_path_factory):
    from serving.model_server.server import start_model_server
    from serving.retrieval.config import ServeConfig
    from serving.retrieval.server import RetrievalServer

    stack = shared_stack(tmp_path_factory).fork(tmp_path_factory.mktemp("load"))
    # Two versions stay loaded (TF Serving's `latest {num_versions: 2}`) so the retrieval
    # service can keep its pinned version until the matching index arrives.
    ms = start_model_server(stack.model_dir, 0, num_versions=2, poll_seconds=0.2)
    ms.wait_until_serving(30)
    srv = RetrievalServer(ServeConfig(
        index=str(stack.index_base), model=str(stack.query_tower),
        model_address=f"127.0.0.1:{ms.port}", host="127.0.0.1", port=0, poll_seconds=0.2,
        workers=8, max_queue=32)).start()
    stop = threading.Event()
    per_thread = [[] for _ in range(CLIENTS)]
    errors: list = []
    threads = [threading.Thread(target=_hammer, args=(f"127.0.0.1:{srv.port}", stop, out, errors))
               for out in per_thread]
    try:
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(2.0)
        stack.publish_model(2)  # the model server loads it; the service stays pinned to 1
        time.sleep(0.5)
        stack.publish_index(2, model_version=2)
        published = time.monotonic()
        time.sleep(max(0.0, SECONDS - (time.monotonic() - t0)))
        deadline = time.monotonic() + 15  # slow machine: wait for the switch if still pending
        while srv.manager.pair.index_version != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        srv.stop(2)
        ms.stop(0)
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:3]}"
    reg = srv.metrics.registry  # 8 concurrent clients: the dynamic batcher did batch
    assert (reg.get_sample_value("ebr_retrieval_embed_batch_size_bucket", {"le": "1.0"})
            < reg.get_sample_value("ebr_retrieval_embed_batch_size_count"))
    total = sum(len(o) for o in per_thread)
    assert total > 100, total
    for out in per_thread:
        pairs = [(m, i) for _, m, i in out]
        assert set(pairs) <= {(1, 1), (2, 2)}, set(pairs)  # never a mixed pair
        assert pairs[-1] == (2, 2)
        first_new = pairs.index((2, 2))
        assert all(p == (2, 2) for p in pairs[first_new:]), "went back to the old pair"
        assert all(t < published + 60 for t, *_ in out[:first_new])


def test_kill_9_mid_load_then_restart_and_drain_on_sigterm(tmp_path_factory, tmp_path):
    stack = shared_stack(tmp_path_factory)
    port, metrics_port = free_port(), free_port()
    args = ["retrieval", "--index", str(stack.index_base), "--model", str(stack.query_tower),
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
            "--drain-seconds", "5", "--drain-delay", "1.5"]
    address = f"127.0.0.1:{port}"

    log1 = tmp_path / "first.log"
    first = start_cli_server(args, log1)
    try:
        wait_serving(address, first, log_path=log1)
        stop, out, errors, threads = _start_hammers(address, 4)
        time.sleep(1.5)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=15)
        assert out, "no request succeeded before the kill"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    # Same ports, same directories: nothing the killed process left behind stops a restart.
    log2 = tmp_path / "second.log"
    second = start_cli_server(args, log2)
    try:
        wait_serving(address, second, log_path=log2)
        stop, out, errors, threads = _start_hammers(address, 4)
        time.sleep(1.5)
        sigterm = time.monotonic()
        second.send_signal(signal.SIGTERM)
        from serving.retrieval.client import RetrievalClient

        with RetrievalClient(address) as probe:  # readiness drops while requests still succeed
            while probe.health() == "SERVING":
                time.sleep(0.05)
            not_ready = time.monotonic()
        assert second.wait(timeout=30) == 0, log2.read_text()[-3000:]
        stop.set()
        for t in threads:
            t.join(timeout=15)
        assert not_ready - sigterm < 1.0
        served_while_draining = [t for t, *_ in out if t > not_ready]
        assert served_while_draining, "nothing answered during the drain delay"
        # Nothing failed before the drain delay was over; afterwards new calls are refused.
        assert all(t > sigterm + 1.4 for t, *_ in errors), errors[:3]
        assert {code for _, code, _ in errors} <= {"UNAVAILABLE", "CANCELLED"}, errors[:3]
        # JSON logs: every line our loggers wrote parses, and the drain is logged.
        records = [json.loads(line) for line in log2.read_text().splitlines()
                   if line.startswith("{")]
        assert any(r["message"] == "draining" and r["level"] == "INFO" for r in records)
        assert any(r["message"] == "serving pair" and r["index_version"] == 1 for r in records)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
