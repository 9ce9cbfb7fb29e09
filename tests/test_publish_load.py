"""Publishing under load with default settings: `ebr serve model` (default `--num-versions 1`)
and `ebr serve retrieval` as separate processes on loopback, 8 client threads calling Retrieve
while a new pair is published model then index, index then model, and as a pair that can never
be consistent (a copied tower directory, docs/contracts.md section 6): no request may fail,
readiness stays SERVING, every response comes from one consistent pair, and the pair switches
as one unit (never back to the old one)."""
from __future__ import annotations

import shutil
import threading
import time
import urllib.request

import grpc

from serving_fixtures import free_port, shared_stack, start_cli_server, wait_serving

CLIENTS = 8


class Load:
    """CLIENTS threads calling Retrieve, plus one watching health, until `stop()`."""

    def __init__(self, address: str):
        self.address = address
        self.halt = threading.Event()
        self.out: list = []  # (monotonic time, model_version, index_version) per answer
        self.errors: list = []  # (monotonic time, code, details) per failed request
        self.health: list = []  # (monotonic time, status) per health check
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]
        self.threads.append(threading.Thread(target=self._watch))
        for t in self.threads:
            t.start()

    def _client(self, seed: int) -> None:
        from serving.retrieval.client import RetrievalClient

        with RetrievalClient(self.address) as c:
            i = seed
            while not self.halt.is_set():
                try:
                    r = c.retrieve(f"club t{i % 120}x", k=10, timeout=10)
                    self.out.append((time.monotonic(), r.model_version, r.index_version))
                except grpc.RpcError as e:
                    self.errors.append((time.monotonic(), e.code().name, e.details()))
                i += CLIENTS

    def _watch(self) -> None:
        from serving.retrieval.client import RetrievalClient

        with RetrievalClient(self.address) as c:
            while not self.halt.is_set():
                self.health.append((time.monotonic(), c.health(timeout=5)))
                time.sleep(0.1)

    def pairs_since(self, t: float) -> list:
        return [(m, i) for when, m, i in list(self.out) if when >= t]

    def wait_for_pair(self, pair: tuple, timeout: float = 45.0) -> float:
        """Until an answer comes from `pair`; returns when the first one did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [when for when, m, i in list(self.out) if (m, i) == pair]
            if hits:
                return hits[0]
            time.sleep(0.1)
        raise AssertionError(f"no answer from pair {pair} within {timeout}s; last "
                             f"{self.out[-1:]}; errors {self.errors[:3]}")

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(timeout=30)


def _metric(port: int, line_start: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_publishes_under_load_fail_no_request(tmp_path_factory, tmp_path):
    stack = shared_stack(tmp_path_factory).fork(tmp_path_factory.mktemp("publish"))
    model_port, port, metrics_port = free_port(), free_port(), free_port()
    model_log, retrieval_log = tmp_path / "model.log", tmp_path / "retrieval.log"
    # Default settings: the model server serves the newest version only (--num-versions 1).
    model = start_cli_server(["model", "--model-base-path", str(stack.model_dir),
                              "--host", "127.0.0.1", "--port", str(model_port)], model_log)
    retrieval = None
    load = None
    try:
        retrieval = start_cli_server(
            ["retrieval", "--index", str(stack.index_base), "--model", str(stack.model_dir),
             "--model-address", f"127.0.0.1:{model_port}", "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", str(metrics_port)], retrieval_log)
        address = f"127.0.0.1:{port}"
        wait_serving(address, retrieval, log_path=retrieval_log)
        load = Load(address)
        time.sleep(1.0)

        # 1. Model then index: version 2 loads on the model server (and would unload 1 under
        #    the latest-1 policy, but the live index pins it), then the index for 2 arrives.
        stack.republish_model(1, as_version=2)  # v1's weights, published as a new export
        time.sleep(2.5)  # at least two polls of both servers with v2 loaded
        assert load.pairs_since(time.monotonic() - 1.0) and set(
            load.pairs_since(time.monotonic() - 1.0)) == {(1, 1)}
        stack.publish_index(2, model_version=2)
        switched_2 = load.wait_for_pair((2, 2))

        # 2. Index then model: index 3 names model 3, published before model 3 exists; the
        #    service waits (without reopening the index) and switches when the model arrives.
        stack._doc_cache[3] = stack.doc_embeddings(1)  # model 3 will carry v1's weights
        stack.publish_index(3, model_version=3)
        time.sleep(2.5)
        assert set(load.pairs_since(time.monotonic() - 1.0)) == {(2, 2)}
        stack.republish_model(1, as_version=3)
        switched_3 = load.wait_for_pair((3, 3))

        # 3. A pair that can never be consistent: towers copied into version 4 as files (their
        #    metadata still says 3), and an index of embeddings labelled with model 3.
        for tower in ("query_tower", "doc_tower"):
            shutil.copytree(stack.model_dir / tower / "3", stack.model_dir / tower / "4")
        stack._doc_cache[4] = stack.doc_embeddings(1)
        stack.publish_index(4, model_version=3)
        deadline = time.monotonic() + 30
        while _metric(metrics_port, 'ebr_retrieval_refused_pairs_total{reason="copied-tower"}') < 1:
            assert time.monotonic() < deadline, retrieval_log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2.5)  # the old pair keeps serving, with model 4 loaded beside it
        assert set(load.pairs_since(time.monotonic() - 2.0)) == {(3, 3)}
        assert _metric(metrics_port, "ebr_retrieval_ready ") == 1.0
        load.stop()
    finally:
        if load is not None:
            load.stop()
        for proc in (retrieval, model):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (retrieval, model):
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except Exception:  # noqa: BLE001 - then kill it
                    proc.kill()
                    proc.wait()

    assert not load.errors, f"{len(load.errors)} failed requests, e.g. {load.errors[:3]}"
    assert len(load.out) > 200, len(load.out)
    assert {s for _, s in load.health} == {"SERVING"}, [h for h in load.health
                                                        if h[1] != "SERVING"][:3]
    # Every answer from a consistent pair; the pair switches as one unit and never back.
    order = [(1, 1), (2, 2), (3, 3)]
    pairs = [(m, i) for _, m, i in sorted(load.out)]
    assert set(pairs) <= set(order), set(pairs) - set(order)
    firsts = [pairs.index(p) for p in order]
    assert firsts == sorted(firsts)
    for a, b in zip(order, order[1:]):
        # requests already in flight at a switch may answer from the old pair just after it
        late = [t for t, m, i in load.out if (m, i) == a and t > (switched_2 if b == (2, 2)
                                                                   else switched_3) + 1.0]
        assert not late, f"pair {a} answered after {b} was live"
    logged = retrieval_log.read_text()
    assert "refused new index version" in logged and "copied-tower" in logged
    assert "tower version 4 names version 3" in logged
