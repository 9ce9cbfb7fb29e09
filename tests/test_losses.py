"""RetrievalLoss: every loss variant, exact logQ / mixture corrections, masks, triplet margin,
hard negatives, parity with tfrs.tasks.Retrieval, and cross-replica gathering."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainer import negatives as neg
from trainer.config import LossConfig
from trainer.losses import MIN_FLOAT, RetrievalLoss

B, D, CORPUS = 6, 4, 40
ROOT = Path(__file__).resolve().parents[1]


def _unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return tf.constant(x / np.linalg.norm(x, axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    return dict(
        query_emb=_unit(rng, B, D), pos_emb=_unit(rng, B, D),
        pos_ids=tf.constant(["a", "b", "c", "a", "d", "e"]),  # rows 0 and 3 share a document
        pos_prob=tf.constant(rng.uniform(0.005, 0.05, B).astype(np.float32)),
        extra_neg_emb=_unit(rng, B, 2, D),
        extra_neg_ids=tf.constant([["x", ""], ["a", "y"], ["z", "w"], ["v", ""], ["d", "u"],
                                   ["t", "s"]]),
        mixed_emb=_unit(rng, 3, D), mixed_ids=tf.constant(["m1", "b", "m3"]),
    )


VARIANTS = {
    "in_batch": dict(logq="none"),
    "logq": dict(logq="pipeline"),
    "streaming": dict(logq="streaming", estimator_buckets=1009),
    "cbns": dict(queue_size=8, queue_warmup_steps=1),
    "mns_tower": dict(mixed_negatives=3),
    "mns_cache": dict(mixed_negatives=3, mixed_source="cache"),
    "softmax_hard": dict(hard_negatives=2),
    "triplet_random": dict(loss="triplet", random_negatives=2),
    "triplet_hard": dict(loss="triplet", random_negatives=0, hard_negatives=2),
    "mean": dict(reduction="mean", queue_size=4, queue_warmup_steps=0, mixed_negatives=3),
}


def _layer(**kw):
    layer = RetrievalLoss(LossConfig(**kw), CORPUS, embedding_dim=D)
    if layer.cache is not None:
        rng = np.random.default_rng(1)
        table = _unit(rng, CORPUS, D)
        layer.cache.maybe_refresh(0, embed_fn=lambda r: tf.gather(table, r),
                                  ids=tf.constant([f"c{i}" for i in range(CORPUS)]),
                                  probs=tf.fill([CORPUS], 1.0 / CORPUS))
    return layer


def _inputs(batch, layer, extras=True):
    kw = {k: batch[k] for k in ("query_emb", "pos_emb", "pos_ids", "pos_prob")}
    if extras:
        kw.update(extra_neg_emb=batch["extra_neg_emb"], extra_neg_ids=batch["extra_neg_ids"])
    m = layer.needs_mixed_from_tower
    if m:
        kw.update(mixed_emb=batch["mixed_emb"][:m], mixed_ids=batch["mixed_ids"][:m])
    return kw


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_loss_computes_and_has_gradients(batch, name):
    layer = _layer(**VARIANTS[name])
    kw = _inputs(batch, layer)
    q, d, e = (tf.Variable(kw.pop(k)) for k in ("query_emb", "pos_emb", "extra_neg_emb"))
    for _ in range(3):  # later steps use the queue / estimator state of earlier ones
        with tf.GradientTape() as tape:
            loss = layer(q, d, extra_neg_emb=e, training=True, **kw)
        grads = tape.gradient(loss, [q, d, e])
        assert np.isfinite(loss.numpy()) and loss.numpy() > 0
        for g in grads[:2]:
            assert g is not None and np.isfinite(g.numpy()).all() and np.abs(g.numpy()).sum() > 0
    if layer.queue is not None:
        assert int(layer.queue.count) == min(3 * B, layer.queue.size)
    assert int(layer.step) == 3


def test_in_batch_matches_tfrs_retrieval(batch):
    """Same logits, masks and summed cross-entropy as tfrs.tasks.Retrieval (clip inactive)."""
    layer = _layer(logq="pipeline", temperature=0.1)
    kw = _inputs(batch, layer, extras=False)
    ours = layer(**kw, training=False)
    task = tfrs.tasks.Retrieval(temperature=0.1, remove_accidental_hits=True)
    theirs = task(batch["query_emb"], batch["pos_emb"],
                  candidate_sampling_probability=B * batch["pos_prob"],
                  candidate_ids=batch["pos_ids"], compute_metrics=False)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5)


def _logits(layer, kw, training=False, **extra):
    return {k: v.numpy() for k, v in layer.compute_logits(**kw, training=training, **extra).items()
            if k != "pool"}


def test_logq_changes_logits_by_exactly_log_q(batch):
    base, corr = _layer(logq="none"), _layer(logq="pipeline")
    kw = _inputs(batch, base)
    a, b = _logits(base, kw), _logits(corr, kw)
    p = batch["pos_prob"].numpy().astype(np.float64)
    log_q = np.concatenate([np.log(B * p), np.zeros(2)])  # extra columns: q = 1
    keep = a["valid"] | (a["labels"] > 0)
    np.testing.assert_array_equal(a["valid"], b["valid"])
    diff = (b["logits"] - a["logits"])[keep]
    np.testing.assert_allclose(diff, -np.broadcast_to(log_q, a["logits"].shape)[keep], atol=2e-5)
    np.testing.assert_allclose(b["log_q"][0], log_q, atol=1e-6)


def test_mixture_correction_is_exactly_log_of_s_p_plus_m_over_corpus(batch):
    base = _layer(logq="none", mixed_negatives=3)
    corr = _layer(logq="pipeline", mixed_negatives=3)
    kw = _inputs(batch, base, extras=False)
    mixed_prob = tf.constant([0.0, 0.02, 0.001])
    a = _logits(base, kw, mixed_prob=mixed_prob)
    b = _logits(corr, kw, mixed_prob=mixed_prob)
    p = np.concatenate([batch["pos_prob"].numpy(), mixed_prob.numpy()]).astype(np.float64)
    q = B * p + 3 / CORPUS  # S = B stream columns, M = 3 uniform draws
    keep = a["valid"] | (a["labels"] > 0)
    np.testing.assert_allclose((b["logits"] - a["logits"])[keep],
                               -np.broadcast_to(np.log(q), a["logits"].shape)[keep], atol=2e-5)
    # The mixed doc "b" duplicates row 1's positive: accidental hit, masked.
    assert not a["valid"][1, B + 1] and a["logits"][1, B + 1] == np.float32(MIN_FLOAT)


def test_queue_entries_get_logq_and_count_in_s(batch):
    base = _layer(logq="none", queue_size=8, queue_warmup_steps=0)
    corr = _layer(logq="pipeline", queue_size=8, queue_warmup_steps=0)
    kw = _inputs(batch, base, extras=False)
    for layer in (base, corr):
        layer(**kw, training=True)  # enqueues the 6 positives, step = 1
        layer.step.assign(2)
    a, b = _logits(base, kw, training=True), _logits(corr, kw, training=True)
    s = B + B  # in-batch + 6 filled queue slots
    p = batch["pos_prob"].numpy().astype(np.float64)
    expect = np.concatenate([np.log(s * p), np.log(s * p), np.zeros(2)])  # 2 empty slots
    keep = a["valid"] | (a["labels"] > 0)
    assert keep[:, B + B:].sum() == 0  # unfilled slots masked for every row
    np.testing.assert_allclose((b["logits"] - a["logits"])[keep],
                               -np.broadcast_to(expect, a["logits"].shape)[keep], atol=2e-5)


def test_streaming_logq_uses_estimator(batch):
    layer = _layer(logq="streaming", estimator_buckets=1009)
    base = _layer(logq="none")
    kw = _inputs(batch, layer, extras=False)
    layer(**kw, training=True)
    est = layer.estimator.example_prob(neg.hash_ids(batch["pos_ids"]), B).numpy()
    a, b = _logits(base, kw), _logits(layer, kw)
    keep = a["valid"] | (a["labels"] > 0)
    np.testing.assert_allclose((b["logits"] - a["logits"])[keep],
                               -np.broadcast_to(np.log(B * est.astype(np.float64)),
                                                a["logits"].shape)[keep], atol=2e-5)


def test_accidental_hits_and_padding_masked(batch):
    layer = _layer(logq="none")
    out = _logits(layer, _inputs(batch, layer))
    logits, valid = out["logits"], out["valid"]
    # Rows 0 and 3 share doc "a": each masks the other's column, keeps its own label column.
    assert not valid[0, 3] and not valid[3, 0]
    assert logits[0, 3] == np.float32(MIN_FLOAT) and logits[0, 0] > MIN_FLOAT / 2
    assert valid[0, 1] and valid[1, 0]
    # Extra negatives: "a" for row 1 is fine (row 1's positive is "b"), "d" for row 4 is a hit,
    # "" is padding.
    assert valid[1, B] and not valid[4, B] and not valid[0, B + 1] and not valid[3, B + 1]
    off = _logits(_layer(logq="none", remove_accidental_hits=False), _inputs(batch, layer))
    assert off["valid"][0, 3] and not off["valid"][0, B + 1]  # padding stays masked


def test_queue_warmup_masks_queue_until_warm(batch):
    layer = _layer(logq="none", queue_size=12, queue_warmup_steps=2)
    kw = _inputs(batch, layer, extras=False)
    for step in (1, 2, 3):
        layer(**kw, training=True)
        out = _logits(layer, kw, training=True)
        queue_cols = out["valid"][:, B:B + 12]
        assert queue_cols.any() == (step > 2), step
    # Eval calls neither use nor change the queue.
    count = int(layer.queue.count)
    layer(**kw, training=False)
    assert int(layer.queue.count) == count and int(layer.step) == 3


def test_extra_negatives_are_per_query_columns(batch):
    layer = _layer(logq="none", temperature=0.5)
    out = _logits(layer, _inputs(batch, layer))
    e = batch["extra_neg_emb"].numpy()
    qe = batch["query_emb"].numpy()
    expect = np.einsum("bd,bkd->bk", qe, e) / 0.5
    valid = out["valid"][:, B:]
    np.testing.assert_allclose(out["logits"][:, B:][valid], expect[valid], rtol=1e-5)


def test_softmax_hard_negatives_keep_positive_and_k_hardest(batch):
    layer = _layer(logq="none", hard_negatives=2)
    kw = _inputs(batch, layer)
    loss = layer(**kw, training=False).numpy()
    out = _logits(layer, kw)
    total = 0.0
    for i in range(B):
        cand = np.where(out["valid"][i])[0]
        hard = cand[np.argsort(-out["logits"][i, cand])[:2]]
        row = out["logits"][i, np.concatenate([[i], hard])].astype(np.float64)
        total += -row[0] + np.log(np.exp(row - row.max()).sum()) + row.max()
    np.testing.assert_allclose(loss, total, rtol=1e-5)


def _vec(deg):
    return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


def test_triplet_margin_hand_computed():
    # Row 0: query at 0 deg, positive at 60 deg (D+ = 1 - .5), negative = row 1's doc at 90 deg
    # (D- = 1). Row 1: query at 90, positive at 90 (D+ = 0), negative at 60 (D- = 1 - cos 30).
    q = tf.constant([_vec(0), _vec(90)], tf.float32)
    d = tf.constant([_vec(60), _vec(90)], tf.float32)
    ids, p = tf.constant(["p", "r"]), tf.constant([0.1, 0.1])
    d_neg_1 = 1 - np.cos(np.radians(30))  # 0.1340
    for margin, expect in [(0.1, 0.0), (0.2, 0.2 - d_neg_1), (0.6, 0.1 + 0.6 - d_neg_1),
                           (1.0, 0.5 + 1.0 - d_neg_1)]:
        # row 0: max(0, .5 - 1 + m); row 1: max(0, 0 - d_neg_1 + m)
        layer = RetrievalLoss(LossConfig(loss="triplet", margin=margin, random_negatives=1), 10)
        got = layer(q, d, ids, p, training=True).numpy()
        np.testing.assert_allclose(got, expect, atol=1e-6)
    # Unnormalised inputs give the same cosine distances.
    layer = RetrievalLoss(LossConfig(loss="triplet", margin=0.6), 10)
    np.testing.assert_allclose(layer(q * 3, d * 0.5, ids, p).numpy(), 0.1 + 0.6 - d_neg_1,
                               atol=1e-6)


def test_triplet_with_extra_negatives_only():
    # random_negatives = hard_negatives = 0: the paper's "impressions / hard negatives only"
    # ablations. Row 0 (query at 0, positive at 0) has an extra negative at 30 deg, row 1 has none
    # (padding ""), so only row 0 counts and the in-batch document of row 1 is never used.
    q = tf.constant([_vec(0), _vec(90)], tf.float32)
    extra = tf.constant([[_vec(30)], [_vec(0)]], tf.float32)
    ids, p = tf.constant(["a", "b"]), tf.constant([0.1, 0.1])
    m = 0.3
    layer = RetrievalLoss(LossConfig(loss="triplet", margin=m, random_negatives=0, hard_negatives=0), 10)
    got = layer(q, q, ids, p, extra_neg_emb=extra, extra_neg_ids=tf.constant([["x"], [""]]),
                training=True).numpy()
    np.testing.assert_allclose(got, m - (1 - np.cos(np.radians(30))), atol=1e-6)
    assert layer(q, q, ids, p, training=True).numpy() == 0.0  # no extra negatives: nothing to learn


def test_triplet_online_hard_negatives_use_k_hardest():
    # Docs at 0, 10, 20, 50, 80 deg, each query on its own doc (D+ = 0), so a negative at angle
    # a from the query adds max(0, m - (1 - cos a)); with m = .3 only neighbours within ~45 deg
    # count, and the k hardest are the k nearest other docs.
    angles = np.array([0, 10, 20, 50, 80])
    q = tf.constant([_vec(a) for a in angles], tf.float32)
    ids, p = tf.constant(["a", "b", "c", "d", "e"]), tf.fill([5], 0.1)
    m = 0.3
    for k in (1, 2, 3):
        layer = RetrievalLoss(LossConfig(loss="triplet", margin=m, random_negatives=0,
                                         hard_negatives=k), 10)
        got = layer(q, q, ids, p, training=False).numpy()
        expect = 0.0
        for i, a in enumerate(angles):
            others = np.sort(np.abs(np.delete(angles, i) - a))[:k]  # k nearest = k hardest
            expect += np.maximum(0, m - (1 - np.cos(np.radians(others)))).sum()
        np.testing.assert_allclose(got, expect, atol=1e-5)
    # Row 0 alone, by hand: k=2 -> neighbours at 10 and 20 deg.
    by_hand = (m - (1 - np.cos(np.radians(10)))) + (m - (1 - np.cos(np.radians(20))))
    assert by_hand > 0.5


_DIST_SCRIPT = textwrap.dedent("""
    import json, sys
    import ebr, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from trainer.config import LossConfig
    from trainer.losses import RetrievalLoss

    B, D, M, C = 4, 8, 2, 50
    rng = np.random.default_rng(3)
    unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
        rng.normal(size=s).astype(np.float32))
    steps = [dict(q=unit(2 * B, D), d=unit(2 * B, D), e=unit(2 * B, 2, D), m=unit(2 * M, D),
                  ids=np.array([b"a", b"b", b"c", b"d", b"e", b"a", b"g", b"c"]),
                  eids=np.array([[b"x", b""]] * 2 * B), mids=np.array([b"u", b"b", b"w", b"z"]),
                  p=rng.uniform(0.01, 0.1, 2 * B).astype(np.float32)) for _ in range(2)]
    configs = {  # in-batch + queue + mixed gathered together; triplet; streaming + hard
        "logq_cbns_mns": dict(logq="pipeline", queue_size=16, queue_warmup_steps=0,
                              mixed_negatives=M),
        "triplet_hard": dict(loss="triplet", random_negatives=0, hard_negatives=2),
        "streaming": dict(logq="streaming", estimator_buckets=1009, hard_negatives=3),
    }

    def run_step(layer, t, lo, hi, mlo, mhi):
        q, d, e = (t[k][lo:hi] for k in "qde")
        with tf.GradientTape() as tape:
            tape.watch([q, d])
            mixed = {}
            if layer.needs_mixed_from_tower:
                mixed = dict(mixed_emb=t["m"][mlo:mhi], mixed_ids=t["mids"][mlo:mhi])
            loss = layer(q, d, t["ids"][lo:hi], t["p"][lo:hi],
                         extra_neg_emb=e, extra_neg_ids=t["eids"][lo:hi],
                         training=True, **mixed)
        gq, gd = tape.gradient(loss, [q, d])
        return loss, gq, gd

    out = {}
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name, kw in configs.items():
        single = RetrievalLoss(LossConfig(**kw), C, embedding_dim=D)
        with strategy.scope():
            dist = RetrievalLoss(LossConfig(**kw), C, embedding_dim=D)

        @tf.function
        def replicated(t):
            def fn(t):
                r = tf.distribute.get_replica_context().replica_id_in_sync_group
                return run_step(dist, t, r * B, (r + 1) * B, r * M, (r + 1) * M)
            return strategy.run(fn, args=(t,))

        res = []
        for x in steps:
            t = {k: tf.constant(v) for k, v in x.items()}
            l1, gq1, gd1 = run_step(single, t, 0, 2 * B, 0, 2 * M)
            l2, gq2, gd2 = replicated(t)
            local = strategy.experimental_local_results
            l2 = sum(float(v) for v in local(l2))
            gq2 = np.concatenate([v.numpy() for v in local(gq2)])
            gd2 = np.concatenate([v.numpy() for v in local(gd2)])
            res.append(dict(single=float(l1), dist=l2,
                            gq=float(np.abs(gq1.numpy() - gq2).max()),
                            gd=float(np.abs(gd1.numpy() - gd2).max())))
        out[name] = res
    print("RESULT" + json.dumps(out))
