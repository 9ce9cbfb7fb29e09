"""The document corpus in memory: `EX/VERSION/corpus/documents-*.tfrecord.gz` -> feature tensors.

Place in the data flow: reads one committed examples version (docs/contracts.md s.2) on any
URI through `trainer.data` / `ebr.storage`; the caller resolves `EX` to `EX/VERSION`.

Used for three things: exact-search evaluation over every document (`trainer.evaluate`),
resolving an example's `negative_doc_ids` into document features for the doc tower (offline
hard negatives, impressions), and drawing uniformly sampled documents for mixed negative
sampling (Yang et al. 2020) and the loss's embedding cache (`trainer.negatives`).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from ebr import features, storage
from trainer import data

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
    doc_ids: np.ndarray  # [N] str, row order
    features: dict[str, tf.Tensor]  # DOC_INPUTS: [N] or [N, width] strings, "" padded
    row_of: dict[str, int]
    source: str = ""
    probs: tf.Tensor | None = None  # [N] training sampling probability per row (logQ), if known
    _table: object = None

    @property
    def ids(self) -> tf.Tensor:
        """[N] doc ids as a string tensor (what `trainer.negatives.EmbeddingCache` reads)."""
        return self.features[features.DOC_ID]

    def __len__(self) -> int:
        return len(self.doc_ids)

    # --- in-graph access (inside the training step) -------------------------------------
    def lookup_table(self) -> tf.lookup.StaticHashTable:
        if self._table is None:
            self._table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(tf.constant(self.doc_ids.astype(str)),
                                                    tf.range(len(self), dtype=tf.int64)),
                default_value=-1)
        return self._table

    def rows(self, ids: tf.Tensor) -> tf.Tensor:
        """Doc ids (any shape) -> corpus rows, -1 for "" and unknown ids."""
        return self.lookup_table().lookup(ids)

    def gather(self, rows: tf.Tensor) -> dict[str, tf.Tensor]:
        """Document features of `rows` [M] (negative rows give row 0; mask them yourself)."""
        rows = tf.maximum(tf.reshape(rows, [-1]), 0)
        return {name: tf.gather(value, rows) for name, value in self.features.items()}

    # --- eager access (evaluation, cache refresh) ----------------------------------------
    def batches(self, batch_size: int):
        """Yield (start, features) slices of the corpus in row order."""
        for start in range(0, len(self), batch_size):
            yield start, {k: v[start:start + batch_size] for k, v in self.features.items()}

    def embed(self, doc_tower, batch_size: int = 4096) -> np.ndarray:
        """[N, D] float32 embeddings of every document by `doc_tower` (a Keras tower or any
        callable over feature dicts returning [B, D])."""
        call = tf.function(lambda x: doc_tower(x, training=False), reduce_retracing=True) \
            if isinstance(doc_tower, tf.keras.Model) else doc_tower
        out = [np.asarray(call(batch)) for _, batch in self.batches(batch_size)]
        return np.concatenate(out, axis=0).astype(np.float32)


def load_frequencies(corpus: Corpus, pattern: str) -> None:
    """Attach `probs` from `EX/VERSION/doc_frequencies-*.tsv` (doc_id, clicks, probability), any
    URI; documents never clicked in training get probability 0."""
    probs = np.zeros(len(corpus), np.float32)
    files = storage.glob(pattern)
    if not files:
        raise FileNotFoundError(f"no document frequency files match {pattern}")
    for path in files:
        try:
            text = storage.read_text(path)
        except UnicodeDecodeError as e:
            raise ValueError(f"read {path}: not UTF-8 text ({e.reason})") from None
        lines = text.split("\n")
        if lines and not lines[-1]:
            lines.pop()  # the newline ending the last line
        for lineno, line in enumerate(lines, 1):
            parts = line.split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}: line {lineno}: expected doc_id, clicks, probability")
            row = corpus.row_of.get(parts[0])
            if row is not None:
                try:
                    probs[row] = float(parts[2])
                except ValueError:
                    raise ValueError(f"{path}: line {lineno}: bad probability {parts[2]!r}") from None
    corpus.probs = tf.constant(probs)


def _pad_to(value: tf.Tensor, width: int) -> tf.Tensor:
    return tf.pad(value, [[0, 0], [0, width - int(value.shape[1])]], constant_values="")


def load_corpus(pattern_or_files, batch_size: int = 8192) -> Corpus:
    """Read every corpus document. Duplicate doc ids keep their first record (logged)."""
    files = data.list_files(pattern_or_files) if isinstance(pattern_or_files, str) else list(pattern_or_files)
    ds = data.make_dataset(files, batch_size, shuffle=False, names=features.DOC_INPUTS)
    chunks: dict[str, list] = {name: [] for name in features.DOC_INPUTS}
    with data.named_errors(files):
        for batch in ds:
            for name in features.DOC_INPUTS:
                chunks[name].append(batch[name])
    if not chunks[features.DOC_ID]:
        raise ValueError(f"corpus {pattern_or_files} holds no documents")
    feats = {}
    for name, parts in chunks.items():
        if len(parts[0].shape) == 2:
            width = max(int(p.shape[1]) for p in parts)
            parts = [_pad_to(p, width) for p in parts]
        feats[name] = tf.concat(parts, axis=0)
    ids = feats[features.DOC_ID].numpy().astype(object)
    ids = np.array([i.decode("utf-8") for i in ids], dtype=object)
    row_of: dict[str, int] = {}
    keep = []
    for row, doc_id in enumerate(ids):
        if doc_id == "":
            raise ValueError(f"corpus {pattern_or_files}: record {row} has an empty doc_id")
        if doc_id not in row_of:
            row_of[doc_id] = len(keep)
            keep.append(row)
    if len(keep) < len(ids):
        log.warning("corpus %s: %d duplicate doc ids ignored", pattern_or_files, len(ids) - len(keep))
        idx = tf.constant(keep, dtype=tf.int64)
        feats = {k: tf.gather(v, idx) for k, v in feats.items()}
        ids = ids[keep]
    log.info("corpus: %d documents from %d file(s)", len(ids), len(files))
    return Corpus(doc_ids=ids, features=feats, row_of=row_of, source=str(pattern_or_files))
