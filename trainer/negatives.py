"""Negative-sampling state kept by the retrieval loss between training steps.

Sits between the towers and `trainer.losses.RetrievalLoss`: the loss gathers each step's positive
documents across replicas, feeds them to these structures and reads extra negatives back.

- `MemoryQueue`: FIFO of recent document embeddings for cross-batch negatives (CBNS, Wang et al.
  SIGIR 2021).
- `EmbeddingCache`: document embeddings of uniformly sampled corpus rows, refreshed every N steps,
  the cheap source of mixed negatives (MNS, Yang et al. WWW 2020).
- `StreamingFrequencyEstimator`: sampling probabilities of documents estimated from the training
  stream itself (Yi et al. RecSys 2019, section 4), an alternative to the pipeline's
  `doc_sampling_prob` for the logQ correction.
- `select_hard_negatives`: the k hardest non-positive candidates per query (paper section 6.1).
- `gather_replicas` / `local_first`: cross-replica all-gather so every replica sees the global pool.

Document ids are turned into int64 fingerprints once (`hash_ids`, "" -> -1 = padding) so they can
be all-gathered, stored in variables and compared cheaply; two different ids collide with
probability ~n^2 / 2^63.

State lives in non-trainable `ON_READ` variables with `ONLY_FIRST_REPLICA` aggregation: every
replica applies the same update (computed from all-gathered data in replica order), so the local
copies stay identical without a broadcast, and checkpoints save the first replica's copy.
"""
from __future__ import annotations

import math
from typing import Callable

import tensorflow as tf

PAD_ID = -1  # fingerprint of "" (padding / missing document)
_MAX_BUCKET = 2**63 - 1


def hash_ids(ids: tf.Tensor) -> tf.Tensor:
    """String doc ids -> int64 fingerprints in [0, 2^63 - 1); "" -> PAD_ID."""
    ids = tf.convert_to_tensor(ids)
    if ids.dtype != tf.string:
        return tf.cast(ids, tf.int64)
    hashed = tf.strings.to_hash_bucket_fast(ids, _MAX_BUCKET)
    return tf.where(tf.equal(ids, ""), tf.constant(PAD_ID, tf.int64), hashed)


