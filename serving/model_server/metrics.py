"""The model server's Prometheus metrics, named as TF Serving names them so its dashboards
carry over: `:tensorflow:serving:request_count{model_name,status}` and `request_latency`, plus
the versions served and the versions pinned per model. The gRPC front end
(`serving.model_server.server`) and the REST one (`serving.model_server.rest`) record every
call here.
"""
from __future__ import annotations

import threading
from collections import defaultdict

import grpc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from serving.model_server.registry import ModelRegistry

# TF Serving's latency histograms are in microseconds; keep its unit so dashboards carry over.
LATENCY_BUCKETS_US = (50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
                      250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000)

UNKNOWN_MODEL = "_unknown"


class ModelServerMetrics:
    """`:tensorflow:serving:request_count{model_name,status}` and `request_latency`."""

    def __init__(self, registry: ModelRegistry | None = None):
        self.prometheus = CollectorRegistry()
        self._models = registry
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], float] = defaultdict(float)
        self.latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"], buckets=LATENCY_BUCKETS_US,
            registry=self.prometheus)
        self.prometheus.register(self)

    def observe(self, model: str, api: str, entrypoint: str, code: grpc.StatusCode,
                seconds: float) -> None:
        if self._models is not None and not self._models.knows(model):
            model = UNKNOWN_MODEL  # clients choose names: keep label cardinality bounded
        with self._lock:
            self._counts[(model, code.name)] += 1
        self.latency.labels(model, api, entrypoint).observe(seconds * 1e6)

    def count(self, model: str, status: str) -> float:
        with self._lock:
            return self._counts.get((model, status), 0.0)

    def describe(self):
        return []

    def collect(self):
        # A hand-made family: prometheus_client's Counter would rename it `..._total`.
        counter = Metric(":tensorflow:serving:request_count",
                         "The total number of requests.", "counter")
        with self._lock:
            for (model, status), n in sorted(self._counts.items()):
                counter.add_sample(":tensorflow:serving:request_count",
                                   {"model_name": model, "status": status}, n)
        yield counter
        if self._models is not None:
            gauge = Metric(":ebr:model_server:loaded_versions",
                           "Versions currently served per model.", "gauge")
            for name, versions in self._models.available().items():
                gauge.add_sample(":ebr:model_server:loaded_versions", {"model_name": name},
                                 len(versions))
            yield gauge
            pins = Metric(":ebr:model_server:pinned_versions",
                          "Versions clients currently pin per model (kept loaded beyond the "
                          "version policy).", "gauge")
            for name, versions in self._models.all_pins().items():
                pins.add_sample(":ebr:model_server:pinned_versions", {"model_name": name},
                                len(versions))
            yield pins

    def exposition(self) -> bytes:
        return generate_latest(self.prometheus)
