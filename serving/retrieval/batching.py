"""Dynamic batching of whole retrievals: every request queued while the previous batch ran is
embedded in one query-tower call and searched in one index search per (k, filter, radius).

Place in the data flow: between the servicer (`serving.retrieval.servicer`, which validated
the request) and the serving pair (`serving.retrieval.pairs.Pair`: encoder and index searcher).
Throughput on 2 cores comes from batching, not threads: the server is grpc.aio on one event
loop thread, a request is a coroutine waiting on a future, and the CPU per request falls as
the load rises (bench/serving_bench.py measures it against the in-process baseline).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent import futures
from typing import Callable, Sequence

import numpy as np

from serving.retrieval import embedder
from serving.retrieval.pairs import Pair
from serving.retrieval.threads import set_search_threads


class DeadlineExpired(Exception):
    """A batched request's deadline passed while its batch ran (answered DEADLINE_EXCEEDED)."""


@dataclasses.dataclass(frozen=True)
class _Job:
    pair: Pair
    values: dict
    k: int
    filter: str | None
    radius: float | None
    deadline: float | None  # time.monotonic()
    enqueued: float  # time.perf_counter()
    future: asyncio.Future


def plan_of(result, j: int) -> tuple[str, int]:
    """(plan, probes) of query j of an index search result."""
    plan = result.plan[j] if len(result.plan) > j else ""
    return plan, int(result.probes[j]) if len(result.probes) > j else 0


@dataclasses.dataclass(frozen=True)
class BatchedResult:
    doc_ids: list
    scores: list
    scanned: int
    queue_seconds: float  # waiting for a batch slot (the previous batch was running)
    embed_seconds: float  # the batch's tower call
    search_seconds: float  # the batch's index search for this request's (k, filter, radius)
    plan: str = ""  # the index planner's plan for this query (index.searcher.SearchResult.plan)
    probes: int = 0


def run_batch(jobs: Sequence[_Job], params: dict | None,
              on_batch: Callable[[int], None] | None = None) -> list:
    """Embeds and searches a batch of requests; one outcome per job (a BatchedResult or the
    exception that job gets). Blocking: runs on a batch thread, never on the event loop.

    One tower call per encoder (a pair swap can put two in a batch), then one index search
    per (searcher, k, filter, radius) group: a FAISS search of B queries costs about half of
    B single searches (one coarse-quantizer pass, one SWIG crossing, one id mapping) and a
    tower call of 8 about a fifth of 8 calls. Each request gets exactly what searching it
    alone would give: same k, filter, radius and parameters; rows are independent."""
    t0 = time.perf_counter()
    outcomes: list = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    by_encoder: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        by_encoder.setdefault(id(job.pair.encoder), []).append(i)
    vectors: dict[int, np.ndarray] = {}
    for idx in by_encoder.values():
        if on_batch is not None:
            on_batch(len(idx))
        deadlines = [jobs[i].deadline for i in idx if jobs[i].deadline is not None]
        timeout = max(0.001, min(deadlines) - time.monotonic()) if deadlines else None
        try:
            rows = jobs[idx[0]].pair.encoder.embed(
                embedder.build_inputs([jobs[i].values for i in idx]), timeout=timeout)
        except Exception as e:  # every waiter of this encoder gets it; the rest go on
            for i in idx:
                outcomes[i] = e
            continue
        vectors.update(zip(idx, rows))
    t1 = time.perf_counter()
    now = time.monotonic()
    for i, job in enumerate(jobs):
        if i not in vectors:
            continue
        if job.deadline is not None and job.deadline <= now:  # no search for an expired request
            outcomes[i] = DeadlineExpired("deadline exceeded")
            continue
        key = (id(job.pair.searcher), job.k, job.filter, job.radius)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        job = jobs[idx[0]]
        ts = time.perf_counter()
        try:
            result = job.pair.searcher.search(np.stack([vectors[i] for i in idx]), job.k,
                                              filter=job.filter, radius=job.radius,
                                              params=params)
        except Exception as e:
            for i in idx:
                outcomes[i] = e
            continue
        search_seconds = time.perf_counter() - ts
        for j, i in enumerate(idx):
            outcomes[i] = BatchedResult(
                list(result.doc_ids[j]), np.asarray(result.scores[j], np.float32).tolist(),
                int(result.scanned[j]), t0 - jobs[i].enqueued, t1 - t0, search_seconds,
                *plan_of(result, j))
    return outcomes


class RetrieveBatcher:
    """Dynamic batching on the event loop (TF Serving's batching idea, applied to the whole
    retrieval): `threads` batch tasks each take every request queued while their previous
    batch ran and hand the batch to their own thread (run_batch). There is no batching timeout:
    an idle server adds no wait, and under load the batch grows with the queue, so the CPU per
    request falls as the load rises. Requests are plain coroutines waiting on a future, so many
    can be in flight without a thread each (bounded by the server's maximum_concurrent_rpcs)."""

    def __init__(self, max_batch: int = 32, threads: int = 1, *, params: dict | None = None,
                 search_threads: int = 1, on_batch: Callable[[int], None] | None = None):
        self.max_batch = max(1, max_batch)
        self._params = params
        self._on_batch = on_batch
        self._pool = futures.ThreadPoolExecutor(
            max(1, threads), thread_name_prefix="retrieve-batch",
            initializer=set_search_threads, initargs=(search_threads,))
        self._n_tasks = max(1, threads)
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Starts the batch tasks; call on the event loop that will call `retrieve`."""
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.get_running_loop().create_task(self._run())
                       for _ in range(self._n_tasks)]

    async def retrieve(self, pair: Pair, values: dict, k: int, filt: str | None,
                       radius: float | None, timeout: float | None = None) -> BatchedResult:
        """One request's results; raises what the encoder or the index raised for it, or
        DeadlineExpired."""
        future = asyncio.get_running_loop().create_future()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._queue.put_nowait(_Job(pair, values, k, filt, radius, deadline,
                                    time.perf_counter(), future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [job for job in batch if not job.future.done()]  # cancelled by the client
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(self._pool, run_batch, batch,
                                                      self._params, self._on_batch)
            except Exception as e:  # a bug in run_batch: its waiters get it, the task lives on
                outcomes = [e] * len(batch)
            for job, outcome in zip(batch, outcomes):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False)
