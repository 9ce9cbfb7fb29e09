"""A hand-written query tower written to the export contract (docs/contracts.md section 3):
query text hashed into a random table and L2-normalised, so tests know each query's embedding
independently of any training (ensembles, mining). Saved to a local staging directory and
published as `BASE/VERSION` (+ `_COMMITTED`) with `ebr.artifacts.publish_dir`."""
import json
import tempfile
from pathlib import Path

import numpy as np


def write_hashed_query_tower(version_dir: Path, dim: int, seed: int, buckets: int,
                             model_name: str = "query_tower") -> Path:
    """Publishes the tower as `version_dir` (BASE/VERSION, committed); returns `version_dir`."""
    import tensorflow as tf

    from ebr import artifacts, features

    module = tf.Module()
    module.table = tf.Variable(np.random.default_rng(seed).normal(size=(buckets, dim)).astype("float32"))
    spec = {n: tf.TensorSpec([None, None] if features.BY_NAME[n].kind == features.MULTI else [None],
                             tf.string, name=n) for n in features.QUERY_INPUTS}

    @tf.function(input_signature=[spec])
    def serve(inputs):
        rows = tf.strings.to_hash_bucket_fast(inputs[features.QUERY_TEXT], buckets)
        return {"embedding": tf.math.l2_normalize(tf.gather(module.table, rows), axis=-1)}

    with tempfile.TemporaryDirectory(prefix="ebr-tower-") as staging:
        tf.saved_model.save(module, staging, signatures={"serving_default": serve.get_concrete_function()})
        (Path(staging) / artifacts.MODEL_METADATA).write_text(json.dumps(
            {"model_name": model_name, "version": int(version_dir.name), "dimension": dim,
             "schema_hash": features.schema_hash(), "config": {}, "metrics": {}, "created": ""}))
        artifacts.publish_dir(staging, str(Path(version_dir).parent), version=int(version_dir.name),
                              last=(artifacts.MODEL_METADATA, artifacts.SAVED_MODEL),
                              info={"model_name": model_name})
    return version_dir
