"""The ceiling of the social-search generator: each session's Bayes-optimal recall@K.

Place in the data flow: `ebr data social` (`ebr.datasets.social`) knows its hidden world and
click model, so beside the raw logs it writes `RAW/truth/ceiling.jsonl` (`.jsonl.gz` with
--gzip), one line per session, `{"session_id": "s123", "mass": {"1": .., "5": .., "10": ..,
"20": .., "50": .., "100": ..}}`; the paper-tables harness joins it on session_id
(`read_ceiling`) and reports it beside the models. `ebr pipeline examples` reads only
RAW/{searchers,documents,sessions}.jsonl[.gz], never truth/ (docs/data-format.md, "The
ceiling").

The posterior, for searcher s and query q (docs/data-format.md gives the same in prose):

    P(t, k | s, q)  ~  P(t | s) * P(k) * P(q | t, k)

over intended documents t and query kinds k (full, prefix, nickname, typo). P(t | s) is the
generator's intent mixture, computed exactly from the world: a friend's person document (1/degree
per friend), a friend of a friend (sum over common friends f of 1/(deg s * deg f)), a document
the searcher (0.3) or a random friend (0.7) belongs to (uniform over that person's documents), a
popularity-weighted document of the searcher's city, a popularity-weighted document anywhere,
with the generator's fallbacks (a source that yields nothing falls back to local, then global).
P(q | t, k) is exact for every kind: full name, the prefix cut, the nickname table, and the
typo model of `social.make_typo` (one edit; with second_typo_prob a second edit on the first's
result, summed over the intermediate strings). The impressions follow from (q, k, t) (a full-name
searcher pages to t), and

    P(click d | s, q) = sum_{t,k} P(t, k | s, q) * examine(pos_k,t(d)) * sigmoid(logit(s, d, t))

with the generator's own `ClickModel`. A session's mass@K is the sum of the K largest
normalised click posteriors, P(click d | s, q) / sum_d' P(click d' | s, q): the expected
recall@K, over the session's clicked documents, of the ranking by click posterior, which no
model that sees (searcher, query) can beat in expectation.

Approximations (also in docs/data-format.md):
- Several clicks in one session are treated through their marginals: the ranking is by marginal
  click probability and mass@K is the expected share of the session's clicks in its top K
  (ratio of expectations), the quantity per-click recall averages.
- Reformulations (the searcher retypes the full name after a failed session and clicks the
  intended document) are recognised as such (the generator knows it) and their posterior is
  P(t | s) over the documents with that name the engine shows; the evidence that the earlier
  session failed (which makes some namesakes likelier) is ignored.
- Typo candidates are the names within two character deletions of the query on both sides
  (every name two edits away is one); their likelihood is then exact.
A session with no candidate (cannot happen with the generator's own queries) gets mass 0.

Cost: the world-level tables are built once (a deletion index over the distinct names, per
searcher fallback probabilities); each session then costs a few small numpy operations over its
candidates and impressions, so sessions stream through in batches like the logs themselves.
"""
from __future__ import annotations

import bisect

import numpy as np

from ebr import storage
from ebr.datasets import social_tables as T

KS = (1, 5, 10, 20, 50, 100)
CEILING_DIR = "truth"
CEILING_NAME = "ceiling.jsonl"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_NEXT = {c: _ALPHABET[(i + 1) % 26] for i, c in enumerate(_ALPHABET)}
_NICK = {formal: nicks for formal, nicks in T.NICKNAMES}
_FORMALS: dict[str, list[str]] = {}
for _formal, _nicks in T.NICKNAMES:
    for _n in _nicks:
        _FORMALS.setdefault(_n, []).append(_formal)
_MEMBERSHIP_SELF = 0.3  # social._SessionSampler.intents: the searcher's own documents, else a friend's


# --------------------------------------------------------------------------------------------
# query likelihoods (the generator's query model, exactly)


