"""Ensemble score identity (weighted concatenation) and the cascade (paper 6.2)."""
import numpy as np
import pytest
from tower_fixtures import write_hashed_query_tower

from ebr import features
from experiments.ensembles import Cascade
from serving.retrieval import ensembles as ens


def rand(rng, n, d):
    return rng.normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("alphas", [(1.0, 1.0), (0.3, 1.7), (2.0, 0.0, 0.5)])
def test_weighted_concat_cosine_is_weighted_sum_of_cosines(alphas):
    rng = np.random.default_rng(0)
    dims = (16, 8, 24)[:len(alphas)]
    qs = [rand(rng, 5, d) * rng.uniform(0.1, 9) for d in dims]  # un-normalised on purpose
    ds = [rand(rng, 40, d) * rng.uniform(0.1, 9) for d in dims]
    per_model = [ens.l2_normalize(q) @ ens.l2_normalize(d).T for q, d in zip(qs, ds)]
    weighted_sum = sum(a * c for a, c in zip(alphas, per_model))
    q_ens = ens.weighted_concat_queries(qs, alphas)
    d_ens = ens.concat_documents(ds)
    assert q_ens.shape == (5, sum(dims)) and d_ens.shape == (40, sum(dims))
    np.testing.assert_allclose(q_ens @ d_ens.T, weighted_sum, atol=1e-5)
    # with both sides re-normalised (the towers' unit-norm contract) only the constant differs
    cos = ens.weighted_concat_queries(qs, alphas, renormalize=True) @ \
        ens.concat_documents(ds, renormalize=True).T
    np.testing.assert_allclose(cos * ens.normalisation_constant(alphas), weighted_sum, atol=1e-5)
    np.testing.assert_array_equal(np.argsort(-cos, axis=1, kind="stable"),
                                  np.argsort(-(q_ens @ d_ens.T), axis=1, kind="stable"))


def test_alpha_moves_ranking_towards_the_heavier_model():
    q1, q2 = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    d1 = d2 = np.array([[1.0, 0.0], [0.0, 1.0]])
    # model 1 prefers doc 0, model 2 prefers doc 1
    for alphas, best in (((2.0, 1.0), 0), ((1.0, 2.0), 1)):
        s = ens.weighted_concat_queries([q1, q2], alphas) @ ens.concat_documents([d1, d2]).T
        assert int(np.argmax(s)) == best


def test_bad_ensembles_are_clear():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="2 models"):
        ens.weighted_concat_queries([rand(rng, 2, 3), rand(rng, 2, 3)], [1.0])
    with pytest.raises(ValueError, match="row counts"):
        ens.concat_documents([rand(rng, 2, 3), rand(rng, 3, 3)])
    with pytest.raises(ValueError, match="weights"):
        ens.weighted_concat_queries([rand(rng, 2, 3)], [-1.0])