""")


def test_cross_replica_gather_equals_single_replica_on_global_batch():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _DIST_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=240, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT"):])
    assert set(result) == {"logq_cbns_mns", "triplet_hard", "streaming"}
    for name, steps in result.items():
        for r in steps:
            assert r["single"] > 0, (name, r)
            np.testing.assert_allclose(r["dist"], r["single"], rtol=1e-5, err_msg=name)
            assert r["gq"] < 1e-4 and r["gd"] < 1e-4, (name, r)


# --------------------------------------------------------------------------- stale negatives


def test_stale_columns_give_the_document_side_the_fresh_softmax_gradient(batch):
    """Queue (CBNS) columns are stop-gradient copies: the document side's gradient must be the
    fresh-column (in-batch) softmax's, which is invariant to shifting every fresh document
    embedding by the same vector; the query side sees the whole pool. Same loss value."""
    cbns = _layer(logq="pipeline", queue_size=8, queue_warmup_steps=0)
    plain = _layer(logq="pipeline")
    kw = _inputs(batch, cbns, extras=False)
    q, d = tf.Variable(kw.pop("query_emb")), tf.Variable(kw.pop("pos_emb"))
    rng = np.random.default_rng(3)
    cbns.queue.enqueue(_unit(rng, 8, D), _ids(["q%d" % i for i in range(8)]),
                       tf.fill([8], 0.02))
    cbns.step.assign(1)  # the step the call below runs as (queue active)
    full = cbns.compute_logits(q, d, training=True, **kw)  # before the call enqueues the batch
    cbns.step.assign(0)
    with tf.GradientTape(persistent=True) as tape:
        loss = cbns(q, d, training=True, **kw)
        loss_ref = plain(q, d, training=True, **kw)
    # Value: the full pool (queue included) = a larger loss than in-batch only.
    np.testing.assert_allclose(
        float(loss), float(tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(
            full["labels"], full["logits"]))), rtol=1e-5)
    assert float(loss) > float(loss_ref)
    # Document side: exactly the in-batch softmax's gradient; it sums to ~0 along the queries
    # (shift invariance), so there is no drift incentive away from the stored copies.
    np.testing.assert_allclose(tape.gradient(loss, d).numpy(), tape.gradient(loss_ref, d).numpy(),
                               atol=1e-5)
    # Query side: the queue columns do push the queries.
    assert np.abs(tape.gradient(loss, q).numpy() - tape.gradient(loss_ref, q).numpy()).max() > 1e-4


def _ids(values):
    return neg.hash_ids(tf.constant(values))


def _synthetic_run(overrides: dict, steps: int = 300, batch: int = 128) -> tuple[float, float]:
    """Two small towers (id embedding -> MLP -> L2 norm, output bias included: the shift the
    collapse used) trained on a latent-factor data set with popularity skew; returns
    (doc-embedding spread, recall@10 on fresh draws)."""
    rng = np.random.default_rng(0)
    users, items, n = 300, 600, 40000
    u_f, i_f = rng.normal(size=(users, 8)), rng.normal(size=(items, 8))
    pop = np.log(rng.zipf(1.5, items).clip(max=500).astype(float))
    aff = u_f @ i_f.T + pop[None]
    p = np.exp(aff - aff.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cum = p.cumsum(1)
    u = rng.integers(0, users, n)
    i = np.minimum((cum[u] < rng.random(n)[:, None]).sum(1), items - 1)
    freq = np.bincount(i, minlength=items) / n
    tf.keras.utils.set_random_seed(1)

    def tower(size):
        return tf.keras.Sequential([
            tf.keras.layers.Embedding(size, 32), tf.keras.layers.Dense(64, "relu"),
            tf.keras.layers.Dense(32), tf.keras.layers.Lambda(lambda x: tf.math.l2_normalize(x, -1))])

    qt, dt = tower(users), tower(items)
    layer = RetrievalLoss(LossConfig(temperature=0.05, logq="pipeline", **overrides), items,
                          embedding_dim=32)
    opt = tf.keras.optimizers.Adam(3e-3)
    ids_all = tf.constant([str(k) for k in range(items)])
    probs_all = tf.constant(freq, tf.float32)

    @tf.function
    def step(ub, ib):
        if layer.cache is not None:
            layer.cache.maybe_refresh(layer.step, embed_fn=dt, ids=ids_all, probs=probs_all)
        with tf.GradientTape() as tape:
            loss = layer(qt(ub), dt(ib), tf.gather(ids_all, ib), tf.gather(probs_all, ib),
                         training=True)
        variables = qt.trainable_variables + dt.trainable_variables
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

    draw = np.random.default_rng(2)
    for _ in range(steps):
        k = draw.integers(0, n, batch)
        step(tf.constant(u[k]), tf.constant(i[k]))
    e, q = dt(tf.range(items)).numpy(), qt(tf.range(users)).numpy()
    spread = float(np.sqrt(((e - e.mean(0)) ** 2).sum(1).mean()))
    test = np.random.default_rng(9).integers(0, n, 3000)
    scores = q[u[test]] @ e.T
    rank = (scores > scores[np.arange(len(test)), i[test]][:, None]).sum(1)
    return spread, float((rank < 10).mean())


def test_queue_and_cache_negatives_do_not_collapse_training():
    """Regression (MovieLens: CBNS recall@10 .006, MNS cache .021 vs in-batch logQ .118): with
    stop-gradient queue / cache columns in one softmax, shifting every fresh document
    embedding towards the queries raised the positives against the stored copies, so the
    embeddings chased their own queue (spread and recall collapsed). Before the fix this run
    gave recall .20 (CBNS) and .09 (cache) against .78 in-batch."""
    base = _synthetic_run({})
    cbns = _synthetic_run(dict(queue_size=1024, queue_warmup_steps=20))
    cache = _synthetic_run(dict(mixed_negatives=256, mixed_source="cache", cache_refresh_steps=10))
    assert base[0] > 0.3 and base[1] > 0.6, base
    for name, (spread, rec) in (("cbns", cbns), ("mns_cache", cache)):
        assert spread > 0.5 * base[0], (name, spread, base)
        assert rec > 0.8 * base[1], (name, rec, base)


# --------------------------------------------------------------------------- fused stale path

SPLIT_CASES = {
    "cbns_logq_extra": dict(logq="pipeline", queue_size=24, queue_warmup_steps=0),
    "cbns_mns_cache_streaming": dict(logq="streaming", estimator_buckets=1009, queue_size=24,
                                     queue_warmup_steps=0, mixed_negatives=5,
                                     mixed_source="cache"),
    "mns_cache_logq": dict(logq="pipeline", mixed_negatives=7, mixed_source="cache"),
    "cbns_mean_no_hit_removal": dict(logq="pipeline", queue_size=24, queue_warmup_steps=0,
                                     reduction="mean", temperature=0.1,
                                     remove_accidental_hits=False),
    "cbns_warming_up": dict(logq="pipeline", queue_size=24, queue_warmup_steps=5),
}


@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
@pytest.mark.parametrize("extras", [False, True])
def test_fused_stale_path_equals_full_logits_formula(name, extras):
    """The training call with stale columns (queue / cache) computes the loss without the
    [B, N] logits of the whole pool (`_softmax_split`, `pool_logsumexp`); its loss and
    gradients (queries, documents, extra negatives) must equal the full-logits formula
    `_softmax(compute_logits(...))` on the same state: random inputs, a partly filled queue,
    duplicate ids (accidental hits in-batch, in the queue, cache and extra columns), padding,
    logQ."""
    b, d, corpus = 16, 8, 30
    rng = np.random.default_rng(11)
    vocab = [f"d{i}" for i in range(corpus)]
    pos_ids = [vocab[i] for i in rng.integers(0, 12, b)]  # popular ids: duplicates and hits
    pos_ids[3] = ""  # a padding row
    kw = dict(pos_ids=tf.constant(pos_ids),
              pos_prob=tf.constant(rng.uniform(0.0, 0.05, b).astype(np.float32)))
    kw["pos_prob"] = tf.tensor_scatter_nd_update(kw["pos_prob"], [[5]], [0.0])  # no recorded p
    layer = RetrievalLoss(LossConfig(**SPLIT_CASES[name]), corpus, embedding_dim=d)
    if layer.cache is not None:
        table = _unit(rng, corpus, d)
        layer.cache.maybe_refresh(0, embed_fn=lambda r: tf.gather(table, r),
                                  ids=tf.constant(vocab),
                                  probs=tf.constant(rng.uniform(0, 0.05, corpus).astype(np.float32)))
    if layer.queue is not None:  # 20 of 24 slots filled: 4 invalid; ids overlap the batch
        layer.queue.enqueue(_unit(rng, 20, d), _ids([vocab[i] for i in rng.integers(0, 12, 20)]),
                            tf.constant(rng.uniform(0.001, 0.05, 20).astype(np.float32)))
    if layer.estimator is not None:
        layer.estimator.update(_ids(pos_ids), 1)
    q, dv = tf.Variable(_unit(rng, b, d)), tf.Variable(_unit(rng, b, d))
    e = tf.Variable(_unit(rng, b, 3, d))
    if extras:
        e_ids = [[vocab[i] for i in row] for row in rng.integers(0, 12, (b, 3))]
        e_ids[0][2] = ""
        kw["extra_neg_emb"], kw["extra_neg_ids"] = e, tf.constant(e_ids)
    else:
        kw["extra_neg_emb"] = None
    step = int(layer.step)
    with tf.GradientTape(persistent=True) as tape:
        layer.step.assign(step + 1)  # the step the call below runs as
        out = layer.compute_logits(q, dv, training=True, **kw)
        ref = tf.reduce_sum(layer._softmax(out))
        if layer.config.reduction == "mean":
            ref = ref / b
        layer.step.assign(step)
        if layer.estimator is not None:  # the call updates the estimator first: same state
            layer.estimator.update(_ids(pos_ids), step + 1)
        loss = layer(q, dv, training=True, **kw)
    assert out["pool"]["has_stale"]
    assert float(ref) > 0
    np.testing.assert_allclose(float(loss), float(ref), rtol=2e-6)
    sources = [q, dv] + ([e] if extras else [])
    for got, want in zip(tape.gradient(loss, sources), tape.gradient(ref, sources)):
        # float32 rounding: a few ulp of the gradient's largest entry
        scale = max(1.0, float(np.abs(want.numpy()).max()))
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6 * scale)


def test_hit_indices_equal_dense_comparison():
    from trainer.losses import _hit_indices

    rng = np.random.default_rng(5)
    for n, b, vocab in ((40, 12, 6), (300, 64, 50), (9, 9, 1000)):
        pos = rng.integers(-1, vocab, b)  # -1 = padding
        ids = np.concatenate([pos, rng.integers(-1, vocab, n - b)])
        got = _hit_indices(tf.constant(ids, tf.int64), tf.constant(pos, tf.int64)).numpy()
        want = np.argwhere((ids[None, :] == pos[:, None]) & (pos[:, None] != -1))
        want = want[want[:, 0] != want[:, 1]]
        assert sorted(map(tuple, got)) == sorted(map(tuple, want))
