"""MovieLens-100K -> canonical raw logs: the real data (fetched once through pip into the
cache), hand-made GroupLens and RecBole fixtures, and malformed sources."""
from __future__ import annotations

import json
import zipfile

import pytest

from ebr import cli
from ebr.datasets.jsonl import read_records
from ebr.datasets.movielens import (SourceError, age_bucket, convert_movielens, split_title,
                                    zip_region)

GENRE_FLAGS_COMEDY = "|".join("1" if g in (5, 14) else "0" for g in range(19))  # Comedy, Romance
GENRE_FLAGS_DRAMA = "|".join("1" if g == 8 else "0" for g in range(19))


def _read(d, name):
    return list(read_records(d / f"{name}.jsonl"))


@pytest.fixture
def grouplens(tmp_path):
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "u.user").write_bytes(b"1|24|M|technician|85711\n2|53|F|other|94043\n3|31|M|writer|T8H1N\n")
    (d / "u.item").write_bytes(
        "1|Café au lait (1994)|01-Jan-1994||http://x|{}\n"
        "2|Toy Story (1995)|01-Jan-1995||http://y|{}\n"
        "3|unknown||||{}\n".format(GENRE_FLAGS_COMEDY, GENRE_FLAGS_DRAMA,
                                   "1" + "|0" * 18).encode("latin-1"))
    (d / "u.data").write_bytes(b"1\t1\t5\t881250949\n2\t2\t3\t891717742\n3\t1\t4\t878887116\n"
                               b"1\t3\t1\t878887117\n")
    return d


def test_grouplens_layout(grouplens, tmp_path):
    out = tmp_path / "raw"
    summary = convert_movielens(out, source=grouplens.parent)  # finds ml-100k/ inside
    assert summary["layout"] == "grouplens"
    assert (summary["searchers"], summary["documents"], summary["sessions"]) == (3, 3, 4)
    docs = {d["doc_id"]: d for d in _read(out, "documents")}
    assert docs["m1"]["text"] == "Café au lait"  # latin-1 decoded, year stripped
    assert docs["m1"]["attributes"] == {"genre": ["Comedy", "Romance"], "year": "1994"}
    assert docs["m2"]["type"] == "movie" and docs["m2"]["attributes"]["genre"] == ["Drama"]
    assert docs["m3"]["text"] == "unknown" and "year" not in docs["m3"]["attributes"]
    users = {u["searcher_id"]: u for u in _read(out, "searchers")}
    assert users["u1"]["region"] == "mountain" and users["u2"]["region"] == "pacific"
    assert users["u3"]["region"] == "other"  # Canadian postal code
    assert users["u1"]["attributes"] == {"age": "24", "age_bucket": "18-24", "gender": "M",
                                         "occupation": "technician", "zip_code": "85711"}
    sessions = _read(out, "sessions")
    assert sessions[0] == {"session_id": "r1", "searcher_id": "u1", "timestamp": 881250949, "query": "",
                           "impressions": [], "clicks": ["m1"], "rating": 5.0}
    assert len({s["session_id"] for s in sessions}) == 4
    meta = json.loads((out / "source.json").read_text())
    assert meta["layout"] == "grouplens" and meta["counts"]["sessions"] == 4
    assert set(meta["files"]) == {"u.user", "u.item", "u.data"}


@pytest.fixture
def recbole(tmp_path):
    d = tmp_path / "rb"
    d.mkdir()
    (d / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\t"
                                    "zip_code:token\n7\t61\tF\tretired\t02139\n")
    (d / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\t"
                                    "class:token_seq\n9\tDead Man Walking\t1995\tDrama\n"
                                    "267\tunkonwn\tunkonwn\tunknown\n")
    (d / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                     "7\t9\t4\t880000000\n7\t267\t2\t880000001\n")
    return d


def test_recbole_layout(recbole, tmp_path):
    out = tmp_path / "raw"
    summary = convert_movielens(out, source=recbole)
    assert summary["layout"] == "recbole" and summary["sessions"] == 2
    docs = {d["doc_id"]: d for d in _read(out, "documents")}
    assert docs["m9"] == {"doc_id": "m9", "text": "Dead Man Walking", "type": "movie",
                          "attributes": {"genre": ["Drama"], "year": "1995"}, "members": []}
    assert "year" not in docs["m267"]["attributes"]
    (user,) = _read(out, "searchers")
    assert user["searcher_id"] == "u7" and user["region"] == "northeast"
    assert user["attributes"]["age_bucket"] == "56+"
    assert [s["clicks"] for s in _read(out, "sessions")] == [["m9"], ["m267"]]


