"""The social-search generator writes the documented structure deterministically, to any URI
(local and gs://), and its JSON Lines I/O replaces an output only once it is complete and
names file:line on bad input."""
from __future__ import annotations

import collections
import gzip
import json
import re

import numpy as np
import pytest

from ebr import cli
from ebr.datasets import social_tables as T
from ebr import storage
from ebr.datasets.jsonl import find_raw_file, read_jsonl, read_records, staged_output_dir
from ebr.datasets.social import SocialConfig, generate_social, make_prefix, make_typo
from ebr.datasets.social_ceiling import read_ceiling
from ebr.datasets.social_engine import BooleanEngine
from ebr.datasets.social_world import build_world

DOCS, SESSIONS, SEED = 2000, 5000, 7


def _load(d):
    return {name: list(read_records(find_raw_file(d, name)))
            for name in ("searchers", "documents", "sessions")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("social") / "raw"
    summary = generate_social(out, documents=DOCS, sessions=SESSIONS, seed=SEED)
    data = _load(out)
    data["summary"] = summary
    data["dir"] = out
    data["docs"] = {d["doc_id"]: d for d in data["documents"]}
    data["searcher"] = {s["searcher_id"]: s for s in data["searchers"]}
    return data


def test_counts_fields_and_references(run):
    assert len(run["documents"]) == DOCS and len(run["sessions"]) == SESSIONS
    assert len(run["searchers"]) == run["summary"]["searchers"] > 0
    meta = json.loads((run["dir"] / "generator.json").read_text())
    assert meta["parameters"]["seed"] == SEED and "clicks" in meta["model"]
    assert meta["parameters"]["clicks"]["intent"] > 0
    types = collections.Counter(d["type"] for d in run["documents"])
    assert set(types) == {"person", "group", "page", "event"}
    for s in run["searchers"]:
        assert {"searcher_id", "city", "region", "country", "language", "attributes", "friends"} <= set(s)
        assert all(f in run["searcher"] for f in s["friends"])
    for d in run["documents"]:
        assert re.fullmatch(r"[a-z][a-z -]*", d["text"])  # the session writer relies on this
        assert all(m in run["searcher"] for m in d["members"])
        for v in d["attributes"].values():
            assert isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        if d["type"] == "person":  # a person's document lists their friends as members
            assert d["members"] == run["searcher"][d["searcher_id"]]["friends"]
    ids = [s["session_id"] for s in run["sessions"]]
    assert len(set(ids)) == len(ids)
    for s in run["sessions"]:
        assert s["searcher_id"] in run["searcher"] and isinstance(s["timestamp"], int)
        assert 0 < len(s["query"]) <= 1000
        assert all(x in run["docs"] for x in s["impressions"])
        assert set(s["clicks"]) <= set(s["impressions"])
    assert any(d["attributes"].get("tag") and "spam" in d["attributes"]["tag"] for d in run["documents"])


def test_shared_names(run):
    names = collections.Counter(d["text"] for d in run["documents"])
    assert max(names.values()) >= 5  # e.g. several "john smith"s
    assert sum(1 for c in names.values() if c > 1) >= 20
    persons = {d["text"] for d in run["documents"] if d["type"] == "person"}
    # pages / groups / events named after people share the pool ("jon smith fan page")
    assert any(any(p in d["text"] for p in persons) for d in run["documents"] if d["type"] != "person")


def test_query_kinds(run):
    texts = {d["text"] for d in run["documents"]}
    queries = [s["query"] for s in run["sessions"]]
    prefixes = {t[:i] for t in texts for i in range(1, len(t))}
    nick_of = {n: f for f, ns in T.NICKNAMES for n in ns}
    prefix_q = [q for q in queries if q not in texts and q in prefixes]
    nick_q = [q for q in queries if q.split()[0] in nick_of and q not in texts
              and nick_of[q.split()[0]] + q[q.index(" "):] in texts]
    typo_q = [q for q in queries if q not in texts and q not in prefixes
              and not (q.split()[0] in nick_of)]
    assert len(prefix_q) > 100 and len(nick_q) > 20 and len(typo_q) > 100
    # a typo'd query is one or two character edits away from a real name
    sample = typo_q[:8]
    assert all(min(_edit_distance(q, t) for t in texts if abs(len(t) - len(q)) <= 2) <= 2 for q in sample)


def _edit_distance(a: str, b: str) -> int:
    """Damerau (optimal string alignment) distance."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def test_impressions_hold_hard_negatives(run):
    with_neg = [s for s in run["sessions"] if set(s["impressions"]) - set(s["clicks"])]
    assert len(with_neg) > SESSIONS // 5
    # the legacy engine's impressions match the query text: negatives are text-hard
    s = next(s for s in with_neg if len(s["impressions"]) >= 3 and s["clicks"])
    first_tok = s["query"].split()[0]
    assert all(first_tok in run["docs"][x]["text"].split() for x in s["impressions"])


def test_failed_sessions_are_reformulated(run):
    sessions = run["sessions"]
    pairs = [(a, b) for a, b in zip(sessions, sessions[1:])
             if not a["clicks"] and b["searcher_id"] == a["searcher_id"]
             and 0 < b["timestamp"] - a["timestamp"] <= 60 and b["clicks"] and b["query"] != a["query"]]
    assert len(pairs) > 100
    # the reformulation is the clicked document's full name
    assert all(run["docs"][b["clicks"][0]]["text"] == b["query"] for _, b in pairs)
    assert sum(1 for s in sessions if not s["clicks"]) > len(pairs)  # some stay failed


def test_degree_heavy_tailed(run):
    deg = np.array([len(s["friends"]) for s in run["searchers"]])
    top = np.sort(deg)[::-1][: len(deg) // 100]
    assert deg.max() >= 5 * np.median(deg)
    assert top.sum() / deg.sum() >= 0.04  # the top 1% hold 4x their share of friendships


def test_clicks_follow_social_and_location_signal(run):
    """The impression experiments rely on this: clicked impressions are socially / locally closer to the
    searcher than the shown-but-skipped ones, which differ from random documents."""
    stat = collections.Counter()
    for s in run["sessions"]:
        me = run["searcher"][s["searcher_id"]]
        friends = set(me["friends"])
        for x in s["impressions"]:
            d = run["docs"][x]
            k = "click" if x in s["clicks"] else "skip"
            stat[k] += 1
            stat[k, "city"] += d["city"] == me["city"]
            stat[k, "social"] += bool(friends & set(d["members"])) or s["searcher_id"] in d["members"]
    rate = {k: (stat[k, "city"] / stat[k], stat[k, "social"] / stat[k]) for k in ("click", "skip")}
    assert rate["click"][0] > 2 * rate["skip"][0]
    assert rate["click"][1] > 3 * rate["skip"][1]


def test_deterministic_per_seed(run, tmp_path):
    again = tmp_path / "again"
    generate_social(again, documents=DOCS, sessions=SESSIONS, seed=SEED)
    for name in ("searchers.jsonl", "documents.jsonl", "sessions.jsonl", "generator.json",
                 "truth/ceiling.jsonl"):
        assert (again / name).read_bytes() == (run["dir"] / name).read_bytes(), name
    other = tmp_path / "other"
    generate_social(other, documents=DOCS, sessions=SESSIONS, seed=SEED + 1, ceiling=False)
    assert (other / "sessions.jsonl").read_bytes() != (run["dir"] / "sessions.jsonl").read_bytes()
    assert (other / "documents.jsonl").read_bytes() != (run["dir"] / "documents.jsonl").read_bytes()


def test_engine_matches_brute_force():
    cfg = SocialConfig(documents=1500, sessions=0, seed=3)
    w = build_world(cfg, np.random.default_rng(3))
    engine = BooleanEngine(w.texts, w.rank)

    toks = [t.split() for t in w.texts]

    def brute(q):
        qt = q.split()
        hits = [d for d, tt in enumerate(toks)
                if all(x in tt for x in qt[:-1]) and any(y.startswith(qt[-1]) for y in tt)]
        return sorted(hits, key=lambda d: (w.texts[d] != q, w.rank[d]))

    rng = np.random.default_rng(0)
    for k in range(200):
        t = w.texts[int(rng.integers(len(w.texts)))]
        q = [t, make_prefix(t, rng.random()), make_typo(t, rng.random(3)), t.split()[0][:2],
             " ".join(t.split()[:2])][k % 5]
        expected = brute(q)
        for limit in (10, 30):
            assert engine.search(q, limit) == expected[:limit], q


def test_typo_and_prefix_edits():
    rng = np.random.default_rng(1)
    for _ in range(300):
        t = "jonathan smith"
        q = make_typo(t, rng.random(3))
        assert q != t and _edit_distance(q, t) == 1 and set(q) <= set(T_ALPHABET)
        p = make_prefix(t, rng.random())
        assert t.startswith(p) and len("jonathan s") <= len(p) < len(t)


T_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def test_gzip_output_and_rerun_replaces_whole_dir(tmp_path):
    out = tmp_path / "raw"
    generate_social(out, documents=300, sessions=200, seed=1, gzip=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "documents.jsonl.gz", "generator.json", "searchers.jsonl.gz", "sessions.jsonl.gz", "truth"]
    assert [p.name for p in (out / "truth").iterdir()] == ["ceiling.jsonl.gz"]
    assert len(list(read_records(find_raw_file(out, "sessions")))) == 200
    generate_social(out, documents=300, sessions=100, seed=1)
    assert sorted(p.name for p in out.iterdir()) == [
        "documents.jsonl", "generator.json", "searchers.jsonl", "sessions.jsonl", "truth"]
    assert [p.name for p in (out / "truth").iterdir()] == ["ceiling.jsonl"]
    generate_social(out, documents=300, sessions=100, seed=1, ceiling=False)
    assert not list((out / "truth").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temp dirs left beside it


def test_refuses_to_replace_unrelated_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        generate_social(tmp_path, documents=100, sessions=10)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_failed_write_leaves_previous_output(tmp_path):
    out = tmp_path / "raw"
    generate_social(out, documents=200, sessions=50, seed=1)
    before = (out / "sessions.jsonl").read_bytes()
    with pytest.raises(RuntimeError):
        with staged_output_dir(out) as tmp:
            (tmp / "sessions.jsonl").write_text("partial")
            raise RuntimeError("boom")
    assert (out / "sessions.jsonl").read_bytes() == before


def test_reader_names_file_and_line(tmp_path):
    p = tmp_path / "sessions.jsonl"
    p.write_bytes(b'{"session_id": "a"}\n\n{"session_id": \n')
    with pytest.raises(ValueError, match=r"sessions.jsonl:3: malformed JSON"):
        list(read_jsonl(p))
    g = tmp_path / "documents.jsonl.gz"
    g.write_bytes(gzip.compress(b'{"doc_id": "x"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(ValueError, match=r"documents.jsonl.gz:2: invalid UTF-8"):
        list(read_jsonl(g))
    with pytest.raises(FileNotFoundError, match="searchers.jsonl"):
        find_raw_file(tmp_path, "searchers")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["data", "social", "--out", str(out), "--documents", "400", "--sessions", "300",
                   "--seed", "2", "--searchers", "350", "--set", "clicks.intent=5.0"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sessions"] == 300 and summary["searchers"] == 350
    meta = json.loads((out / "generator.json").read_text())
    assert meta["parameters"]["clicks"]["intent"] == 5.0 and meta["parameters"]["searchers"] == 350
    saved = json.loads((out / "config.json").read_text())  # the command's settings, not --out
    assert saved == meta["parameters"]
    assert cli.main(["data", "social", "--out", str(out), "--documents", "5"]) == 2  # clear error


def test_generate_to_gcs_and_read_back(tmp_path, gcs_root):
    """`ebr data social --out gs://...`: the same bytes as a local run, read back through
    the raw-log readers from gs://."""
    local, remote = tmp_path / "raw", storage.join(gcs_root, "raw")
    assert cli.main(["data", "social", "--out", str(local), "--documents", "300",
                     "--sessions", "200", "--seed", "4", "--gzip"]) == 0
    assert cli.main(["data", "social", "--out", remote, "--documents", "300",
                     "--sessions", "200", "--seed", "4", "--gzip"]) == 0
    files = storage.walk_files(remote)
    assert files == sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "truth/ceiling.jsonl.gz" in files
    for name in files:
        assert storage.read_bytes(storage.join(remote, name)) == (local / name).read_bytes(), name
    sessions = find_raw_file(remote, "sessions")
    assert sessions == f"{remote}/sessions.jsonl.gz"
    assert list(read_records(sessions)) == list(read_records(find_raw_file(local, "sessions")))
    assert read_ceiling(remote) == read_ceiling(str(local)) and len(read_ceiling(remote)) == 200
    # a plain rerun replaces the .gz files; an unrelated remote directory is refused
    generate_social(remote, documents=300, sessions=100, seed=4)
    assert storage.walk_files(remote) == ["documents.jsonl", "generator.json", "searchers.jsonl",
                                          "sessions.jsonl", "truth/ceiling.jsonl"]
    assert len(list(read_records(find_raw_file(remote, "sessions")))) == 100
    storage.write_bytes(storage.join(gcs_root, "home", "precious.txt"), b"keep me")
    with pytest.raises(ValueError, match="refusing"):
        generate_social(storage.join(gcs_root, "home"), documents=100, sessions=10)
    assert storage.listdir(storage.join(gcs_root, "home")) == ["precious.txt"]


def test_namesake_knobs_and_summary(tmp_path):
    """Smaller name pools and steeper name Zipfs mean more namesakes: the summary's namesake
    statistics move that way."""
    def stats(**knobs):
        s = generate_social(tmp_path / "x", documents=1500, sessions=1500, seed=3, ceiling=False,
                            progress=False, **knobs)
        return s["namesakes"]

    wide = stats(first_name_pool=0, last_name_pool=0)
    narrow = stats(first_name_pool=10, last_name_pool=10)
    steep = stats(first_name_pool=0, last_name_pool=0, first_name_zipf=2.0, last_name_zipf=2.0)
    for k in ("documents_with_namesake", "clicked_with_namesake", "namesakes_per_click"):
        assert narrow[k] > wide[k] and steep[k] > wide[k], k
    assert 0 < wide["documents_with_namesake"] < narrow["documents_with_namesake"] <= 1
    with pytest.raises(ValueError, match="first_name_pool"):
        generate_social(tmp_path / "y", documents=100, sessions=10, first_name_pool=1000)


def test_intent_knobs_move_clicks(tmp_path):
    """All intent on friends: most clicks go to friends' documents; all on global popularity:
    few do."""
    def friend_share(**knobs):
        out = tmp_path / "i"
        generate_social(out, documents=1000, sessions=800, seed=5, ceiling=False, progress=False,
                        **knobs)
        data = _load(out)
        friends = {s["searcher_id"]: set(s["friends"]) for s in data["searchers"]}
        owner = {d["doc_id"]: d.get("searcher_id") for d in data["documents"]}
        clicks = [(s["searcher_id"], c) for s in data["sessions"] for c in s["clicks"]]
        return np.mean([owner[c] in friends[u] for u, c in clicks])

    zero = dict(intent_friend=0.0, intent_friend_of_friend=0.0, intent_membership=0.0,
                intent_local=0.0, intent_global=0.0)
    assert friend_share(**{**zero, "intent_friend": 1.0}) > 0.6 > 0.2 > friend_share(
        **{**zero, "intent_global": 1.0})


def test_help_documents_every_knob_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "social", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--first-name-pool", "20"), ("--last-name-pool", "20"),
                          ("--intent-friend", "0.3"), ("--query-typo", "0.15"),
                          ("--query-nickname", "0.1"), ("--clicks.member", "2.0"),
                          ("--clicks.same-city", "1.0"), ("--clicks.popularity", "1.0")):
        assert flag in text, flag
        after = text[text.rindex(flag + " "):]  # the option list, after the usage line
        assert f"(default: {default})" in after[:400], flag
