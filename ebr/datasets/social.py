"""Social-search data set generator: `ebr data social` -> the canonical raw logs.

A documented generative model in the spirit of the paper's setting (Facebook search, section 1:
the searcher's social graph and location decide which of many same-named entities they want):
the world (`social_world`) holds people, groups, pages and events named from one shared pool,
with locations, a community-structured friendship graph and Zipf popularity; each session picks
a searcher, an intended document drawn from the searcher's social and local neighbourhood, and a
query typed for it (full name, prefix, nickname or typo). A legacy boolean engine
(`social_engine`) decides the impressions; clicks follow a hidden relevance (`ClickModel`) that
mixes intent, name match, social proximity, location and popularity. Failed sessions are often
followed within the same searcher's session window by a reformulated query that clicks: the
hard positives of the paper's section 6.

Everything is a function of the seed (numpy Generators only). Sessions stream to disk in
batches, so memory holds the world, never the sessions. The model and its parameters are
written to `generator.json` beside the data (docs/data-format.md describes it), with the
namesake statistics of the summary; each session's Bayes-optimal recall@K goes to
`truth/ceiling.jsonl` (`social_ceiling`). Every knob is a `SocialConfig` field with its help
text; the namesake-density defaults are calibrated as docs/data-format.md ("Calibration")
records.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from ebr import config
from ebr.datasets import social_tables as T
from ebr.datasets.jsonl import JsonlWriter, staged_output_dir
from ebr.datasets.social_ceiling import CEILING_DIR, CEILING_NAME, Ceiling, ceiling_line
from ebr.datasets.social_engine import BooleanEngine
from ebr.datasets.social_world import (AGE_BUCKETS, PERSON, TYPE_NAMES, TYPE_PREFIX, Segments, World,
                                       build_world)

log = logging.getLogger(__name__)

QUERY_KINDS = ("full", "prefix", "nickname", "typo")
INTENT_SOURCES = ("friend", "friend_of_friend", "membership", "local", "global")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_NICK = {formal: nicks for formal, nicks in T.NICKNAMES}
DAY = 86_400


S = config.setting


@dataclasses.dataclass
class ClickModel:
    """The hidden relevance: P(click d | shown at position i) = examine(i) * sigmoid(logit),
    logit = bias + sum of weight * feature over the (searcher, document) pair below."""
    bias: float = S(-4.0, "click logit bias")
    intent: float = S(6.5, "click logit weight of [d is the document the searcher meant]")
    same_name: float = S(0.5, "click logit weight of [d's name equals the intended document's name]")
    member: float = S(2.0, "click logit weight of [searcher is a member of d; a friend, for a person "
                           "document]: how much clicks depend on friendship and group membership")
    close_friend_overlap: float = S(1.0, "click logit weight per close friend among d's members "
                                         "(friends of friends), at most 3 counted")
    same_city: float = S(1.0, "click logit weight of [d is in the searcher's city]: how much clicks "
                              "depend on location")
    same_country: float = S(0.5, "click logit weight of [d is in the searcher's country]")
    same_language: float = S(0.3, "click logit weight of [d has the searcher's language]")
    popularity: float = S(1.0, "click logit weight of d's popularity, 1 - log(1+rank)/log(1+N)")
    spam: float = S(-3.0, "click logit weight of [d is tagged spam]")
    position_decay: float = S(0.3, "examination probability (1 + position) ** -position_decay")


@dataclasses.dataclass
class SocialConfig:
    documents: int = S(20_000, "documents: people, groups, pages and events")
    sessions: int = S(50_000, "sessions written, reformulations included")
    seed: int = S(0, "the output is a function of the seed and these settings alone")
    searchers: int | None = S(None, "people, all of them searchers (none: the number of person "
                                    "documents)")
    # entity mix (shares of documents)
    person_share: float = S(0.70, "share of documents that are people")
    group_share: float = S(0.12, "share of documents that are groups")
    page_share: float = S(0.12, "share of documents that are pages")
    event_share: float = S(0.06, "share of documents that are events")
    # people, places, names: namesake density (docs/data-format.md, "Namesakes")
    community_size: int = S(60, "mean people per community (each with a home city and topic)")
    home_city_prob: float = S(0.85, "probability a person, group, page or event is in its "
                                    "community's city")
    primary_language_prob: float = S(0.85, "probability of the country's first language")
    first_name_pool: int = S(20, f"namesake density: first names drawn from the N most popular of "
                                 f"the {len(T.FIRST_NAMES)}-name table, genders alternating (0: "
                                 "all); fewer names, more people and pages share a name. Calibrated "
                                 "(docs/data-format.md)")
    last_name_pool: int = S(20, f"namesake density: last names drawn from the N most popular of the "
                                f"{len(T.LAST_NAMES)}-name table (0: all). Calibrated "
                                "(docs/data-format.md)")
    first_name_zipf: float = S(0.8, "namesake density: Zipf exponent of first-name draws (higher: "
                                    "the top names more shared)")
    last_name_zipf: float = S(0.7, "namesake density: Zipf exponent of last-name draws")
    city_zipf: float = S(0.8, "Zipf exponent of city draws")
    # friendship graph (community-aware Chung-Lu: degree ~ Pareto fitness)
    avg_degree: float = S(16.0, "mean friends per person (before duplicates are dropped)")
    in_community: float = S(0.8, "probability a friendship stays inside the community")
    fitness_alpha: float = S(1.8, "Pareto exponent of the fitness that drives degree (lower: "
                                  "heavier tail)")
    close_friends: int = S(8, "close friends per person (a random subset of friends)")
    # groups, pages, events
    member_mean: float = S(20.0, "mean members of a group, page or event (lognormal)")
    member_max: int = S(500, "most members of a group, page or event")
    spam_share: float = S(0.03, "share of groups and pages tagged spam")
    popularity_zipf: float = S(1.0, "Zipf exponent of popularity over the static rank")
    # sessions: who the searcher is looking for (probabilities, renormalised)
    intent_friend: float = S(0.30, "intent weight: a friend's person document")
    intent_friend_of_friend: float = S(0.15, "intent weight: a friend of a friend's person document")
    intent_membership: float = S(0.15, "intent weight: a group, page or event the searcher or a "
                                       "friend belongs to")
    intent_local: float = S(0.20, "intent weight: a popularity-weighted document in the "
                                  "searcher's city")
    intent_global: float = S(0.20, "intent weight: a popularity-weighted document anywhere")
    # ... and how they type it
    query_full: float = S(0.55, "query weight: the full name")
    query_prefix: float = S(0.20, "query weight: a prefix cut after the first token")
    query_nickname: float = S(0.10, "query weight: a nickname for the first name (people with a "
                                    "nicknamed first name; others type the full name)")
    query_typo: float = S(0.15, "query weight: the name with a character edit")
    second_typo_prob: float = S(0.2, "probability a typo'd query gets a second edit")
    # the legacy engine's result pages
    page_size: int = S(10, "results per page of the legacy engine")
    max_pages: int = S(3, "pages a full-name searcher looks through at most")
    # clicks and reformulation
    clicks: ClickModel = dataclasses.field(default_factory=ClickModel)
    reformulate_prob: float = S(0.8, "probability a session without clicks is reformulated")
    reformulate_delay_min: int = S(5, "seconds from a failed session to its reformulation, at least")
    reformulate_delay_max: int = S(60, "seconds from a failed session to its reformulation, at most")
    session_window: int = S(60, "seconds: a reformulation falls inside the searcher's window")
    # time line
    start_time: int = S(1_546_300_800, "unix time of the first session (2019-01-01T00:00:00Z)")
    days: int = S(90, "days the sessions span")
    # output
    gzip: bool = S(False, "write .jsonl.gz files")
    ceiling: bool = S(True, "also write truth/ceiling.jsonl: each session's Bayes-optimal "
                            "recall@K (ebr.datasets.social_ceiling)")
    batch_size: int = S(4096, "sessions generated per vectorised batch (memory, not output)")
    progress: bool = S(True, "progress bar (runs of 200,000 sessions or more)")

    def validate(self) -> None:
        if self.documents < 10:
            raise ValueError(f"--documents must be >= 10, got {self.documents}")
        if self.sessions < 0:
            raise ValueError(f"--sessions must be >= 0, got {self.sessions}")
        if self.searchers is not None and self.searchers < 2:
            raise ValueError(f"--searchers must be >= 2, got {self.searchers}")
        for name, table in (("first_name_pool", T.FIRST_NAMES), ("last_name_pool", T.LAST_NAMES)):
            n = getattr(self, name)
            if not 0 <= n <= len(table) or n == 1:
                raise ValueError(f"{name} must be 0 (all) or 2..{len(table)}, got {n}")
        for group in ("intent_", "query_"):
            weights = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                       if f.name.startswith(group) and f.type == "float"}
            if min(weights.values()) < 0 or sum(weights.values()) <= 0:
                raise ValueError(f"{group}* weights must be >= 0 with a positive sum, got {weights}")
        if self.reformulate_delay_max > self.session_window:
            raise ValueError("reformulate_delay_max must lie inside session_window")


# --------------------------------------------------------------------------------------------
# queries


def make_typo(text: str, u: np.ndarray) -> str:
    """One character edit (insert, delete, substitute, transpose) at a letter position."""
    letters = [i for i, c in enumerate(text) if c != " "]
    op = int(u[0] * 4)
    i = letters[int(u[1] * len(letters))]
    c = _ALPHABET[int(u[2] * 26)]
    if op == 3 and i + 1 < len(text) and text[i + 1] != " " and text[i] != text[i + 1]:
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    if op == 0:
        return text[:i] + c + text[i:]
    if op == 1 and len(letters) > 3:
        return text[:i] + text[i + 1:]
    if c == text[i]:
        c = _ALPHABET[(_ALPHABET.index(c) + 1) % 26]
    return text[:i] + c + text[i + 1:]


def make_prefix(text: str, u: float) -> str:
    """Typeahead: the name cut somewhere after the first token's second letter of the next."""
    first_end = text.find(" ")
    if first_end < 0:
        lo = min(3, len(text))
    else:
        lo = first_end + 2
    hi = len(text) - 1
    if hi < lo:
        return text
    return text[:lo + int(u * (hi - lo + 1))].rstrip()


