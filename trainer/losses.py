"""Retrieval losses and negative sampling of the unified embedding model, as one Keras layer.

The model runs both towers and hands the normalised embeddings to `RetrievalLoss`; the layer
builds the candidate pool (in-batch positives of all replicas, CBNS memory queue, MNS mixed
negatives, per-example extra negatives), applies temperature, logQ correction, accidental-hit
and padding masks, and returns the scalar loss. State (queue, cache, frequency estimator, step
counter) lives in `trainer.negatives` and is kept inside the layer between steps.

Math (row i = query i of this replica, column j = candidate j, s_ij = <u_i, v_j>):

Sampled softmax (`loss="softmax"`):

    logit_ij = s_ij / T - log q_j
    L_i      = -logit_ii + log sum_{j valid} exp(logit_ij)

The positive of row i is column i: the pool starts with this replica's positives in batch order
(other replicas' positives follow, `negatives.local_first`), then the queue, then mixed negatives,
then the K per-example extra negatives of row i. A column is *invalid* for row i (logit set to
TFRS's MIN_FLOAT) when it is padding (id ""), an unfilled or not-yet-warm queue slot, or an
accidental hit: a column other than i whose document id equals row i's positive id.

logQ correction (Yi et al. 2019; `logq="pipeline"|"streaming"`): q_j is the *expected number of
copies of document j in the candidate pool* under the sampling that produced it:

    q_j = S * p_j + M / |C|

- S = number of stream-sampled columns = global batch size (all replicas) + the queue entries in
  use. Every positive of the stream (in-batch or queued) was drawn with the per-example
  probability p_j: with `logq="pipeline"` the pipeline's `doc_sampling_prob` (a doc's click
  share; a missing / zero value is replaced by 1 / |C|); with `logq="streaming"` the
  `StreamingFrequencyEstimator` estimate at this step.
- M = number of mixed negatives (all replicas), each uniform over the corpus of |C| documents
  (MNS, Yang et al. 2020); the term is absent without MNS.
- The same q_j applies to every column holding document j (in-batch, queue or mixed), positive
  included, since all come from the one mixed pool. Exactly `log(q_j)` is subtracted (after the
  division by T); normalising q (e.g. by S + M) would shift every logit of a row by the same
  constant, which the softmax ignores.
- Per-example extra negatives (offline hard negatives, impressions) are not sampled from the
  stream: each is present exactly once, q = 1, nothing is subtracted.

Stale negatives (CBNS queue, MNS cache): their embeddings are stored, stop-gradient copies made
by earlier parameters. In one softmax over fresh and stale columns, shifting every fresh document
embedding by the same vector c adds <u_i, c> to the positive and the in-batch columns of row i but
not to the stale ones, so the document side gets a drift gradient (towards the queries, away from
the stored copies) that in-batch training never has (there, the softmax is shift invariant). The
towers then chase their own queue: on MovieLens-100K the mean document embedding swung across the
sphere every ~25 steps and recall@10 fell from .118 (logQ) to .006 (CBNS) / .021 (MNS cache).
CBNS's "embedding stability" (Wang et al. 2021, section 3) assumes the encoders settle; this
gradient keeps them moving. So the loss value and the query side's gradient use the full pool,
while the document side's gradient is that of the softmax over the fresh columns only (in-batch,
tower-mixed and extra negatives; same q_j): `doc_logits` in `compute_logits`, added as
`ce_doc - stop_gradient(ce_doc)`. A stale column thus acts only as a negative for the query side,
like a MoCo key. With the triplet loss, a hinge against a stale column gives no gradient to the
positive document either. Without stale columns nothing changes.

Cost of stale columns (softmax without online hard negatives): the training call does not build
the full-pool [B, N] logits of `compute_logits` (N = B + queue 4096 made their masks, id and logQ
copies cost more than the matmul). The query side's cross-entropy is lse_i - logit_ii with lse_i
from `pool_logsumexp`: one matmul with the temperature folded into the queries and -logQ / the
validity mask as its per-column bias, the accidental hits (found by binary search, no [B, N] id
comparison) scattered in, one softmax kernel, and a custom gradient of one [B, N] x [N, D] matmul.
`compute_logits` keeps the full formula; tests pin the two to the same loss and gradients.

Online hard negatives with softmax (`hard_negatives=k > 0`): only the positive and the k
highest-logit valid columns of each row enter the softmax (`tfrs.layers.loss.HardNegativeMining`).

Triplet loss (`loss="triplet"`, paper section 3.1), on cosine distance D(u, v) = 1 - cos(u, v):

    L_i = sum_{n in N_i} max(0, D(u_i, v_i) - D(u_i, v_n) + m)

N_i = `random_negatives` columns drawn uniformly among row i's valid pool columns (shuffled
in-batch negatives) + the `hard_negatives` k highest-cosine valid pool columns (online hard
negatives, paper section 6.1; k=2 was best) + all valid extra negatives of row i. With
`random_negatives = hard_negatives = 0` only the extra negatives remain: the paper's "impressions
as negatives" and "hard negatives only" ablations (a row without extra negatives adds 0). No temperature or
logQ: the margin works on raw distances.

Reduction: `sum` over this replica's rows (as `tfrs.tasks.Retrieval`); `mean` divides by the
global batch size, so summing replica gradients still gives the global mean.

Why not `tfrs.tasks.Retrieval` itself: its `SamplingProbablityCorrection` clips the probability
to [1e-6, 1], which breaks the exact correction for q_j = S * p_j > 1 (any popular document) and
for rare documents of large corpora, and per-example extra columns ([B, K] logits) do not fit its
shared-candidate matmul. The layer reproduces its logits, masking (MIN_FLOAT, labels eye(B, N))
and summed cross-entropy exactly; tests check equality with it where the clip is inactive.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer import negatives as neg
from trainer.config import LossConfig

MIN_FLOAT = np.finfo(np.float32).min / 100.0  # TFRS's "minus infinity" for masked logits


def _hit_indices(ids, pos_ids):
    """(row, column) pairs [H, 2], column j != row i, where column id ids[j] equals row i's
    positive id (padding excluded): the accidental hits. No [B, N] comparison: a binary search
    of each column id among the sorted positive ids gives the rows it hits (a contiguous run of
    the sort order), and the runs are enumerated directly. Column i of row i is its label,
    never a hit."""
    order = tf.argsort(pos_ids, stable=True)  # B values: a cheap sort (int32 positions)
    sorted_pos = tf.gather(pos_ids, order)
    lo = tf.searchsorted(sorted_pos, ids, side="left", out_type=tf.int32)
    hi = tf.searchsorted(sorted_pos, ids, side="right", out_type=tf.int32)
    counts = tf.where(ids != neg.PAD_ID, hi - lo, 0)  # rows hit by column j
    ends = tf.cumsum(counts)
    k = tf.range(ends[-1], dtype=tf.int32)  # pair index
    cols = tf.searchsorted(ends, k, side="right", out_type=tf.int32)
    rows = tf.gather(order, tf.gather(lo, cols) + k - tf.gather(ends - counts, cols))
    keep = rows != cols
    return tf.stack([tf.boolean_mask(rows, keep), tf.boolean_mask(cols, keep)], 1)


def _pool_logits(query, emb, log_q, ids, valid, pos_ids, temperature, remove_hits):
    """Masked logits [B, N] of the shared columns, as `_masked_logits` (column i of row i is its
    label, always kept): the temperature folded into the query side and -logQ (or "minus
    infinity" for an invalid column) added as the bias of one fused matmul; accidental hits
    scattered in. No [B, N] mask, id or logQ copies."""
    bias = tf.where(valid, -log_q, tf.cast(MIN_FLOAT, log_q.dtype))
    b = tf.shape(query)[0]
    bias = tf.tensor_scatter_nd_update(bias, tf.range(b)[:, None], -log_q[:b])  # labels kept
    logits = tf.nn.bias_add(tf.matmul(query / temperature, emb, transpose_b=True), bias)
    if remove_hits:
        hits = _hit_indices(ids, pos_ids)
        logits = tf.tensor_scatter_nd_update(
            logits, hits, tf.fill(tf.shape(hits)[:1], tf.cast(MIN_FLOAT, logits.dtype)))
    return logits


def pool_logsumexp(query, emb, log_q, ids, valid, pos_ids, temperature: float,
                   remove_hits: bool) -> tf.Tensor:
    """Row log-sum-exp [B] of the masked shared-column logits (`_pool_logits`) and its gradient
    to `query` only (`emb` is treated as constant: stop-gradient copies). Forward: one fused
    matmul + bias, one softmax kernel and two row maxima (lse_i = max_j z_ij - log max_j
    softmax_ij); backward: one [B, N] x [N, D] matmul of the saved softmax, the per-row factor
    applied after it. The queue's [N, D] layout is what both matmuls read."""
    temperature, remove_hits = float(temperature), bool(remove_hits)
    emb = tf.cast(emb, query.dtype)
    log_q = tf.cast(log_q, query.dtype)

    @tf.custom_gradient
    def lse(q):
        logits = _pool_logits(q, emb, log_q, ids, valid, pos_ids, temperature, remove_hits)
        softmax = tf.nn.softmax(logits)
        value = tf.reduce_max(logits, 1) - tf.math.log(tf.reduce_max(softmax, 1))

        def grad(g):
            # d lse_i / d u_i = sum_j softmax_ij v_j / T
            return tf.matmul(softmax, emb) * (g / temperature)[:, None]
        return value, grad

    return lse(query)


class RetrievalLoss(tf.keras.layers.Layer):
    """Softmax / triplet retrieval loss over in-batch, queue, mixed and extra negatives.

    Call: `loss = layer(query_emb [B, D], pos_emb [B, D], pos_ids [B] string, pos_prob [B],
    extra_neg_emb=None [B, K, D], extra_neg_ids=None [B, K], mixed_emb=None [M, D],
    mixed_ids=None [M], training=True)`. See the module docstring for the math.

    `embedding_dim` is needed up front only for the MNS cache (the model calls
    `cache.maybe_refresh` before the first loss call); the queue is otherwise built on first call.
    """

    def __init__(self, config: LossConfig, corpus_size: int, embedding_dim: int | None = None,
                 name: str = "retrieval_loss"):
        super().__init__(name=name, trainable=False)
        if corpus_size <= 0:
            raise ValueError(f"RetrievalLoss: corpus_size must be positive, got {corpus_size}")
        self.config, self.corpus_size = config, int(corpus_size)
        c = config
        self.step = neg._state_weight(self, "step", [], tf.int64, "zeros")
        self.queue: neg.MemoryQueue | None = None
        self._cache: neg.EmbeddingCache | None = None
        self.estimator = None
        if c.logq == "streaming":
            self.estimator = neg.StreamingFrequencyEstimator(
                c.estimator_buckets, c.estimator_alpha, c.estimator_hashes,
                initial_gap=self.corpus_size)
        if c.mixed_negatives and c.mixed_source == "cache" and embedding_dim is None:
            raise ValueError("RetrievalLoss: MNS from the embedding cache needs embedding_dim")
        self._dim = None
        if embedding_dim is not None:
            self._build_state(int(embedding_dim))

    # ------------------------------------------------------------------ state / interface

    def _build_state(self, dim: int) -> None:
        if self._dim is not None:
            if dim != self._dim:
                raise ValueError(f"RetrievalLoss built for dimension {self._dim}, got {dim}")
            return
        self._dim, c = dim, self.config
        if c.queue_size:
            self.queue = neg.MemoryQueue(c.queue_size, dim)
        if c.mixed_negatives and c.mixed_source == "cache":
            size = c.cache_size or min(self.corpus_size, 65536)
            self._cache = neg.EmbeddingCache(size, dim, self.corpus_size, c.cache_refresh_steps,
                                             c.seed)

    def build(self, input_shape):
        dim = tf.TensorShape(input_shape)[-1]
        if dim is None:
            raise ValueError("RetrievalLoss: the embedding dimension must be static")
        self._build_state(int(dim))
        super().build(input_shape)

    @property
    def needs_mixed_from_tower(self) -> int:
        c = self.config
        return c.mixed_negatives if c.mixed_negatives and c.mixed_source == "tower" else 0

    @property
    def cache(self) -> neg.EmbeddingCache | None:
        return self._cache

    # ------------------------------------------------------------------ candidate pool

    def _stream_prob(self, p: tf.Tensor) -> tf.Tensor:
        # A positive without a recorded probability (schema default 0) is taken as average.
        p = tf.cast(p, tf.float32)
        return tf.where(p > 0, p, 1.0 / self.corpus_size)

    def _pool(self, pos_emb, pos_ids, pos_prob, mixed_emb, mixed_ids, mixed_prob, training):
        """Shared candidate columns: dict(emb [N, D], ids [N], p [N], valid [N], S, M, ...)."""
        c = self.config
        b_local = tf.shape(pos_emb)[0]
        g_emb = neg.gather_replicas(pos_emb)
        g_ids = neg.gather_replicas(pos_ids)
        g_p = neg.gather_replicas(self._stream_prob(pos_prob))
        global_b = tf.shape(g_ids)[0]
        embs = [neg.local_first(g_emb, b_local)]
        ids = [neg.local_first(g_ids, b_local)]
        ps = [neg.local_first(g_p, b_local)]
        valid = [tf.ones([global_b], tf.bool)]
        # fresh: the column's embedding was computed by this step's doc tower (carries gradient);
        # queue and cache columns are stored, stop-gradient copies ("stale").
        fresh = [tf.ones([global_b], tf.bool)]
        fresh_parts = [True]  # static, per part of the pool
        n_stream = tf.cast(global_b, tf.float32)
        if self.queue is not None and training:
            q_emb, q_ids, q_p, q_valid = self.queue.read()
            active = self.step > c.queue_warmup_steps
            q_valid = tf.logical_and(q_valid, active)
            embs.append(q_emb), ids.append(q_ids), ps.append(q_p), valid.append(q_valid)
            fresh.append(tf.zeros([self.queue.size], tf.bool))
            fresh_parts.append(False)
            n_stream += tf.reduce_sum(tf.cast(q_valid, tf.float32))
        n_mixed = tf.constant(0.0)
        mixed_fresh = mixed_emb is not None
        if c.mixed_negatives:
            if mixed_emb is None and self._cache is not None and training:
                m_global = c.mixed_negatives * neg.num_replicas()
                # Same seed on every replica: all draw the same global set, no gather needed.
                seed = tf.stack([tf.constant(c.seed + 1, tf.int64), self.step])
                mixed_emb, mixed_ids, mixed_prob = self._cache.sample(m_global, seed=seed)
            elif mixed_emb is not None:
                mixed_emb = neg.gather_replicas(mixed_emb)
                mixed_ids = neg.gather_replicas(neg.hash_ids(mixed_ids))
                mixed_prob = None if mixed_prob is None else neg.gather_replicas(mixed_prob)
            if mixed_emb is not None:
                m = tf.shape(mixed_emb)[0]
                mixed_ids = neg.hash_ids(mixed_ids)
                embs.append(tf.cast(mixed_emb, pos_emb.dtype)), ids.append(mixed_ids)
                # Stream probability of a uniformly drawn doc: known only if given (cache / kwarg).
                ps.append(tf.zeros([m]) if mixed_prob is None else tf.cast(mixed_prob, tf.float32))
                valid.append(mixed_ids != neg.PAD_ID)
                fresh.append(tf.fill([m], mixed_fresh))
                fresh_parts.append(mixed_fresh)
                n_mixed = tf.cast(m, tf.float32)
        pool = dict(emb=tf.concat(embs, 0), ids=tf.concat(ids, 0), p=tf.concat(ps, 0),
                    valid=tf.concat(valid, 0), fresh=tf.concat(fresh, 0),
                    has_stale=not all(fresh_parts), n_stream=n_stream, n_mixed=n_mixed,
                    global_b=global_b, canonical=(g_emb, g_ids, g_p))
        if pool["has_stale"]:
            # The fresh columns alone (in-batch first), same q_j: the document side's softmax.
            keep = [i for i, f in enumerate(fresh_parts) if f]
            pool["fresh_pool"] = dict(
                pool, **{k: tf.concat([parts[i] for i in keep], 0)
                         for k, parts in (("emb", embs), ("ids", ids), ("p", ps), ("valid", valid))})
        return pool

    def _log_q(self, pool) -> tf.Tensor:
        """log q_j per shared column (module docstring); zeros with logq=none."""
        c = self.config
        if c.logq == "none":
            return tf.zeros_like(pool["p"])
        if c.logq == "streaming":
            p = self.estimator.example_prob(pool["ids"], pool["global_b"])
        else:
            p = pool["p"]
        q = pool["n_stream"] * p + pool["n_mixed"] / float(self.corpus_size)
        # Padding columns (masked anyway) may have q = 0; keep their logits finite.
        return tf.math.log(tf.where(q > 0, q, 1.0))

    # ------------------------------------------------------------------ logits

    def compute_logits(self, query_emb, pos_emb, pos_ids, pos_prob, extra_neg_emb=None,
                       extra_neg_ids=None, mixed_emb=None, mixed_ids=None, training=True,
                       mixed_prob=None, _prepared=None) -> dict:
        """Corrected, masked logits [B, N + K] with the positive of row i in column i.

        Returns dict(logits, scores (cosine, unscaled), log_q [B, N + K], valid [B, N + K] (False
        for masked columns and for the label column), labels [B, N + K] one-hot). Reads state,
        never updates it.

        When the pool holds stale columns (CBNS queue, MNS cache), `logits` carry gradient to the
        query side only, and `doc_logits` / `doc_labels` [B, F + K] (the fresh columns: in-batch,
        tower-mixed, extra) carry the document side's gradient ("Stale negatives" in the module
        docstring).
        """
        query_emb, pos_ids, pool, extra = _prepared or self._prepare(
            query_emb, pos_emb, pos_ids, pos_prob, extra_neg_emb, extra_neg_ids, mixed_emb,
            mixed_ids, training, mixed_prob)
        stale = pool["has_stale"]
        log_q = self._log_q(pool)
        sg = tf.stop_gradient
        out = self._masked_logits(query_emb, sg(pool["emb"]) if stale else pool["emb"], log_q,
                                  pool["ids"], pool["valid"], pos_ids, extra, sg if stale else None)
        out["pool"] = pool
        if stale:
            # In-batch columns come first, so row i's positive stays in column i.
            fp = pool["fresh_pool"]
            doc = self._masked_logits(sg(query_emb), fp["emb"], self._log_q(fp), fp["ids"],
                                      fp["valid"], pos_ids, extra, None)
            out["doc_logits"], out["doc_labels"] = doc["logits"], doc["labels"]
        return out

    def _prepare(self, query_emb, pos_emb, pos_ids, pos_prob, extra_neg_emb, extra_neg_ids,
                 mixed_emb, mixed_ids, training, mixed_prob):
        """(query_emb, hashed pos_ids, pool, extra (emb, ids, valid) or None)."""
        query_emb = tf.convert_to_tensor(query_emb)
        pos_emb = tf.cast(pos_emb, query_emb.dtype)
        self._build_state(int(query_emb.shape[-1]))
        pos_ids = neg.hash_ids(pos_ids)
        pool = self._pool(pos_emb, pos_ids, pos_prob, mixed_emb, mixed_ids, mixed_prob, training)
        extra = None
        if extra_neg_emb is not None:
            extra_neg_emb = tf.cast(extra_neg_emb, query_emb.dtype)
            k = tf.shape(extra_neg_emb)[1]
            b = tf.shape(query_emb)[0]
            if extra_neg_ids is None:
                e_ids = tf.zeros([b, k], tf.int64)  # unknown ids: never accidental hits
                e_valid = tf.ones([b, k], tf.bool)
            else:
                e_ids = neg.hash_ids(extra_neg_ids)
                e_valid = e_ids != neg.PAD_ID
            extra = (extra_neg_emb, e_ids, e_valid)
        return query_emb, pos_ids, pool, extra

    def _masked_logits(self, query_emb, cand_emb, log_q, cand_ids, cand_valid, pos_ids, extra,
                       extra_grad) -> dict:
        """Logits of query rows against shared candidate columns (+ per-row extra columns):
        temperature, logQ, padding / accidental-hit masks; dict(logits, scores, log_q, valid,
        labels). `extra_grad` (e.g. stop_gradient) is applied to the extra embeddings.

        Per-column terms ([N] log_q, ids, valid) enter the [B, N] ops by implicit broadcasting,
        never as materialised [B, N] copies: with a CBNS queue N = B + queue size, and those
        copies (an int64 id matrix above all) cost more than the matmul. The full `log_q` / `valid`
        of the returned dict are pruned from a traced train step that does not read them."""
        c = self.config
        b = tf.shape(query_emb)[0]
        scores = tf.matmul(query_emb, cand_emb, transpose_b=True)  # [B, N]
        logits = scores / c.temperature - tf.cast(log_q, scores.dtype)[None, :]
        keep = cand_valid[None, :]  # [1, N], broadcast by the ops below
        pos_col = pos_ids[:, None]
        has_pos = pos_col != neg.PAD_ID
        if c.remove_accidental_hits:
            keep = tf.logical_and(keep, tf.logical_not(
                tf.logical_and(tf.equal(cand_ids[None, :], pos_col), has_pos)))
        keep = tf.broadcast_to(keep, tf.shape(scores))
        full_log_q = tf.broadcast_to(log_q[None, :], tf.shape(scores))
        if extra is not None:
            e_emb, e_ids, e_valid = extra
            if extra_grad is not None:
                e_emb = extra_grad(e_emb)
            e_scores = tf.einsum("bd,bkd->bk", query_emb, e_emb)
            e_keep = e_valid
            if c.remove_accidental_hits:
                e_keep = tf.logical_and(e_keep, tf.logical_not(
                    tf.logical_and(tf.equal(e_ids, pos_col), has_pos)))
            scores = tf.concat([scores, e_scores], 1)
            logits = tf.concat([logits, e_scores / c.temperature], 1)  # q = 1: nothing subtracted
            keep = tf.concat([keep, e_keep], 1)
            full_log_q = tf.concat([full_log_q, tf.zeros(tf.shape(e_ids), full_log_q.dtype)], 1)
        # Row i's label column i is always kept (its own id would count as a hit).
        n_diag = tf.minimum(b, tf.shape(keep)[1])
        keep_or_label = tf.linalg.set_diag(keep, tf.ones([n_diag], tf.bool))
        logits = tf.where(keep_or_label, logits, tf.cast(MIN_FLOAT, scores.dtype))
        labels = tf.eye(b, tf.shape(scores)[1], dtype=scores.dtype)
        valid = tf.linalg.set_diag(keep, tf.zeros([n_diag], tf.bool))
        return dict(logits=logits, scores=scores, log_q=full_log_q, valid=valid, labels=labels)

    # ------------------------------------------------------------------ losses

    def _softmax(self, out) -> tf.Tensor:
        def ce(logits, labels):
            if self.config.hard_negatives:
                logits, labels = tfrs.layers.loss.HardNegativeMining(self.config.hard_negatives)(
                    logits, labels)
            return tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)

        per_row = ce(out["logits"], out["labels"])
        if "doc_logits" in out:
            # Value of the full-pool loss; document-side gradient of the fresh-column softmax.
            doc = ce(out["doc_logits"], out["doc_labels"])
            per_row = per_row + (doc - tf.stop_gradient(doc))
        return per_row

    def _softmax_split(self, query_emb, pos_ids, pool, extra) -> tf.Tensor:
        """`_softmax` of a pool with stale columns, without the [B, N] logits of the whole pool.

        Same per-row loss and gradients as `_softmax(compute_logits(...))`. Query side: the
        full-pool cross-entropy of row i is lse_i - logit_ii, with lse_i the log-sum-exp of all
        its valid columns (document side stopped, as in the full logits): `pool_logsumexp`
        over the shared columns (one pass over the [B, N] block, gradient to the queries only),
        joined with the [B, K] extra columns. Document side: the fresh columns' softmax, as in
        `compute_logits` ("Stale negatives" in the module docstring).
        """
        c, sg = self.config, tf.stop_gradient
        t = c.temperature
        log_q = self._log_q(pool)
        emb = sg(tf.cast(pool["emb"], query_emb.dtype))
        lse = pool_logsumexp(query_emb, emb, log_q, pool["ids"], pool["valid"], pos_ids, t,
                             c.remove_accidental_hits)
        b = tf.shape(query_emb)[0]
        pos_logit = tf.reduce_sum((query_emb / t) * emb[:b], 1) - tf.cast(log_q[:b], emb.dtype)
        if extra is not None:
            e_emb, e_ids, e_valid = extra
            e_logits = tf.einsum("bd,bkd->bk", query_emb, sg(e_emb)) / t  # q = 1
            e_keep = e_valid
            if c.remove_accidental_hits:
                pos_col = pos_ids[:, None]
                e_keep = tf.logical_and(e_keep, tf.logical_not(tf.logical_and(
                    tf.equal(e_ids, pos_col), pos_col != neg.PAD_ID)))
            e_logits = tf.where(e_keep, e_logits, tf.cast(MIN_FLOAT, e_logits.dtype))
            lse = tf.reduce_logsumexp(tf.concat([lse[:, None], e_logits], 1), 1)
        per_row = lse - pos_logit
        fp = pool["fresh_pool"]
        if extra is None:  # the same fused masking, differentiated by TF (documents only)
            logits = _pool_logits(sg(query_emb), tf.cast(fp["emb"], query_emb.dtype),
                                  tf.cast(self._log_q(fp), query_emb.dtype), fp["ids"],
                                  fp["valid"], pos_ids, t, c.remove_accidental_hits)
            labels = tf.eye(b, tf.shape(logits)[1], dtype=logits.dtype)
        else:
            doc = self._masked_logits(sg(query_emb), fp["emb"], self._log_q(fp), fp["ids"],
                                      fp["valid"], pos_ids, extra, None)
            logits, labels = doc["logits"], doc["labels"]
        ce_doc = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return per_row + (ce_doc - sg(ce_doc))

    def _triplet(self, out, n_shared) -> tf.Tensor:
        c = self.config
        cos = out["cos"]
        valid = out["valid"]
        cos_pos = tf.linalg.diag_part(cos)  # column i of row i
        # Against a stale (queue / cache) negative the positive document gets no gradient, as
        # in the softmax ("Stale negatives" in the module docstring).
        cos_pos_q = out.get("cos_pos_query_only", cos_pos)
        fresh = out["pool"]["fresh"]

        def hinge(cos_neg, idx=None):
            pos = cos_pos[:, None]
            if idx is not None and out["pool"]["has_stale"]:
                pos = tf.where(tf.gather(fresh, idx), pos, cos_pos_q[:, None])
            return tf.nn.relu(cos_neg - pos + c.margin)

        shared_cos, shared_valid = cos[:, :n_shared], valid[:, :n_shared]
        per_row = tf.zeros_like(cos_pos)
        if c.random_negatives:
            seed = tf.stack([tf.constant(c.seed + 2, tf.int64), self.step])
            idx, ok = neg.select_random_negatives(shared_valid, c.random_negatives, seed)
            per_row += tf.reduce_sum(
                tf.where(ok, hinge(tf.gather(shared_cos, idx, batch_dims=1), idx), 0.0), 1)
        if c.hard_negatives:
            idx, ok = neg.select_hard_negatives(shared_cos, shared_valid, c.hard_negatives)
            per_row += tf.reduce_sum(
                tf.where(ok, hinge(tf.gather(shared_cos, idx, batch_dims=1), idx), 0.0), 1)
        extra_cos, extra_valid = cos[:, n_shared:], valid[:, n_shared:]
        per_row += tf.reduce_sum(tf.where(extra_valid, hinge(extra_cos), 0.0), 1)
        return per_row

    def call(self, query_emb, pos_emb, pos_ids, pos_prob, extra_neg_emb=None, extra_neg_ids=None,
             mixed_emb=None, mixed_ids=None, training=True, mixed_prob=None, sample_weight=None):
        c = self.config
        training = bool(training)
        query_emb = tf.convert_to_tensor(query_emb)
        if training:
            self.step.assign_add(1)
        if training and self.estimator is not None:
            # Canonical (replica-ordered) ids: every replica applies the identical update.
            self.estimator.update(neg.gather_replicas(neg.hash_ids(pos_ids)), self.step)
        prepared = self._prepare(query_emb, pos_emb, pos_ids, pos_prob, extra_neg_emb,
                                 extra_neg_ids, mixed_emb, mixed_ids, training, mixed_prob)
        pool = prepared[2]
        if c.loss == "softmax" and pool["has_stale"] and not c.hard_negatives:
            per_row = self._softmax_split(*prepared)
        elif c.loss == "softmax":
            per_row = self._softmax(self.compute_logits(query_emb, pos_emb, pos_ids, pos_prob,
                                                        extra_neg_emb, extra_neg_ids, mixed_emb,
                                                        mixed_ids, training, mixed_prob,
                                                        _prepared=prepared))
        else:
            out = self.compute_logits(query_emb, pos_emb, pos_ids, pos_prob, extra_neg_emb,
                                      extra_neg_ids, mixed_emb, mixed_ids, training, mixed_prob,
                                      _prepared=prepared)
            n_shared = tf.shape(pool["ids"])[0]
            cand = tf.math.l2_normalize(pool["emb"], -1)
            qn = tf.math.l2_normalize(query_emb, -1)
            cos = tf.matmul(qn, cand, transpose_b=True)
            if extra_neg_emb is not None:
                e = tf.math.l2_normalize(tf.cast(extra_neg_emb, qn.dtype), -1)
                cos = tf.concat([cos, tf.einsum("bd,bkd->bk", qn, e)], 1)
            out["cos"] = cos
            if pool["has_stale"]:
                b = tf.shape(qn)[0]
                out["cos_pos_query_only"] = tf.reduce_sum(qn * tf.stop_gradient(cand[:b]), -1)
            per_row = self._triplet(out, n_shared)
        if sample_weight is not None:
            per_row = per_row * tf.cast(sample_weight, per_row.dtype)
        loss = tf.reduce_sum(per_row)
        if c.reduction == "mean":
            loss = loss / tf.cast(pool["global_b"], loss.dtype)
        if training and self.queue is not None:
            g_emb, g_ids, g_p = pool["canonical"]
            self.queue.enqueue(g_emb, g_ids, g_p)
        return loss
