"""The retrieval service over real gRPC on loopback, with a real exported query tower and a real
index: answers, request validation, readiness, model/index pairing, deadlines, saturation, TLS,
metrics, the remote (PredictionService) embedding path and `ebr query`."""
from __future__ import annotations

import filecmp
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving_fixtures import REPO, shared_stack

from ebr import features


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return shared_stack(tmp_path_factory)


def start(stack_or_index, model=None, **kw):
    from serving.retrieval.config import ServeConfig
    from serving.retrieval.server import RetrievalServer

    is_stack = hasattr(stack_or_index, "index_base")
    index_path = str(stack_or_index.index_base if is_stack else stack_or_index)
    model = model or (str(stack_or_index.query_tower) if is_stack else None)
    cfg = dict(index=index_path, model=model, host="127.0.0.1", port=0, metrics_port=0,
               poll_seconds=0.2, drain_seconds=1.0)
    cfg.update(kw)
    return RetrievalServer(ServeConfig(**cfg)).start()


@pytest.fixture(scope="module")
def server(stack):
    srv = start(stack)
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def client(server):
    from serving.retrieval.client import RetrievalClient

    with RetrievalClient(f"127.0.0.1:{server.port}") as c:
        yield c


def test_generated_code_is_current(tmp_path):
    subprocess.run([sys.executable, str(REPO / "serving/protos/generate.py"), str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("retrieval_pb2.py", "retrieval_pb2_grpc.py"):
        generated = Path("serving", "retrieval", name)
        assert filecmp.cmp(tmp_path / generated, REPO / generated, shallow=False), (
            f"{generated} is stale: run `python serving/protos/generate.py`")


def test_retrieve_answers_from_the_pair(stack, client):
    searcher = stack.searchers[0]
    values = features.query_values("", searcher, [])
    del values["query"]
    doc = stack.docs[5]
    title_word = doc["text"].split()[-1]
    r = client.retrieve(title_word, searcher=values, k=10)
    assert len(r.doc_ids) == 10 and len(set(r.doc_ids)) == 10
    assert all(d in {x["doc_id"] for x in stack.docs} for d in r.doc_ids)
    assert r.scores == sorted(r.scores, reverse=True)
    assert (r.model_version, r.index_version, r.backend) == (1, 1, "exact")
    assert r.documents_scanned == len(stack.docs)
    assert (r.search_plan, r.probes) == ("exact", 0)  # the planner's choice reaches the response
    assert {"validate", "embed", "search", "total"} <= set(r.latency_micros)
    assert r.latency_micros["total"] >= r.latency_micros["embed"] > 0

    # The same vector computed in-process scores the same documents (no reordering on the wire).
    from serving.retrieval.embedder import LocalModelSource, build_inputs
    import index

    vec = LocalModelSource(stack.query_tower).open(1).embed(
        build_inputs([dict(values, query=title_word)]))
    direct = index.open_index(str(stack.index_base)).search(vec, 10)
    assert r.doc_ids == list(direct.doc_ids[0])
    assert r.scores == pytest.approx(list(direct.scores[0]), abs=1e-5)

    # Filter and radius reach the index.
    seattle = client.retrieve(title_word, searcher=values, k=10, filter="city:seattle")
    by_id = {d["doc_id"]: d for d in stack.docs}
    assert seattle.doc_ids and all(by_id[d]["city"] == "seattle" for d in seattle.doc_ids)
    cut = r.scores[3]
    near = client.retrieve(title_word, searcher=values, k=10, radius=cut)
    assert near.doc_ids and all(s >= cut - 1e-5 for s in near.scores)
    assert len(near.doc_ids) <= 4 + 1  # ties at the cut may add one


def test_recommendation_request_without_text(stack, client):
    values = features.query_values("", stack.searchers[1], ["d1", "d2"])
    del values["query"]
    r = client.retrieve("", searcher=values, k=5)
    assert len(r.doc_ids) == 5


BAD = [
    (dict(query=""), "query"),
    (dict(query="   "), "query"),
    (dict(query="x" * (features.MAX_TEXT_CHARS + 1)), "query"),
    (dict(query="x", k=0), "k"),
    (dict(query="x", k=-3), "k"),
    (dict(query="x", k=1001), "k"),
    (dict(query="x", filter="city:seattle AND (type:group"), "filter"),
    (dict(query="x", filter="AND AND"), "filter"),
    (dict(query="x", radius=math.nan), "radius"),
    (dict(query="x", radius=math.inf), "radius"),
    (dict(query="x", backend="no-such-backend"), "backend"),
    (dict(query="x", ensemble="no-such-ensemble"), "ensemble"),
    (dict(query="x", searcher={"friends": ["f" * 300]}), "searcher.friends[0]"),
    (dict(query="x", searcher={"city": "c" * 300}), "searcher.city"),
]


def test_bad_requests_name_the_field_and_the_server_keeps_serving(client):
    for kwargs, field in BAD:
        kwargs = dict(kwargs)
        query = kwargs.pop("query")
        kwargs.setdefault("k", 5)
        with pytest.raises(grpc.RpcError) as e:
            client.retrieve(query, **kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, e.value.details())
        assert e.value.details().startswith(f"{field}:"), (kwargs, e.value.details())
    assert len(client.retrieve("club", k=3).doc_ids) == 3


def test_undecodable_request_is_invalid_argument(server, client):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    raw = channel.unary_unary("/ebr.retrieval.v1.Retrieval/Retrieve",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    # Truncated (field 1 claims 5 bytes, 2 follow) and invalid UTF-8 in a proto3 string.
    for blob in (b"\x0a\x05hi", b"\x0a\x02\xff\xfe"):
        with pytest.raises(grpc.RpcError) as e:
            raw(blob, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("request: not a RetrieveRequest")
    channel.close()
    assert client.retrieve("club", k=1).doc_ids


texts = st.text(max_size=40) | st.text(min_size=990, max_size=1010)
searchers = st.fixed_dictionaries({}, optional={
    "searcher_id": st.text(max_size=20), "city": st.text(max_size=300),
    "friends": st.lists(st.text(max_size=270), max_size=80),
    "history_doc_ids": st.lists(st.sampled_from(["d1", "d2", "nope", ""]), max_size=15),
    "attributes": st.lists(st.text(max_size=12), max_size=40)})


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(query=texts, searcher=searchers, k=st.integers(-5, 1200),
       filter=st.sampled_from(["", "city:seattle", "type:group OR city:paris", "((", "NOT",
                               "city:", "a AND", "attributes.topic:music"]) | st.text(max_size=30),
       radius=st.none() | st.floats(allow_nan=True, allow_infinity=True, width=32),
       backend=st.sampled_from(["", "exact", "scann", "x"]))
def test_generated_requests_never_crash_the_server(client, query, searcher, k, filter, radius,
                                                   backend):
    try:
        r = client.retrieve(query, searcher=searcher, k=k, filter=filter, radius=radius,
                            backend=backend)
        assert len(r.doc_ids) <= k
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200))
def test_generated_bytes_never_crash_the_server(server, blob):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    raw = channel.unary_unary("/ebr.retrieval.v1.Retrieval/Retrieve",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        raw(blob, timeout=5)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    finally:
        channel.close()


def test_health_is_serving_only_with_model_and_index(stack, tmp_path):
    from serving.retrieval.client import RetrievalClient

    empty_base = tmp_path / "index"
    empty_base.mkdir()
    srv = start(empty_base, model=str(stack.query_tower))
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            assert c.health() == "NOT_SERVING"
            assert c.health("") == "NOT_SERVING"
            assert c.health("liveness") == "SERVING"  # alive, not ready: no restart loop
            with pytest.raises(grpc.RpcError) as e:
                c.retrieve("club", k=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "index" in e.value.details()
            # Publish the index the way the builder does (files, manifest, _COMMITTED last).
            from ebr import artifacts

            artifacts.publish_dir(str(stack.index_base / "1"), str(empty_base), version=1,
                                  last=("manifest.json",))
            c.wait_ready(timeout=20)
            assert c.retrieve("club", k=3).index_version == 1
    finally:
        srv.stop(0)
    with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
        assert c.health(timeout=0.5) == "UNAVAILABLE"


def test_model_index_mismatch_refused_at_start_and_on_reload(stack, tmp_path):
    from serving.retrieval.client import RetrievalClient
    from serving.retrieval.pairs import ModelIndexMismatch

    base = tmp_path / "index"
    base.mkdir()
    stack.publish_index(1, model_version=1, dimension=24, base=base)
    with pytest.raises(ModelIndexMismatch, match=r"dimension 24 \(artifact\) != 16 \(model\)"):
        start(base, model=str(stack.query_tower))

    stack.publish_index(2, model_version=1, base=base)  # a good version on top: starts on it
    srv = start(base, model=str(stack.query_tower))
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            assert c.retrieve("club", k=3).index_version == 2
            stack.publish_index(3, model_version=1, schema_hash="0123456789abcdef", base=base)
            deadline = time.monotonic() + 20
            while srv.metrics.reloads.labels("refused")._value.get() < 1:
                assert time.monotonic() < deadline, "reload of a mismatching index not refused"
                time.sleep(0.1)
            assert c.health() == "SERVING"
            r = c.retrieve("club", k=3)
            assert (r.index_version, r.model_version) == (2, 1)
            assert "schema_hash" in srv.manager._refused[3]
    finally:
        srv.stop(0)


def test_in_process_model_swaps_with_its_index(stack, tmp_path):
    """Local mode: a new index naming a new model version loads that model in-process, then
    both switch together."""
    from serving.retrieval.client import RetrievalClient

    fork = stack.fork(tmp_path)
    fork.republish_model(1, as_version=2)  # v1's weights as v2 (artifacts.publish_towers)
    srv = start(fork)
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            assert (c.retrieve("club", k=3).model_version, srv.manager.pair.index_version) == (1, 1)
            fork.publish_index(2, model_version=2)
            deadline = time.monotonic() + 30
            while (r := c.retrieve("club", k=3)).index_version != 2:
                assert time.monotonic() < deadline, "new pair not loaded"
                time.sleep(0.1)
            assert r.model_version == 2
    finally:
        srv.stop(0)


def test_deadline_is_honoured(client, server):
    seen = set()
    for _ in range(20):
        try:
            client.retrieve("club", k=10, timeout=0.0005)
            seen.add("OK")
        except grpc.RpcError as e:
            seen.add(e.code().name)
    assert "DEADLINE_EXCEEDED" in seen
    assert seen <= {"OK", "DEADLINE_EXCEEDED"}
    assert client.retrieve("club", k=3).doc_ids


def test_saturation_answers_resource_exhausted(stack):
    from serving.retrieval.client import RetrievalClient, make_request

    srv = start(stack, workers=1, max_queue=0)
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            request = make_request("club hiking", k=50)
            futs = [c.stub.Retrieve.future(request, timeout=30) for _ in range(64)]
            codes = []
            for f in futs:
                try:
                    f.result()
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
            assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
            assert c.retrieve("club", k=3).doc_ids  # recovers once the burst is gone
    finally:
        srv.stop(0)


def test_metrics_endpoint(server, client):
    client.retrieve("club", k=3)
    with pytest.raises(grpc.RpcError):
        client.retrieve("", k=3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'ebr_retrieval_requests_total{code="OK"}' in text
    assert 'ebr_retrieval_errors_total{code="INVALID_ARGUMENT"}' in text
    assert 'ebr_retrieval_latency_seconds_bucket{le="0.005",stage="embed"}' in text
    assert "ebr_retrieval_documents_scanned_count" in text
    assert 'ebr_retrieval_search_plans_total{plan="exact"}' in text
    assert "ebr_retrieval_index_version 1.0" in text
    assert "ebr_retrieval_embed_batch_size_count" in text


def _self_signed(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


def test_tls(stack, tmp_path):
    from serving.retrieval.client import RetrievalClient

    cert, key = _self_signed(tmp_path)
    srv = start(stack, tls_cert=cert, tls_key=key)
    try:
        with RetrievalClient(f"localhost:{srv.port}", tls_ca=cert) as c:
            assert c.retrieve("club", k=2).doc_ids
        with RetrievalClient(f"localhost:{srv.port}") as plain:
            with pytest.raises(grpc.RpcError) as e:
                plain.retrieve("club", k=2, timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0)


def test_tls_to_the_model_server(stack, tmp_path):
    from serving.model_server.server import start_model_server
    from serving.retrieval.client import RetrievalClient

    cert, key = _self_signed(tmp_path)
    ms = start_model_server(stack.model_dir, 0, tls_cert=cert, tls_key=key)
    try:
        ms.wait_until_serving(30)
        srv = start(stack, model_address=f"localhost:{ms.port}", model_tls_ca=cert)
        try:
            with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
                assert c.retrieve("club", k=2).model_version == 1
        finally:
            srv.stop(0)
    finally:
        ms.stop(0)


def test_remote_model_over_prediction_service(stack):
    """Embedding through TF Serving's API (our model server): same answers as in-process."""
    from serving.model_server.server import start_model_server
    from serving.retrieval.client import RetrievalClient

    ms = start_model_server(stack.model_dir, 0, num_versions=2, poll_seconds=0.2)
    try:
        ms.wait_until_serving(30)
        srv = start(stack, model=str(stack.query_tower), model_address=f"127.0.0.1:{ms.port}")
        try:
            with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
                remote = c.retrieve("club hiking", k=10)
            assert remote.model_version == 1
        finally:
            srv.stop(0)
        # Address only (no metadata dir): dimension checked from the signature.
        srv = start(stack, model=None, model_address=f"127.0.0.1:{ms.port}")
        try:
            assert srv.manager.pair.encoder.info.dimension == 16
        finally:
            srv.stop(0)
    finally:
        ms.stop(0)
    local = start(stack)
    try:
        with RetrievalClient(f"127.0.0.1:{local.port}") as c:
            here = c.retrieve("club hiking", k=10)
    finally:
        local.stop(0)
    assert remote.doc_ids == here.doc_ids
    assert remote.scores == pytest.approx(here.scores, abs=1e-5)


def test_ensemble_hook(stack):
    from serving.retrieval.client import RetrievalClient
    from serving.retrieval.config import ServeConfig
    from serving.retrieval.ensembles import EnsembleResult
    from serving.retrieval.server import RetrievalServer

    def reverse(call):  # a real search through the pair, re-ranked: exercises the plumbing
        if call.k > 50:
            raise ValueError(f"k={call.k} exceeds this ensemble's 50")
        vec = call.pair.encoder.embed(call.inputs)
        res = call.pair.searcher.search(vec, call.k)
        return EnsembleResult(list(res.doc_ids[0])[::-1], list(res.scores[0])[::-1],
                              int(res.scanned[0]))

    srv = RetrievalServer(ServeConfig(index=str(stack.index_base), model=str(stack.query_tower),
                                      host="127.0.0.1", port=0),
                          ensemble_registry={"reverse": reverse}).start()
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            plain = c.retrieve("club", k=5)
            ens = c.retrieve("club", k=5, ensemble="reverse")
            with pytest.raises(grpc.RpcError) as e:
                c.retrieve("club", k=60, ensemble="reverse")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("ensemble: k=60")
        assert ens.doc_ids == plain.doc_ids[::-1]
        assert "ensemble" in ens.latency_micros
    finally:
        srv.stop(0)


def test_ebr_query_prints_a_table(server, stack, capsys, tmp_path):
    import json

    from ebr import config
    from ebr.cli import main
    from serving.cli import QueryConfig, searcher_values

    searchers = tmp_path / "searchers.jsonl"
    searchers.write_text("".join(json.dumps(s) + "\n" for s in stack.searchers))
    parser = __import__("ebr.cli", fromlist=["build_parser"]).build_parser()
    args = parser.parse_args(["query", "club", "--searcher", "s3", "--searchers", str(searchers),
                              "--city", "lima", "--history", "d1"])
    values = searcher_values(config.from_args(QueryConfig, args))
    assert values["searcher_id"] == "s3" and values["city"] == "lima"
    assert "searcher_city" not in values and values["history_doc_ids"] == ["d1"]
    assert values["searcher_friends"] == stack.searchers[3]["friends"]
    rc = main(["query", "club", "--address", f"127.0.0.1:{server.port}", "--searcher", "s3",
               "--searchers", str(searchers), "--json"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["doc_ids"]) == 10

    rc = main(["query", "club hiking", "--address", f"127.0.0.1:{server.port}", "-k", "4",
               "--searcher", "s1", "--filter", "city:seattle"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rank" in out and "score" in out and out.count("\n") >= 5
    rc = main(["query", "", "--address", f"127.0.0.1:{server.port}"])
    assert rc == 1
    assert "INVALID_ARGUMENT: query:" in capsys.readouterr().out


def test_direct_tower_call_equals_the_checked_call(stack):
    """The encoder calls the concrete function flat (TF-private `_call_flat`, for speed); it
    must give what the checked structured call gives, MULTI padding included."""
    import numpy as np

    from serving.retrieval.embedder import LocalModelSource, build_inputs

    encoder = LocalModelSource(stack.query_tower).open(1)
    assert encoder._flat_order is not None  # the fast path is the one being compared
    rows = [dict(features.query_values(f"club t{i}x", s, [f"d{j}" for j in range(i % 5)]))
            for i, s in enumerate(stack.searchers[:6])]
    for batch in (rows[:1], rows):
        inputs = build_inputs(batch)
        np.testing.assert_allclose(encoder.embed(inputs), encoder._tower(inputs), atol=1e-6)


def test_batched_retrievals_equal_single_ones(stack):
    """The batcher embeds and searches requests together (grouped by k, filter and radius);
    every request must get what embedding and searching it alone gives, and a failure
    belongs to its own requests only."""
    import asyncio

    import numpy as np

    import index
    from index.filters import FilterSyntaxError
    from serving.retrieval.batching import DeadlineExpired, RetrieveBatcher, _Job, run_batch
    from serving.retrieval.embedder import LocalModelSource, build_inputs
    from serving.retrieval.pairs import Pair

    encoder = LocalModelSource(stack.query_tower).open(1)
    searcher = index.open_index(str(stack.index_base))
    pair = Pair(encoder, searcher, 1, str(stack.index_base), "exact")
    rows = [dict(features.query_values(f"club t{i}x", s, [f"d{j}" for j in range(i % 7)]))
            for i, s in enumerate(stack.searchers[:24])]
    options = [(5, None, None), (10, None, None), (10, "city:seattle", None), (10, None, 0.0)]
    asks = [(row, *options[i % len(options)]) for i, row in enumerate(rows)]

    sizes = []

    async def all_at_once():
        batcher = RetrieveBatcher(max_batch=8, threads=1, on_batch=sizes.append)
        batcher.start()
        try:
            return await asyncio.gather(*[batcher.retrieve(pair, row, k, filt, radius, 30.0)
                                          for row, k, filt, radius in asks])
        finally:
            await batcher.close()

    got = asyncio.run(all_at_once())
    assert max(sizes) > 1 and sum(sizes) == len(asks)
    for (row, k, filt, radius), r in zip(asks, got):
        alone = searcher.search(encoder.embed(build_inputs([row])), k, filter=filt, radius=radius)
        assert r.doc_ids == list(alone.doc_ids[0])
        np.testing.assert_allclose(r.scores, alone.scores[0], atol=1e-5)
        assert r.scanned == int(alone.scanned[0])
        assert r.embed_seconds > 0 and r.search_seconds > 0 and r.queue_seconds >= 0

    # One batch: a malformed filter and an expired deadline fail their own requests only.
    now = time.monotonic()
    jobs = [_Job(pair, rows[0], 5, None, None, None, 0.0, None),
            _Job(pair, rows[1], 5, "city:(", None, None, 0.0, None),
            _Job(pair, rows[2], 5, None, None, now - 1.0, 0.0, None),
            _Job(pair, rows[3], 5, None, None, now + 60.0, 0.0, None)]
    out = run_batch(jobs, None)
    assert isinstance(out[1], FilterSyntaxError) and isinstance(out[2], DeadlineExpired)
    for i in (0, 3):
        alone = searcher.search(encoder.embed(build_inputs([rows[i]])), 5)
        assert out[i].doc_ids == list(alone.doc_ids[0])


def test_requests_in_flight_do_not_need_a_thread_each(stack):
    """On the asyncio server a waiting request holds no worker thread: with one worker, 16
    concurrent requests are all answered, and answered in shared batches."""
    from serving.retrieval.client import RetrievalClient, make_request

    srv = start(stack, workers=1, max_queue=15, embed_batch=32)
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            c.retrieve("club", k=3)
            reg = srv.metrics.registry
            before = reg.get_sample_value("ebr_retrieval_embed_batch_size_count")
            requests = [make_request(f"club hiking {i}", k=10) for i in range(16)]
            for _ in range(3):
                futs = [c.stub.Retrieve.future(r, timeout=30) for r in requests]
                assert all(len(f.result().doc_ids) == 10 for f in futs)
            calls = reg.get_sample_value("ebr_retrieval_embed_batch_size_count") - before
            assert calls < 3 * len(requests)  # some requests shared a tower call
    finally:
        srv.stop(0)


def _reloads(srv, result: str) -> float:
    return srv.metrics.reloads.labels(result)._value.get()


def test_corrupt_new_index_is_retried_with_backoff_and_the_pair_keeps_serving(stack, tmp_path,
                                                                             caplog):
    """A committed index version whose file fails its checksum: the serving pair answers every
    request meanwhile, the load is retried with capped exponential backoff (logged), and a good
    version published afterwards is picked up at once."""
    import logging
    import shutil
    import threading

    from ebr import artifacts
    from serving.retrieval.client import RetrievalClient

    fork = stack.fork(tmp_path / "fork")
    staging = tmp_path / "staging"
    shutil.copytree(fork.index_base / "1", staging,
                    ignore=shutil.ignore_patterns(artifacts.COMMIT_MARKER))
    data = bytearray((staging / "filters.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the manifest's sha256 tells
    (staging / "filters.bin").write_bytes(bytes(data))

    caplog.set_level(logging.ERROR, logger="serving.retrieval.pairs")
    srv = start(fork, retry_seconds=0.2, retry_max_seconds=0.8)
    answers, stop = [], threading.Event()
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            assert c.retrieve("club", k=3).index_version == 1

            def load():  # traffic during the failed reloads: none may be dropped
                while not stop.is_set():
                    try:
                        answers.append(c.retrieve("club", k=3, timeout=10).index_version)
                    except grpc.RpcError as e:
                        answers.append(e.code().name)
                    time.sleep(0.02)

            thread = threading.Thread(target=load)
            thread.start()
            artifacts.publish_dir(str(staging), str(fork.index_base), version=2,
                                  last=("manifest.json",))
            deadline = time.monotonic() + 30
            while _reloads(srv, "failed") < 5:
                assert time.monotonic() < deadline, "corrupt index version not retried"
                time.sleep(0.05)
            assert c.health() == "SERVING"
            assert srv.manager.pair.index_version == 1
            assert "filters.bin fails its sha256" in srv.manager._failed[2].reason

            fork.publish_index(3, model_version=1)  # a good version: loaded at once
            deadline = time.monotonic() + 30
            while srv.manager.pair.index_version != 3:
                assert time.monotonic() < deadline, "good index version not picked up"
                time.sleep(0.05)
            time.sleep(0.2)
            stop.set()
            thread.join(timeout=30)
            assert c.retrieve("club", k=3).index_version == 3
    finally:
        stop.set()
        srv.stop(0)
    assert answers and set(answers) <= {1, 3}, set(answers)
    delays = [r.retry_in_seconds for r in caplog.records
              if r.getMessage().startswith("new index version failed to load")]
    attempts = [r.attempt for r in caplog.records
                if r.getMessage().startswith("new index version failed to load")]
    assert attempts[:5] == [1, 2, 3, 4, 5]
    assert delays[:5] == [0.2, 0.4, 0.8, 0.8, 0.8]  # doubling, capped


def test_index_and_model_on_object_storage(stack, gcs_root, tmp_path, monkeypatch):
    """gs:// INDEX_BASE and MODEL_DIR: committed versions only, the index read from a local
    cached copy, an uncommitted upload ignored, a new committed version swapped in."""
    from ebr import artifacts, storage
    from index import persistence
    from serving.retrieval.client import RetrievalClient

    monkeypatch.setenv(persistence.CACHE_ENV, str(tmp_path / "cache"))
    model_dir = f"{gcs_root}/models"
    artifacts.publish_towers({t: str(stack.model_dir / t / "1") for t in artifacts.TOWERS},
                             model_dir, 1)
    base = f"{gcs_root}/index"
    stack.publish_index(1, model_version=1, base=base)
    srv = start(base, model=model_dir)  # MODEL_DIR: its query tower is used
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            r = c.retrieve("club", k=5)
            assert (r.index_version, r.model_version) == (1, 1)
            pair = srv.manager.pair
            assert pair.index_path == f"{base}/1"
            assert pair.searcher.local_path.startswith(str(tmp_path / "cache"))
            with RetrievalClient(f"127.0.0.1:{srv.port}") as c2:
                assert c2.retrieve("club", k=5).doc_ids == r.doc_ids

            # Files of version 2 without _COMMITTED: an upload in progress, never loaded.
            for rel in storage.walk_files(f"{base}/1"):
                if rel != artifacts.COMMIT_MARKER:
                    storage.copy_file(f"{base}/1/{rel}", f"{base}/2/{rel}")
            time.sleep(1.0)
            assert c.retrieve("club", k=5).index_version == 1
            assert _reloads(srv, "failed") == 0

            artifacts.commit(f"{base}/2", {"artifact": "index"})
            deadline = time.monotonic() + 30
            while (r2 := c.retrieve("club", k=5)).index_version != 2:
                assert time.monotonic() < deadline, "committed gs:// version not picked up"
                time.sleep(0.1)
            assert r2.doc_ids == r.doc_ids
    finally:
        srv.stop(0)


def test_storage_error_while_listing_is_logged_and_the_pair_keeps_serving(stack, tmp_path,
                                                                         caplog):
    """Listing INDEX_BASE fails (here: an entry whose name is not UTF-8, a StorageError from
    ebr.storage): every poll fails, the warning is logged once per streak, requests are answered
    by the serving pair; once listing works again a new version is picked up."""
    import logging
    import os

    from serving.retrieval.client import RetrievalClient

    fork = stack.fork(tmp_path / "fork")
    caplog.set_level(logging.WARNING, logger="serving.retrieval.pairs")
    srv = start(fork)
    bad = os.path.join(os.fsencode(fork.index_base), b"\xff")
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            assert c.retrieve("club", k=3).index_version == 1
            open(bad, "wb").close()
            deadline = time.monotonic() + 20
            while _reloads(srv, "list-error") < 3:
                assert time.monotonic() < deadline, "listing errors not counted"
                time.sleep(0.05)
            assert c.health() == "SERVING" and c.retrieve("club", k=3).index_version == 1
            warned = [r for r in caplog.records
                      if r.getMessage().startswith("cannot list index versions")]
            assert len(warned) == 1 and str(fork.index_base) in warned[0].reason
            os.remove(bad)
            fork.publish_index(2, model_version=1)
            deadline = time.monotonic() + 20
            while c.retrieve("club", k=3).index_version != 2:
                assert time.monotonic() < deadline, "new version not picked up after recovery"
                time.sleep(0.1)
    finally:
        srv.stop(0)
        if os.path.exists(bad):
            os.remove(bad)


def test_deep_filters_are_invalid_argument_not_internal(client):
    """Nesting beyond index.filters.MAX_DEPTH (parentheses and NOTs) is a syntax error naming
    the limit, however deep: the parser never recurses past it."""
    from index.filters import MAX_DEPTH

    deep = ["(" * 328 + "city:seattle" + ")" * 328, "NOT " * 982 + "city:seattle",
            "(" * (MAX_DEPTH + 1) + "city:seattle" + ")" * (MAX_DEPTH + 1),
            "NOT (" * 600 + "type:group" + ")" * 600]
    for expression in deep:
        with pytest.raises(grpc.RpcError) as e:
            client.retrieve("club", k=3, filter=expression)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()[:200]
        assert e.value.details().startswith("filter:")
        assert f"nested deeper than {MAX_DEPTH}" in e.value.details()
    # At the limit it is an ordinary filter.
    nots = MAX_DEPTH // 2 - 1  # odd: every document matches NOT city:nowhere
    parens = MAX_DEPTH - nots
    at_limit = "NOT " * nots + "(" * parens + "city:nowhere" + ")" * parens
    assert len(client.retrieve("club", k=3, filter=at_limit).doc_ids) == 3
    assert client.retrieve("club", k=3).doc_ids


def test_pair_follows_the_model_server_and_never_appearing_models_are_refused(stack,
                                                                              tmp_path):
    """Remote model: readiness drops while the model server cannot serve the live pair's
    version and comes back with it; an index naming a model version that can never be
    published is refused (metric, log) while the pair keeps serving, and an index waiting
    for a future model is not reopened on every poll."""
    import index as index_pkg
    from serving.model_server.server import start_model_server
    from serving.retrieval.client import RetrievalClient

    fork = stack.fork(tmp_path / "fork")
    fork.republish_model(1, as_version=2)
    fork.publish_index(2, model_version=2)
    ms = start_model_server(fork.model_dir, 0, poll_seconds=0.1)  # --num-versions 1
    ms.wait_until_serving(30)
    srv = start(fork, model=str(fork.query_tower), model_address=f"127.0.0.1:{ms.port}")
    port = ms.port
    ms2 = None
    opened = []
    real_open = index_pkg.open_index
    try:
        with RetrievalClient(f"127.0.0.1:{srv.port}") as c:
            assert c.retrieve("club", k=3).model_version == 2
            # An index for model 1 after 2 exists: fine (v1 is committed; pinned, it loads).
            fork.publish_index(3, model_version=1)
            deadline = time.monotonic() + 30
            while srv.manager.pair.index_version != 3:
                assert time.monotonic() < deadline, srv.manager.waiting_for
                time.sleep(0.1)
            assert c.retrieve("club", k=3).model_version == 1
            assert ms.registry.available()["query_tower"] == [2, 1]  # 1 pinned beyond latest-1

            # Model 9 is above every version: the index waits, opened not once per poll.
            index_pkg.open_index = lambda *a, **kw: opened.append(a) or real_open(*a, **kw)
            waits = srv.metrics.reloads.labels("waiting")._value.get()
            fork._doc_cache[9] = fork.doc_embeddings(1)
            fork.publish_index(4, model_version=9)
            time.sleep(1.5)  # ~7 polls
            assert opened == [] and c.retrieve("club", k=3).index_version == 3
            assert srv.metrics.reloads.labels("waiting")._value.get() == waits + 1  # logged once

            # Model 0 can never be published (a newer version is): refused for good.
            fork._doc_cache[0] = fork.doc_embeddings(1)
            path = fork.publish_index(5, model_version=0)
            deadline = time.monotonic() + 20
            while srv.metrics.refused_pairs.labels("model-never-appears")._value.get() < 1:
                assert time.monotonic() < deadline, "index naming a gone model not refused"
                time.sleep(0.1)
            assert "will never appear" in srv.manager._refused[5], path
            assert c.health() == "SERVING" and c.retrieve("club", k=3).index_version == 3

            # The model server goes away: not ready; back: ready, answering again.
            ms.stop(0)
            deadline = time.monotonic() + 20
            while c.health() != "NOT_SERVING":
                assert time.monotonic() < deadline, "health stayed SERVING without a model"
                time.sleep(0.1)
            assert srv.metrics.ready._value.get() == 0
            ms2 = start_model_server(fork.model_dir, port, poll_seconds=0.1)
            deadline = time.monotonic() + 30
            while c.health() != "SERVING":
                assert time.monotonic() < deadline, srv.manager.waiting_for
                time.sleep(0.1)
            assert srv.metrics.ready._value.get() == 1
            assert c.retrieve("club", k=3).model_version == 1  # v1 loaded again by its pin
            assert opened == []
    finally:
        index_pkg.open_index = real_open
        srv.stop(0)
        (ms2 or ms).stop(0)
