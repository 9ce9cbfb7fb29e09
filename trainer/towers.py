"""The two towers of the unified embedding model (paper section 3.1, 4.1-4.2).

Each tower is a Keras model over a dict of raw string tensors (names from `ebr.features`):
scalar kinds [B], MULTI kinds [B, N] padded with "". Features that name the same `table` in the
schema share one embedding table, also across towers: searcher friends and document members
share the "entity" table so mutual connections show up in the dot product (paper 4.2), and the
history of clicked documents shares the document-id table. Text tables are shared between the
towers when `share_text_tables` is set. Output: MLP, then L2 normalisation (cosine similarity).
"""
from __future__ import annotations

import tensorflow as tf

from ebr import features
from trainer import featurize
from trainer.config import TrainConfig, table_buckets

_INIT_STDDEV = 0.05


class HashedEmbedding(tf.keras.layers.Layer):
    """One embedding table over hashed strings; "" means "no value" and embeds to zeros."""

    def __init__(self, buckets: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.buckets, self.dim = int(buckets), int(dim)
        # Created here, not in build(): the table is shared by layers of both towers.
        self.table = self.add_weight(
            name=f"{self.name}_embeddings", shape=(self.buckets, self.dim),
            initializer=tf.keras.initializers.TruncatedNormal(stddev=_INIT_STDDEV))

    def call(self, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Strings [...] -> (embeddings [..., dim] zeroed where "", mask [...] float)."""
        mask = tf.cast(tf.not_equal(values, ""), tf.float32)
        ids = tf.strings.to_hash_bucket_fast(values, self.buckets)
        return tf.gather(self.table, ids) * mask[..., None], mask


def _mean_pool(emb: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """[B, N, E] masked by [B, N] -> [B, E]; rows without values give zeros, not NaN."""
    count = tf.reduce_sum(mask, axis=1, keepdims=True)
    return tf.reduce_sum(emb, axis=1) / tf.maximum(count, 1.0)


class TextEmbedding(tf.keras.layers.Layer):
    """Raw text [B] -> mean of char 3-gram embeddings ++ mean of word uni/bigram embeddings."""

    def __init__(self, dim: int, char_buckets: int, word_buckets: int, **kwargs):
        super().__init__(**kwargs)
        self.char_buckets, self.word_buckets = char_buckets, word_buckets
        def init():  # a fresh initializer per table: one instance would repeat its values
            return tf.keras.initializers.TruncatedNormal(stddev=_INIT_STDDEV)
        self.char_table = self.add_weight(name=f"{self.name}_char_ngrams", shape=(char_buckets, dim),
                                          initializer=init())
        self.word_table = self.add_weight(name=f"{self.name}_word_ngrams", shape=(word_buckets, dim),
                                          initializer=init())

    @staticmethod
    def _pool(table: tf.Variable, ids: tf.RaggedTensor) -> tf.Tensor:
        emb = ids.with_flat_values(tf.gather(table, ids.flat_values))  # [B, None, dim]
        count = tf.cast(ids.row_lengths(), tf.float32)[:, None]
        return tf.reduce_sum(emb, axis=1) / tf.maximum(count, 1.0)  # empty text -> zeros

    def call(self, text: tf.Tensor) -> tf.Tensor:
        chars, words = featurize.text_ids(text, self.char_buckets, self.word_buckets)
        return tf.concat([self._pool(self.char_table, chars), self._pool(self.word_table, words)], -1)


def build_tables(config: TrainConfig) -> dict[str, HashedEmbedding]:
    """One `HashedEmbedding` per schema table (`trainer.config.table_buckets`)."""
    return {key: HashedEmbedding(n, config.feature_dim, name=f"table_{key}")
            for key, n in table_buckets(config.hash_bucket_cap).items()}


def build_text_layers(config: TrainConfig) -> tuple[TextEmbedding, TextEmbedding]:
    """(query text layer, document text layer): the same object when tables are shared."""
    def make(name):
        return TextEmbedding(config.text_dim, config.text_char_buckets, config.text_word_buckets, name=name)
    if config.share_text_tables:
        shared = make("text_shared")
        return shared, shared
    return make("text_query"), make("text_doc")


class Tower(tf.keras.Model):
    """One side (QUERY or DOCUMENT) of the two-tower model."""

    def __init__(self, side: str, config: TrainConfig, tables: dict[str, HashedEmbedding],
                 text: TextEmbedding, **kwargs):
        super().__init__(**kwargs)
        self.side = side
        # Every input of the side is accepted (the serving signature is the schema's); only
        # `config.tower_features` (all when empty) are embedded.
        self.input_names = tuple(f.name for f in features.features(side))
        self.feature_specs = tuple(f for f in features.features(side)
                                   if not config.tower_features or f.name in config.tower_features)
        self.feature_names = tuple(f.name for f in self.feature_specs)
        self.tables = {f.name: tables[f.table or f.name] for f in self.feature_specs
                       if f.kind in (features.CATEGORICAL, features.MULTI)}
        self.text = text
        self.history_attention = (config.history_attention and side == features.QUERY
                                  and features.HISTORY_DOC_IDS in self.feature_names)
        if self.history_attention:
            # Attention query from the query text only, so the towers stay decoupled.
            self.attention_query = tf.keras.layers.Dense(config.feature_dim, use_bias=False,
                                                         name="history_attention_query")
        self.mlp = tf.keras.Sequential(
            [tf.keras.layers.Dense(u, activation="relu") for u in config.hidden_units]
            + [tf.keras.layers.Dense(config.embedding_dim)], name="mlp")

    def _attend(self, text_emb: tf.Tensor, emb: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        q = self.attention_query(text_emb)  # [B, E]
        scale = tf.math.rsqrt(tf.cast(tf.shape(q)[-1], tf.float32))
        scores = tf.einsum("be,bne->bn", q, emb) * scale
        scores = scores - tf.stop_gradient(tf.reduce_max(scores - 1e9 * (1.0 - mask), 1, keepdims=True))
        weights = tf.exp(tf.minimum(scores, 0.0)) * mask  # empty history -> all-zero weights
        weights = weights / tf.maximum(tf.reduce_sum(weights, 1, keepdims=True), 1e-9)
        return tf.einsum("bn,bne->be", weights, emb)

    def select(self, inputs: dict) -> dict:
        """This tower's inputs out of a batch holding both sides (a fixed key set for Keras)."""
        return {name: inputs[name] for name in self.input_names}

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        parts, text_emb = [], None
        for f in self.feature_specs:
            if f.kind == features.TEXT:
                text_emb = self.text(tf.reshape(inputs[f.name], [-1]))
                parts.append(text_emb)
        for f in self.feature_specs:
            x = inputs[f.name]
            if f.kind == features.CATEGORICAL:
                emb, _ = self.tables[f.name](tf.reshape(x, [-1]))
                parts.append(emb)
            elif f.kind == features.MULTI:
                emb, mask = self.tables[f.name](x)
                parts.append(_mean_pool(emb, mask))
                if (f.name == features.HISTORY_DOC_IDS and self.history_attention
                        and text_emb is not None):
                    parts.append(self._attend(text_emb, emb, mask))
            elif f.kind == features.NUMERIC:
                value = tf.strings.to_number(tf.where(x == "", "0", x), tf.float32)
                parts.append(tf.reshape(value, [-1, 1]))
        out = self.mlp(tf.concat(parts, axis=-1), training=training)
        return tf.math.l2_normalize(out, axis=-1)


def build_towers(config: TrainConfig) -> tuple[Tower, Tower]:
    """(query tower, doc tower) sharing the schema's tables (and text tables if configured)."""
    tables = build_tables(config)
    q_text, d_text = build_text_layers(config)
    return (Tower(features.QUERY, config, tables, q_text, name="query_tower"),
            Tower(features.DOCUMENT, config, tables, d_text, name="doc_tower"))
