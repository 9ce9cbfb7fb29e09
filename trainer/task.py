"""The training job: `python -m trainer.task` (Vertex AI / Kubeflow) and `ebr train`.

Place in the data flow: examples artifact (`ebr pipeline examples`, docs/contracts.md s.2) ->
this job -> towers (s.3). Every path is a URI (local or gs://) read and written through
`ebr.storage` / tf.io.gfile: the data dir is an examples artifact `EX` or `EX/VERSION`
(resolved to its newest committed version with `ebr.artifacts.resolve`), and the model,
checkpoint and TensorBoard directories may all be in Cloud Storage.

Flags and a config file -> `TrainConfig`; reads `EX/VERSION/train` TFRecords with tf.data, trains the
unified embedding model under MultiWorkerMirroredStrategy when TF_CONFIG (or Vertex's
CLUSTER_SPEC) names several workers, backs up every `checkpoint_every_steps` steps with Keras
BackupAndRestore (a killed job resumes where it stopped), optionally warm-starts the towers from
an exported pair (`warm_start`, e.g. the model in service: `trainer.export.restore_tower`), logs
to TensorBoard, evaluates recall@K on `EX/VERSION/eval`, exports the towers (docs/contracts.md
section 3) with the resolved configuration (`config.json`) in each version, and reports the
tuning metric in the cloudml-hypertune file format (`hypertune_path`). Bad input and NaN losses
end the job with a non-zero exit and a one-line reason.

Flags are generated from `TrainConfig` by `ebr.config` (`--batch-size`, `--set loss.temperature=0.1`,
`--config FILE`); the job logs its resolved configuration before it starts.

Vertex AI conventions: AIP_MODEL_DIR, AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR (gs:// URIs
as Vertex sets them) fill the config's empty paths; CLUSTER_SPEC is turned into TF_CONFIG when
TF_CONFIG is absent. A hyperparameter-tuning trial passes each trial value as a flag named by the
parameter id (`--learning-rate=0.01`: the id is the flag's name).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

from ebr import artifacts, features, logs, storage
from ebr import config as ebr_config
from trainer.config import TrainConfig  # no TensorFlow: `ebr --help` stays fast

log = logging.getLogger("trainer.task")

EXIT_BAD_INPUT = 2
EXIT_NAN = 3


class TrainingError(RuntimeError):
    """Training diverged (NaN / inf loss) or could not run."""


# --------------------------------------------------------------------------- environment


def cluster_from_env() -> dict:
    """TF_CONFIG as a dict; built from Vertex's CLUSTER_SPEC when only that is set."""
    if os.environ.get("TF_CONFIG"):
        try:
            return json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as e:
            raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
    spec = os.environ.get("CLUSTER_SPEC")
    if not spec:
        return {}
    try:
        spec = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"CLUSTER_SPEC is not valid JSON: {e}") from None
    # Vertex: worker pool 0 is the chief, pool 1 the workers (pools 2/3: ps, evaluator).
    roles = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps",
             "workerpool3": "evaluator"}
    cluster = {roles[k]: v for k, v in spec.get("cluster", {}).items() if k in roles}
    task = spec.get("task", {})
    tf_config = {"cluster": cluster, "task": {"type": roles.get(task.get("type"), "chief"),
                                              "index": int(task.get("index", 0))}}
    os.environ["TF_CONFIG"] = json.dumps(tf_config)
    return tf_config


