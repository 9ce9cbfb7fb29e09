"""Shared small synthetic corpus for the index tests (clustered, unit-norm, d=32)."""
import numpy as np

N, NQ, DIM = 10_000, 200, 32


def corpus(seed: int = 0):
    from index.synthetic import mixture

    return mixture(N, NQ, DIM, seed=seed)


def brute_force(X, Q, k, mask=None):
    S = Q @ X.T
    if mask is not None:
        S = np.where(mask[None, :], S, -np.inf)
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, order, 1), order


SELECTIVITIES = (0.001, 0.01, 0.1, 0.5)


def filtered_corpus(n: int = 20_000, nq: int = 100, dim: int = DIM, seed: int = 0):
    """The mixture corpus plus, for each selectivity of SELECTIVITIES, a filter on exactly that
    share of the documents, correlated with the clusters ("c", as cities are) and not ("u")
    (`index.synthetic.selectivity_terms`). -> (ids, X, terms, Q, {(s, "c"|"u"): expression})."""
    from index.synthetic import mixture, selectivity_terms

    ids, X, terms, Q = mixture(n, nq, dim, seed=seed)
    extra, exprs = selectivity_terms(X, SELECTIVITIES, seed=seed + 1)
    return ids, X, [t + e for t, e in zip(terms, extra)], Q, exprs


def filtered_truth(X, Q, mask, k=None, radius=None):
    """Exact filtered results per query: top-k ids, or every id scoring >= radius."""
    S = np.where(mask[None, :], Q @ X.T, -np.inf)
    out = []
    for row in S:
        if radius is None:
            top = np.argsort(-row, kind="stable")[:k]
            out.append(top[np.isfinite(row[top])])
        else:
            out.append(np.nonzero(row >= radius)[0])
    return out
