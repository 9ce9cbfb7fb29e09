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
