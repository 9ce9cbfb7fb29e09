"""Scale beyond one machine: sharded index build and search across shards.

Build (the FAISS "index on disk" recipe, faiss/contrib/ondisk.py): train ONE empty index on a
sample, give every shard a copy, let each shard add its slice of the corpus with global ids
(in parallel, as a Beam pipeline on the local runner or Dataflow/Flink/Spark by options), then
merge the shards' inverted lists into one on-disk index with `merge_ondisk`. Because every
shard shares the trained quantizers, the merged index equals a single build list by list.

The work directory is local scratch (a remote runner needs a shared one); the merged index is
published like any other build (`index.builder.build_index` -> `persistence.publish`: staged
locally, uploaded to INDEX_BASE/VERSION on any URI, committed last).

Search: each shard answers top-k for its slice; the global top-k is the merge of the shards'
lists (what a serving fan-out does when one machine cannot hold the index). With a filter,
`search_sharded` runs the search planner (index/planner.py) on every shard over its own slice,
so each returns min(k, its matching documents) and the merge min(k, matching documents).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TRAINED = "trained.faiss"
MERGED = "merged.faiss"
IVFDATA = "merged.ivfdata"


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    b = np.linspace(0, n, shards + 1).astype(int)
    return [(int(b[i]), int(b[i + 1])) for i in range(shards)]


def add_shard(task: tuple[int, int, int], vectors_npy: str, trained: str, out_dir: str) -> str:
    """One shard: read the trained empty index, add rows [start, end) with their global ids."""
    import faiss

    from index.ivf_pq import add_vectors

    shard, start, end = task
    X = np.load(vectors_npy, mmap_mode="r")
    index = faiss.read_index(trained)
    add_vectors(index, np.asarray(X[start:end]), start=start)
    path = str(Path(out_dir) / f"shard-{shard:05d}.faiss")
    faiss.write_index(index, path)
    log.info("shard %d: rows %d..%d -> %s", shard, start, end, path)
    return path


def build_shards(X: np.ndarray, factory: str, work_dir, shards: int, *, beam_args=None,
                 seed: int = 0) -> list[str]:
    """Trains once, then adds the shards in a Beam pipeline; returns shard index paths."""
    import apache_beam as beam
    import faiss

    from beam_pipelines.options import make_pipeline  # local FnApiRunner unless options say
    from index.ivf_pq import train_index

    if "RFlat" in factory:
        raise ValueError(f"{factory}: sharded builds merge inverted lists only; drop the refine "
                         "stage (RFlat) or build on one machine")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    faiss.write_index(train_index(X, factory, seed=seed), str(work / TRAINED))
    vectors = work / "vectors.npy"
    np.save(vectors, np.ascontiguousarray(X, np.float32))
    tasks = [(i, s, e) for i, (s, e) in enumerate(shard_bounds(len(X), shards))]
    out = work / "shards"
    out.mkdir(exist_ok=True)
    with make_pipeline(list(beam_args or [])) as p:
        _ = (p | "Shards" >> beam.Create(tasks)
               | "AddSlice" >> beam.Map(add_shard, str(vectors), str(work / TRAINED), str(out)))
    vectors.unlink()
    return [str(out / f"shard-{i:05d}.faiss") for i, _, _ in tasks]


def merge_shards(shard_paths: list[str], trained: str, out_dir) -> str:
    """Merges shard inverted lists into out_dir/merged.faiss + merged.ivfdata (on disk); the
    pair is read back with faiss.IO_FLAG_ONDISK_SAME_DIR so the directory can be moved."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = faiss.read_index(trained)
    merge_ondisk(index, shard_paths, str(out / IVFDATA))
    faiss.write_index(index, str(out / MERGED))
    return str(out / MERGED)


def read_merged(path: str):
    import faiss

    return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


def to_memory(index):
    """Copies on-disk inverted lists into memory so the index file stands alone."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    mem = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    src = ivf.invlists
    for l in range(ivf.nlist):
        n = src.list_size(l)
        if n:
            mem.add_entries(l, n, src.get_ids(l), src.get_codes(l))
    ivf.replace_invlists(mem, True)
    mem.this.disown()
    return index


def search_shards(indexes: list, Q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k from per-shard top-k lists (inner product: larger is better). Ids are the
    global ids each shard stored."""
    Ds, Is = [], []
    for index in indexes:
        D, I = index.search(Q, k, params=params)
        Ds.append(D)
        Is.append(I)
    D = np.concatenate(Ds, axis=1)
    I = np.concatenate(Is, axis=1)
    D = np.where(I >= 0, D, -np.inf)
    # Stable sort on (-score, id) so ties break the same way as one index would (lower id first
    # within a list is not guaranteed by FAISS; ids make the merge deterministic).
    order = np.lexsort((I, -D), axis=1)[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def search_sharded(planners: list, Q: np.ndarray, k: int, *, selection=None,
                   radius: float | None = None, params=None, plan: str = "auto"):
    """Fan-out through the search planner: `planners` are `index.planner.Planner`s over each
    shard's backend (e.g. `IVFPQBackend(faiss.read_index(shard), factory)`), `selection` the
    filter compiled over global ids (`index.filters.compile_filter`) or None. Returns (ids,
    scores) per query, best first, documents scanned per query summed over shards, and each
    shard's plan per query."""
    outs = [p.search(Q, k, p.compile(selection), radius=radius, params=params, plan=plan)
            for p in planners]
    limit = k if k > 0 else None
    ids, scores = [], []
    for q in range(len(Q)):
        i = np.concatenate([o.ids[q] for o in outs]).astype(np.int64)
        d = np.concatenate([o.scores[q] for o in outs]).astype(np.float32)
        order = np.lexsort((i, -d))[:limit]
        ids.append(i[order])
        scores.append(d[order])
    scanned = np.sum([o.scanned for o in outs], axis=0).astype(np.int64)
    return ids, scores, scanned, [o.plans for o in outs]
