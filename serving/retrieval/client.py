"""Python client of the retrieval service (`ebr.retrieval.v1.Retrieval`), used by `ebr query`,
the demo, the tests and the benchmark.

    with RetrievalClient("localhost:8600") as client:
        hits = client.retrieve("jon smith", searcher={"searcher_id": "u42"}, k=10,
                               filter="city:seattle")

`searcher` takes either the proto's SearcherFeatures field names (`city`, `friends`, ...) or the
feature names of `ebr.features.query_values` (`searcher_city`, ...), so a canonical searcher
record can be passed straight through.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.retrieval import retrieval_pb2, retrieval_pb2_grpc

SERVICE_NAME = "ebr.retrieval.v1.Retrieval"


@dataclasses.dataclass
class Retrieved:
    doc_ids: list[str]
    scores: list[float]
    latency_micros: dict[str, int]
    documents_scanned: int
    model_version: int
    index_version: int
    backend: str
    search_plan: str = ""  # the index planner's plan (exact | ann | postfilter | empty)
    probes: int = 0


def searcher_proto(searcher: Mapping | None) -> retrieval_pb2.SearcherFeatures:
    """SearcherFeatures from field names or `searcher_`-prefixed feature names."""
    msg = retrieval_pb2.SearcherFeatures()
    fields = {f.name: f for f in msg.DESCRIPTOR.fields}
    for key, value in (searcher or {}).items():
        if value is None:
            continue
        field = key if key in fields else key.removeprefix("searcher_")
        if field not in fields:
            raise KeyError(f"searcher feature {key!r} is not a SearcherFeatures field "
                           f"({sorted(fields)})")
        if fields[field].is_repeated:
            getattr(msg, field).extend(str(v) for v in value)
        else:
            setattr(msg, field, str(value))
    return msg


def make_request(query: str = "", *, searcher: Mapping | None = None, k: int = 10,
                 filter: str = "", radius: float | None = None, backend: str = "",
                 ensemble: str = "") -> retrieval_pb2.RetrieveRequest:
    request = retrieval_pb2.RetrieveRequest(query=query, searcher=searcher_proto(searcher), k=k,
                                            filter=filter or "", backend=backend or "",
                                            ensemble=ensemble or "")
    if radius is not None:
        request.radius = radius
    return request


def to_retrieved(response: retrieval_pb2.RetrieveResponse) -> Retrieved:
    d = response.debug
    return Retrieved(list(response.doc_ids), list(response.scores),
                     {s.stage: s.micros for s in d.latency}, d.documents_scanned,
                     d.model_version, d.index_version, d.backend, d.search_plan, d.probes)


class RetrievalClient:
    def __init__(self, address: str, *, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, timeout: float = 5.0):
        self.address = address
        self.timeout = timeout
        if tls_ca or tls_cert:
            from ebr import storage  # certificates on any URI

            creds = grpc.ssl_channel_credentials(
                root_certificates=storage.read_bytes(tls_ca) if tls_ca else None,
                private_key=storage.read_bytes(tls_key) if tls_key else None,
                certificate_chain=storage.read_bytes(tls_cert) if tls_cert else None)
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = retrieval_pb2_grpc.RetrievalStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def retrieve(self, query: str = "", *, searcher: Mapping | None = None, k: int = 10,
                 filter: str = "", radius: float | None = None, backend: str = "",
                 ensemble: str = "", timeout: float | None = None) -> Retrieved:
        """Raises grpc.RpcError with the server's status (e.g. INVALID_ARGUMENT naming a field)."""
        request = make_request(query, searcher=searcher, k=k, filter=filter, radius=radius,
                               backend=backend, ensemble=ensemble)
        return to_retrieved(self.stub.Retrieve(request, timeout=timeout or self.timeout))

    def health(self, service: str = SERVICE_NAME, timeout: float = 2.0) -> str:
        """SERVING / NOT_SERVING / UNKNOWN, or UNAVAILABLE when the server cannot be reached."""
        try:
            response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                              timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = self.health()
            if status == "SERVING":
                return
            time.sleep(0.1)
        raise TimeoutError(f"retrieval service at {self.address} not SERVING after "
                           f"{timeout:.0f}s (last status {status})")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RetrievalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_table(query: str, result: Retrieved) -> str:
    """A readable table of one response (used by `ebr query`)."""
    lines = [f"query {query!r}: {len(result.doc_ids)} documents "
             f"(model v{result.model_version}, index v{result.index_version} {result.backend}, "
             f"{result.documents_scanned} scanned, plan {result.search_plan or '-'})",
             f"{'rank':>4}  {'score':>8}  doc_id"]
    for rank, (doc, score) in enumerate(zip(result.doc_ids, result.scores), 1):
        lines.append(f"{rank:>4}  {score:>8.4f}  {doc}")
    timing = ", ".join(f"{k} {v / 1000:.2f} ms" for k, v in result.latency_micros.items())
    lines.append(f"latency: {timing}")
    return "\n".join(lines)