def _state_weight(layer: tf.keras.layers.Layer, name: str, shape, dtype, init) -> tf.Variable:
    return layer.add_weight(
        name=name, shape=shape, dtype=dtype, initializer=init, trainable=False,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


# --------------------------------------------------------------------------- cross-replica


def _replica_context():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def num_replicas() -> int:
    ctx = _replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def gather_replicas(x: tf.Tensor) -> tf.Tensor:
    """All-gather along axis 0 in replica order (identity without a multi-replica strategy).

    The gradient flows back to the replica that produced each row (all_gather's gradient sums
    the upstream gradients over replicas and slices out the local part).
    """
    ctx = _replica_context()
    if ctx is None:
        return x
    return ctx.all_gather(x, axis=0)


def local_first(gathered: tf.Tensor, local_size: tf.Tensor) -> tf.Tensor:
    """Rotate a replica-ordered gathered tensor so this replica's rows come first.

    Row i of the local batch then stays at index i, so its label column is unchanged. Local
    sizes may differ between replicas (last batch), hence the gathered size prefix sum.
    """
    ctx = _replica_context()
    if ctx is None:
        return gathered
    sizes = ctx.all_gather(tf.reshape(tf.cast(local_size, tf.int32), [1]), axis=0)
    rid = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    offset = tf.reduce_sum(sizes[:rid])
    return tf.roll(gathered, shift=-offset, axis=0)


# --------------------------------------------------------------------------- hard negatives


def select_hard_negatives(scores: tf.Tensor, valid: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The k highest-scoring valid candidates per row (online hard negatives, paper section 6.1).

    scores: [B, N]; valid: [B, N] bool, False for the positive itself, accidental hits and
    padding. Returns (indices [B, k'], picked_valid [B, k']) with k' = min(k, N); a pick is invalid
    when a row has fewer than k valid candidates.
    """
    k = min(int(k), scores.shape[1]) if scores.shape[1] is not None else int(k)
    k = tf.minimum(k, tf.shape(scores)[1])
    masked = tf.where(valid, scores, tf.constant(-math.inf, scores.dtype))
    _, idx = tf.math.top_k(masked, k=k, sorted=True)
    picked_valid = tf.gather(valid, idx, batch_dims=1)
    return idx, picked_valid


def select_random_negatives(valid: tf.Tensor, r: int, seed: tf.Tensor | None = None
                            ) -> tuple[tf.Tensor, tf.Tensor]:
    """r distinct candidates per row drawn uniformly among the valid ones (random negatives).

    Uses top-r of uniform keys over valid columns (Gumbel-top-k with uniform weights is a
    uniform sample without replacement).
    """
    r = tf.minimum(int(r), tf.shape(valid)[1])
    if seed is None:
        keys = tf.random.uniform(tf.shape(valid))
    else:
        keys = tf.random.stateless_uniform(tf.shape(valid), seed=seed)
    keys = tf.where(valid, keys, -1.0)
    _, idx = tf.math.top_k(keys, k=r, sorted=False)
    return idx, tf.gather(valid, idx, batch_dims=1)


# --------------------------------------------------------------------------- memory queue


class MemoryQueue(tf.keras.layers.Layer):
    """FIFO of the most recent `size` document embeddings with ids and sampling probabilities.

    Cross-batch negative sampling (CBNS, Wang et al. SIGIR 2021): embeddings of earlier batches'
    positives are reused as negatives. They were computed by older parameters, which is why CBNS
    only turns the queue on after a warm-up (embeddings drift fast early in training). Entries
    are stored without gradient. Slots not written yet are reported invalid by `read`.
    """

    def __init__(self, size: int, dim: int, name: str = "memory_queue"):
        super().__init__(name=name, trainable=False)
        if size <= 0 or dim <= 0:
            raise ValueError(f"MemoryQueue needs size > 0 and dim > 0, got size={size} dim={dim}")
        self.size, self.dim = int(size), int(dim)
        self.emb = _state_weight(self, "emb", [self.size, self.dim], tf.float32, "zeros")
        self.ids = _state_weight(self, "ids", [self.size], tf.int64,
                                 tf.keras.initializers.Constant(PAD_ID))
        self.probs = _state_weight(self, "probs", [self.size], tf.float32, "zeros")
        self.head = _state_weight(self, "head", [], tf.int64, "zeros")    # next slot to write
        self.count = _state_weight(self, "count", [], tf.int64, "zeros")  # filled slots

    def read(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """(emb [S, D], ids [S], probs [S], valid [S] bool) in slot order."""
        valid = tf.range(self.size, dtype=tf.int64) < self.count
        return (tf.identity(self.emb), tf.identity(self.ids), tf.identity(self.probs), valid)

    def ordered(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Filled entries oldest -> newest (for inspection and tests)."""
        start = tf.where(self.count < self.size, tf.constant(0, tf.int64), self.head)
        order = (start + tf.range(self.count)) % self.size
        return (tf.gather(self.emb, order), tf.gather(self.ids, order), tf.gather(self.probs, order))

    def enqueue(self, emb: tf.Tensor, ids: tf.Tensor, probs: tf.Tensor) -> None:
        """Append rows (oldest first), overwriting the oldest entries once full."""
        emb = tf.stop_gradient(tf.cast(emb, tf.float32))
        ids, probs = tf.cast(ids, tf.int64), tf.cast(probs, tf.float32)
        # More rows than slots: only the newest `size` can survive.
        emb, ids, probs = emb[-self.size:], ids[-self.size:], probs[-self.size:]
        n = tf.cast(tf.shape(ids)[0], tf.int64)
        slots = tf.expand_dims((self.head + tf.range(n)) % self.size, 1)
        # Dense assign: scatter ops are not implemented for ON_READ variables in replica context.
        self.emb.assign(tf.tensor_scatter_nd_update(self.emb, slots, emb))
        self.ids.assign(tf.tensor_scatter_nd_update(self.ids, slots, ids))
        self.probs.assign(tf.tensor_scatter_nd_update(self.probs, slots, probs))
        self.head.assign((self.head + n) % self.size)
        self.count.assign(tf.minimum(self.count + n, self.size))


# --------------------------------------------------------------------------- embedding cache


class EmbeddingCache(tf.keras.layers.Layer):
    """Embeddings of `size` corpus rows drawn uniformly, recomputed every `refresh_steps` steps.

    Mixed negative sampling (MNS, Yang et al. WWW 2020) adds uniformly sampled corpus documents
    to the in-batch negatives; running the document tower on them every step is the costly part,
    so this cache embeds a uniform sample once per `refresh_steps` and `sample(m)` draws from it.
    Cache rows are drawn with replacement and each step's picks are uniform over the cache, so
    every negative is marginally uniform over the corpus: expected count m / |corpus| per doc,
    which is what the MNS logQ mixture uses. Entries are stale by up to `refresh_steps` steps.

    Refresh rows come from a stateless RNG seeded by (seed, step), so all replicas embed the same
    rows and their copies stay equal.
    """

    def __init__(self, size: int, dim: int, corpus_size: int, refresh_steps: int,
                 seed: int = 0, chunk: int = 4096, name: str = "embedding_cache"):
        super().__init__(name=name, trainable=False)
        if size <= 0 or dim <= 0 or corpus_size <= 0 or refresh_steps <= 0:
            raise ValueError(f"EmbeddingCache needs positive size/dim/corpus_size/refresh_steps, "
                             f"got {size}/{dim}/{corpus_size}/{refresh_steps}")
        self.size, self.dim, self.corpus_size = int(size), int(dim), int(corpus_size)
        self.refresh_steps, self.seed, self.chunk = int(refresh_steps), int(seed), int(chunk)
        self.emb = _state_weight(self, "emb", [self.size, self.dim], tf.float32, "zeros")
        self.ids = _state_weight(self, "ids", [self.size], tf.int64,
                                 tf.keras.initializers.Constant(PAD_ID))
        self.probs = _state_weight(self, "probs", [self.size], tf.float32, "zeros")
        self.refreshed_at = _state_weight(self, "refreshed_at", [], tf.int64,
                                          tf.keras.initializers.Constant(-1))

    def _rows(self, step: tf.Tensor) -> tf.Tensor:
        if self.size == self.corpus_size:
            # Whole corpus fits: every row exactly once (still uniform, no sampling noise).
            return tf.range(self.corpus_size, dtype=tf.int64)
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        return tf.random.stateless_uniform([self.size], seed=seed, minval=0,
                                           maxval=self.corpus_size, dtype=tf.int64)

    def refresh(self, step, embed_fn: Callable[[tf.Tensor], tf.Tensor], ids: tf.Tensor,
                probs: tf.Tensor | None = None) -> None:
        """Recompute the cache now. embed_fn(rows int64 [n]) -> [n, D]; ids [corpus] (string or
        int64) and optional probs [corpus] index the same corpus rows."""
        rows = self._rows(step)
        parts = [tf.stop_gradient(tf.cast(embed_fn(rows[s:s + self.chunk]), tf.float32))
                 for s in range(0, self.size, self.chunk)]
        self.emb.assign(tf.concat(parts, 0) if len(parts) > 1 else parts[0])
        self.ids.assign(tf.gather(hash_ids(ids), rows))
        if probs is not None:
            self.probs.assign(tf.gather(tf.cast(probs, tf.float32), rows))
        self.refreshed_at.assign(tf.cast(step, tf.int64))

    def due(self, step) -> tf.Tensor:
        step = tf.cast(step, tf.int64)
        return tf.logical_or(self.refreshed_at < 0, step - self.refreshed_at >= self.refresh_steps)

    def maybe_refresh(self, step, doc_tower=None, corpus=None, *,
                      embed_fn: Callable[[tf.Tensor], tf.Tensor] | None = None,
                      ids: tf.Tensor | None = None, probs: tf.Tensor | None = None) -> tf.Tensor:
        """Refresh if never filled or `refresh_steps` passed since the last refresh.

        Give either `embed_fn` + `ids` (+ optional `probs`), or `doc_tower` + `corpus`, where
        `corpus` offers `gather(rows) -> dict` of document inputs (or a `features` dict of
        [corpus] tensors), `ids` ([corpus] doc ids) and optionally `probs` (logQ of the mixed
        negatives); `doc_tower.select` is applied when the tower has it.
        Works eagerly and inside tf.function. Returns whether it refreshed.
        """
        if embed_fn is None:
            if doc_tower is None or corpus is None:
                raise ValueError("EmbeddingCache.maybe_refresh needs embed_fn+ids or doc_tower+corpus")
            embed_fn, ids, probs = _corpus_embed_fn(doc_tower, corpus)
        if ids is None:
            raise ValueError("EmbeddingCache.maybe_refresh: ids of the corpus rows are required")
        due = self.due(step)

        def _do():
            self.refresh(step, embed_fn, ids, probs)
            return tf.constant(True)

        if tf.executing_eagerly():
            return _do() if bool(due) else tf.constant(False)
        return tf.cond(due, _do, lambda: tf.constant(False))

    def sample(self, m: int, seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """m entries drawn uniformly with replacement: (emb [m, D], ids [m], probs [m])."""
        if seed is None:
            idx = tf.random.uniform([m], 0, self.size, dtype=tf.int64)
        else:
            idx = tf.random.stateless_uniform([m], seed=seed, minval=0, maxval=self.size,
                                              dtype=tf.int64)
        return tf.gather(self.emb, idx), tf.gather(self.ids, idx), tf.gather(self.probs, idx)


def _corpus_embed_fn(doc_tower, corpus):
    """embed_fn over corpus rows from a doc tower and a `trainer.corpus.Corpus`-like object
    (`gather(rows) -> features` or a `features` dict of [N] tensors, `ids`, optional `probs`)."""
    ids, probs = corpus.ids, getattr(corpus, "probs", None)
    if hasattr(corpus, "gather"):
        gather = corpus.gather
    else:
        gather = lambda rows: {k: tf.gather(v, rows) for k, v in corpus.features.items()}  # noqa: E731
    select = getattr(doc_tower, "select", lambda feats: feats)
    return (lambda rows: doc_tower(select(gather(rows)), training=False)), ids, probs


# --------------------------------------------------------------------------- frequency estimator


def _primes_below(n: int, count: int) -> list[int]:
    out, c = [], max(n, 3)
    while len(out) < count and c > 2:
        c -= 1
        if all(c % d for d in range(2, int(c ** 0.5) + 1)):
            out.append(c)
    return out


class StreamingFrequencyEstimator(tf.keras.layers.Layer):
    """Sampling probabilities estimated from the training stream (Yi et al. 2019, Algorithm 2/3).

    Two hashed arrays per hash function: A[h] = last step the id was seen, B[h] = estimated
    number of steps between two occurrences, updated when the id shows up at step t as

        B[h] <- (1 - alpha) * B[h] + alpha * (t - A[h]);   A[h] <- t.

    The first sighting of a bucket sets B = t (the gap since the start) instead of blending
    with the initial value, so estimates need not wait ~1/alpha sightings to forget it; ids
    never seen keep `initial_gap`. The per-step hit probability is 1 / B. With several hash functions (Algorithm 3) the largest
    B is used, since hash collisions can only shrink the observed gaps. Buckets of hash h are
    `id mod P_h` for distinct primes P_h <= num_buckets, independent for random 63-bit ids.

    `example_prob` turns the per-step hit probability h of a batch of n i.i.d. draws into the
    per-example probability p, inverting h = 1 - (1 - p)^n (exact for i.i.d. batches; for
    h << 1, p ~ h / n).
    """

    def __init__(self, num_buckets: int, alpha: float, num_hashes: int = 2,
                 initial_gap: float = 1.0, name: str = "frequency_estimator"):
        super().__init__(name=name, trainable=False)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"frequency estimator alpha must be in (0, 1], got {alpha}")
        if num_buckets < 3 or num_hashes < 1:
            raise ValueError(f"frequency estimator needs num_buckets >= 3 and num_hashes >= 1, "
                             f"got {num_buckets} / {num_hashes}")
        self.alpha, self.initial_gap = float(alpha), max(1.0, float(initial_gap))
        self.primes = _primes_below(int(num_buckets) + 1, int(num_hashes))
        self.num_buckets = max(self.primes)
        h = len(self.primes)
        self.last_step = _state_weight(self, "A_last_step", [h, self.num_buckets], tf.int64, "zeros")
        self.gap = _state_weight(self, "B_step_gap", [h, self.num_buckets], tf.float32,
                                 tf.keras.initializers.Constant(self.initial_gap))

    def _index(self, ids: tf.Tensor) -> tf.Tensor:
        """[n] int64 ids -> [n, H, 2] (hash, bucket) indices into A / B."""
        ids = tf.maximum(tf.cast(ids, tf.int64), 0)
        buckets = tf.stack([tf.math.floormod(ids, p) for p in self.primes], axis=1)
        hashes = tf.broadcast_to(tf.range(len(self.primes), dtype=tf.int64), tf.shape(buckets))
        return tf.stack([hashes, buckets], axis=-1)

    def update(self, ids: tf.Tensor, step) -> None:
        """Record that `ids` (int64 fingerprints; PAD_ID ignored) occurred at `step` (>= 1)."""
        ids = tf.cast(ids, tf.int64)
        ids = tf.boolean_mask(ids, ids != PAD_ID)
        idx = tf.reshape(self._index(ids), [-1, 2])
        t = tf.cast(step, tf.int64)
        last = tf.gather_nd(self.last_step, idx)
        gap = tf.gather_nd(self.gap, idx)
        delta = tf.cast(t - last, tf.float32)
        new_gap = tf.where(last == 0, delta, (1.0 - self.alpha) * gap + self.alpha * delta)
        # Duplicates of an id (or colliding ids) in one step compute identical values, so the
        # scatter's choice among them does not matter.
        self.gap.assign(tf.tensor_scatter_nd_update(self.gap, idx, new_gap))
        self.last_step.assign(tf.tensor_scatter_nd_update(
            self.last_step, idx, tf.fill(tf.shape(last), t)))

    def step_gap(self, ids: tf.Tensor) -> tf.Tensor:
        """Estimated steps between occurrences (max over hash functions)."""
        return tf.reduce_max(tf.gather_nd(self.gap, self._index(ids)), axis=1)

    def step_prob(self, ids: tf.Tensor) -> tf.Tensor:
        """Estimated probability that the id occurs in a step's batch: 1 / B."""
        return 1.0 / self.step_gap(ids)

    def example_prob(self, ids: tf.Tensor, batch_size) -> tf.Tensor:
        """Per-example sampling probability p from h = 1 - (1 - p)^batch_size."""
        h = tf.minimum(self.step_prob(ids), 1.0 - 1e-6)
        n = tf.cast(batch_size, tf.float32)
        return -tf.math.expm1(tf.math.log1p(-h) / n)