def prefix_prob(text: str, q: str) -> float:
    """P(make_prefix(text, u) == q) for u uniform."""
    first_end = text.find(" ")
    lo = min(3, len(text)) if first_end < 0 else first_end + 2
    hi = len(text) - 1
    if hi < lo:
        return float(q == text)
    n = sum(1 for L in (len(q), len(q) + 1) if lo <= L <= hi and text[:L].rstrip() == q)
    return n / (hi - lo + 1)


def typo1_prob(text: str, q: str) -> float:
    """P(make_typo(text, u) == q) for u uniform: (op, letter position, letter) are uniform over
    4 x letters x 26; an impossible transpose or a delete of a short name substitutes."""
    n, m = len(text), len(q)
    dl = m - n
    if abs(dl) > 1 or text == q:
        return 0.0
    letters = [i for i, c in enumerate(text) if c != " "]
    n_l = len(letters)
    if not n_l:
        return 0.0
    # Only edits inside the window where q and text differ can produce q.
    p = 0
    while p < min(n, m) and text[p] == q[p]:
        p += 1
    sfx = 0
    while sfx < min(n, m) and text[n - 1 - sfx] == q[m - 1 - sfx]:
        sfx += 1
    count = 0
    if dl == 1:  # insert q[i] before letter position i: q[:i] == text[:i], q[i+1:] == text[i:]
        count = sum(1 for i in letters if n - sfx <= i <= p and q[i] in _NEXT)
    elif dl == -1:  # delete letter i: q[:i] == text[:i], q[i:] == text[i+1:]
        if n_l > 3:
            count = 26 * sum(1 for i in letters if m - sfx <= i <= p)
    else:
        i = p  # the first difference
        can_swap = i + 1 < n and text[i + 1] != " " and text[i] != text[i + 1] and text[i] != " "
        if can_swap and q == text[:i] + text[i + 1] + text[i] + text[i + 2:]:
            count += 26
        if p + sfx == n - 1 and text[i] != " ":  # exactly one position differs
            c = q[i]
            if c in _NEXT:
                ops = 1 + (n_l <= 3) + (not can_swap)  # op 2; op 1 / op 3 when they substitute
                count += ops * (1 + (c == _NEXT[text[i]]))  # a draw of text[i] itself moves on
    # A transpose at i-1 also differs first at i-1 (handled above: p is that position).
    return count / (4 * n_l * 26)


def typo_likelihood(name: str, q: str, second: float, name_edits: set[str] | None = None,
                    q_edits: set[str] | None = None) -> float:
    """P(query q | name, kind typo): one edit, or with probability `second` a second edit on the
    first one's result, summed over the intermediate strings (those one edit from both).
    Two edits that undo each other (q == name, about 1 in 4 x letters x 26 double typos) are
    left out: beside a full-name query their share is below 1e-4."""
    if name == q:
        return 0.0
    p1 = typo1_prob(name, q)
    p2 = 0.0
    if second > 0:
        between = (name_edits if name_edits is not None else edits1(name)) & \
            (q_edits if q_edits is not None else edits1(q))
        for a in between:
            pa = typo1_prob(name, a)
            if pa:
                p2 += pa * typo1_prob(a, q)
    return (1 - second) * p1 + second * p2


