"""`ebr embed` (beam_pipelines/embed.py): a real exported doc tower over a real corpus written by
`ebr pipeline examples`; embeddings equal the tower's own output, filter terms follow the
schema, bad corpus records are dead-lettered with their file, a model of another schema or a
missing model is refused before any run, every accepted form of --corpus, versioned output
(new version per run, the newest 2 kept, a killed run leaving the previous version readable)
and the same run on gs:// (the Cloud Storage emulator)."""
import gzip
import json
import os
import shutil

import numpy as np
import pytest

from beam_pipelines import embed, examples, split, tfrecords
from beam_pipelines.config import EmbedConfig, ExamplesConfig
from ebr import artifacts, cli, features, storage
from test_examples_pipeline import _kill_mid_publish, read_examples

DIM = 16


def _tiny_model_dir(model_dir: str, corpus_docs: list[dict], queries: list[dict]) -> str:
    """Builds the two towers with the trainer's public functions, runs each once on real
    inputs (creating the variables) and exports them with `trainer.export.export_towers`."""
    import tensorflow as tf

    from ebr import config as ebr_config
    from trainer.config import TrainConfig
    from trainer.export import export_towers
    from trainer.model import UnifiedEmbeddingModel

    tf.random.set_seed(0)
    cfg = ebr_config.load(TrainConfig, None, [
        f"model_dir={model_dir}", f"embedding_dim={DIM}", "feature_dim=8", "text_dim=8",
        "hidden_units=16", "hash_bucket_cap=512", "text_char_buckets=512",
        "text_word_buckets=512"])
    model = UnifiedEmbeddingModel(cfg, corpus_size=len(corpus_docs))
    docs = {k: tf.constant(v, tf.string) for k, v in embed.doc_inputs(corpus_docs[:4]).items()}
    model.doc_tower(docs)
    qs = {k: tf.constant(v, tf.string)
          for k, v in features.tower_inputs(queries[:4], features.QUERY_INPUTS).items()}
    model.query_tower(qs)
    return export_towers(model, model_dir, 1)["doc_tower"]


def _corpus_docs(out: str) -> list[dict]:
    import glob

    rows = read_examples(out, "corpus")
    docs = []
    for r in rows:
        doc = {}
        for name in features.DOC_INPUTS:
            spec = features.BY_NAME[name]
            vals = r.get(name, [])
            doc[name] = list(vals) if spec.kind == features.MULTI else (vals[0] if vals else "")
        docs.append(doc)
    assert glob.glob(os.path.join(out, "corpus", "documents-*.tfrecord.gz"))
    return docs


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    from ebr.datasets.social import generate_social

    base = tmp_path_factory.mktemp("embed")
    generate_social(base / "raw", documents=150, sessions=200, seed=3, progress=False)
    out = str(base / "out")
    examples.run(ExamplesConfig(str(base / "raw"), out, split.SplitConfig()))
    docs = _corpus_docs(artifacts.resolve(out, "examples"))
    queries = [{"query": "john", "searcher_id": "u1", "searcher_friends": ["u2", "u3"]},
               {"query": "", "history_doc_ids": ["p1"]}]
    tower_path = _tiny_model_dir(str(base / "models"), docs, queries)

    # The corpus plus one extra shard holding a record that is not an Example and an Example
    # without doc_id: both must be dead-lettered, naming that file.
    corpus = base / "corpus"
    shutil.copytree(os.path.join(artifacts.resolve(out, "examples"), "corpus"), corpus)
    bad_shard = str(corpus / "documents-bad-00000-of-00001.tfrecord.gz")
    no_id = features.make_example({"doc_text": "nameless", "doc_type": "page"})
    with gzip.open(bad_shard, "wb") as f:
        f.write(tfrecords.frame([b"\xff\x00 definitely not a proto", no_id]))
    emb_dir = str(base / "emb")
    code = cli.main(["embed", "--model", str(base / "models" / "doc_tower"), "--corpus",
                     str(corpus), "--output", emb_dir, "--batch-size", "64"])
    assert code == 0
    assert artifacts.resolve(emb_dir, "embeddings") == os.path.join(emb_dir, "1")
    return base, docs, tower_path, bad_shard, emb_dir


def test_embeddings_equal_the_towers_output(embedded):
    from index.embeddings import read_embeddings
    from trainer.export import load_tower

    _, docs, tower_path, _, emb_dir = embedded
    ids, X, terms, meta = read_embeddings(emb_dir)
    assert sorted(ids) == sorted(d["doc_id"] for d in docs)
    assert meta["dimension"] == DIM and meta["count"] == len(docs) == X.shape[0]
    assert meta["schema_hash"] == features.schema_hash() and meta["model_version"] == 1
    tower = load_tower(tower_path)
    by_id = {d["doc_id"]: d for d in docs}
    ordered = [by_id[i] for i in ids]
    want = tower(embed.doc_inputs(ordered))
    np.testing.assert_allclose(X, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-4)
    assert len({tuple(np.round(x, 5)) for x in X}) > len(X) // 2  # not one constant vector
    for i, doc_id in enumerate(ids):
        assert terms[i] == features.document_filter_terms(by_id[doc_id])
    assert any(t.startswith("type:") for row in terms for t in row)


