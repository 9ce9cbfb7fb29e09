"""Training-set variants cut from another variant without a second pipeline run.

Place in the data flow: an examples artifact mined with easy:hard 0:1 (every example carries
offline hard negatives, `beam_pipelines.mine_negatives`) -> `restrict_ratio` -> a new version of
another examples artifact (docs/contracts.md 2) that the seed run trains on. The other variants
(impression negatives and positives, hard positives) are Beam pipelines of
`experiments/ablations.py`.
"""
from __future__ import annotations

from ebr import features, storage
from beam_pipelines import mining


def _rewrite_tfrecords(src_dir: str, dst_dir: str, fn) -> int:
    """Every `*.tfrecord.gz` of `src_dir` through `fn` (parsed example -> example or None) into
    a file of the same name in `dst_dir` (any URIs: tf.io writes through tf.io.gfile)."""
    import tensorflow as tf

    n = 0
    for path in storage.glob(storage.join(src_dir, "*.tfrecord.gz")):
        storage.makedirs(dst_dir)  # local disk needs the directory; gs:// has none
        out = storage.join(dst_dir, storage.basename(path))
        with tf.io.TFRecordWriter(out, tf.io.TFRecordOptions(compression_type="GZIP")) as w:
            for rec in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                ex = fn(features.parse_example(rec.numpy()))
                if ex is not None:
                    w.write(features.make_example(ex))
                    n += 1
    return n


def restrict_ratio(mined_all: str, output: str, ratio: str, seed: int) -> str:
    """From a run mined with ratio 0:1 (every example carries hard negatives), the same run at
    `ratio`: examples the ratio does not select lose their mined negatives. Exactly what
    `ebr mine-negatives --set mining.ratio=RATIO` writes (same selection hash, same per-example
    RNG), at the cost of one mining pass for all ratios.

    `mined_all` is the examples artifact of that run (`BASE` or `BASE/VERSION`); the result is
    committed as a new version of the examples artifact `output` (any URI; commit marker
    last); returns its version directory."""
    from beam_pipelines import outputs
    from beam_pipelines.mine_negatives import SUMMARY, carry_parts, example_key
    from experiments.ablations import resolve_examples

    src = resolve_examples(mined_all)

    def keep(ex):
        if not mining.carries_hard_negatives(example_key(ex), ratio, seed):
            ex = {k: v for k, v in ex.items() if k != features.NEGATIVE_DOC_IDS}
        return ex

    with outputs.NewVersion(output, "examples") as out:
        n = _rewrite_tfrecords(storage.join(src, "train"), out.path("train"), keep)
        carry_parts(src, out.dir)
        if storage.exists(storage.join(src, SUMMARY)):  # the mining run's configuration
            storage.copy_file(storage.join(src, SUMMARY), out.path(SUMMARY))
        out.commit({}, {"schema_hash": features.schema_hash(), "derived_from": src,
                        "restricted_to_ratio": ratio, "seed": seed, "train_examples": n})
    return out.dir


