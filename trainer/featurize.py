"""In-graph text featurisation shared by both towers (paper section 4.1).

Raw query / document text -> hashed character 3-grams (with '#' word-boundary marks, robust to
typos) and hashed word unigrams + bigrams (+1.5% recall in the paper despite collisions). Only
stock `tf.strings` ops, so the exported towers take raw strings and TF Serving needs nothing
custom. `ebr.features.normalize_text` is the Python twin of `normalize`.
"""
from __future__ import annotations

import tensorflow as tf

from ebr import features


def normalize(text: tf.Tensor) -> tf.Tensor:
    """Lower-case (UTF-8 aware) and collapse whitespace, as `features.normalize_text`."""
    text = tf.strings.lower(text, encoding="utf-8")
    text = tf.strings.regex_replace(text, r"\s+", " ")
    return tf.strings.strip(text)


def words(text: tf.Tensor) -> tf.RaggedTensor:
    """[B] raw text -> ragged [B, W] normalised words (empty text -> no words)."""
    # No `sep`: whitespace splitting drops empty tokens, so "" has no words at all.
    return tf.strings.split(normalize(text))


def char_ngrams(word_tokens: tf.RaggedTensor, n: int = features.TEXT_CHAR_NGRAM) -> tf.RaggedTensor:
    """Ragged [B, W] words -> ragged [B, G] character n-grams of '#word#' (word-boundary marks)."""
    marked = tf.strings.join(["#", word_tokens, "#"])
    chars = tf.strings.unicode_split(marked, "UTF-8")  # [B, W, C]
    grams = tf.strings.ngrams(chars, ngram_width=n, separator="")  # [B, W, G]
    return grams.merge_dims(1, 2)


def word_ngrams(word_tokens: tf.RaggedTensor) -> tf.RaggedTensor:
    """Ragged [B, W] words -> ragged [B, U] word unigrams and bigrams."""
    return tf.strings.ngrams(word_tokens, ngram_width=(1, 2), separator=" ")


def text_ids(text: tf.Tensor, char_buckets: int = features.TEXT_CHAR_BUCKETS,
             word_buckets: int = features.TEXT_WORD_BUCKETS) -> tuple[tf.RaggedTensor, tf.RaggedTensor]:
    """[B] raw strings -> (char 3-gram ids [B, G], word n-gram ids [B, U]) as ragged int64."""
    tokens = words(text)
    chars = tf.strings.to_hash_bucket_fast(char_ngrams(tokens), char_buckets)
    grams = tf.strings.to_hash_bucket_fast(word_ngrams(tokens), word_buckets)
    return chars, grams
