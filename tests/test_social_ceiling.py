"""The social generator's ceiling (ebr.datasets.social_ceiling): its query likelihoods equal the
generator's own query model enumerated exhaustively, its click posterior equals what the
generator's own samplers produce for a searcher, and the file beside the logs has one valid line
per session."""
from __future__ import annotations

import collections
import gzip
import json

import numpy as np
import pytest

from ebr.datasets.social import (SocialConfig, _query_for, _SessionSampler, generate_social,
                                 impressions, make_prefix, make_typo)
from ebr.datasets.social_ceiling import (KS, Ceiling, prefix_prob, read_ceiling, typo1_prob,
                                         typo_likelihood)
from ebr.datasets.social_engine import BooleanEngine
from ebr.datasets.social_world import build_world


def _typo_outcomes(text: str) -> collections.Counter:
    """Every (op, letter, character) draw of make_typo, each with its probability."""
    n_l = sum(c != " " for c in text)
    out = collections.Counter()
    for op in range(4):
        for k in range(n_l):
            for c in range(26):
                u = np.array([(op + 0.5) / 4, (k + 0.5) / n_l, (c + 0.5) / 26])
                out[make_typo(text, u)] += 1 / (4 * n_l * 26)
    return out


@pytest.mark.parametrize("text", ["jon smith", "anna lee", "abba", "li wu", "ab c"])
def test_one_typo_likelihood_matches_enumeration(text):
    dist = _typo_outcomes(text)
    assert sum(dist.values()) == pytest.approx(1.0)
    for q in set(dist) | {text, text + "x", text[1:], "zz" + text}:
        assert typo1_prob(text, q) == pytest.approx(dist.get(q, 0.0), abs=1e-12), q


def test_two_typo_likelihood_matches_enumeration():
    name, second = "a b", 0.2  # two letters: a delete substitutes; later edits reach the rest
    one = _typo_outcomes(name)
    two = collections.Counter()
    for a, pa in one.items():
        for q, pq in _typo_outcomes(a).items():
            two[q] += pa * pq
    for q in (set(one) | set(two)) - {name}:
        want = (1 - second) * one.get(q, 0.0) + second * two.get(q, 0.0)
        assert typo_likelihood(name, q, second) == pytest.approx(want, abs=1e-12), q


@pytest.mark.parametrize("text", ["jon smith", "smith bakery", "ab c", "jo li"])
def test_prefix_likelihood_matches_enumeration(text):
    first_end = text.find(" ")
    lo, hi = first_end + 2, len(text) - 1
    n = max(hi - lo + 1, 1)
    dist = collections.Counter(make_prefix(text, (j + 0.5) / n) for j in range(n))
    for q in set(dist) | {text[:2], text}:
        assert prefix_prob(text, q) == pytest.approx(dist.get(q, 0) / n), q


def test_click_posterior_matches_the_generators_own_sampling():
    """A tiny world with few names (many namesakes): draw many sessions of one searcher with
    the generator's own intent, query, impression and click code; the frequency of each query
    and the mean click probability of each shown document given the query must match the
    ceiling's P(q | s) and expected clicks."""
    cfg = SocialConfig(documents=60, sessions=0, seed=3, first_name_pool=3, last_name_pool=3,
                       community_size=10, avg_degree=6.0, member_mean=6.0)
    world = build_world(cfg, np.random.default_rng(11))
    engine = BooleanEngine(world.texts, world.rank)
    rng = np.random.default_rng(5)
    sampler = _SessionSampler(world, cfg, rng)
    ceiling = Ceiling(world, engine, cfg, sampler)
    s0 = int(np.argmax(world.degree()[:world.n_person_docs]))
    n = 12_000
    target, _ = sampler.intents(np.full(n, s0))
    kind = np.searchsorted(sampler.kind_cum, rng.random(n), side="right").clip(0, 3)
    u = rng.random((n, 9))
    seen = collections.Counter()
    clicks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(n):
        t = int(target[i])
        q, k = _query_for(world, t, int(kind[i]), u[i], cfg)
        shown = np.asarray(impressions(engine, q, k, t, cfg), dtype=np.int64)
        seen[q] += 1
        if len(shown):
            p = sampler.click_probability(np.full(len(shown), s0), shown, np.full(len(shown), t),
                                          np.arange(len(shown)))
            for d, pd in zip(shown.tolist(), p.tolist()):
                clicks[q][d] += pd
    checked = 0
    for q, m in seen.most_common(6):
        docs, expected, p_q = ceiling.click_posterior(s0, q)
        freq = m / n
        assert abs(p_q - freq) < 4 * np.sqrt(freq * (1 - freq) / n) + 1e-3, (q, p_q, freq)
        got = dict(zip(docs.tolist(), expected.tolist()))
        assert set(clicks[q]) <= set(got), q
        for d, total in clicks[q].items():
            assert abs(got[d] - total / m) < 3.0 / np.sqrt(m) * 0.5 + 0.01, (q, d, got[d], total / m)
        checked += 1
    assert checked == 6


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ceiling") / "raw"
    summary = generate_social(out, documents=400, sessions=600, seed=2, first_name_pool=10,
                              last_name_pool=10, progress=False)
    return out, summary


def test_ceiling_file_has_one_valid_line_per_session(logs):
    out, summary = logs
    sessions = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    lines = [json.loads(line) for line in (out / "truth" / "ceiling.jsonl").read_text().splitlines()]
    assert [x["session_id"] for x in lines] == [s["session_id"] for s in sessions]
    ceiling = read_ceiling(str(out))
    assert len(ceiling) == len(sessions) == summary["sessions"]
    clicked = [ceiling[s["session_id"]] for s in sessions if s["clicks"]]
    for mass in ceiling.values():
        values = [mass[k] for k in KS]
        assert list(mass) == list(KS)
        assert all(0.0 <= v <= 1.0 for v in values)
        assert values == sorted(values)
    # the clicked sessions had something to click: their posterior is not empty
    assert all(m[100] > 0.99 for m in clicked)
    assert np.mean([m[1] for m in clicked]) < np.mean([m[10] for m in clicked])


def test_ceiling_gzip_and_reader_errors(tmp_path, logs):
    out = tmp_path / "raw"
    generate_social(out, documents=200, sessions=100, seed=1, gzip=True, progress=False)
    with gzip.open(out / "truth" / "ceiling.jsonl.gz", "rt") as f:
        assert len(f.read().splitlines()) == 100
    assert len(read_ceiling(str(out))) == 100
    with pytest.raises(FileNotFoundError, match="ceiling.jsonl"):
        read_ceiling(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    (bad / "truth").mkdir(parents=True)
    (bad / "truth" / "ceiling.jsonl").write_text('{"session_id": "s0", "mass": {"1": 0.5}}\n'
                                                 '{"session_id": "s1"}\n')
    with pytest.raises(ValueError, match=r"ceiling.jsonl:2"):
        read_ceiling(str(bad))
    none = tmp_path / "none"
    generate_social(none, documents=200, sessions=50, seed=1, ceiling=False, progress=False)
    assert not (none / "truth").exists()