def test_cascade_keeps_top_k_of_first_stage_by_unified_score():
    # unified model: 2-d unit vectors at angles; query at angle 0 -> score cos(angle)
    angles = {"a": 0.1, "b": 0.5, "c": 1.0, "d": 0.0, "e": 2.0}
    table = ens.EmbeddingTable(list(angles), np.array([[np.cos(t), np.sin(t)] for t in angles.values()]))

    # first stage (text model) over a hand-made 1-d "index": the top n by text score
    text_scores = {"a": 0.2, "b": 0.9, "c": 0.8, "d": 0.1, "e": 0.7}

    def first_stage(queries, n):
        ranked = sorted(text_scores, key=lambda k: -text_scores[k])[:n]
        return [ranked for _ in range(len(queries))]

    cascade = Cascade(first_stage, table, n=3)  # text top-3: b, c, e (d and a dropped)
    ids, scores = cascade.search(np.ones((2, 1)), np.array([[1.0, 0.0], [3.0, 0.0]]), k=2)
    assert ids == [["b", "c"], ["b", "c"]]  # "d" would win on unified score but was not retrieved
    np.testing.assert_allclose(scores[0], np.cos([0.5, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="k <= n"):
        cascade.search(np.ones((1, 1)), np.ones((1, 2)), k=4)
    with pytest.raises(KeyError, match="'zz'"):
        table(["zz"])
    ids, _ = ens.cascade_rescore([[]], np.ones((1, 2)), table, 3)
    assert ids == [[]]


# --------------------------------------------------------------------------------------------
# Ensembles as servable artefacts: an exported weighted-concat tower and the retrieval service's
# registry entries, over small query towers written to the export contract (docs/contracts.md 3).


def _tower(path, dim, seed, buckets=30):
    write_hashed_query_tower(path / "1", dim, seed, buckets, model_name=path.name)
    return path


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return root, _tower(root / "text", 8, 0), _tower(root / "unified", 4, 1)


QUERIES = [{features.QUERY_TEXT: q} for q in ("jon smith", "ann lee", "bob")]


def test_exported_weighted_concat_tower(towers, tmp_path):
    import json

    from serving.retrieval.embedder import LocalEncoder, build_inputs

    _, a, b = towers
    from ebr import artifacts

    out = ens.export_weighted_concat([str(a), str(b)], [0.5, 2.0], str(tmp_path / "query_tower"))
    assert out == str(tmp_path / "query_tower" / "1")
    assert artifacts.is_committed(out) and artifacts.read_commit(out)["model_name"] == "query_tower"
    meta = json.loads((tmp_path / "query_tower" / "1" / "ebr_metadata.json").read_text())
    assert meta["dimension"] == 12 and meta["config"]["alphas"] == [0.5, 2.0]
    inputs = build_inputs(QUERIES)
    ea = LocalEncoder(a / "1").embed(inputs)
    eb = LocalEncoder(b / "1").embed(inputs)
    got = LocalEncoder(out).embed(inputs)  # loads through the same path serving uses
    np.testing.assert_allclose(got, ens.weighted_concat_queries([ea, eb], [0.5, 2.0], renormalize=True),
                               atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    with pytest.raises(FileExistsError):
        ens.export_weighted_concat([str(a), str(b)], [1.0, 1.0], str(tmp_path / "query_tower"))
    assert sorted(p.name for p in (tmp_path / "query_tower").iterdir()) == ["1"]  # nothing left
    # Members resolve through the commit markers: an uncommitted member version is refused.
    (a / "2").mkdir()
    with pytest.raises(ValueError, match="not committed"):
        ens.export_weighted_concat([str(a / "2"), str(b)], [1.0, 1.0], str(tmp_path / "other"))
    (a / "2").rmdir()


def test_registry_entries_for_the_retrieval_service(towers, tmp_path):
    import json

    from index import build_index
    from index.embeddings import write_embeddings
    from serving.retrieval.embedder import LocalEncoder, build_inputs
    from serving.retrieval.ensembles import EnsembleCall

    _, a, b = towers
    rng = np.random.default_rng(7)
    ids = [f"d{i}" for i in range(60)]
    da = ens.l2_normalize(rng.normal(size=(60, 8)))
    db = ens.l2_normalize(rng.normal(size=(60, 4)))
    build_index(write_embeddings(tmp_path / "emb_concat", ids, ens.concat_documents([da, db], renormalize=True)),
                tmp_path / "idx_concat", backend="exact")
    build_index(write_embeddings(tmp_path / "emb_text", ids, da), tmp_path / "idx_text", backend="exact")
    write_embeddings(tmp_path / "emb_unified", ids, db)
    spec = {
        "concat": {"kind": "weighted_concat", "members": [str(a), str(b)], "alphas": [1.0, 0.5],
                   "index": str(tmp_path / "idx_concat")},
        "cascade": {"kind": "cascade", "first_model": str(a), "first_index": str(tmp_path / "idx_text"),
                    "embeddings": str(tmp_path / "emb_unified"), "n": 20, "second_model": str(b)},
    }
    (tmp_path / "ensembles.json").write_text(json.dumps(spec))
    registry = ens.load_registry(str(tmp_path / "ensembles.json"))
    assert sorted(registry) == ["cascade", "concat"]

    inputs = build_inputs(QUERIES[:1])
    qa = LocalEncoder(a / "1").embed(inputs)
    qb = LocalEncoder(b / "1").embed(inputs)
    call = EnsembleCall(pair=None, inputs=inputs, k=5, filter=None, radius=None, timeout=None)

    got = registry["concat"](call)
    expected = np.argsort(-(1.0 * (da @ qa[0]) + 0.5 * (db @ qb[0])), kind="stable")[:5]
    assert list(got.doc_ids) == [ids[i] for i in expected]

    got = registry["cascade"](call)
    first = np.argsort(-(da @ qa[0]), kind="stable")[:20]
    best = sorted(first, key=lambda i: -(db[i] @ qb[0]))[:5]
    assert list(got.doc_ids) == [ids[i] for i in best]
    np.testing.assert_allclose(got.scores, [db[i] @ qb[0] for i in best], atol=1e-5)

    (tmp_path / "bad.json").write_text(json.dumps({"x": {"kind": "stack"}}))
    with pytest.raises(ValueError, match="kind must be one of"):
        ens.load_registry(str(tmp_path / "bad.json"))
    (tmp_path / "bad2.json").write_text(json.dumps({"x": {"kind": "cascade", "nope": 1}}))
    with pytest.raises(ValueError, match="'x'"):
        ens.load_registry(str(tmp_path / "bad2.json"))