def test_wheel_source(recbole, tmp_path):
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f in recbole.iterdir():
            z.write(f, f"recbole/dataset_example/ml-100k/{f.name}")
    out = tmp_path / "raw"
    summary = convert_movielens(out, source=wheel, cache_dir=tmp_path / "cache")
    assert summary["sessions"] == 2
    assert list((tmp_path / "cache" / "wheels").glob("*/ml-100k/ml-100k.inter"))
    assert json.loads((out / "source.json").read_text())["wheel"] == str(wheel)


def test_malformed_source_names_file_and_line(grouplens, tmp_path):
    (grouplens / "u.data").write_bytes(b"1\t1\t5\t881250949\n2\t2\t3\n")
    out = tmp_path / "raw"
    with pytest.raises(SourceError, match=r"u\.data:2: expected 4 tab-separated fields"):
        convert_movielens(out, source=grouplens)
    assert not out.exists()  # nothing half-written
    (grouplens / "u.data").write_bytes(b"1\t1\t5\t881250949\n2\t99\t3\t1\n")
    with pytest.raises(SourceError, match=r"u\.data:2: .*unknown item id '99'"):
        convert_movielens(out, source=grouplens)
    (grouplens / "u.user").write_bytes(b"1|old|M|technician|85711\n")
    with pytest.raises(SourceError, match=r"u\.user:1: field 'age'"):
        convert_movielens(out, source=grouplens)
    with pytest.raises(FileNotFoundError, match="no MovieLens-100K"):
        convert_movielens(out, source=tmp_path / "nowhere")


def test_malformed_recbole_header(recbole, tmp_path):
    (recbole / "ml-100k.inter").write_text("user:token\titem_id:token\n7\t9\n")
    with pytest.raises(SourceError, match=r"ml-100k\.inter:1: header lacks column\(s\) \['user_id'"):
        convert_movielens(tmp_path / "raw", source=recbole)


def test_helpers():
    assert split_title("Toy Story (1995)") == ("Toy Story", "1995")
    assert split_title("City of Lost Children, The (Cité des enfants perdus, La) (1995)") == (
        "City of Lost Children, The (Cité des enfants perdus, La)", "1995")
    assert split_title("unknown") == ("unknown", "")
    assert zip_region("98101") == "pacific" and zip_region("V3N4P") == "other"
    assert zip_region("1234") == "other"
    assert age_bucket(7) == "under-18" and age_bucket(73) == "56+"


def test_cli_movielens(grouplens, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["data", "movielens", "--out", str(out), "--source", str(grouplens)]) == 0
    assert json.loads(capsys.readouterr().out)["sessions"] == 4
    assert json.loads((out / "config.json").read_text()) == {
        "source": str(grouplens), "cache_dir": "~/.cache/ebr/recbole", "gzip": False}


def test_real_movielens_100k(tmp_path):
    """The real path: `pip download recbole==1.2.1` into the default cache (once), extract."""
    out = tmp_path / "ml"
    summary = convert_movielens(out)
    assert (summary["searchers"], summary["documents"], summary["sessions"]) == (943, 1682, 100_000)
    assert sum(1 for _ in read_records(out / "sessions.jsonl")) == 100_000
    docs = {d["doc_id"]: d for d in read_records(out / "documents.jsonl")}
    assert len(docs) == 1682
    assert docs["m1"]["text"] == "Toy Story"
    assert docs["m1"]["attributes"] == {"genre": ["Animation", "Children's", "Comedy"], "year": "1995"}
    users = {u["searcher_id"]: u for u in read_records(out / "searchers.jsonl")}
    assert len(users) == 943 and users["u1"]["attributes"]["occupation"] == "technician"
    meta = json.loads((out / "source.json").read_text())
    assert meta["fetched_with"].startswith("pip download") and meta["counts"]["sessions"] == 100_000


def test_source_and_output_on_gcs(grouplens, tmp_path, gcs_root):
    from ebr import storage

    src = storage.join(gcs_root, "ml-100k")
    for f in grouplens.iterdir():
        storage.copy_file(str(f), storage.join(src, f.name))
    out = storage.join(gcs_root, "raw")
    summary = convert_movielens(out, source=src, cache_dir=tmp_path / "cache")
    assert (summary["layout"], summary["sessions"], summary["out"]) == ("grouplens", 4, out)
    local = tmp_path / "raw"
    convert_movielens(local, source=grouplens)
    for name in ("searchers", "documents", "sessions"):
        assert list(read_records(storage.join(out, f"{name}.jsonl"))) == _read(local, name)
    assert storage.read_json(storage.join(out, "source.json"))["counts"]["sessions"] == 4
