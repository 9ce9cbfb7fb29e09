"""Index directories: round trip, atomic versions, corruption and model checks, the CLI."""
import json
import shutil

import faiss
import numpy as np
import pytest

from index_fixtures import corpus
from index import build_index, open_index
from index.embeddings import read_embeddings, write_embeddings
from index.errors import CorruptIndexFile, DimensionMismatch, EmbeddingsError, ModelMismatch

faiss.omp_set_num_threads(1)
N = 3000


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    ids, X, terms, Q = corpus()
    path = write_embeddings(tmp_path_factory.mktemp("emb") / "EMB", ids[:N], X[:N], terms[:N],
                            schema_hash="abc123", model_version=7, shards=2)
    return path, Q


@pytest.fixture(scope="module")
def built(emb, tmp_path_factory):
    base = tmp_path_factory.mktemp("idx") / "INDEX"
    path = build_index(emb[0], base, backend="faiss", factory="IVF32,PQ8x4fs,RFlat", nprobe=8, k_factor=8)
    return base, path


def test_embeddings_round_trip(emb):
    ids, X, terms, _ = corpus()
    rids, RX, rterms, meta = read_embeddings(emb[0])
    assert rids == ids[:N] and rterms == terms[:N]
    np.testing.assert_array_equal(RX, X[:N])
    assert meta == {"dimension": X.shape[1], "count": N, "schema_hash": "abc123", "model_version": 7}


def test_embeddings_errors_name_the_file(emb, tmp_path):
    bad = tmp_path / "EMB"
    shutil.copytree(emb[0], bad)
    meta = json.loads((bad / "embeddings.json").read_text())
    (bad / "embeddings.json").write_text(json.dumps({**meta, "dimension": 16}))
    with pytest.raises(EmbeddingsError, match=r"embeddings-00000-of-00002\.tfrecord\.gz"):
        read_embeddings(bad)
    (bad / "embeddings.json").write_text(json.dumps({**meta, "count": 5}))
    with pytest.raises(EmbeddingsError, match="count=5"):
        read_embeddings(bad)


def test_round_trip_and_manifest(built, emb):
    base, path = built
    s = open_index(base)  # INDEX_BASE -> newest version
    assert s.path == path and path.name == "1"
    m = s.manifest
    assert (m["backend"], m["dimension"], m["count"], m["schema_hash"], m["model_version"]) == \
        ("faiss", 32, N, "abc123", 7)
    assert m["params"]["factory"] == "IVF32,PQ8x4fs,RFlat"
    assert set(m["files"]) == {"ivf.faiss", "doc_ids.txt", "filters.bin"}
    r1 = s.search(emb[1][:20], 10, filter="type:group")
    r2 = open_index(path).search(emb[1][:20], 10, filter="type:group")
    assert r1.doc_ids == r2.doc_ids and len(r1.doc_ids[0]) == 10
    assert all(d.startswith("d") for d in r1.doc_ids[0])
    assert r1.scanned.shape == (20,) and r1.info["selectivity"] > 0


def test_versions_are_published_whole(built, emb):
    base, _ = built
    p2 = build_index(emb[0], base, backend="exact")
    assert p2.name == "2" and open_index(base).manifest["backend"] == "exact"
    assert not [p for p in base.iterdir() if p.name.startswith(".tmp")]
    shutil.rmtree(p2)


def _copy(built, tmp_path):
    dst = tmp_path / "1"
    shutil.copytree(built[1], dst)
    return dst


def test_truncated_file_is_named(built, tmp_path):
    v = _copy(built, tmp_path)
    data = (v / "ivf.faiss").read_bytes()
    (v / "ivf.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptIndexFile, match=r"ivf\.faiss is truncated"):
        open_index(v)
    # Even without checksum verification the reader fails cleanly, naming the directory.
    with pytest.raises(CorruptIndexFile, match="cannot be read|holds"):
        open_index(v, verify=False)


def test_flipped_byte_is_named(built, tmp_path):
    v = _copy(built, tmp_path)
    data = bytearray((v / "filters.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (v / "filters.bin").write_bytes(bytes(data))
    with pytest.raises(CorruptIndexFile, match=r"filters\.bin fails its sha256"):
        open_index(v)


def test_wrong_dimension(built, emb, tmp_path):
    v = _copy(built, tmp_path)
    m = json.loads((v / "manifest.json").read_text())
    (v / "manifest.json").write_text(json.dumps({**m, "dimension": 64}))
    with pytest.raises(DimensionMismatch, match="dimension 32"):
        open_index(v)
    s = open_index(built[1])
    with pytest.raises(DimensionMismatch, match="dimension 32"):
        s.search(np.zeros((2, 16), np.float32), 5)


def test_other_models_index_is_refused(built):
    with pytest.raises(ModelMismatch, match="schema_hash abc123"):
        open_index(built[1], schema_hash="ffff")
    with pytest.raises(ModelMismatch, match="model_version 7"):
        open_index(built[1], model_version=8)
    assert open_index(built[1], schema_hash="abc123", model_version=7).manifest["count"] == N


def test_garbage_manifest(built, tmp_path):
    v = _copy(built, tmp_path)
    (v / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptIndexFile, match="manifest.json is not valid JSON"):
        open_index(v)


def test_cli_build_query_inspect(emb, tmp_path, capsys):
    from ebr.cli import main

    base = tmp_path / "IDX"
    assert main(["index", "build", "--embeddings", str(emb[0]), "--output", str(base),
                 "--backend", "faiss", "--factory", "IVF16,PQ8", "--nprobe", "16"]) == 0
    assert main(["index", "inspect", "--index", str(base)]) == 0
    assert '"verified": true' in capsys.readouterr().out
    qf = tmp_path / "q.npy"
    np.save(qf, emb[1][:2])
    assert main(["index", "query", "--index", str(base), "--vector-file", str(qf), "-k", "3",
                 "--filter", "city:seattle OR city:boston", "--param", "nprobe=4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and len(lines[0]["hits"]) == 3
    assert main(["index", "query", "--index", str(base), "--doc-id", "d00000005",
                 "--embeddings", str(emb[0]), "-k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["doc_id"] == "d00000005"
    assert main(["index", "query", "--index", str(base), "--vector-file", str(qf),
                 "--filter", "type:group AND"]) == 2
    assert "position 14" in capsys.readouterr().err
