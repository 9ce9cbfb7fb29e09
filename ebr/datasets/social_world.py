"""The entity world behind the social-search generator: people, their friendship graph, and the
documents (people, groups, pages, events) with locations, members and popularity.

Built once per seed, fully vectorised over numpy arrays so a 1M-document world fits in memory
and builds in seconds; the session stream (`ebr.datasets.social`) samples from it. The model is
described in docs/data-format.md ("Social search generator").
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ebr.datasets import social_tables as T

PERSON, GROUP, PAGE, EVENT = 0, 1, 2, 3
TYPE_NAMES = ("person", "group", "page", "event")
TYPE_PREFIX = ("p", "g", "pg", "e")
AGE_BUCKETS = ("13-17", "18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_PROBS = (0.06, 0.22, 0.26, 0.18, 0.13, 0.09, 0.06)


def _first_name_ranking() -> np.ndarray:
    """Indices into T.FIRST_NAMES, most popular first, alternating the genders."""
    by_gender = [[i for i, (_, g) in enumerate(T.FIRST_NAMES) if g == x] for x in ("m", "f")]
    out = []
    for k in range(max(map(len, by_gender))):
        out += [names[k] for names in by_gender if k < len(names)]
    return np.array(out, dtype=np.int64)


FIRST_NAME_RANKING = _first_name_ranking()


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


class Segments:
    """Items grouped by an integer key (community, city...) with per-item weights, for
    vectorised weighted draws inside a chosen group: `sample(keys, u)`."""

    def __init__(self, key: np.ndarray, n_keys: int, weights: np.ndarray | None = None) -> None:
        self.order = np.argsort(key, kind="stable").astype(np.int64)
        w = np.ones(len(key)) if weights is None else weights[self.order].astype(np.float64)
        self.cum = np.cumsum(w)
        counts = np.bincount(key, minlength=n_keys)
        self.end = np.cumsum(counts)
        self.start = self.end - counts
        self.size = counts

    def sample(self, keys: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One weighted item per key (-1 where the group is empty)."""
        start, end = self.start[keys], self.end[keys]
        empty = end <= start
        lo = np.where(start > 0, self.cum[np.maximum(start - 1, 0)], 0.0)
        hi = self.cum[np.maximum(end - 1, 0)]
        idx = np.searchsorted(self.cum, lo + u * (hi - lo), side="right")
        idx = np.clip(idx, start, np.maximum(end - 1, start))
        out = self.order[np.minimum(idx, len(self.order) - 1)] if len(self.order) else np.zeros_like(keys)
        return np.where(empty, -1, out)


