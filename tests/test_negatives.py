"""Negative-sampling state: memory queue (CBNS), embedding cache (MNS), streaming frequency
estimator (Yi et al.), hard / random negative selection, id hashing."""
import numpy as np
import tensorflow as tf

from trainer import negatives as neg


def _ids(values):
    return neg.hash_ids(tf.constant([str(v) for v in values]))


def test_hash_ids_padding_and_distinct():
    h = neg.hash_ids(tf.constant(["a", "", "b", "a"])).numpy()
    assert h[1] == neg.PAD_ID
    assert h[0] == h[3] and h[0] != h[2] and h[0] >= 0 and h[2] >= 0


def test_queue_fifo_order_wraparound_and_fill_mask():
    q = neg.MemoryQueue(size=5, dim=2)
    emb, ids, probs, valid = q.read()
    assert not valid.numpy().any()

    def rows(values):
        v = np.asarray(values, np.float32)
        return tf.constant(np.stack([v, -v], 1)), _ids(values), tf.constant(v / 100)

    q.enqueue(*rows([1, 2, 3]))
    assert q.read()[3].numpy().tolist() == [True, True, True, False, False]
    o_emb, o_ids, o_p = q.ordered()
    np.testing.assert_array_equal(o_emb.numpy()[:, 0], [1, 2, 3])
    # Wrap-around: 4 more rows overwrite the two oldest (1, 2).
    q.enqueue(*rows([4, 5, 6, 7]))
    assert q.read()[3].numpy().all() and int(q.count) == 5 and int(q.head) == 2
    o_emb, o_ids, o_p = q.ordered()
    np.testing.assert_array_equal(o_emb.numpy()[:, 0], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(o_ids.numpy(), _ids([3, 4, 5, 6, 7]).numpy())
    np.testing.assert_allclose(o_p.numpy(), np.array([3, 4, 5, 6, 7]) / 100, rtol=1e-6)
    np.testing.assert_array_equal(q.read()[0].numpy()[:, 0], [6, 7, 3, 4, 5])  # slot order
    # More rows than slots: only the newest `size` survive, still in order.
    q.enqueue(*rows(range(10, 18)))
    np.testing.assert_array_equal(q.ordered()[0].numpy()[:, 0], [13, 14, 15, 16, 17])


def test_queue_has_no_gradient_path():
    q = neg.MemoryQueue(size=4, dim=2)
    x = tf.Variable([[1.0, 2.0]])
    with tf.GradientTape() as tape:
        q.enqueue(x * 2, _ids([1]), tf.constant([0.1]))
        out = tf.reduce_sum(q.read()[0])
    assert tape.gradient(out, x) is None


def test_frequency_estimator_converges_on_synthetic_stream():
    rng = np.random.default_rng(0)
    n_items, batch, steps = 50, 16, 3000
    true_p = rng.dirichlet(np.full(n_items, 0.7))
    est = neg.StreamingFrequencyEstimator(num_buckets=4099, alpha=0.01, num_hashes=2,
                                          initial_gap=1000)
    all_ids = _ids(range(n_items))
    update = tf.function(lambda ids, t: est.update(ids, t))
    for t in range(1, steps + 1):
        draw = rng.choice(n_items, size=batch, p=true_p)
        update(tf.gather(all_ids, draw), tf.constant(t, tf.int64))
    step_hit = 1 - (1 - true_p) ** batch  # true probability of appearing in a step
    got_hit = est.step_prob(all_ids).numpy()
    got_p = est.example_prob(all_ids, batch).numpy()
    frequent = step_hit > 0.02  # enough sightings for the EMA to settle
    assert frequent.sum() > 20
    rel = np.abs(got_hit - step_hit)[frequent] / step_hit[frequent]
    assert np.median(rel) < 0.1 and rel.max() < 0.4, rel
    rel_p = np.abs(got_p - true_p)[frequent] / true_p[frequent]
    assert np.median(rel_p) < 0.12, rel_p
    # Ranking of frequencies is recovered.
    assert np.corrcoef(np.argsort(np.argsort(got_p)), np.argsort(np.argsort(true_p)))[0, 1] > 0.95


def test_frequency_estimator_update_rule():
    est = neg.StreamingFrequencyEstimator(num_buckets=101, alpha=0.5, num_hashes=1, initial_gap=7)
    a = _ids(["a"])
    assert est.step_gap(a).numpy()[0] == 7  # never seen
    est.update(a, 4)  # first sighting: B = t - 0
    assert est.step_gap(a).numpy()[0] == 4
    est.update(a, 6)  # B = 0.5 * 4 + 0.5 * (6 - 4)
    assert est.step_gap(a).numpy()[0] == 3
    est.update(tf.constant([neg.PAD_ID], tf.int64), 8)  # padding ignored
    assert est.step_gap(a).numpy()[0] == 3 and int(est.last_step.numpy().max()) == 6


def test_select_hard_negatives_picks_top_k_non_positive():
    scores = tf.constant([[0.9, 0.8, 0.1, 0.7, 0.95],
                          [0.2, 0.1, 0.3, 0.4, 0.5]])
    valid = tf.constant([[False, True, True, True, False],   # col 0 positive, col 4 accidental hit
                         [True, False, True, False, False]])  # only 2 valid
    idx, ok = neg.select_hard_negatives(scores, valid, k=2)
    assert idx.numpy()[0].tolist() == [1, 3] and ok.numpy()[0].all()
    assert idx.numpy()[1].tolist() == [2, 0] and ok.numpy()[1].all()
    idx, ok = neg.select_hard_negatives(scores, valid, k=3)
    assert ok.numpy()[1].tolist() == [True, True, False]


def test_select_random_negatives_uniform_over_valid():
    valid = tf.constant([[True, False, True, True, False]] * 4000)
    idx, ok = neg.select_random_negatives(valid, 2, seed=tf.constant([1, 2], tf.int64))
    idx, ok = idx.numpy(), ok.numpy()
    assert ok.all() and (idx[:, 0] != idx[:, 1]).all()
    counts = np.bincount(idx.ravel(), minlength=5)
    assert counts[1] == 0 and counts[4] == 0
    np.testing.assert_allclose(counts[[0, 2, 3]] / counts.sum(), 1 / 3, atol=0.03)


def test_embedding_cache_refresh_cadence_and_sampling():
    corpus = 30
    table = tf.constant(np.arange(corpus * 2, dtype=np.float32).reshape(corpus, 2))
    ids = tf.constant([f"d{i}" for i in range(corpus)])
    probs = tf.constant(np.full(corpus, 1 / corpus, np.float32))
    calls = []

    def embed(rows):
        calls.append(1)
        return tf.gather(table, rows) + tf.cast(cache_step, tf.float32) * 1000

    cache = neg.EmbeddingCache(size=12, dim=2, corpus_size=corpus, refresh_steps=3, seed=5, chunk=5)
    cache_step = 0
    assert bool(cache.maybe_refresh(0, embed_fn=embed, ids=ids, probs=probs))
    assert len(calls) == 3  # 12 rows in chunks of 5
    first = cache.emb.numpy().copy()
    rows = first[:, 0].astype(int) // 2
    np.testing.assert_array_equal(cache.ids.numpy(), neg.hash_ids(tf.gather(ids, rows)).numpy())
    np.testing.assert_allclose(cache.probs.numpy(), 1 / corpus)
    for s in (1, 2):
        assert not bool(cache.maybe_refresh(s, embed_fn=embed, ids=ids))
    cache_step = 3
    assert bool(cache.maybe_refresh(3, embed_fn=embed, ids=ids, probs=probs))
    assert (cache.emb.numpy()[:, 0] >= 3000).all()
    emb, sid, sp = cache.sample(7, seed=tf.constant([0, 1], tf.int64))
    assert emb.shape == (7, 2)
    members = {tuple(r) for r in cache.emb.numpy()}
    assert all(tuple(r) in members for r in emb.numpy())


def test_embedding_cache_in_tf_function_and_whole_corpus():
    corpus = 6
    table = tf.constant(np.eye(corpus, 3, dtype=np.float32) + 1)
    cache = neg.EmbeddingCache(size=corpus, dim=3, corpus_size=corpus, refresh_steps=2)
    ids = tf.constant([str(i) for i in range(corpus)])

    @tf.function
    def step(s):
        return cache.maybe_refresh(s, embed_fn=lambda r: tf.gather(table, r), ids=ids)

    assert [bool(step(tf.constant(s, tf.int64))) for s in range(5)] == [True, False, True, False, True]
    np.testing.assert_array_equal(cache.emb.numpy(), table.numpy())  # every row exactly once


def test_gather_helpers_are_identity_without_strategy():
    x = tf.constant([[1.0], [2.0]])
    assert neg.num_replicas() == 1
    np.testing.assert_array_equal(neg.local_first(neg.gather_replicas(x), 2).numpy(), x.numpy())

