"""The retrieval service's Prometheus metrics (served on `--metrics-port`): requests and errors
by status code, latency by stage (validate, queue, embed, search, ensemble, total), documents
scanned, search plans, dynamic batch sizes, readiness, the serving pair's versions, index reloads by result
and refused pairs by reason. The servicer and the pair manager record into one `Metrics` per
server.
"""
from __future__ import annotations


class Metrics:
    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("ebr_retrieval_requests_total", "Retrieve requests by status code",
                                ["code"], registry=r)
        self.errors = Counter("ebr_retrieval_errors_total", "Failed Retrieve requests by code",
                              ["code"], registry=r)
        self.latency = Histogram("ebr_retrieval_latency_seconds", "Retrieve latency by stage",
                                 ["stage"], registry=r,
                                 buckets=(.0005, .001, .002, .003, .005, .0075, .01, .015, .025,
                                          .05, .1, .25, .5, 1, 2.5, 5))
        self.scanned = Histogram("ebr_retrieval_documents_scanned", "Documents scored per query",
                                 registry=r, buckets=tuple(4 ** i for i in range(2, 12)))
        self.plans = Counter("ebr_retrieval_search_plans_total",
                             "Queries by the index planner's plan (exact, ann, postfilter, empty)",
                             ["plan"], registry=r)
        self.in_flight = Gauge("ebr_retrieval_in_flight", "Retrieve requests executing", registry=r)
        self.ready = Gauge("ebr_retrieval_ready", "1 when a model/index pair is serving",
                           registry=r)
        self.model_version = Gauge("ebr_retrieval_model_version", "Serving query tower version",
                                   registry=r)
        self.index_version = Gauge("ebr_retrieval_index_version", "Serving index version",
                                   registry=r)
        self.embed_batch = Histogram("ebr_retrieval_embed_batch_size",
                                     "Queries per query-tower call (dynamic batching)", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64))
        self.refused_pairs = Counter(
            "ebr_retrieval_refused_pairs_total",
            "New index versions refused for good because their pair can never be consistent",
            ["reason"], registry=r)
        self.reloads = Counter("ebr_retrieval_reloads_total", "Index reload attempts by result",
                               ["result"], registry=r)
