"""Export of the two towers as SavedModels that stock TF Serving loads (docs/contracts.md s.3).

Place in the data flow: the last step of `trainer.task` (training -> towers), read by evaluation
(`trainer.evaluate`), batch embedding (`ebr embed`), the model server and the retrieval service.

`MODEL_DIR/{query_tower,doc_tower}/VERSION/` on any URI (local or gs://) with a
`serving_default` signature taking every tower input by its schema name as raw strings (scalar
kinds [B], MULTI kinds [B, N] padded with "") and returning `embedding` float32 [B, D],
L2-normalised; `ebr_metadata.json` (and the training run's `config.json`) beside it and the
commit marker `_COMMITTED` last. Each tower is saved into a local staging directory, its graph
checked for TFRS / ScaNN / py_function ops, then both are published as one version by
`ebr.artifacts.publish_towers` (saved_model.pb last in each, the query tower's commit marker
last of all): a reader (or a kill) never sees a half pair. `load_tower` is the checked loader; it takes a tower base (newest committed version) or a
version directory on any URI (tf.saved_model.load reads gs:// itself).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile

import numpy as np
import tensorflow as tf

from ebr import artifacts, features, storage
from ebr import config as ebr_config

log = logging.getLogger(__name__)

TOWERS = {"query_tower": (features.QUERY, features.QUERY_INPUTS),
          "doc_tower": (features.DOCUMENT, features.DOC_INPUTS)}
# Ops stock TF Serving cannot run: ScaNN's are a custom-op library of the scann package
# (google-research/google-research scann/scann/scann_ops/cc/ops/scann_ops.cc) that TFRS's ScaNN
# layer calls (tensorflow/recommenders tensorflow_recommenders/layers/factorized_top_k.py), and a
# py_function's body is Python, not a graph (tensorflow/python/ops/script_ops.py).
FORBIDDEN_OP_MARKERS = ("Scann", "PyFunc", "EagerPyFunc", "Recommenders", "Tfrs")


class ExportError(ValueError):
    """A tower directory is missing, incomplete or does not match this schema."""


def input_specs(names: tuple[str, ...]) -> dict[str, tf.TensorSpec]:
    specs = {}
    for name in names:
        f = features.BY_NAME[name]
        shape = [None, None] if f.kind == features.MULTI else [None]
        specs[name] = tf.TensorSpec(shape, tf.string, name=name)
    return specs


def next_version(model_dir: str) -> int:
    """One more than any version directory of either tower under `model_dir` (1 when empty)."""
    return artifacts.next_version(*(artifacts.tower_base(model_dir, name) for name in TOWERS))


def exported_op_types(path: str) -> set[str]:
    """Every op type in a SavedModel's graphs, including its function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString(storage.read_bytes(storage.join(path, artifacts.SAVED_MODEL)))
    ops = set()
    for mg in sm.meta_graphs:
        ops.update(n.op for n in mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return ops


def check_ops(path: str) -> None:
    bad = sorted(op for op in exported_op_types(path)
                 if any(m.lower() in op.lower() for m in FORBIDDEN_OP_MARKERS))
    if bad:
        raise ExportError(f"{path}: exported graph holds ops stock TF Serving cannot run: {bad}")


def tower_root(tower) -> tf.Module:
    """The root object a tower's SavedModel is saved from: its variables, in `tower.variables`
    order, under `tower_variables`. Only the variables are tracked: the serving signature is
    the whole serving graph (no Keras call traces, no training-only layers such as the loss and
    its negative-sampling state). `restore_tower` reads an export back through the same object."""
    module = tf.Module()
    module.tower_variables = list(tower.variables)
    return module


def _save_tower(tower, names: tuple[str, ...], path: str) -> None:
    module = tower_root(tower)

    @tf.function
    def serve(**inputs):
        return {"embedding": tf.cast(tower(inputs, training=False), tf.float32)}

    concrete = serve.get_concrete_function(**input_specs(names))
    tf.saved_model.save(module, path, signatures={"serving_default": concrete})


def export_towers(model, model_dir: str, version: int | None = None, metadata: dict | None = None,
                  train_config=None) -> dict[str, str]:
    """Publish `model.query_tower` and `model.doc_tower` under `model_dir` (any URI) as one
    committed version; returns name -> version directory.

    `metadata` adds keys such as "config" and "metrics" to ebr_metadata.json; `train_config` (the
    run's resolved `TrainConfig`) is written beside it as config.json (`ebr.config.save`) before
    the version is committed; `version` None or 0 picks `next_version(model_dir)`. A committed
    version is never overwritten; leftovers of an interrupted export (uncommitted, or committed
    by one tower only) are removed first.
    """
    model_dir = storage.normalize(model_dir)
    version = int(version or next_version(model_dir))
    if version <= 0:
        raise ValueError(f"export version must be a positive integer, got {version}")
    for name in TOWERS:
        final = storage.join(artifacts.tower_base(model_dir, name), version)
        if artifacts.is_committed(final):
            raise ExportError(f"{final} already exists; versions are immutable, pick a new one")
    with tempfile.TemporaryDirectory(prefix=f"ebr-export-{version}-") as staging:
        staged = {}
        for name in artifacts.TOWERS:
            side, names = TOWERS[name]
            tower = getattr(model, name)
            local = os.path.join(staging, name)
            _save_tower(tower, names, local)
            check_ops(local)
            meta = {"model_name": name, "version": version,
                    "dimension": int(tower.mlp.layers[-1].units), "schema_hash": features.schema_hash(),
                    "inputs": list(names), "config": {}, "metrics": {},
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
            meta.update({k: v for k, v in (metadata or {}).items()
                         if k not in ("model_name", "version", "dimension", "schema_hash")})
            with open(os.path.join(local, artifacts.MODEL_METADATA), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True, default=str)
            if train_config is not None:
                ebr_config.save(train_config, local)
            staged[name] = local
        try:
            dirs = artifacts.publish_towers(staged, model_dir, version)
        except artifacts.ArtifactError as e:
            raise ExportError(str(e)) from None
    for name, path in dirs.items():
        log.info("exported %s version %d to %s", name, version, path)
    return {name: dirs[name] for name in TOWERS}


def exported_variables(version_dir: str) -> list[tuple[str, list[int]]]:
    """(name, shape) of each variable of a tower export, in `tower_root` order, from the object
    graph of its saved_model.pb (tensorflow/core/protobuf/saved_object_graph.proto)."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString(storage.read_bytes(storage.join(version_dir, artifacts.SAVED_MODEL)))
    nodes = sm.meta_graphs[0].object_graph_def.nodes

    def child(node, name):
        for ref in node.children:
            if ref.local_name == name:
                return nodes[ref.node_id]
        raise ExportError(f"{version_dir}: the SavedModel's root has no {name!r}: not saved by "
                          f"trainer.export (tower_root)")

    listed = child(nodes[0], "tower_variables")
    out = []
    for i in range(len(listed.children)):
        var = child(listed, str(i)).variable
        out.append((var.name, [int(d.size) for d in var.shape.dim]))
    return out


def restore_tower(tower, version_dir: str) -> int:
    """Assign a tower's variables from an export's `VERSION/variables/variables` (any URI, read
    by TensorFlow's file systems): a `tf.train.Checkpoint` over `tower_root(tower)`, the object
    the export was saved from, so each variable is matched by its place in `tower_variables`.
    Call it after the variables are built (inside the distribution strategy's scope when
    there is one). Returns how many variables were restored; a different number of variables
    or a different shape is an `ExportError` naming the variable."""
    mine = list(tower.variables)
    theirs = exported_variables(version_dir)
    for i, var in enumerate(mine):
        if i >= len(theirs):
            raise ExportError(f"{version_dir}: the export has {len(theirs)} variables, this "
                              f"{tower.name} has {len(mine)}; {var.name} has no counterpart")
        name, shape = theirs[i]
        if list(var.shape) != shape:
            raise ExportError(f"{version_dir}: variable {var.name} has shape {list(var.shape)} here "
                              f"but {shape} in the export (its {name})")
    if len(theirs) > len(mine):
        raise ExportError(f"{version_dir}: the export has {len(theirs)} variables, this "
                          f"{tower.name} has {len(mine)}; the export's {theirs[len(mine)][0]} "
                          f"has no counterpart")
    prefix = storage.join(version_dir, "variables", "variables")
    status = tf.train.Checkpoint(root=tower_root(tower)).read(prefix)
    try:
        # Every variable of ours and every value of the export matched: the export's only other
        # object, its signature map, holds no state, so no `expect_partial` is needed.
        status.assert_consumed()
    except AssertionError as e:
        raise ExportError(f"{prefix}: does not match this {tower.name}'s variables: {e}") from None
    return len(mine)


def read_metadata(version_dir: str) -> dict:
    """`ebr_metadata.json` of a committed tower version, checked against this code's schema."""
    try:
        return artifacts.read_model_metadata(version_dir, features.schema_hash())
    except artifacts.ArtifactError as e:
        raise ExportError(str(e)) from None


class LoadedTower:
    """An exported tower: call it with a dict of numpy / list inputs, get float32 [B, D]."""

    def __init__(self, path: str):
        try:
            self.path = artifacts.resolve(path, "tower")
        except (artifacts.ArtifactError, storage.StorageError) as e:
            raise ExportError(str(e)) from None
        self.metadata = read_metadata(self.path)
        try:
            self._saved = tf.saved_model.load(self.path)
        except Exception as e:  # noqa: BLE001 - TF raises many types for a broken SavedModel
            raise ExportError(f"{self.path}: cannot load SavedModel: {e}") from None
        if "serving_default" not in self._saved.signatures:
            raise ExportError(f"{self.path}: no serving_default signature")
        self.signature = self._saved.signatures["serving_default"]
        self.input_specs = self.signature.structured_input_signature[1]
        self.input_names = tuple(sorted(self.input_specs))
        self.dimension = int(self.metadata["dimension"])
        self.name = self.metadata.get("model_name", storage.basename(storage.parent(self.path)))

    def _tensor(self, name: str, value) -> tf.Tensor:
        spec = self.input_specs[name]
        if isinstance(value, tf.Tensor):
            return value
        if len(spec.shape) == 2:
            rows = [list(v) for v in value]
            width = max([len(r) for r in rows] + [1])
            value = np.array([[str(x) if not isinstance(x, bytes) else x for x in r] + [""] * (width - len(r))
                              for r in rows], dtype=object).reshape(len(rows), width)
        return tf.constant(np.asarray(value, dtype=object), dtype=tf.string)

    def __call__(self, inputs: dict, training: bool = False) -> np.ndarray:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {missing}")
        out = self.signature(**{n: self._tensor(n, inputs[n]) for n in self.input_names})
        return out["embedding"].numpy()


def load_tower(path: str) -> LoadedTower:
    """Load `MODEL_DIR/NAME[/VERSION]` (committed only) checking metadata and schema hash."""
    return LoadedTower(path)