# --------------------------------------------------------------------------------------------
# sessions


class _SessionSampler:
    """Vectorised per-batch draws over the world: searchers, intents, click features."""

    def __init__(self, world: World, cfg: SocialConfig, rng: np.random.Generator) -> None:
        self.w, self.cfg, self.rng = world, cfg, rng
        activity = rng.lognormal(0.0, 1.0, world.n_people)
        self.act_cum = np.cumsum(activity)
        self.pop_cum = np.cumsum(world.pop_weight)
        # Documents grouped by city, weighted by popularity, for "local" intents.
        self.city_docs = Segments(world.doc_city.astype(np.int64), len(T.CITIES), world.pop_weight)
        p = np.array([cfg.intent_friend, cfg.intent_friend_of_friend, cfg.intent_membership,
                      cfg.intent_local, cfg.intent_global])
        self.intent_cum = np.cumsum(p / p.sum())
        q = np.array([cfg.query_full, cfg.query_prefix, cfg.query_nickname, cfg.query_typo])
        self.kind_cum = np.cumsum(q / q.sum())
        self.deg = world.degree()
        self.n_docs = len(world.texts)

    def _random_friend(self, people: np.ndarray) -> np.ndarray:
        w = self.w
        deg = self.deg[np.maximum(people, 0)]
        ok = (people >= 0) & (deg > 0)
        idx = w.adj_indptr[np.maximum(people, 0)] + (self.rng.random(len(people)) * deg).astype(np.int64)
        return np.where(ok, w.adj[np.minimum(idx, len(w.adj) - 1)], -1)

    def searchers(self, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.act_cum, self.rng.random(n) * self.act_cum[-1]),
                          self.w.n_people - 1)

    def intents(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(target document, source index) per searcher; unavailable sources fall back to
        local, then global."""
        w, rng, n = self.w, self.rng, len(s)
        source = np.searchsorted(self.intent_cum, rng.random(n), side="right").clip(0, 4)
        f = self._random_friend(s)
        fof = self._random_friend(f)
        fof = np.where(fof == s, -1, fof)
        # membership: a group/page/event the searcher or a friend belongs to
        x = np.where(rng.random(n) < 0.3, s, np.where(f >= 0, f, s))
        cnt = np.diff(w.person_docs_indptr)[x]
        j = w.person_docs_indptr[x] + (rng.random(n) * cnt).astype(np.int64)
        mdoc = np.where(cnt > 0, w.person_docs[np.minimum(j, max(len(w.person_docs) - 1, 0))], -1) \
            if len(w.person_docs) else np.full(n, -1)
        local = self.city_docs.sample(w.city[s].astype(np.int64), rng.random(n))
        glob = np.minimum(np.searchsorted(self.pop_cum, rng.random(n) * self.pop_cum[-1]), self.n_docs - 1)
        target = np.select([source == 0, source == 1, source == 2, source == 3],
                           [w.person_doc(f), w.person_doc(fof), mdoc, local], glob)
        target = np.where(target >= 0, target, np.where(local >= 0, local, glob))
        return target, source

    def click_probability(self, s: np.ndarray, d: np.ndarray, t: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Probability of a click on document d shown at pos to searcher s who meant t."""
        w, c = self.w, self.cfg.clicks
        logit = (self.base_logit(s, d) + c.intent * (d == t)
                 + c.same_name * (w.text_id[d] == w.text_id[t]))
        # A person never clicks their own profile in a search for someone else.
        logit = np.where(self.own_profile(s, d) & (d != t), -20.0, logit)
        return examine(pos, c) / (1.0 + np.exp(-logit))

    def own_profile(self, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        return (d < self.w.n_person_docs) & (d == s)

    def base_logit(self, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        """The click logit's terms that do not depend on the intended document: everything but
        intent and same_name (`ebr.datasets.social_ceiling` adds those per candidate intent)."""
        w, c = self.w, self.cfg.clicks
        # One lookup for "searcher is a member" and "close friend j is a member", all pairs.
        C = w.close_friends.shape[1]
        people = np.concatenate([s[:, None], w.close_friends[s]], axis=1)
        hits = w.is_member(np.repeat(d, C + 1), people.ravel()).reshape(len(d), C + 1)
        member, overlap = hits[:, 0], hits[:, 1:].sum(axis=1)
        return (c.bias + c.member * member + c.close_friend_overlap * np.minimum(overlap, 3)
                + c.same_city * (w.doc_city[d] == w.city[s])
                + c.same_country * (w.city_country[w.doc_city[d]] == w.city_country[w.city[s]])
                + c.same_language * (w.doc_language[d] == w.language[s])
                + c.popularity * w.pop_feature[d] + c.spam * w.doc_spam[d])


def examine(pos: np.ndarray, c: ClickModel) -> np.ndarray:
    """Probability that the impression at 0-based position `pos` is examined."""
    return (1.0 + pos) ** -c.position_decay


def _query_for(world: World, target: int, kind: int, u: np.ndarray, cfg: SocialConfig) -> tuple[str, int]:
    """(query, kind actually used): nickname needs a person with a nicknamed first name."""
    text = world.texts[target]
    if kind == 2:
        if target < world.n_person_docs:
            nicks = _NICK.get(T.FIRST_NAMES[world.first[target]][0])
            if nicks:
                return nicks[int(u[0] * len(nicks))] + text[text.index(" "):], 2
        kind = 0
    if kind == 1:
        return make_prefix(text, u[1]), 1
    if kind == 3:
        q = make_typo(text, u[2:5])
        if u[5] < cfg.second_typo_prob:
            q = make_typo(q, u[6:9])
        return q, 3
    return text, 0


def impressions(engine: BooleanEngine, query: str, kind: int, target: int, cfg: SocialConfig) -> list[int]:
    """What the legacy engine shows: one page, except for a full-name query (kind 0), whose
    searcher pages on (up to max_pages) until the intended document."""
    page, deep = cfg.page_size, cfg.page_size * cfg.max_pages
    res = engine.search(query, deep if kind == 0 else page)
    if kind == 0 and len(res) > page:
        try:
            upto = (res.index(target) // page + 1) * page
        except ValueError:
            upto = deep
        res = res[:upto]
    return res


def _line(sid: int, searcher: str, ts: int, query: str, imps: list[str], clicks: list[str]) -> str:
    # Generated names and queries use only [a-z -], so they need no JSON escaping.
    return (f'{{"session_id":"s{sid}","searcher_id":"{searcher}","timestamp":{ts},'
            f'"query":"{query}","impressions":[{",".join(imps)}],"clicks":[{",".join(clicks)}]}}')


def _write_world(world: World, out: Path, ext: str, start_time: int) -> None:
    P = world.n_people
    sid = [f"u{i}" for i in range(P)]
    with JsonlWriter(out / f"searchers{ext}") as f:
        for i in range(P):
            a, b = world.adj_indptr[i], world.adj_indptr[i + 1]
            c = int(world.city[i])
            city, region, country = T.CITIES[c]
            f.write({
                "searcher_id": sid[i], "city": city, "region": region, "country": country,
                "language": world.languages[world.language[i]],
                "attributes": {"gender": T.FIRST_NAMES[world.first[i]][1],
                               "age": AGE_BUCKETS[world.age[i]],
                               "interests": sorted({T.TOPICS[t] for t in world.interests[i].tolist()})},
                "friends": [sid[j] for j in world.adj[a:b].tolist()],
            })
    with JsonlWriter(out / f"documents{ext}") as f:
        for d, text in enumerate(world.texts):
            t = int(world.doc_type[d])
            city, region, country = T.CITIES[int(world.doc_city[d])]
            topic = T.TOPICS[int(world.doc_topic[d])]
            tags = [topic] + (["spam"] if world.doc_spam[d] else [])
            if t == PERSON:
                attrs = {"gender": T.FIRST_NAMES[world.first[d]][1], "interests": sorted(set(
                    T.TOPICS[x] for x in world.interests[d].tolist()))}
            else:
                attrs = {"topic": topic, "tag": tags}
                if world.doc_date[d] >= 0:
                    attrs["date"] = time.strftime("%Y-%m-%d", time.gmtime(
                        start_time + int(world.doc_date[d]) * DAY))
            rec = {"doc_id": doc_id(world, d), "text": text, "type": TYPE_NAMES[t],
                   "city": city, "region": region, "country": country,
                   "language": world.languages[world.doc_language[d]], "attributes": attrs,
                   "members": [sid[j] for j in world.members(d).tolist()]}
            if t == PERSON:
                rec["searcher_id"] = sid[d]  # the person document of searcher u<d>
            f.write(rec)


def doc_id(world: World, d: int) -> str:
    t = int(world.doc_type[d])
    return f"p{d}" if t == PERSON else f"{TYPE_PREFIX[t]}{d - world.n_person_docs}"


def generate_social(out_dir: str | Path, documents: int = 20_000, sessions: int = 50_000,
                    seed: int = 0, searchers: int | None = None, **overrides) -> dict:
    """Writes searchers/documents/sessions (.jsonl or .jsonl.gz) and generator.json to `out_dir`
    (any URI; staged locally, uploaded once complete, generator.json last); returns a summary (counts, timings, sessions per second)."""
    cfg = SocialConfig(documents=documents, sessions=sessions, seed=seed, searchers=searchers, **overrides)
    cfg.validate()
    return _generate(str(out_dir), cfg)


def _generate(out_dir: str, cfg: SocialConfig, record=None) -> dict:
    """`generate_social` for a validated `cfg`; `record` (a configuration dataclass) is saved
    beside the logs as config.json (`ebr.config.save`)."""
    t0 = time.perf_counter()
    world_seq, session_seq = np.random.SeedSequence(cfg.seed).spawn(2)
    world = build_world(cfg, np.random.default_rng(world_seq))
    t_world = time.perf_counter() - t0
    log.info("social world: %d people, %d documents, %d friendships in %.1fs",
             world.n_people, len(world.texts), len(world.adj) // 2, t_world)
    ext = ".jsonl.gz" if cfg.gzip else ".jsonl"
    with staged_output_dir(out_dir) as tmp:
        t1 = time.perf_counter()
        _write_world(world, tmp, ext, cfg.start_time)
        t_write_world = time.perf_counter() - t1
        engine = BooleanEngine(world.texts, world.rank)
        t2, c2 = time.perf_counter(), time.process_time()
        truth = None
        if cfg.ceiling:
            (tmp / CEILING_DIR).mkdir()
            truth = tmp / CEILING_DIR / f"{CEILING_NAME}{'.gz' if cfg.gzip else ''}"
        counts = _write_sessions(world, engine, cfg, tmp / f"sessions{ext}",
                                 np.random.default_rng(session_seq), truth)
        # The ceiling (social_ceiling) is timed apart: sessions_per_s measures the logs alone.
        t_ceiling = counts.pop("ceiling_seconds")
        t_sessions = time.perf_counter() - t2 - t_ceiling
        cpu_sessions = time.process_time() - c2 - t_ceiling
        summary = {
            "searchers": world.n_people,
            "documents": len(world.texts),
            "documents_by_type": {TYPE_NAMES[t]: int((world.doc_type == t).sum()) for t in range(4)},
            "friendships": int(len(world.adj) // 2),
            "distinct_names": int(world.text_id.max() + 1),
            **counts,
            "seconds": {"world": round(t_world, 3), "write_world": round(t_write_world, 3),
                        "engine_index": round(t2 - t1 - t_write_world, 3),
                        "sessions": round(t_sessions, 3), "ceiling": round(t_ceiling, 3)},
            "sessions_per_s": round(counts["sessions"] / max(t_sessions, 1e-9), 1),
            # CPU time of this process: on a shared machine wall time mostly measures neighbours.
            "sessions_per_cpu_s": round(counts["sessions"] / max(cpu_sessions, 1e-9), 1),
        }
        timing = ("seconds", "sessions_per_s", "sessions_per_cpu_s")  # would break byte-identity
        meta = {"generator": "ebr.datasets.social", "parameters": dataclasses.asdict(cfg),
                "model": MODEL_DESCRIPTION,
                "summary": {k: v for k, v in summary.items() if k not in timing}}
        if record is not None:
            config.save(record, str(tmp))
        (tmp / "generator.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _remove_stale_ceiling(out_dir, cfg)
    return summary


def _remove_stale_ceiling(out_dir: str, cfg: SocialConfig) -> None:
    """The staged upload replaces the top-level raw-log files only: drop an earlier run's
    truth/ceiling file that this run did not write (.gz after a plain run, or --no-ceiling)."""
    from ebr import storage

    keep = CEILING_NAME + (".gz" if cfg.gzip else "") if cfg.ceiling else None
    for name in (CEILING_NAME, CEILING_NAME + ".gz"):
        path = storage.join(storage.normalize(out_dir), CEILING_DIR, name)
        if name != keep and storage.exists(path):
            storage.remove(path)


def _write_sessions(world: World, engine: BooleanEngine, cfg: SocialConfig, path: Path,
                    rng: np.random.Generator, truth: Path | None = None) -> dict:
    """Streams the sessions to `path` and, given `truth`, each session's ceiling line there
    (`social_ceiling`: computed from the world and the session's searcher and query only)."""
    from tqdm import tqdm

    sampler = _SessionSampler(world, cfg, rng)
    ceiling = Ceiling(world, engine, cfg, sampler) if truth is not None else None
    truth_out = JsonlWriter(truth, buffer_lines=8192) if truth is not None else None
    t_ceiling = 0.0
    sids = [f"u{i}" for i in range(world.n_people)]
    dids = [f'"{doc_id(world, d)}"' for d in range(len(world.texts))]
    page, deep = cfg.page_size, cfg.page_size * cfg.max_pages
    span = cfg.days * DAY
    kinds = np.zeros(4, dtype=np.int64)
    intents = np.zeros(len(INTENT_SOURCES), dtype=np.int64)
    stats = dict(sessions=0, failed=0, reformulations=0, clicks=0, impressions=0,
                 empty_impressions=0, target_shown=0)
    # Namesakes of every clicked document (docs/data-format.md, "Namesakes").
    namesakes = (np.bincount(world.text_id)[world.text_id] - 1).tolist()
    clicked_with_namesake, clicked_namesakes = 0, 0
    written, primary = 0, 0
    bar = tqdm(total=cfg.sessions, unit="session", desc="sessions", mininterval=2.0,
               disable=not cfg.progress or cfg.sessions < 200_000)
    with JsonlWriter(path, buffer_lines=8192) as out:
        while written < cfg.sessions:
            B = cfg.batch_size
            s = sampler.searchers(B)
            target, source = sampler.intents(s)
            kind = np.searchsorted(sampler.kind_cum, rng.random(B), side="right").clip(0, 3)
            U = rng.random((B, 9))
            ts = cfg.start_time + ((primary + np.arange(B) + rng.random(B)) * span
                                   // max(cfg.sessions, 1)).astype(np.int64)
            delay = rng.integers(cfg.reformulate_delay_min, cfg.reformulate_delay_max + 1, B)
            reform_u = rng.random(B)
            # pass 1: queries and impressions (the legacy engine); full-name searchers page on
            queries, imps, used = [], [], np.empty(B, dtype=np.int64)
            for i in range(B):
                t = int(target[i])
                q, k = _query_for(world, t, int(kind[i]), U[i], cfg)
                used[i] = k
                res = impressions(engine, q, k, t, cfg)
                queries.append(q)
                imps.append(res)
            # pass 2: clicks by the hidden relevance, vectorised over all impressions
            lens = np.fromiter((len(r) for r in imps), dtype=np.int64, count=B)
            flat = np.fromiter((d for r in imps for d in r), dtype=np.int64, count=int(lens.sum()))
            owner = np.repeat(np.arange(B), lens)
            pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
            prob = sampler.click_probability(s[owner], flat, target[owner], pos)
            clicked = rng.random(len(flat)) < prob
            offsets = np.concatenate([[0], np.cumsum(lens)]).tolist()
            clicked_l = clicked.tolist()
            flat_l = flat.tolist()
            # pass 3: write, adding the reformulation after a failed session
            for i in range(B):
                if written >= cfg.sessions:
                    break
                a, b = offsets[i], offsets[i + 1]
                clicked_docs = [flat_l[j] for j in range(a, b) if clicked_l[j]]
                clicks = [dids[d] for d in clicked_docs]
                for d in clicked_docs:
                    clicked_with_namesake += namesakes[d] > 0
                    clicked_namesakes += namesakes[d]
                t = int(target[i])
                stats["target_shown"] += t in imps[i]
                searcher = sids[s[i]]
                out.write_line(_line(written, searcher, int(ts[i]), queries[i],
                                     [dids[d] for d in imps[i]], clicks))
                if ceiling is not None:
                    tc = time.perf_counter()
                    truth_out.write_line(ceiling_line(f"s{written}", ceiling.mass(int(s[i]), queries[i])))
                    t_ceiling += time.perf_counter() - tc
                written += 1
                kinds[used[i]] += 1
                intents[source[i]] += 1
                stats["impressions"] += b - a
                stats["clicks"] += len(clicks)
                stats["empty_impressions"] += a == b
                if clicks:
                    continue
                stats["failed"] += 1
                if written >= cfg.sessions or reform_u[i] >= cfg.reformulate_prob:
                    continue
                # The searcher retypes the full name and pages until the intended document.
                full = world.texts[t]
                res = engine.search(full, deep)
                if t not in res:
                    continue  # still not found: the searcher gives up
                res = res[:(res.index(t) // page + 1) * page]
                out.write_line(_line(written, searcher, int(ts[i] + delay[i]), full,
                                     [dids[d] for d in res], [dids[t]]))
                if ceiling is not None:
                    tc = time.perf_counter()
                    truth_out.write_line(ceiling_line(f"s{written}", ceiling.mass(int(s[i]), full, True)))
                    t_ceiling += time.perf_counter() - tc
                written += 1
                kinds[0] += 1
                stats["reformulations"] += 1
                clicked_with_namesake += namesakes[t] > 0
                clicked_namesakes += namesakes[t]
                stats["impressions"] += len(res)
                stats["clicks"] += 1
            primary += B
            bar.update(min(written, cfg.sessions) - bar.n)
    bar.close()
    if truth_out is not None:
        truth_out.close()
    stats["sessions"] = written
    stats["ceiling_seconds"] = round(t_ceiling, 3)
    n_clicks = max(stats["clicks"], 1)
    stats["namesakes"] = {
        "documents_with_namesake": round(float(np.mean(np.asarray(namesakes) > 0)), 4),
        "clicked_with_namesake": round(clicked_with_namesake / n_clicks, 4),
        "namesakes_per_click": round(clicked_namesakes / n_clicks, 3),
    }
    stats["query_kinds"] = {k: int(v) for k, v in zip(QUERY_KINDS, kinds)}
    # by drawn source; a source with nothing to offer fell back to local / global
    stats["intent_sources"] = {k: int(v) for k, v in zip(INTENT_SOURCES, intents)}
    return stats


MODEL_DESCRIPTION = {
    "people": "Every person is a searcher u<i>; the first ones also have a person document p<i>. "
              "Names are 'first last' drawn Zipf-like from a shared pool (the first_name_pool / "
              "last_name_pool most popular names), so many entities share a name. Each person belongs to a community (lognormal sizes) with a home city and a "
              "favourite topic; city = community city with prob home_city_prob, else Zipf over cities; "
              "language = the country's first language with prob primary_language_prob.",
    "friendships": "Community-aware Chung-Lu / fitness attachment: each edge picks u with prob "
                   "proportional to a Pareto(fitness_alpha)+1 fitness, and v by fitness inside u's "
                   "community with prob in_community, else globally; self-loops and duplicates "
                   "dropped. Expected degree is proportional to fitness, so degrees are heavy-tailed.",
    "documents": "Groups, pages, events get a community, a city (community city or Zipf), a topic, "
                 "lognormal member counts (members drawn 65% from the community, 25% from the city, "
                 "10% anyone), and names from templates over cities, topics, businesses and person "
                 "names ('seattle hiking club', 'jon smith fan page'); spam_share of groups/pages carry "
                 "the tag 'spam'. Person documents list the person's friends as members.",
    "popularity": "Static rank by log(1+degree) (people) or log(1+members) plus Gumbel(0.5) noise, "
                  "+2 for spam (spam games the static rank); weight = 1/(rank+1)^popularity_zipf.",
    "intent": "A session's searcher is drawn by a lognormal activity; the intended document by "
              "source: a random friend's person document (intent_friend), a friend of a friend "
              "(intent_friend_of_friend), a group/page/event the searcher or a friend belongs to "
              "(intent_membership), a popularity-weighted document in the searcher's city "
              "(intent_local), or a Zipf-popular document anywhere (intent_global); a source that "
              "yields nothing falls back to local, then global.",
    "queries": "full name (query_full), a prefix cut after the first token (query_prefix), the first "
               "name replaced by a nickname (query_nickname; people with a nicknamed first name only), "
               "or one (second_typo_prob: two) character edits: insert, delete, substitute, transpose.",
    "engine": "Legacy boolean engine: every query token must equal a name token, the last may be a "
              "prefix; ranked by exact full-name match, then static rank. A full-name query shows "
              "page_size results per page and the searcher pages (up to max_pages) until the intended "
              "document; other queries show one page.",
    "clicks": "Each impression is clicked independently with examine(pos) * sigmoid(logit), logit = "
              "bias + intent*[d is intended] + same_name*[same name as intended] + member*[searcher in "
              "d's members] + close_friend_overlap*min(3, close friends in d's members) + same_city + "
              "same_country + same_language + popularity*pop + spam*[spam]; weights in parameters.clicks.",
    "reformulation": "A session without clicks is, with reformulate_prob, followed by the same searcher "
                     "reformulate_delay_min..max seconds later (inside session_window) with the intended "
                     "document's full name; they page to it and click it (if within max_pages).",
}
