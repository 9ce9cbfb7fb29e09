"""Thread pools of the two libraries a request runs through: TensorFlow's (the query tower)
and FAISS's OpenMP (the index search). On 2 cores the service's throughput comes from batching,
not threads, so both default to one thread (ServeConfig's tf_threads, search_threads;
bench/serving_bench.py measures the difference).
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_thread_state = threading.local()


def set_search_threads(n: int) -> None:
    """FAISS OpenMP threads for searches started by the *calling* thread.

    OpenMP keeps the setting per thread, so each request worker sets it once for itself
    (setting it in the main thread would leave every worker at the default, all cores)."""
    if n <= 0 or getattr(_thread_state, "omp_threads", None) == n:
        return
    import faiss

    faiss.omp_set_num_threads(n)
    _thread_state.omp_threads = n


_tf_threads_set: list[int] = []


def set_tf_threads(n: int) -> None:
    """TensorFlow's inter- and intra-op thread pools at `n` threads (0 = TF's default).

    The query tower is hundreds of tiny ops: on 2 cores, spreading one small batch over TF's
    pools only adds thread hand-offs next to the batch and gRPC threads (bench: one thread
    each is ~15% less CPU per request). TF takes this only before its runtime starts, i.e. in
    a fresh process, so `serving.retrieval.server.serve` (the `ebr serve retrieval` path) sets
    it, not RetrievalServer: an in-process server (tests, notebooks) leaves its host process's
    TF as it is."""
    if n <= 0 or _tf_threads_set:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(n)
        tf.config.threading.set_intra_op_parallelism_threads(n)
    except RuntimeError:  # the TF runtime already started in this process
        log.info("TensorFlow threads already fixed; --tf-threads not applied",
                 extra={"tf_threads": n})
    _tf_threads_set.append(n)