def test_bad_corpus_records_are_dead_lettered_with_their_file(embedded):
    _, docs, _, bad_shard, emb_dir = embedded
    import glob

    vdir = artifacts.resolve(emb_dir, "embeddings")
    dead = [json.loads(line) for p in glob.glob(os.path.join(vdir, "dead_letter", "*.jsonl"))
            for line in open(p) if line.strip()]
    assert sorted(d["reason"] for d in dead) == sorted([embed.UNPARSABLE, embed.MISSING_DOC_ID])
    assert all(d["file"] == bad_shard and d["detail"] for d in dead)
    meta = json.load(open(os.path.join(vdir, "embeddings.json")))
    assert meta["records_in"] == len(docs) + 2
    assert meta["records_in"] == meta["count"] + meta["records_dead"]
    assert not [p for p in os.listdir(os.path.dirname(emb_dir)) if ".tmp-" in p]


def test_failing_document_is_isolated_from_its_batch(embedded):
    """A batch whose inference fails is retried document by document: only the document that
    fails on its own becomes a dead letter."""
    _, docs, tower_path, _, _ = embedded
    handler = embed.DocTowerHandler(tower_path, DIM, 8)
    model = handler.load_model()
    bad = dict(docs[0], doc_members=[["nested"]])  # not a string: fails alone and in any batch
    batch = [docs[1], bad, docs[2]]
    results = handler.run_inference(batch, model)
    assert [isinstance(r.inference, str) for r in results] == [False, True, False]
    np.testing.assert_allclose(results[0].inference, model([docs[1]])[0], rtol=1e-5, atol=1e-6)


def test_model_of_another_schema_or_missing_is_refused(embedded, tmp_path):
    base, _, tower_path, _, _ = embedded
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed.resolve_model(str(tmp_path / "nowhere"))
    other = tmp_path / "doc_tower" / "7"
    shutil.copytree(tower_path, other)
    meta_path = other / "ebr_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["schema_hash"] = "0000000000000000"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="schema_hash"):
        embed.resolve_model(str(tmp_path / "doc_tower"))
    path, meta = embed.resolve_model(str(base / "models" / "doc_tower"))
    assert path.endswith("/doc_tower/1") and meta["version"] == 1
    with pytest.raises(FileNotFoundError, match="no corpus files"):
        embed.resolve_corpus(str(tmp_path))


def test_corpus_forms(embedded):
    base, *_ = embedded
    ex = str(base / "out")
    v1 = artifacts.resolve(ex, "examples")
    want = os.path.join(v1, "corpus", embed.CORPUS_GLOB)
    for form in (ex, v1, os.path.join(ex, "corpus"), os.path.join(v1, "corpus")):
        assert embed.resolve_corpus(form)[0] == want, form
    assert embed.resolve_corpus(ex) == (want, v1)
    glob_form = os.path.join(v1, "corpus", "documents-*")
    assert embed.resolve_corpus(glob_form) == (glob_form, None)
    with pytest.raises(FileNotFoundError, match="no corpus files"):
        embed.resolve_corpus(os.path.join(v1, "corpus", "nothing-*"))


def test_rerun_commits_new_versions_and_a_killed_run_leaves_the_previous_one(embedded):
    base, docs, _, _, _ = embedded
    emb = str(base / "emb_versions")
    argv = ["embed", "--model", str(base / "models" / "doc_tower"), "--corpus",
            str(base / "out"), "--output", emb, "--batch-size", "64"]
    assert cli.main(argv) == 0
    ids1, X1, _, meta1 = read_embeddings_checked(emb, 1)
    _kill_mid_publish(argv, os.path.join(emb, "2"))
    assert artifacts.resolve(emb, "embeddings") == os.path.join(emb, "1")
    assert artifacts.uncommitted(emb) == [2]
    ids, X, _, meta = read_embeddings_checked(emb, 1)
    assert ids == ids1 and meta == meta1
    np.testing.assert_array_equal(X, X1)
    # the next run removes the leftover and commits the next number (never reused); a third
    # prunes version 1
    assert cli.main(argv) == 0
    assert artifacts.versions(emb) == [1, 3] and artifacts.uncommitted(emb) == []
    ids2, X2, _, _ = read_embeddings_checked(emb, 3)
    assert sorted(ids2) == sorted(ids1) == sorted(d["doc_id"] for d in docs)
    assert cli.main(argv) == 0
    assert artifacts.versions(emb) == [3, 4] and artifacts.all_versions(emb) == [3, 4]
    read_embeddings_checked(emb, 4)


def read_embeddings_checked(emb: str, version: int):
    from index.embeddings import read_embeddings

    vdir = artifacts.resolve(emb, "embeddings")
    assert vdir == os.path.join(emb, str(version))
    artifacts.verify(vdir)
    return read_embeddings(emb)


def test_embed_on_gcs(embedded, gcs_root):
    """Model, examples and embeddings on gs://: the same embeddings as the local run."""
    from index.embeddings import read_embeddings

    base, _, tower_path, _, emb_dir = embedded
    model = storage.join(gcs_root, "models", "doc_tower")
    artifacts.publish_dir(tower_path, model, version=1, last=(artifacts.SAVED_MODEL,))
    ex = storage.join(gcs_root, "examples")
    artifacts.publish_dir(artifacts.resolve(str(base / "out"), "examples"), ex, version=1)
    emb = storage.join(gcs_root, "emb")
    summary = embed.run(EmbedConfig(model=model, corpus=ex, output=emb, batch_size=64,
                                    num_shards=1))
    assert summary["output"] == f"{emb}/1" and summary["examples"] == f"{ex}/1"
    artifacts.verify(f"{emb}/1")
    ids, X, terms, meta = read_embeddings(emb)
    lids, LX, lterms, _ = read_embeddings(emb_dir)
    order = {d: i for i, d in enumerate(lids)}
    assert sorted(ids) == sorted(lids) and meta["model_version"] == 1
    np.testing.assert_allclose(X, LX[[order[d] for d in ids]], rtol=1e-5, atol=1e-6)
