"""The legacy boolean search engine of the social-search generator.

It decides which documents a session is shown (its impressions), like the term-matching
engine the paper's embedding retrieval was added next to (section 1): every query token must
match a document name token exactly, except the last one, which may be a prefix (typeahead).
It knows nothing of nicknames, typos, the searcher or location, so those queries fail and the
documents it shows but the searcher does not click are hard, text-matching negatives.
Results rank by its own naive score: exact full-name match first, then static popularity rank.
"""
from __future__ import annotations

import bisect

import numpy as np

_MAX_CACHE = 400_000


class BooleanEngine:
    def __init__(self, texts: list[str], rank: np.ndarray) -> None:
        n = len(texts)
        self.order = np.argsort(rank, kind="stable")  # rank -> document
        tokens = [t.split() for t in texts]
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=n)
        flat = np.array([tok for toks in tokens for tok in toks], dtype=str)
        vocab, flat_id = np.unique(flat, return_inverse=True)
        self.vocab = vocab.tolist()  # sorted: a prefix's tokens form one id range
        self.tok_id = {tok: i for i, tok in enumerate(self.vocab)}
        width = int(lengths.max()) if n else 1
        # Token ids of each document, indexed by rank, padded with -1: filters candidates by the
        # remaining query tokens without intersecting long posting lists.
        self.tokmat = np.full((n, width), -1, dtype=np.int32)
        row = np.repeat(np.asarray(rank, dtype=np.int64), lengths)
        col = np.arange(len(flat_id)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.tokmat[row, col] = flat_id
        pairs = np.unique(flat_id.astype(np.int64) * n + row)  # a token twice in a name counts once
        self.post = (pairs % n).astype(np.int32)  # token-major, rank-sorted within a token
        self.indptr = np.searchsorted(pairs // n, np.arange(len(self.vocab) + 1))
        # Token-pair lists (docs holding both tokens, by rank): two-token queries, most of them,
        # are answered from these alone, longer ones start from their rarest pair.
        V = len(self.vocab)
        keys, ranks = [], []
        rank_col = np.arange(n, dtype=np.int64)
        for i in range(width):
            for j in range(i + 1, width):
                x, y = self.tokmat[:, i].astype(np.int64), self.tokmat[:, j].astype(np.int64)
                ok = (x >= 0) & (y >= 0) & (x != y)
                keys.append(np.minimum(x, y)[ok] * V + np.maximum(x, y)[ok])
                ranks.append(rank_col[ok])
        pk = np.unique(np.concatenate(keys) * n + np.concatenate(ranks)) if keys else np.empty(0, np.int64)
        self.pair_post = (pk % n).astype(np.int32)
        self.pair_keys, start = np.unique(pk // n, return_index=True)
        self.pair_indptr = np.append(start, len(pk)).astype(np.int64)
        self.V = V
        # Exact-name tier: documents whose whole name equals the query, by rank.
        by_text: dict[str, list[int]] = {}
        for d, t in enumerate(texts):
            by_text.setdefault(t, []).append(int(rank[d]))
        self.exact = {t: np.sort(np.array(r, dtype=np.int32)) for t, r in by_text.items()}
        self.cache: dict[str, list[int]] = {}

    def search(self, query: str, limit: int) -> list[int]:
        """Document indices matching `query` (already normalised), best first, at most `limit`."""
        key = query
        hit = self.cache.get(key)
        if hit is not None and (len(hit) >= limit or hit[-1:] == [-1]):
            return hit[:limit] if hit[-1:] != [-1] else hit[:-1][:limit]
        result = self._search(query, limit)
        if len(self.cache) >= _MAX_CACHE:
            self.cache.clear()
        # A trailing -1 marks "complete": fewer than `limit` documents match at all.
        self.cache[key] = result if len(result) >= limit else result + [-1]
        return result

    def _search(self, query: str, limit: int) -> list[int]:
        toks = query.split()
        if not toks:
            return []
        *exact, last = toks
        a = bisect.bisect_left(self.vocab, last)
        b = bisect.bisect_left(self.vocab, last + "\uffff")
        if a == b:
            return []
        ids = []
        for tok in exact:
            i = self.tok_id.get(tok)
            if i is None:
                return []
            ids.append(i)
        ids = sorted(set(ids))  # a repeated token is one condition
        exact_tier = self.exact.get(query, np.empty(0, dtype=np.int32))[:limit]
        need = limit - len(exact_tier)
        want = need + len(exact_tier)
        if len(ids) == 1:
            rest = self._pair_union(ids[0], a, b, want)
        elif ids:
            rest = self._filter(ids, a, b, want)
        else:
            # One prefix token: the best `limit` of the union of the matching tokens' lists.
            starts, ends = self.indptr[a:b], self.indptr[a + 1:b + 1]
            ends = np.minimum(ends, starts + limit + len(exact_tier))
            idx = np.concatenate([np.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())])
            rest = np.unique(self.post[idx])
        if not len(exact_tier):
            return self.order[rest[:need]].tolist()
        tier = exact_tier.tolist()
        seen = set(tier)
        ranks = tier + [r for r in rest.tolist() if r not in seen][:need]
        return self.order[ranks].tolist()

    def _pair_list(self, x: int, y: int) -> np.ndarray:
        key = min(x, y) * self.V + max(x, y)
        k = int(np.searchsorted(self.pair_keys, key))
        if k == len(self.pair_keys) or self.pair_keys[k] != key:
            return self.pair_post[:0]
        return self.pair_post[self.pair_indptr[k]:self.pair_indptr[k + 1]]

    def _pair_union(self, x: int, a: int, b: int, want: int) -> np.ndarray:
        """Best `want` ranks holding token x and a token in [a, b): the union of the pair
        lists' heads (each list is rank-sorted, so the union's head lies in theirs)."""
        r = np.arange(a, b, dtype=np.int64)
        r = r[r != x]
        keys = np.minimum(r, x) * self.V + np.maximum(r, x)
        ks = np.searchsorted(self.pair_keys, keys)
        ok = ks < len(self.pair_keys)
        ks, keys = ks[ok], keys[ok]
        ks = ks[self.pair_keys[ks] == keys]
        heads = [self.pair_post[self.pair_indptr[k]:min(self.pair_indptr[k + 1], self.pair_indptr[k] + want)]
                 for k in ks.tolist()]
        if a <= x < b:  # the query's own first token also satisfies the prefix
            heads.append(self.post[self.indptr[x]:min(self.indptr[x + 1], self.indptr[x] + want)])
        if not heads:
            return self.pair_post[:0]
        return np.unique(np.concatenate(heads))[:want]

    def _filter(self, ids: list[int], a: int, b: int, want: int) -> np.ndarray:
        """Ranks of documents holding every token in `ids` and a token in [a, b), the first
        `want` by rank, scanning the rarest token pair's list in growing chunks."""
        sizes = [self.indptr[i + 1] - self.indptr[i] for i in ids]
        by_size = [ids[i] for i in np.argsort(sizes, kind="stable")]
        x, y = by_size[0], by_size[1]
        others = by_size[2:]
        lst = self._pair_list(x, y)
        found: list[np.ndarray] = []
        n_found, start, chunk = 0, 0, max(256, 8 * want)
        while start < len(lst) and n_found < want:
            cand = lst[start:start + chunk]
            m = self.tokmat[cand]
            ok = ((m >= a) & (m < b)).any(axis=1)
            for i in others:
                ok &= (m == i).any(axis=1)
            cand = cand[ok]
            found.append(cand)
            n_found += len(cand)
            start += chunk
            chunk *= 4
        return np.concatenate(found)[:want] if found else np.empty(0, dtype=np.int32)
