"""Export of the two towers as SavedModels that stock TF Serving loads (docs/contracts.md s.3).

`MODEL_DIR/{query_tower,doc_tower}/VERSION/` with a `serving_default` signature taking every
tower input by its schema name as raw strings (scalar kinds [B], MULTI kinds [B, N] padded with
"") and returning `embedding` float32 [B, D], L2-normalised; `ebr_metadata.json` beside it.
Each version is written into a temp directory and renamed into place, so TF Serving (which
polls for numeric directories) never sees a half-written model. The graphs are checked for
TFRS / ScaNN / py_function ops before the rename. `load_tower` is the checked loader used by
evaluation, batch embedding and the retrieval service.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from ebr import features

log = logging.getLogger(__name__)

METADATA_FILE = "ebr_metadata.json"
TOWERS = {"query_tower": (features.QUERY, features.QUERY_INPUTS),
          "doc_tower": (features.DOCUMENT, features.DOC_INPUTS)}
# Stock TF Serving has none of these (tensorflow/recommenders #182, #216).
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


def _versions(base: str) -> list[int]:
    if not os.path.isdir(base):
        return []
    return sorted(int(d) for d in os.listdir(base) if d.isdigit() and int(d) > 0)


def next_version(model_dir: str) -> int:
    """One more than the newest version of either tower under `model_dir` (1 when empty)."""
    existing = [v for name in TOWERS for v in _versions(os.path.join(model_dir, name))]
    return (max(existing) + 1) if existing else 1


def exported_op_types(path: str) -> set[str]:
    """Every op type in a SavedModel's graphs, including its function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
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


def _save_tower(tower, names: tuple[str, ...], path: str) -> None:
    module = tf.Module()
    # Track only the variables: the signature below is the whole serving graph (no Keras
    # call traces, no training-only layers such as the loss and its negative-sampling state).
    module.tower_variables = list(tower.variables)

    @tf.function
    def serve(**inputs):
        return {"embedding": tf.cast(tower(inputs, training=False), tf.float32)}

    concrete = serve.get_concrete_function(**input_specs(names))
    tf.saved_model.save(module, path, signatures={"serving_default": concrete})


def export_towers(model, model_dir: str, version: int | None = None, metadata: dict | None = None
                  ) -> dict[str, str]:
    """Write `model.query_tower` and `model.doc_tower` under `model_dir`; returns name -> path.

    `metadata` adds keys such as "config" and "metrics" to ebr_metadata.json; `version` None or 0
    picks `next_version(model_dir)`. An existing version is never overwritten.
    """
    version = int(version or next_version(model_dir))
    if version <= 0:
        raise ValueError(f"export version must be a positive integer, got {version}")
    paths = {}
    for name, (side, names) in TOWERS.items():
        tower = getattr(model, name)
        base = os.path.join(model_dir, name)
        final = os.path.join(base, str(version))
        if os.path.exists(final):
            raise ExportError(f"{final} already exists; versions are immutable, pick a new one")
        os.makedirs(base, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base)
        try:
            _save_tower(tower, names, tmp)
            check_ops(tmp)
            meta = {"model_name": name, "version": version,
                    "dimension": int(tower.mlp.layers[-1].units), "schema_hash": features.schema_hash(),
                    "inputs": list(names), "config": {}, "metrics": {},
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
            meta.update({k: v for k, v in (metadata or {}).items()
                         if k not in ("model_name", "version", "dimension", "schema_hash")})
            with open(os.path.join(tmp, METADATA_FILE), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True, default=str)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("exported %s version %d to %s", name, version, final)
        paths[name] = final
    return paths


def resolve_version_dir(path: str) -> str:
    """`BASE/NAME` (newest version) or `BASE/NAME/VERSION` -> the version directory."""
    path = os.path.normpath(path)
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = _versions(path)
    if not versions:
        raise ExportError(f"{path}: no saved_model.pb and no numeric version directories")
    return os.path.join(path, str(versions[-1]))


def read_metadata(version_dir: str) -> dict:
    meta_path = os.path.join(version_dir, METADATA_FILE)
    if not os.path.exists(meta_path):
        raise ExportError(f"{meta_path} is missing: not a complete ebr tower export")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{meta_path}: line {e.lineno}: {e.msg}") from None
    if meta.get("schema_hash") != features.schema_hash():
        raise ExportError(f"{meta_path}: schema_hash {meta.get('schema_hash')!r} does not match this "
                          f"code's feature schema {features.schema_hash()!r}; re-train or use matching code")
    return meta


class LoadedTower:
    """An exported tower: call it with a dict of numpy / list inputs, get float32 [B, D]."""

    def __init__(self, path: str):
        self.path = resolve_version_dir(path)
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
        self.name = self.metadata.get("model_name", os.path.basename(os.path.dirname(self.path)))

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
    """Load `BASE/NAME[/VERSION]` checking metadata and schema hash."""
    return LoadedTower(path)