def edits1(x: str) -> set[str]:
    """Every string one insert, delete, substitution or transposition away (a superset of
    make_typo's outputs)."""
    splits = [(x[:i], x[i:]) for i in range(len(x) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out |= {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    out |= {a + c + b[1:] for a, b in splits if b for c in _ALPHABET}
    out |= {a + c + b for a, b in splits for c in _ALPHABET}
    return out


def deletes(x: str, depth: int = 2) -> set[str]:
    """x and every string of up to `depth` character deletions."""
    out, frontier = {x}, {x}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1:] for w in frontier for i in range(len(w))}
        out |= frontier
    return out


# --------------------------------------------------------------------------------------------


class Ceiling:
    """Click posteriors and mass@K for sessions of one generated world (`social._generate`)."""

    def __init__(self, world, engine, cfg, sampler) -> None:
        self.w, self.engine, self.cfg, self.sampler = world, engine, cfg, sampler
        w = world
        P, npd = w.n_people, w.n_person_docs
        p = np.array([cfg.intent_friend, cfg.intent_friend_of_friend, cfg.intent_membership,
                      cfg.intent_local, cfg.intent_global], dtype=np.float64)
        self.pi = p / p.sum()
        k = np.array([cfg.query_full, cfg.query_prefix, cfg.query_nickname, cfg.query_typo],
                     dtype=np.float64)
        self.kind = k / k.sum()
        # Distinct names, sorted (prefix ranges by bisection), and their documents.
        self.names = sorted(set(w.texts))
        self.name_id = {n: i for i, n in enumerate(self.names)}
        doc_name = np.fromiter((self.name_id[t] for t in w.texts), dtype=np.int64, count=len(w.texts))
        self.doc_name = doc_name
        order = np.argsort(doc_name, kind="stable")
        self.name_docs = order
        self.name_indptr = np.searchsorted(doc_name[order], np.arange(len(self.names) + 1))
        firsts = np.array([T.FIRST_NAMES[f][0] in _NICK for f in range(len(T.FIRST_NAMES))])
        self.nickable = np.zeros(len(w.texts), dtype=bool)
        self.nickable[:npd] = firsts[w.first[:npd]]
        # Per searcher: probability that each intent source yields nothing (then: local, then
        # global), as social._SessionSampler.intents draws them.
        deg = w.degree().astype(np.float64)
        self.deg = deg
        rows = np.repeat(np.arange(P), np.diff(w.adj_indptr))
        cols = w.adj.astype(np.int64)
        safe = np.maximum(deg, 1.0)
        self.fail_friend = np.where(deg > 0, np.bincount(rows, cols >= npd, P) / safe, 1.0)
        n_bad = np.bincount(rows, cols >= npd, P)  # friends without a person document
        bad_fof = (n_bad[cols] + (rows < npd)) / deg[cols]  # ... or the searcher themself
        self.fail_fof = np.where(deg > 0, np.bincount(rows, bad_fof, P) / safe, 1.0)
        n_docs = np.diff(w.person_docs_indptr)
        self.n_docs = n_docs
        no_docs = (n_docs == 0).astype(np.float64)
        friends_none = np.bincount(rows, no_docs[cols], P) / safe
        self.fail_member = np.where(deg > 0, _MEMBERSHIP_SELF * no_docs
                                    + (1 - _MEMBERSHIP_SELF) * friends_none, no_docs)
        self.city_pop = np.bincount(w.doc_city.astype(np.int64), w.pop_weight, len(T.CITIES))
        self._del_index: dict[str, list[int]] | None = None
        self._edits: dict[int, set[str]] = {}
        self._likelihoods: dict[str, dict[int, list[float]]] = {}
        self._social_cache: dict[int, tuple] = {}

    # --- P(q | t) per candidate name ---------------------------------------------------------

    def _typo_index(self) -> dict[str, list[int]]:
        if self._del_index is None:
            index: dict[str, list[int]] = {}
            for i, name in enumerate(self.names):
                for key in deletes(name):
                    index.setdefault(key, []).append(i)
            self._del_index = index
        return self._del_index

    def _name_edits(self, i: int) -> set[str]:
        e = self._edits.get(i)
        if e is None:
            if len(self._edits) >= 2_000:  # about 50 kB each
                self._edits.clear()
            e = self._edits[i] = edits1(self.names[i])
        return e

    def typo_prob(self, i: int, q: str, q_edits: set[str]) -> float:
        """P(query | name i, kind typo) (`typo_likelihood`), name i's edits cached."""
        return typo_likelihood(self.names[i], q, self.cfg.second_typo_prob,
                               self._name_edits(i), q_edits)

    def name_likelihoods(self, q: str) -> dict[int, list[float]]:
        """{name id: [P(q | full), P(q | prefix), P(q | nickname), P(q | typo)]} for every name
        that can yield q (the nickname entry applies to nicknamed people only)."""
        out = self._likelihoods.get(q)
        if out is not None:
            return out
        if len(self._likelihoods) > 200_000:
            self._likelihoods.clear()
        out = self._likelihoods[q] = {}

        def entry(i):
            return out.setdefault(i, [0.0, 0.0, 0.0, 0.0])

        i = self.name_id.get(q)
        if i is not None:
            entry(i)[0] = 1.0
        if self.kind[1] > 0:
            a = bisect.bisect_left(self.names, q)
            b = bisect.bisect_left(self.names, q + "\uffff")
            for j in range(a, b):
                p = prefix_prob(self.names[j], q)
                if p:
                    entry(j)[1] = p
        if self.kind[2] > 0 and " " in q:
            first, rest = q[:q.index(" ")], q[q.index(" "):]
            for formal in _FORMALS.get(first, ()):
                j = self.name_id.get(formal + rest)
                if j is not None:
                    entry(j)[2] = _NICK[formal].count(first) / len(_NICK[formal])
        if self.kind[3] > 0:
            index = self._typo_index()
            cand = {j for key in deletes(q) for j in index.get(key, ())}
            cand.discard(i)  # the name itself: see typo_prob
            q_edits = edits1(q) if cand and self.cfg.second_typo_prob > 0 else set()
            for j in cand:
                p = self.typo_prob(j, q, q_edits)
                if p:
                    entry(j)[3] = p
        return out

    # --- P(t | s) for candidate documents ----------------------------------------------------

    def _social(self, s: int):
        """(friends, friend-of-friend documents and weights, membership documents and weights)
        of searcher s, each document list sorted and unique; cached (searchers come back)."""
        hit = self._social_cache.get(s)
        if hit is not None:
            return hit
        w = self.w
        deg = self.deg[s]
        friends = w.adj[w.adj_indptr[s]:w.adj_indptr[s + 1]].astype(np.int64)
        fof_k, fof_w = np.zeros(0, np.int64), np.zeros(0)
        if deg > 0:
            # friend of a friend: sum over common friends f of 1 / (deg s * deg f)
            lens = np.diff(w.adj_indptr)[friends]
            idx = np.repeat(w.adj_indptr[friends] - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
            fof_k, fof_w = _aggregate(w.adj[idx].astype(np.int64),
                                      np.repeat(1.0 / (deg * self.deg[friends]), lens))
            keep = (fof_k != s) & (fof_k < w.n_person_docs)
            fof_k, fof_w = fof_k[keep], fof_w[keep]
        # membership: one of the searcher's (0.3) or a random friend's (0.7) documents
        own = _MEMBERSHIP_SELF if deg > 0 else 1.0
        people = np.concatenate([[s], friends])
        share = np.concatenate([[own], np.full(len(friends), (1 - own) / max(deg, 1))])
        nd = self.n_docs[people]
        keep = nd > 0
        people, share, nd = people[keep], share[keep], nd[keep]
        idx = np.repeat(w.person_docs_indptr[people] - np.cumsum(nd) + nd, nd) + np.arange(nd.sum())
        mem_k, mem_w = _aggregate(w.person_docs[idx].astype(np.int64), np.repeat(share / nd, nd))
        if len(self._social_cache) >= 10_000:  # a few kB each
            self._social_cache.clear()
        out = self._social_cache[s] = (friends, fof_k, fof_w, mem_k, mem_w)
        return out

    def prior(self, s: int, t: np.ndarray) -> np.ndarray:
        """P(intended document t | searcher s), the intent mixture with its fallbacks."""
        w, pi = self.w, self.pi
        friends, fof_k, fof_w, mem_k, mem_w = self._social(s)
        person = t < w.n_person_docs
        out = pi[1] * _lookup_sorted(t, fof_k, fof_w) + pi[2] * _lookup_sorted(t, mem_k, mem_w)
        if len(friends):
            # friend: uniform over friends (adjacency rows are sorted)
            k = np.minimum(np.searchsorted(friends, t), len(friends) - 1)
            out += pi[0] * (person & (friends[k] == t)) / self.deg[s]
        # local (else global) and the fallbacks of every source
        city = int(w.city[s])
        glob = w.pop_weight[t]
        fail_local = float(self.city_pop[city] <= 0)
        local = np.where(w.doc_city[t] == city, w.pop_weight[t] / max(self.city_pop[city], 1e-300), 0.0)
        fallback = (pi[3] + pi[0] * self.fail_friend[s] + pi[1] * self.fail_fof[s]
                    + pi[2] * self.fail_member[s])
        out += fallback * (local + fail_local * glob) + pi[4] * glob
        return out

    # --- P(click d | s, q) ---------------------------------------------------------------------

    def click_posterior(self, s: int, q: str,
                        reformulation: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
        """(documents, expected clicks on each given (s, q), P(q | s)): the documents the engine
        can show for q and the expected number of clicks on each, under the posterior over the
        intended document and query kind. For a reformulation, the clicked document is the
        intended one, among the documents named q the engine shows."""
        cfg = self.cfg
        page, deep = cfg.page_size, cfg.page_size * cfg.max_pages
        if reformulation:
            shown = np.asarray(self.engine.search(q, deep), dtype=np.int64)
            named = shown[self.doc_name[shown] == self.name_id.get(q, -1)] if len(shown) else shown
            pr = self.prior(s, named)
            total = pr.sum()
            return named, (pr / total if total > 0 else pr), float(total)
        lik = self.name_likelihoods(q)
        if not lik:
            return np.zeros(0, dtype=np.int64), np.zeros(0), 0.0
        ids = np.fromiter(lik, dtype=np.int64, count=len(lik))
        L = np.array([lik[i] for i in ids.tolist()])  # [names, 4 kinds]
        cnt = self.name_indptr[ids + 1] - self.name_indptr[ids]
        start = np.repeat(self.name_indptr[ids] - np.cumsum(cnt) + cnt, cnt)
        t = self.name_docs[start + np.arange(cnt.sum())]
        Lt = np.repeat(L, cnt, axis=0)
        nick = self.nickable[t]
        kf, kp, kn, kt = self.kind
        # A nickname draw for someone without a nicknamed first name types the full name.
        deep_lik = Lt[:, 0] * (kf + kn * ~nick)
        page_lik = Lt[:, 1] * kp + Lt[:, 3] * kt + Lt[:, 2] * kn * nick
        pr = self.prior(s, t)
        w_deep, w_page = pr * deep_lik, pr * page_lik
        p_q = float(w_deep.sum() + w_page.sum())
        if p_q <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0), 0.0
        w_deep, w_page = w_deep / p_q, w_page / p_q
        docs, clicks = [], []
        if w_page.sum() > 0:
            shown = np.asarray(self.engine.search(q, page), dtype=np.int64)
            if len(shown):
                docs.append(shown)
                clicks.append(self._expected_clicks(s, shown, np.arange(len(shown)), t, w_page,
                                                    np.full(len(t), np.inf)))
        if w_deep.sum() > 0:
            shown = np.asarray(self.engine.search(q, deep), dtype=np.int64)
            if len(shown):
                # The full-name searcher pages on to the intended document (all pages when it
                # is not among them); one page is shown when everything fits on it.
                where = {d: j for j, d in enumerate(shown.tolist())}
                t_page = np.array([where[d] // page if d in where else np.inf for d in t.tolist()],
                                  dtype=np.float64)
                if len(shown) <= page:
                    t_page[:] = np.inf
                docs.append(shown)
                clicks.append(self._expected_clicks(s, shown, np.arange(len(shown)), t, w_deep, t_page))
        if not docs:
            return np.zeros(0, dtype=np.int64), np.zeros(0), p_q
        d = np.concatenate(docs)
        c = np.concatenate(clicks)
        u, inv = np.unique(d, return_inverse=True)
        return u, np.bincount(inv, c, len(u)), p_q

    def _expected_clicks(self, s: int, shown: np.ndarray, pos: np.ndarray, t: np.ndarray,
                         wt: np.ndarray, t_page: np.ndarray) -> np.ndarray:
        """sum_t wt[t] * [shown[j] visible when t is meant] * P(click shown[j] | s, t, pos j):
        shown[j] is visible when its page (j // page_size) is at most t_page[t]."""
        from ebr.datasets.social import examine  # social imports this module

        c = self.cfg.clicks
        base = self.sampler.base_logit(np.full(len(shown), s), shown)
        own = self.sampler.own_profile(np.full(len(shown), s), shown)
        vis = t_page[None, :] >= (pos // self.cfg.page_size)[:, None]  # [shown, t]
        wv = np.where(vis, wt[None, :], 0.0)
        is_d = t[None, :] == shown[:, None]
        same = self.doc_name[t][None, :] == self.doc_name[shown][:, None]
        w_d = (wv * is_d).sum(axis=1)
        w_same = (wv * (same & ~is_d)).sum(axis=1)
        w_other = wv.sum(axis=1) - w_d - w_same
        sig = _sigmoid
        p = (w_d * sig(base + c.intent + c.same_name)
             + np.where(own, (w_same + w_other) * sig(-20.0),
                        w_same * sig(base + c.same_name) + w_other * sig(base)))
        return p * examine(pos, c)

    def mass(self, s: int, q: str, reformulation: bool = False, ks=KS) -> dict[int, float]:
        """{K: sum of the K largest normalised click posteriors}."""
        _, p, _ = self.click_posterior(s, q, reformulation)
        total = p.sum()
        if total <= 0:
            return {k: 0.0 for k in ks}
        top = np.cumsum(np.sort(p)[::-1]) / total
        return {k: float(min(1.0, top[min(k, len(top)) - 1])) for k in ks}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _aggregate(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, summed weights per key)."""
    if not len(keys):
        return keys, weights
    u, inv = np.unique(keys, return_inverse=True)
    return u, np.bincount(inv, weights, len(u))


def _lookup_sorted(t: np.ndarray, keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """weights[keys == t] for each t (0 where absent); keys sorted and unique."""
    if not len(keys):
        return np.zeros(len(t))
    k = np.minimum(np.searchsorted(keys, t), len(keys) - 1)
    return np.where(keys[k] == t, weights[k], 0.0)


def ceiling_line(session_id: str, mass: dict[int, float]) -> str:
    return ('{"session_id":"%s","mass":{%s}}'
            % (session_id, ",".join(f'"{k}":{round(v, 6)!r}' for k, v in mass.items())))


def ceiling_path(raw_dir: str) -> str:
    """RAW/truth/ceiling.jsonl or .jsonl.gz (the one matching the sessions file when both
    exist, e.g. after a plain run was replaced by a --gzip one)."""
    from ebr.datasets.jsonl import find_raw_file

    raw = storage.normalize(raw_dir)
    options = [storage.join(raw, CEILING_DIR, CEILING_NAME + ext) for ext in ("", ".gz")]
    existing = [p for p in options if storage.exists(p)]
    if not existing:
        raise FileNotFoundError(f"{raw}: no {CEILING_DIR}/{CEILING_NAME} (or .gz): logs not "
                                "written by `ebr data social`, or written with --no-ceiling")
    if len(existing) > 1:
        gz = find_raw_file(raw, "sessions").endswith(".gz")
        existing = [options[1] if gz else options[0]]
    return existing[0]


def read_ceiling(raw_dir: str) -> dict[str, dict[int, float]]:
    """{session_id: {K: mass@K}} from RAW/truth/ceiling.jsonl[.gz] (any URI); errors name the
    file and line."""
    from ebr.datasets.jsonl import read_jsonl

    path = ceiling_path(raw_dir)
    out: dict[str, dict[int, float]] = {}
    for line, rec in read_jsonl(path):
        try:
            out[rec["session_id"]] = {int(k): float(v) for k, v in rec["mass"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}:{line}: expected {{\"session_id\": str, \"mass\": "
                             f"{{K: float}}}}: {e!r}") from None
    return out
