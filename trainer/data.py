"""tf.data input of the trainer: GZIP TFRecords of `ebr pipeline examples` -> feature dicts.

Place in the data flow: reads the files of one committed examples version (docs/contracts.md
s.2; the caller resolves `EX` to `EX/VERSION` with `ebr.artifacts.resolve`) on any URI: file
patterns are matched with `ebr.storage.glob` (tf.io.gfile) and read by tf.data, local and gs://
alike.

The parse spec is derived from `ebr.features.SCHEMA` (never spelled here): scalar strings as
[B], MULTI / multi-valued ids as dense [B, N] padded with "" (the serving signature's layout),
labels as float / int64. Reads are interleaved across files in parallel and prefetched.

TensorFlow's own error for a corrupt file does not say which file: `locate_bad_record` scans the
files one by one after a failure and returns the file and record number, so the job can say
exactly what is broken.
"""
from __future__ import annotations

import contextlib
import logging
import re

import tensorflow as tf

from ebr import features, storage

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad training input; the message names the file (and record)."""


def list_files(pattern: str) -> list[str]:
    files = storage.glob(pattern)
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern}")
    return files


def _is_multi(f: features.Feature) -> bool:
    return f.kind == features.MULTI or f.max_values > 0


def parse_spec(names: tuple[str, ...] | None = None) -> dict:
    """`tf.io.parse_example` spec for the schema features (or the given names)."""
    spec = {}
    for f in features.SCHEMA:
        if names is not None and f.name not in names:
            continue
        dtype = {"string": tf.string, "int64": tf.int64, "float32": tf.float32}[f.dtype]
        if _is_multi(f):
            spec[f.name] = tf.io.VarLenFeature(dtype)
        else:
            default = f.default if f.dtype != "string" else str(f.default)
            spec[f.name] = tf.io.FixedLenFeature([], dtype, default_value=default)
    return spec


def parse_batch(serialized: tf.Tensor, names: tuple[str, ...] | None = None) -> dict:
    """Serialized Examples [B] -> dict of dense tensors (MULTI padded with "" to the batch max)."""
    parsed = tf.io.parse_example(serialized, parse_spec(names))
    out = {}
    for name, value in parsed.items():
        if isinstance(value, tf.sparse.SparseTensor):
            # At least one column, so a batch where nobody has a value still has shape [B, 1].
            dense = tf.sparse.to_dense(value, default_value="" if value.dtype == tf.string else 0)
            pad = tf.maximum(1 - tf.shape(dense)[1], 0)
            dense = tf.pad(dense, [[0, 0], [0, pad]], constant_values="" if value.dtype == tf.string else 0)
            out[name] = dense
        else:
            out[name] = value
    return out


def make_dataset(pattern_or_files, batch_size: int, *, shuffle: bool = True, repeat: bool = False,
                 seed: int = 42, shuffle_buffer: int = 10_000, names: tuple[str, ...] | None = None,
                 drop_remainder: bool = False) -> tf.data.Dataset:
    """Batched, parsed, prefetched dataset over GZIP TFRecord files."""
    files = list_files(pattern_or_files) if isinstance(pattern_or_files, str) else list(pattern_or_files)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                       cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=not shuffle)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda s: parse_batch(s, names), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Under MultiWorkerMirroredStrategy shard by record, not file: pipelines may write fewer
    # shards than there are workers, and every worker needs data.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _cause(error: Exception) -> str:
    """The informative line of a TF graph error ("corrupted record at 884801", "Could not parse
    example input, ..."), without the header, node names and stack."""
    lines = [ln.strip() for ln in (getattr(error, "message", None) or str(error)).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("Graph execution error", "Detected at node",
                                                              "<stack traces", "File ", "[["))]
    text = lines[-1] if lines else type(error).__name__
    text = re.sub(r"^.*(ParallelMapV2|MapDataset\S*)(:\S*)*:\s*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text)


def _prefix_checker(spec: dict):
    """f(path, k) -> error text or None: read and parse the first k records (k < 0: all).
    One traced function for every call (tracing a new pipeline per probe is the slow part)."""
    @tf.function
    def count(path, k):
        ds = tf.data.TFRecordDataset(path, compression_type="GZIP").take(k).batch(512)
        ds = ds.map(lambda b: tf.shape(tf.io.parse_example(b, spec)[features.QUERY_TEXT])[0])
        return ds.reduce(tf.constant(0), lambda n, m: n + m)

    def check(path: str, k: int) -> str | None:
        try:
            count(tf.constant(path), tf.constant(k, tf.int64))
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
            return _cause(e)
        return None
    return check


def locate_bad_record(files: list[str]) -> str | None:
    """First unreadable or unparsable record among `files`, as "FILE: record N: reason".

    A whole-file check in-graph, then (only for a bad file) a binary search on the longest good
    prefix, so even a large file is located in O(log N) fast passes."""
    check = _prefix_checker(parse_spec())
    for path in files:
        if not storage.exists(path):
            return f"{path}: file does not exist"
        reason = check(path, -1)
        if reason is None:
            continue
        good, bad = 0, 1  # invariant: first `good` records fine, first `bad` records not
        while check(path, bad) is None:
            good, bad = bad, bad * 2
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if check(path, mid) is None else (good, mid)
        return f"{path}: record {good}: {check(path, bad) or reason}"
    return None


@contextlib.contextmanager
def named_errors(files: list[str]):
    """Turn TensorFlow's anonymous read / parse errors over `files` into a DataError naming the
    bad file and record (errors that are not about the data pass through unchanged)."""
    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        where = locate_bad_record(files)
        if where is None:
            raise
        raise DataError(f"corrupt training input: {where}") from None