def is_chief(tf_config: dict) -> bool:
    task = tf_config.get("task", {})
    cluster = tf_config.get("cluster", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in cluster


def make_strategy(tf_config: dict):
    import tensorflow as tf

    n = sum(len(tf_config.get("cluster", {}).get(role, [])) for role in ("chief", "worker"))
    if n > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def resolve_paths(config: TrainConfig) -> TrainConfig:
    """Fill empty output paths from Vertex's AIP_* variables, then from model_dir; every path a
    normalised URI (Vertex's gs://.../ values lose their trailing slash). The data dir stays as
    given: `resolve_data_dir` turns it into the examples version to read."""
    model_dir = config.model_dir or os.environ.get("AIP_MODEL_DIR", "")
    if not model_dir:
        raise ValueError("no model directory: set model_dir (--model-dir) or AIP_MODEL_DIR")
    if not config.data_dir:
        raise ValueError("no data directory: set data_dir (--data-dir), the output of `ebr pipeline examples`")
    model_dir = storage.normalize(model_dir)
    ckpt = (config.checkpoint_dir or os.environ.get("AIP_CHECKPOINT_DIR", "")
            or storage.join(model_dir, "checkpoints"))
    tb = (config.tensorboard_dir or os.environ.get("AIP_TENSORBOARD_LOG_DIR", "")
          or storage.join(model_dir, "logs"))
    return dataclasses.replace(config, model_dir=model_dir, checkpoint_dir=storage.normalize(ckpt),
                               tensorboard_dir=storage.normalize(tb))


def resolve_data_dir(data_dir: str) -> str:
    """`EX` (newest committed examples version) or `EX/VERSION` -> the version directory."""
    return artifacts.resolve(data_dir, "examples")


def resolve_warm_start(config: TrainConfig) -> dict | None:
    """`warm_start` (a MODEL_DIR, any URI) and `warm_start_version` (0 = newest) -> the committed
    tower pair to start from: {"model_dir", "version", "towers": {name: version dir}}; None for
    a cold start. Both towers must have committed the version (`ebr.artifacts.versions`: a
    pair, docs/contracts.md "Commit protocol"), carry this code's feature schema and have been
    trained with this run's `ARCHITECTURE` settings (their ebr_metadata.json "config"); else a
    ValueError naming the warm-start directory and the reason."""
    from trainer.config import architecture_mismatch

    if not config.warm_start:
        return None
    model_dir = storage.normalize(config.warm_start)
    where = f"warm start from {model_dir}"
    try:
        if config.warm_start_version:
            version = config.warm_start_version
        else:  # the newest version both towers committed
            version = artifacts.version_of(artifacts.resolve(
                artifacts.tower_base(model_dir, "query_tower"), "tower"))
        towers = {name: artifacts.resolve(storage.join(artifacts.tower_base(model_dir, name), version),
                                          "tower")
                  for name in artifacts.TOWERS}
        metas = {name: artifacts.read_model_metadata(vdir, features.schema_hash())
                 for name, vdir in towers.items()}
    except (artifacts.ArtifactError, storage.StorageError) as e:
        raise ValueError(f"{where}: {e} (warm_start names a MODEL_DIR holding a committed "
                         f"query_tower/doc_tower pair)") from None
    for name, meta in metas.items():
        mismatch = architecture_mismatch(config, meta.get("config") or {})
        if mismatch:
            raise ValueError(f"{where}: version {version} of {name} was trained with other tower "
                             f"settings, so its variables do not fit this model: {mismatch}")
    return {"model_dir": model_dir, "version": version,
            "towers": {name: towers[name] for name in ("query_tower", "doc_tower")}}


def warm_start_towers(model, warm: dict) -> dict:
    """Assign the towers' variables from the exported pair `warm` (`resolve_warm_start`);
    called once the model's variables are built, inside the strategy's scope. Optimizer
    slots and the loss layer's state (queue, cache, frequency estimator) start fresh."""
    from trainer.export import ExportError, restore_tower

    counts = {}
    for name, vdir in warm["towers"].items():
        try:
            counts[name] = restore_tower(getattr(model, name), vdir)
        except ExportError as e:
            raise ValueError(f"warm start from {warm['model_dir']}: {e}") from None
    unique = len({id(v) for name in counts for v in getattr(model, name).variables})
    log.info("warm start: restored %d tower variables (query_tower %d, doc_tower %d, shared tables "
             "in both) from %s version %d", unique, counts["query_tower"], counts["doc_tower"],
             warm["model_dir"], warm["version"])
    return {**warm, "variables": unique}


# cloudml-hypertune's default metrics file (hypertune/hypertune.py, _DEFAULT_METRIC_PATH): where
# Vertex AI reads a tuning trial's metric unless CLOUD_ML_HP_METRIC_FILE names another file.
VERTEX_HYPERTUNE_FILE = "/tmp/hypertune/output.metrics"


def hypertune_path(model_dir: str, version: int) -> str:
    """Where this run reports its tuning metric: CLOUD_ML_HP_METRIC_FILE when set; in a Vertex AI
    tuning trial (CLOUD_ML_TRIAL_ID set) the file Vertex reads; otherwise beside the run's own
    export, `MODEL_DIR/hypertune-VERSION.metrics`, so unrelated runs never share one file."""
    if os.environ.get("CLOUD_ML_HP_METRIC_FILE"):
        return os.environ["CLOUD_ML_HP_METRIC_FILE"]
    if os.environ.get("CLOUD_ML_TRIAL_ID"):
        return VERTEX_HYPERTUNE_FILE
    return storage.join(model_dir, f"hypertune-{version}.metrics")


def report_hypertune(path: str, tag: str, value: float, step: int) -> str:
    """Append one metric line to `path` (any URI) in cloudml-hypertune's format (what its
    HyperTune class writes: JSON lines, values as strings)."""
    line = {"timestamp": time.time(), "trial": str(os.environ.get("CLOUD_ML_TRIAL_ID", 0)),
            tag: str(value), "global_step": str(int(step)), "checkpoint_path": ""}
    old = storage.read_bytes(path) if storage.exists(path) else b""
    storage.write_bytes(path, old + (json.dumps(line) + "\n").encode("utf-8"))
    return path


# --------------------------------------------------------------------------- callbacks


def _callbacks(config, model, steps_per_epoch: int, chief: bool):
    import tensorflow as tf

    class Progress(tf.keras.callbacks.Callback):
        """Logs step, loss and examples/s; records where a resumed run started."""

        def __init__(self):
            super().__init__()
            self.every = max(1, min(100, steps_per_epoch // 5 or 1))
            self.start_step = 0
            self.nan_step = None
            self.last_loss = None

        def on_train_begin(self, logs=None):
            # Runs after BackupAndRestore.on_train_begin (callback order): sees restored state.
            self.start_step = int(self.model.optimizer.iterations.numpy())
            if self.start_step:
                log.info("resumed from backup at step %d", self.start_step)
            self.t0, self.s0, self.step = None, self.start_step, self.start_step

        def on_train_batch_end(self, batch, logs=None):
            loss = float((logs or {}).get("loss", 0.0))
            self.last_loss = loss
            self.step += 1
            step = self.step
            if not math.isfinite(loss):
                self.nan_step = step
                self.model.stop_training = True
                return
            if self.t0 is None:  # rate from the first finished step on: tracing is not training
                self.t0, self.s0 = time.time(), step
            elif step % self.every == 0:
                rate = (step - self.s0) * config.batch_size / max(time.time() - self.t0, 1e-9)
                log.info("step %d/%d loss %.4f (%.0f examples/s)", step,
                         steps_per_epoch * config.epochs, loss, rate)

    progress = Progress()
    backup = tf.keras.callbacks.BackupAndRestore(
        storage.join(config.checkpoint_dir, "backup"), save_freq=config.checkpoint_every_steps,
        delete_checkpoint=True)
    callbacks = [backup, progress, tf.keras.callbacks.TerminateOnNaN(),
                 tf.keras.callbacks.TensorBoard(config.tensorboard_dir, update_freq=progress.every,
                                                write_graph=False, profile_batch=0)]
    return callbacks, progress


# --------------------------------------------------------------------------- training


def _count_records(files: list[str]) -> int:
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(files, compression_type="GZIP", num_parallel_reads=4)
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())


def _has_negatives(files: list[str]) -> bool:
    from trainer import data

    names = (features.NEGATIVE_DOC_IDS,)
    for batch in data.make_dataset(files[:1], 256, shuffle=False, names=names).take(1):
        return bool((batch[features.NEGATIVE_DOC_IDS] != b"").numpy().any())
    return False


def _worker_dir(path: str, chief: bool) -> str:
    """MWMS: every worker writes (saving may need all of them); non-chiefs to a temp dir."""
    return path if chief else tempfile.mkdtemp(prefix="ebr-worker-")


def train(config: TrainConfig) -> dict:
    """Train, evaluate and export. Returns {"metrics", "exports", "steps", "resumed_from_step", ...}."""
    import tensorflow as tf

    from trainer import data
    from trainer.corpus import load_corpus, load_frequencies
    from trainer.evaluate import evaluate
    from trainer.export import export_towers, next_version
    from trainer.model import UnifiedEmbeddingModel, make_optimizer

    config = resolve_paths(config)
    ebr_config.announce("train", config)
    warm = resolve_warm_start(config)  # before any data is read: a wrong pair fails at once
    d = resolve_data_dir(config.data_dir)
    log.info("examples: %s", d)
    tf_config = cluster_from_env()
    chief = is_chief(tf_config)
    strategy = make_strategy(tf_config)
    tf.keras.utils.set_random_seed(config.seed)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {replicas} replicas")
    train_files = data.list_files(storage.join(d, config.train_pattern))
    corpus = load_corpus(storage.join(d, config.corpus_pattern))
    freq = storage.join(d, "doc_frequencies-*.tsv")
    if storage.glob(freq):
        load_frequencies(corpus, freq)
    with data.named_errors(train_files):
        steps_per_epoch = config.steps_per_epoch or max(1, _count_records(train_files) // config.batch_size)
        extra = config.use_extra_negatives and _has_negatives(train_files)
        log.info("training on %d file(s), %d steps/epoch x %d epochs, global batch %d on %d "
                 "replica(s)%s", len(train_files), steps_per_epoch, config.epochs, config.batch_size,
                 replicas, ", with extra negatives" if extra else "")
        ds = data.make_dataset(train_files, config.batch_size, shuffle=True, repeat=True,
                               seed=config.seed, shuffle_buffer=config.shuffle_buffer,
                               drop_remainder=True)
        with strategy.scope():
            corpus.lookup_table()  # created once, eagerly: not inside the traced train step
            model = UnifiedEmbeddingModel(config, corpus, extra_negatives=extra)
            model.compile(optimizer=make_optimizer(config))
            model(next(iter(ds.take(1))))  # build before BackupAndRestore restores into it
            if warm:  # a resumed run's backup, restored when fit begins, takes precedence
                warm = warm_start_towers(model, warm)
        callbacks, progress = _callbacks(config, model, steps_per_epoch, chief)
        t0 = time.time()
        history = model.fit(ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                            callbacks=callbacks, verbose=0)
    if progress.nan_step is not None:
        raise TrainingError(f"loss became {progress.last_loss} at step {progress.nan_step}; training "
                            f"stopped (TerminateOnNaN). Lower learning_rate ({config.learning_rate}), raise "
                            f"loss.temperature ({config.loss.temperature}) or check the input's "
                            f"doc_sampling_prob values")
    steps = int(model.optimizer.iterations.numpy())
    train_seconds = time.time() - t0
    final_ckpt = tf.train.Checkpoint(model=model).write(
        storage.join(_worker_dir(storage.join(config.checkpoint_dir, "final"), chief), "ckpt"))
    metrics: dict = {"loss": float(history.history["loss"][-1]) if history.history.get("loss") else None,
                     "steps": steps, "train_seconds": round(train_seconds, 2)}
    eval_glob = storage.join(d, config.eval_pattern)
    if storage.glob(eval_glob):
        ev = evaluate(model, eval_pattern=eval_glob, corpus=corpus, ks=config.eval_ks,
                      train_pattern=storage.join(d, config.train_pattern), data_dir=d,
                      batch_size=config.eval_batch_size)
        metrics["eval"] = ev
    version = config.version or next_version(config.model_dir)
    # MWMS: every worker saves (saving may need all of them); non-chiefs into a local temp dir
    # that is dropped afterwards, so only the chief publishes.
    export_base = _worker_dir(config.model_dir, chief)
    exports = export_towers(model, export_base, version, {
        "config": dataclasses.asdict(config), "metrics": _headline(metrics),
        "training": {"steps": steps, "replicas": replicas, "data_dir": d,
                     "train_files": train_files, "warm_start": warm}}, train_config=config)
    result = {"metrics": metrics, "exports": exports, "steps": steps, "version": version,
              "data_dir": d, "resumed_from_step": progress.start_step, "checkpoint": final_ckpt,
              "chief": chief, "warm_start": warm}
    if chief:
        headline = _headline(metrics)
        if config.hypertune_metric in headline:
            result["hypertune_file"] = report_hypertune(
                hypertune_path(config.model_dir, version), config.hypertune_metric,
                headline[config.hypertune_metric], steps)
        storage.write_bytes(storage.join(config.model_dir, f"train_result-{version}.json"),
                            json.dumps(result, indent=2, default=str).encode("utf-8"))
    else:
        shutil.rmtree(export_base, ignore_errors=True)
        result["exports"] = {}
    return result


def _headline(metrics: dict) -> dict:
    """Flat metrics for metadata / hypertune: loss, steps and recall of the `all` protocol."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    ev = metrics.get("eval")
    if ev:
        out.update(ev["protocols"]["all"])
        out.update({f"exclude_train_{k}": v for k, v in ev["protocols"].get("exclude_train", {}).items()})
    return out


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field, `--config` and `--set` (`ebr.config`)."""
    ebr_config.add_arguments(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """defaults <- --config file <- flags <- --set (`ebr.config.from_args`)."""
    return ebr_config.from_args(TrainConfig, args)


def run(args: argparse.Namespace) -> int:
    """Shared by `python -m trainer.task` and `ebr train`: exit code, one-line errors."""
    import tensorflow as tf

    try:
        config = config_from_args(args)
        result = train(config)
    except TrainingError as e:
        print(f"training failed: {e}", file=sys.stderr)
        return EXIT_NAN
    except (ValueError, FileNotFoundError, KeyError, storage.StorageError,
            tf.errors.DataLossError) as e:
        print(f"bad input: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    text = json.dumps(result, indent=2, default=str)
    if config.output:
        storage.write_bytes(config.output, text.encode("utf-8"))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Run as a program (no argv given), the job owns stderr and may filter it (ebr.logs).
    logs.setup(filter_native=argv is None)
    parser = argparse.ArgumentParser(prog="python -m trainer.task", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
