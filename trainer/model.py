"""The unified embedding model (paper section 3): a `tfrs.Model` over the two towers.

`compute_loss` embeds the query side and the clicked document of each example, optionally the
example's extra negatives (`negative_doc_ids`, resolved through the in-memory corpus: offline
hard negatives and impressions) and uniformly sampled corpus documents (MNS), then hands all of
it to `trainer.losses.RetrievalLoss`, which owns the softmax / triplet losses, logQ and the
negative-sampling state (queue, cache, frequency estimator).
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from ebr import features
from trainer.config import TrainConfig
from trainer.corpus import Corpus
from trainer.losses import RetrievalLoss
from trainer.towers import build_towers


def make_optimizer(config: TrainConfig) -> tf.keras.optimizers.Optimizer:
    return {"adam": tf.keras.optimizers.Adam, "adagrad": tf.keras.optimizers.Adagrad,
            "sgd": tf.keras.optimizers.SGD}[config.optimizer](learning_rate=config.learning_rate)


class UnifiedEmbeddingModel(tfrs.Model):
    def __init__(self, config: TrainConfig, corpus: Corpus | None = None,
                 corpus_size: int | None = None, extra_negatives: bool = False):
        super().__init__()
        self.config = config
        self.query_tower, self.doc_tower = build_towers(config)
        self.corpus = corpus
        size = corpus_size or (len(corpus) if corpus is not None else 0)
        if size <= 0:
            raise ValueError("UnifiedEmbeddingModel needs the corpus or its size (for MNS / logQ)")
        self.loss_layer = RetrievalLoss(config.loss, size, embedding_dim=config.embedding_dim)
        self.extra_negatives = bool(extra_negatives and corpus is not None)
        self.mixed_from_tower = int(self.loss_layer.needs_mixed_from_tower)
        if self.mixed_from_tower and corpus is None:
            raise ValueError("mixed negative sampling through the doc tower needs the corpus")
        if getattr(self.loss_layer, "cache", None) is not None and corpus is None:
            raise ValueError("the mixed-negative embedding cache needs the corpus")

    def call(self, inputs: dict, training: bool = False):
        return (self.query_tower(self.query_tower.select(inputs), training=training),
                self.doc_tower(self.doc_tower.select(inputs), training=training))

    def _embed_docs(self, rows: tf.Tensor, training: bool) -> tf.Tensor:
        return self.doc_tower(self.doc_tower.select(self.corpus.gather(rows)), training=training)

    def compute_loss(self, inputs: dict, training: bool = False) -> tf.Tensor:
        query, pos = self(inputs, training=training)
        kwargs = {}
        if self.extra_negatives and features.NEGATIVE_DOC_IDS in inputs:
            ids = inputs[features.NEGATIVE_DOC_IDS]  # [B, K] padded with ""
            rows = self.corpus.rows(ids)
            known = rows >= 0
            emb = self._embed_docs(tf.reshape(rows, [-1]), training)
            emb = tf.reshape(emb, tf.concat([tf.shape(ids), [-1]], 0))
            # Ids missing from the corpus become padding: the loss ignores "" columns.
            kwargs["extra_neg_emb"] = emb * tf.cast(known, emb.dtype)[..., None]
            kwargs["extra_neg_ids"] = tf.where(known, ids, "")
        if self.mixed_from_tower:
            rows = tf.random.uniform([self.mixed_from_tower], 0, len(self.corpus), dtype=tf.int64)
            feats = self.corpus.gather(rows)
            kwargs["mixed_emb"] = self.doc_tower(self.doc_tower.select(feats), training=training)
            kwargs["mixed_ids"] = feats[features.DOC_ID]
            if self.corpus.probs is not None:
                # a uniformly drawn doc also appears in-batch with its click probability: the
                # loss needs it for the mixture's logQ (MNS, Yang et al. 2020)
                kwargs["mixed_prob"] = tf.gather(self.corpus.probs, rows)
        cache = getattr(self.loss_layer, "cache", None)
        if cache is not None and training:
            cache.maybe_refresh(self.optimizer.iterations, self.doc_tower, self.corpus)
        return self.loss_layer(query, pos, inputs[features.DOC_ID],
                               inputs[features.DOC_SAMPLING_PROB], training=training, **kwargs)
