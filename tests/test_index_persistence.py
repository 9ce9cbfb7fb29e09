"""Index versions (docs/contracts.md section 5): round trip, the commit protocol (a killed build
is never opened and is cleaned by the next one), corruption and model checks, the CLI, gs://."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from index_fixtures import corpus
from ebr import artifacts, storage
from index import build_index, open_index, persistence
from index.embeddings import read_embeddings, write_embeddings
from index.errors import (CorruptIndexFile, DimensionMismatch, EmbeddingsError, IndexDataError,
                          ModelMismatch, UncommittedIndex)

REPO = Path(__file__).resolve().parents[1]

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
    assert {k: meta[k] for k in ("dimension", "count", "schema_hash", "model_version")} == \
        {"dimension": X.shape[1], "count": N, "schema_hash": "abc123", "model_version": 7}


def test_embeddings_errors_name_the_file(emb, tmp_path):
    shutil.copytree(emb[0], tmp_path / "EMB")
    bad = Path(artifacts.resolve(str(tmp_path / "EMB"), "embeddings"))
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
    assert s.path == path == str(base / "1") and s.local_path == path  # local: read in place
    assert artifacts.read_commit(path)["files"].keys() == {
        "ivf.faiss", "doc_ids.txt", "filters.bin", "manifest.json"}
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
    assert storage.basename(p2) == "2" and open_index(base).manifest["backend"] == "exact"
    assert persistence.versions(base) == [1, 2]
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # staged elsewhere, no temp dirs
    assert (Path(p2) / artifacts.COMMIT_MARKER).exists()
    # The manifest is uploaded after every file it lists, the commit marker after it.
    files = sorted(Path(p2).iterdir(), key=lambda f: f.stat().st_mtime_ns)
    assert [f.name for f in files[-2:]] == ["manifest.json", artifacts.COMMIT_MARKER]
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


def test_uncommitted_version_is_never_listed_or_opened(built, tmp_path, capsys):
    """A version directory with every file and a manifest but no _COMMITTED (a publish that
    was interrupted, or is still uploading) does not exist for readers."""
    from ebr.cli import main

    base = tmp_path / "INDEX"
    shutil.copytree(built[1], base / "1")
    shutil.copytree(built[1], base / "2", ignore=shutil.ignore_patterns(artifacts.COMMIT_MARKER))
    m = json.loads((base / "2" / "manifest.json").read_text())
    (base / "2" / "manifest.json").write_text(json.dumps({**m, "version": 2}))

    assert persistence.versions(base) == [1]
    assert open_index(base).path == str(base / "1")
    with pytest.raises(UncommittedIndex, match=r"version 2 is not committed"):
        open_index(base / "2")
    assert main(["index", "inspect", "--index", str(base)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["path"], out["versions"]) == (str(base / "1"), [1])
    assert main(["index", "inspect", "--index", str(base / "2")]) == 2
    assert "not committed" in capsys.readouterr().err

    # Only uncommitted directories: no index at all.
    shutil.rmtree(base / "1")
    with pytest.raises(IndexDataError, match="no committed index version"):
        open_index(base)


def _cli_env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_killed_build_leaves_the_previous_version_and_the_next_build_cleans_up(emb, tmp_path):
    """kill -9 of `ebr index build` while it uploads: readers keep the previous version, the
    leftover (files without _COMMITTED) is removed by the next build."""
    base = tmp_path / "INDEX"
    v1 = build_index(emb[0], base, backend="exact")
    # Big enough that uploading it takes a while (the window where the kill must land).
    n, d = 12_000, 1024
    rng = np.random.default_rng(1)
    big = write_embeddings(tmp_path / "BIG", [f"b{i}" for i in range(n)],
                           rng.normal(size=(n, d)).astype(np.float32), schema_hash="abc123",
                           model_version=7)
    killed = None
    for attempt in range(3):  # a kill that lands after the commit tests nothing: try again
        before = persistence.versions(base)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ebr.cli", "index", "build", "--embeddings", str(big),
             "--output", str(base), "--backend", "exact"],
            env=_cli_env(), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 180
            seen = None
            while seen is None and proc.poll() is None and time.monotonic() < deadline:
                # A new version directory holding some files but no marker: the upload is under way
                # (killing as soon as the directory appears may leave it empty on a loaded machine).
                seen = next((e.name for e in os.scandir(base) if e.name.isdigit()
                             and int(e.name) > max(before) and os.listdir(e.path)
                             and not os.path.exists(os.path.join(e.path, artifacts.COMMIT_MARKER))),
                            None)
                if seen is None:
                    time.sleep(0.002)
            if seen is not None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        assert seen is not None or proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        proc.stderr.close()
        if seen is not None and not (base / seen / artifacts.COMMIT_MARKER).exists():
            killed = int(seen)
            break
    assert killed is not None, "the kill never landed before the commit marker"
    assert any((base / str(killed)).iterdir())  # a real leftover: files, no marker

    previous = persistence.versions(base)
    assert killed not in previous
    assert open_index(base).path == str(base / str(previous[-1]))
    assert previous[-1] == 1 or previous[-1] < killed

    # The next build removes the leftover and publishes whole.
    p = build_index(emb[0], base, backend="exact")
    assert artifacts.uncommitted(str(base)) == []
    assert persistence.versions(base) == previous + [artifacts.version_of(p)]
    assert artifacts.version_of(p) > killed  # a number once used is never reused
    marker = artifacts.read_commit(p)
    artifacts.verify(p, marker, checksums=True)
    assert sorted(f.name for f in Path(p).iterdir()) == sorted(
        list(marker["files"]) + [artifacts.COMMIT_MARKER])
    assert open_index(base).manifest["count"] == N
    assert v1 == str(base / "1")


def test_remote_index_round_trip_through_a_local_cache(emb, gcs_root, tmp_path, monkeypatch,
                                                       capsys):
    """gs://: build, list, open (copied to the local cache once, then reused), inspect, query."""
    from ebr.cli import main

    monkeypatch.setenv(persistence.CACHE_ENV, str(tmp_path / "cache"))
    base = f"{gcs_root}/INDEX"
    assert main(["index", "build", "--embeddings", str(emb[0]), "--output", base,
                 "--backend", "faiss", "--factory", "IVF16,PQ8", "--nprobe", "16"]) == 0
    vdir = json.loads(capsys.readouterr().out)["index"]
    assert vdir == f"{base}/1" and persistence.versions(base) == [1]
    assert storage.exists(f"{vdir}/{artifacts.COMMIT_MARKER}")

    s = open_index(base)
    assert s.path == vdir and s.local_path.startswith(str(tmp_path / "cache"))
    local = Path(s.local_path)
    stamp = (local / artifacts.COMMIT_MARKER).stat().st_mtime_ns
    again = open_index(vdir)
    assert again.local_path == s.local_path
    assert (local / artifacts.COMMIT_MARKER).stat().st_mtime_ns == stamp  # reused, not copied
    r1 = s.search(emb[1][:5], 5, filter="type:group")
    r2 = again.search(emb[1][:5], 5, filter="type:group")
    assert r1.doc_ids == r2.doc_ids and len(r1.doc_ids[0]) == 5

    # A damaged cache copy is copied again, not trusted.
    (local / "doc_ids.txt").write_text("x\n")
    assert open_index(base).search(emb[1][:5], 5, filter="type:group").doc_ids == r1.doc_ids
    assert (local / "doc_ids.txt").stat().st_size == artifacts.read_commit(vdir)["files"][
        "doc_ids.txt"]["bytes"]

    # An uncommitted remote version is invisible.
    storage.write_bytes(f"{base}/2/manifest.json", b"{}")
    assert persistence.versions(base) == [1] and open_index(base).path == vdir

    assert main(["index", "inspect", "--index", base]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and out["versions"] == [1] and out["path"] == vdir
    qf = f"{gcs_root}/q.npy"
    import io

    buf = io.BytesIO()
    np.save(buf, emb[1][:2])
    storage.write_bytes(qf, buf.getvalue())
    assert main(["index", "query", "--index", base, "--vector-file", qf, "-k", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and len(lines[0]["hits"]) == 3


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