def csr(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) with indices sorted inside each row."""
    order = np.lexsort((cols, rows))
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, cols[order].astype(np.int32)


@dataclasses.dataclass
class World:
    n_people: int
    # people (= searchers), index i is searcher "u{i}"
    community: np.ndarray
    city: np.ndarray
    language: np.ndarray  # index into `languages`
    first: np.ndarray
    last: np.ndarray
    age: np.ndarray
    interests: np.ndarray  # [P, 2] topic ids
    fitness: np.ndarray
    adj_indptr: np.ndarray
    adj: np.ndarray
    close_friends: np.ndarray  # [P, C] int32, -1 padded
    # documents, index d; person documents first (person d is searcher d)
    n_person_docs: int
    doc_type: np.ndarray
    doc_city: np.ndarray
    doc_language: np.ndarray
    doc_topic: np.ndarray
    doc_spam: np.ndarray
    doc_date: np.ndarray  # day offset for events, -1 otherwise
    texts: list[str]
    text_id: np.ndarray  # equal names <-> equal ids
    mem_indptr: np.ndarray  # members of non-person documents (person docs: adjacency)
    mem: np.ndarray
    rank: np.ndarray  # popularity rank, 0 = most popular
    pop_weight: np.ndarray  # Zipf weight of the rank, sums to 1
    pop_feature: np.ndarray  # 1 - log(1+rank)/log(1+N), in [0, 1]
    member_keys: np.ndarray  # sorted int64 doc * P + person for every (document, member)
    person_docs_indptr: np.ndarray  # person -> non-person documents they belong to
    person_docs: np.ndarray
    languages: tuple[str, ...]
    city_country: np.ndarray

    def degree(self) -> np.ndarray:
        return np.diff(self.adj_indptr)

    def person_doc(self, person: np.ndarray) -> np.ndarray:
        return np.where((person >= 0) & (person < self.n_person_docs), person, -1)

    def members(self, d: int) -> np.ndarray:
        if d < self.n_person_docs:
            return self.adj[self.adj_indptr[d]:self.adj_indptr[d + 1]]
        j = d - self.n_person_docs
        return self.mem[self.mem_indptr[j]:self.mem_indptr[j + 1]]

    def is_member(self, docs: np.ndarray, people: np.ndarray) -> np.ndarray:
        """Elementwise: is person people[i] in members(docs[i]) (-1 people never are)."""
        keys = docs.astype(np.int64) * self.n_people + people
        # Sorted needles let searchsorted reuse its last bound: ~8x faster on large tables.
        order = np.argsort(keys, kind="stable")
        found = np.empty(len(keys), dtype=bool)
        idx = np.minimum(np.searchsorted(self.member_keys, keys[order]), len(self.member_keys) - 1)
        found[order] = self.member_keys[idx] == keys[order]
        return found & (people >= 0)


def geography() -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...], list[tuple[int, ...]]]:
    """(languages, city -> country index, countries, country -> language ids)."""
    countries = tuple(c for c, _ in T.COUNTRY_LANGUAGES)
    languages = tuple(sorted({lang for _, langs in T.COUNTRY_LANGUAGES for lang in langs}))
    city_country = np.array([countries.index(c[2]) for c in T.CITIES])
    country_langs = [tuple(languages.index(lang) for lang in langs) for _, langs in T.COUNTRY_LANGUAGES]
    return languages, city_country, countries, country_langs


def _draw_language(rng, cities, city_country, country_langs, primary_prob):
    country = city_country[cities]
    out = np.empty(len(cities), dtype=np.int16)
    u = rng.random(len(cities))
    pick = rng.integers(0, 1 << 30, len(cities))
    for c, langs in enumerate(country_langs):
        m = country == c
        first = np.full(m.sum(), langs[0])
        if len(langs) > 1:
            other = np.array(langs[1:])[pick[m] % (len(langs) - 1)]
            first = np.where(u[m] < primary_prob, first, other)
        out[m] = first
    return out


def build_world(cfg, rng: np.random.Generator) -> World:
    """The people, graph and documents for `cfg` (a `SocialConfig`)."""
    n_docs = cfg.documents
    shares = np.array([cfg.person_share, cfg.group_share, cfg.page_share, cfg.event_share])
    n_person_docs = int(round(n_docs * shares[0] / shares.sum()))
    P = int(cfg.searchers) if cfg.searchers else max(n_person_docs, 2)
    n_person_docs = min(n_person_docs, P)
    rest = shares[1:] / shares[1:].sum()
    n_other = n_docs - n_person_docs
    n_group = int(round(n_other * rest[0]))
    n_page = int(round(n_other * rest[1]))
    n_event = n_other - n_group - n_page

    languages, city_country, _, country_langs = geography()
    n_cities = len(T.CITIES)
    city_w = zipf_weights(n_cities, cfg.city_zipf)

    # --- communities: heavy-ish sizes, each with a home city and a favourite topic ---------
    n_comm = max(1, P // cfg.community_size)
    comm_w = rng.lognormal(0.0, 1.0, n_comm)
    comm_w /= comm_w.sum()
    comm_city = rng.choice(n_cities, n_comm, p=city_w)
    comm_topic = rng.integers(0, len(T.TOPICS), n_comm)

    # --- people ------------------------------------------------------------------------------
    community = rng.choice(n_comm, P, p=comm_w)
    city = np.where(rng.random(P) < cfg.home_city_prob, comm_city[community],
                    rng.choice(n_cities, P, p=city_w))
    language = _draw_language(rng, city, city_country, country_langs, cfg.primary_language_prob)
    # Namesake density: the pool sizes and Zipf exponents decide how many people share a name.
    # First names are ranked alternating genders (the table lists each gender by popularity),
    # so a small pool still holds both.
    n_first = cfg.first_name_pool or len(T.FIRST_NAMES)
    n_last = cfg.last_name_pool or len(T.LAST_NAMES)
    first = FIRST_NAME_RANKING[rng.choice(n_first, P, p=zipf_weights(n_first, cfg.first_name_zipf))]
    last = rng.choice(n_last, P, p=zipf_weights(n_last, cfg.last_name_zipf))
    age = rng.choice(len(AGE_BUCKETS), P, p=np.array(AGE_PROBS) / sum(AGE_PROBS))
    interests = np.stack([
        np.where(rng.random(P) < 0.6, comm_topic[community], rng.integers(0, len(T.TOPICS), P)),
        rng.integers(0, len(T.TOPICS), P)], axis=1)
    # Fitness drives the expected degree (Chung-Lu): Pareto tail -> heavy-tailed degrees.
    fitness = rng.pareto(cfg.fitness_alpha, P) + 1.0

    # --- friendship graph: community-aware fitness-weighted attachment ---------------------
    by_comm = Segments(community, n_comm, fitness)
    by_all = Segments(np.zeros(P, dtype=np.int64), 1, fitness)
    n_edges = int(P * cfg.avg_degree / 2)
    u = by_all.sample(np.zeros(n_edges, dtype=np.int64), rng.random(n_edges))
    inside = rng.random(n_edges) < cfg.in_community
    v_in = by_comm.sample(community[u], rng.random(n_edges))
    v_out = by_all.sample(np.zeros(n_edges, dtype=np.int64), rng.random(n_edges))
    v = np.where(inside, v_in, v_out)
    keep = u != v
    a, b = np.minimum(u, v)[keep], np.maximum(u, v)[keep]
    pair = np.unique(a.astype(np.int64) * P + b)
    a, b = pair // P, pair % P
    adj_indptr, adj = csr(np.concatenate([a, b]), np.concatenate([b, a]), P)

    # Close friends: a random subset of each person's friends (the "overlap" of the hidden
    # relevance counts these among a document's members).
    C = cfg.close_friends
    rows = np.repeat(np.arange(P), np.diff(adj_indptr))
    order = np.lexsort((rng.random(len(adj)), rows))
    pos = np.arange(len(adj)) - adj_indptr[rows[order]]
    close = np.full((P, C), -1, dtype=np.int32)
    m = pos < C
    close[rows[order][m], pos[m]] = adj[order][m]

    # --- non-person documents: groups, pages, events -----------------------------------------
    doc_type = np.concatenate([np.full(n_person_docs, PERSON), np.full(n_group, GROUP),
                               np.full(n_page, PAGE), np.full(n_event, EVENT)]).astype(np.int8)
    o_comm = rng.choice(n_comm, n_other, p=comm_w)
    o_city = np.where(rng.random(n_other) < cfg.home_city_prob, comm_city[o_comm],
                      rng.choice(n_cities, n_other, p=city_w))
    o_topic = np.where(rng.random(n_other) < 0.7, comm_topic[o_comm],
                       rng.integers(0, len(T.TOPICS), n_other))
    o_spam = (rng.random(n_other) < cfg.spam_share) & (doc_type[n_person_docs:] != EVENT)
    sizes = np.clip(np.round(rng.lognormal(np.log(cfg.member_mean) - 0.5, 1.0, n_other)),
                    2, cfg.member_max).astype(np.int64)
    owner = np.repeat(np.arange(n_other), sizes)
    src = rng.random(len(owner))
    by_comm_u = Segments(community, n_comm)
    by_city_u = Segments(city, n_cities)
    members = np.where(
        src < 0.65, by_comm_u.sample(o_comm[owner], rng.random(len(owner))),
        np.where(src < 0.9, by_city_u.sample(o_city[owner], rng.random(len(owner))),
                 rng.integers(0, P, len(owner))))
    ok = members >= 0
    mk = np.unique(owner[ok].astype(np.int64) * P + members[ok])
    m_owner, m_person = mk // P, mk % P
    mem_indptr, mem = csr(m_owner, m_person, n_other)
    n_members = np.diff(mem_indptr)

    # --- names from the shared pool ----------------------------------------------------------
    texts = [f"{T.FIRST_NAMES[f][0]} {T.LAST_NAMES[l]}" for f, l in zip(first[:n_person_docs].tolist(),
                                                                         last[:n_person_docs].tolist())]
    celebrity = by_all.sample(np.zeros(n_other, dtype=np.int64), rng.random(n_other))
    first_member = np.where(n_members > 0, mem[np.minimum(mem_indptr[:-1], max(len(mem) - 1, 0))],
                            celebrity) if len(mem) else celebrity
    tpl_u = rng.integers(0, 1 << 30, n_other)
    biz = rng.integers(0, len(T.BUSINESSES), n_other)
    templates = {GROUP: T.GROUP_TEMPLATES, PAGE: T.PAGE_TEMPLATES, EVENT: T.EVENT_TEMPLATES}
    for j, (t, tu, c, top, bz, cel, fm) in enumerate(zip(
            doc_type[n_person_docs:].tolist(), tpl_u.tolist(), o_city.tolist(), o_topic.tolist(),
            biz.tolist(), celebrity.tolist(), first_member.tolist())):
        tpl = templates[t][tu % len(templates[t])]
        # Fan pages name a popular person; family/friends/birthday name one of the members.
        who = cel if "fan" in tpl or "official" in tpl else fm
        texts.append(tpl.format(city=T.CITIES[c][0], topic=T.TOPICS[top], business=T.BUSINESSES[bz],
                                first=T.FIRST_NAMES[first[who]][0], last=T.LAST_NAMES[last[who]]))
    _, text_id = np.unique(np.array(texts, dtype=object).astype(str), return_inverse=True)

    doc_city = np.concatenate([city[:n_person_docs], o_city]).astype(np.int16)
    doc_language = np.concatenate([
        language[:n_person_docs],
        _draw_language(rng, o_city, city_country, country_langs, cfg.primary_language_prob)])
    doc_topic = np.concatenate([interests[:n_person_docs, 0], o_topic]).astype(np.int16)
    doc_spam = np.concatenate([np.zeros(n_person_docs, bool), o_spam])
    doc_date = np.where(doc_type == EVENT, rng.integers(0, cfg.days, n_docs), -1)

    # --- Zipf popularity: people by fitness, others by member count; spam games static rank -
    deg = np.diff(adj_indptr)
    score = np.concatenate([np.log1p(deg[:n_person_docs].astype(np.float64)),
                            np.log1p(n_members.astype(np.float64))])
    score = score + rng.gumbel(0.0, 0.5, n_docs) + 2.0 * doc_spam
    rank = np.empty(n_docs, dtype=np.int64)
    rank[np.argsort(-score, kind="stable")] = np.arange(n_docs)
    pop_weight = 1.0 / (rank + 1.0) ** cfg.popularity_zipf
    pop_weight /= pop_weight.sum()
    pop_feature = 1.0 - np.log1p(rank) / np.log1p(n_docs)

    # --- membership lookups ----------------------------------------------------------------
    person_rows = np.repeat(np.arange(n_person_docs), np.diff(adj_indptr)[:n_person_docs])
    member_keys = np.sort(np.concatenate([
        person_rows.astype(np.int64) * P + adj[:adj_indptr[n_person_docs]],
        (m_owner + n_person_docs) * P + m_person]))
    person_docs_indptr, person_docs = csr(m_person, (m_owner + n_person_docs), P)

    return World(
        n_people=P, community=community, city=city, language=language, first=first, last=last,
        age=age, interests=interests, fitness=fitness, adj_indptr=adj_indptr, adj=adj,
        close_friends=close, n_person_docs=n_person_docs, doc_type=doc_type, doc_city=doc_city,
        doc_language=doc_language, doc_topic=doc_topic, doc_spam=doc_spam, doc_date=doc_date,
        texts=texts, text_id=text_id.astype(np.int64), mem_indptr=mem_indptr, mem=mem, rank=rank,
        pop_weight=pop_weight, pop_feature=pop_feature, member_keys=member_keys,
        person_docs_indptr=person_docs_indptr, person_docs=person_docs, languages=languages,
        city_country=city_country)
