"""The cascade ensemble evaluated offline (paper section 6.2; experiment 7 of the paper tables).

Place in the data flow: after training a text-only and a unified model and embedding the
held-out queries and the corpus with both, `Cascade` runs the two stages over whole batches of
query embeddings: the text-only model's index retrieves the top `n`, the unified model re-scores
them (`serving.retrieval.ensembles.cascade_rescore`) and keeps the top `k`. The same ensembles
at serving time, and the weighted concatenation, live in `serving.retrieval.ensembles`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from serving.retrieval.ensembles import cascade_rescore


@dataclasses.dataclass
class Cascade:
    """Text-only model retrieves top `n`, unified model re-scores and keeps top `k`.

    `first_stage(queries, n)` returns each query's top `n` doc ids (e.g.
    `index.open_index(...).search(queries, n).doc_ids`); `doc_lookup(ids)` the unified model's
    document embeddings (e.g. an `EmbeddingTable`)."""
    first_stage: Callable[[np.ndarray, int], Sequence[Sequence[str]]]
    doc_lookup: Callable[[Sequence[str]], np.ndarray]
    n: int = 500

    def search(self, first_queries: np.ndarray, second_queries: np.ndarray,
               k: int) -> tuple[list[list[str]], list[np.ndarray]]:
        """`first_queries` / `second_queries`: the batch embedded by each model."""
        if k > self.n:
            raise ValueError(f"cascade keeps k={k} of the first stage's n={self.n}: need k <= n")
        candidates = self.first_stage(np.asarray(first_queries, np.float32), self.n)
        return cascade_rescore(candidates, second_queries, self.doc_lookup, k)
