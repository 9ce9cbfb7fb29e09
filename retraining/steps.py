"""The retraining pipeline's steps as plain functions; each KFP component calls one.

Place in the data flow: every step calls the function its `ebr` command calls, on URIs (local
paths or gs://) that the previous step returned, and stages its output under this run's
directory of the work root, never in the served bases:

    validate_inputs  settings and inputs checked          -> RUN = WORK_ROOT/<time>-<run id>
    make_examples    beam_pipelines.examples.run          -> RUN/examples/VERSION
    train_candidate  trainer.task.train                   -> RUN/candidate/{query,doc}_tower/N
    evaluate_models  trainer.evaluate.evaluate, both models on one held-out split
                                                          -> RUN/evaluation.json
    check_gate       retraining.gate (raises when the candidate is worse)
    embed_corpus     beam_pipelines.embed.run             -> RUN/embeddings/VERSION
    build_index      index.builder.build_index            -> RUN/index/VERSION
    publish          retraining.publish                   -> MODEL_DIR/*/N, INDEX_BASE/VERSION

N, the candidate's version, is the served MODEL_DIR's next version (`ebr.artifacts.next_version`),
fixed when it is trained, so the embeddings and the index built from it name the version it
will be served as. Every failure is a `RetrainError` whose message starts with the step's name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import re

from ebr import artifacts, features, storage
from ebr import config as ebr_config
from retraining.config import STAGES, GateConfig, build_stage, stage_settings

log = logging.getLogger(__name__)

# Step names: the KFP task names (retraining/components.py), which start every error message.
VALIDATE, EXAMPLES, TRAIN, EVALUATE, GATE, EMBED, INDEX, PUBLISH = (
    "validate-inputs", "make-examples", "train-candidate", "evaluate-models", "gate",
    "embed-corpus", "build-index", "publish")
EVALUATION = "evaluation.json"  # RUN/evaluation.json: the evaluate step's report


class RetrainError(RuntimeError):
    """A step failed; the message names the step and the reason."""


class GateFailed(RetrainError):
    """The candidate retrieves worse than the served model (retraining/gate.py)."""


# Set by `retraining.pipeline.run_locally`: a local file where a failed step leaves its message,
# so the local run can end with the reason instead of kfp.local's bare "task failed" (on Vertex
# AI and Kubeflow the step's log shows it).
ERROR_FILE_ENV = "EBR_RETRAIN_ERROR_FILE"


def _report(error: RetrainError) -> None:
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{error}\n")


@contextlib.contextmanager
def step(name: str):
    """Any exception inside becomes a RetrainError whose message starts with the step's name."""
    try:
        yield
    except RetrainError as e:
        _report(e)
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the step named, cause chained
        error = RetrainError(f"{name} step: {e}")
        _report(error)
        raise error from e


def served_version(model_dir: str) -> int | None:
    """The served pair's version: the newest committed by both towers of MODEL_DIR, or None."""
    return artifacts.newest(artifacts.tower_base(storage.normalize(model_dir), "query_tower"))


def tower_dirs(model_dir: str, version: int) -> dict[str, str]:
    return {name: storage.join(artifacts.tower_base(model_dir, name), version)
            for name in artifacts.TOWERS}


def _inside(path: str, base: str) -> bool:
    path, base = storage.normalize(path), storage.normalize(base)
    return path == base or path.startswith(base.rstrip("/") + "/")


# --------------------------------------------------------------------------- steps


def validate_inputs(*, raw_logs: str, model_dir: str, index_base: str, work_root: str,
                    run_id: str, warm_start: bool, beam_args: list, examples: dict, train: dict,
                    embed: dict, index: dict, gate: dict) -> str:
    """Every setting and input checked before any work; returns this run's directory RUN,
    where the run's resolved parameters are written as config.json."""
    from beam_pipelines import rawlog
    from trainer.config import EVAL_PATTERN

    with step(VALIDATE):
        settings = {"examples": examples, "train": train, "embed": embed, "index": index}
        typed = {stage: stage_settings(stage, settings[stage]) for stage in STAGES}
        gate_cfg = ebr_config.from_dict(GateConfig, gate, "gate")
        for name, uri in (("raw_logs", raw_logs), ("model_dir", model_dir),
                          ("index_base", index_base), ("work_root", work_root)):
            if not uri:
                raise ValueError(f"{name} is empty")
        for name, base in (("model_dir", model_dir), ("index_base", index_base)):
            if _inside(work_root, base) or _inside(base, work_root):
                raise ValueError(f"work_root {work_root} and {name} {base} overlap: staged "
                                 f"artifacts never go into a served base")
        if not storage.exists(raw_logs):
            raise FileNotFoundError(f"raw logs {raw_logs} do not exist (raw_logs): nothing to "
                                    f"train on")
        try:
            rawlog.resolve_inputs(raw_logs)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"raw logs: {e}") from None
        if gate_cfg.eval_data:
            d = artifacts.resolve(gate_cfg.eval_data, "examples (gate.eval_data)")
            if not storage.glob(storage.join(d, EVAL_PATTERN)):
                raise FileNotFoundError(f"gate.eval_data {d}: no held-out examples "
                                        f"{EVAL_PATTERN}")
        served = served_version(model_dir)
        if served is not None:  # the gate must be able to load it with this code
            meta = artifacts.read_model_metadata(tower_dirs(model_dir, served)["query_tower"],
                                                 features.schema_hash())
            log.info("served pair: %s version %d (dimension %s)", model_dir, served,
                     meta["dimension"])
        else:
            log.info("no served pair under %s yet: the gate will pass the candidate",
                     model_dir)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run_dir = storage.join(storage.normalize(work_root),
                               f"{stamp}-{re.sub(r'[^A-Za-z0-9._-]', '-', run_id) or 'run'}")
        resolved = {"raw_logs": raw_logs, "model_dir": model_dir, "index_base": index_base,
                    "work_root": work_root, "run_dir": run_dir, "warm_start": bool(warm_start),
                    "beam_args": [str(a) for a in beam_args], **typed,
                    "gate": dataclasses.asdict(gate_cfg), "served_version": served}
        log.info("ebr retrain configuration: %s", json.dumps(resolved, sort_keys=True))
        storage.write_bytes(storage.join(run_dir, ebr_config.CONFIG_FILE),
                            (json.dumps(resolved, indent=2, sort_keys=True) + "\n").encode())
        return run_dir


def make_examples(*, raw_logs: str, run_dir: str, examples: dict, beam_args: list) -> str:
    """Raw logs -> RUN/examples/VERSION (`ebr pipeline examples`); returns the version dir."""
    from beam_pipelines import examples as pipeline

    with step(EXAMPLES):
        cfg = build_stage("examples", examples, input=raw_logs,
                          output=storage.join(run_dir, "examples"))
        ebr_config.announce("pipeline examples", cfg)
        stats = pipeline.run(cfg, [str(a) for a in beam_args])
        empty = [part for part in ("train", "eval") if not stats["written"].get(part)]
        if empty:
            raise ValueError(f"raw logs {raw_logs}: no {' or '.join(empty)} examples written to "
                             f"{stats['output']} (dead letters by reason: "
                             f"{stats['totals']['dead_by_reason']})")
        return stats["output"]


def candidate_config(*, examples_uri: str, run_dir: str, model_dir: str, warm_start: bool,
                     train: dict):
    """The candidate's TrainConfig: the user's settings, the run's examples, RUN/candidate as
    its MODEL_DIR, version N = the served MODEL_DIR's next version, and the served pair as the
    warm start when `warm_start` is on and there is one."""
    model_dir = storage.normalize(model_dir)
    version = artifacts.next_version(*(artifacts.tower_base(model_dir, t) for t in artifacts.TOWERS))
    served = served_version(model_dir)
    warm = bool(warm_start and served is not None)
    return build_stage("train", train, data_dir=examples_uri,
                       model_dir=storage.join(run_dir, "candidate"), version=version,
                       warm_start=model_dir if warm else "",
                       warm_start_version=served if warm else 0)


def train_candidate(*, examples_uri: str, run_dir: str, model_dir: str, warm_start: bool,
                    train: dict) -> tuple[str, int]:
    """Trains the candidate (`candidate_config`) with the function `ebr train` calls; returns
    (RUN/candidate, N). A retried step whose candidate is already committed reuses it."""
    from trainer import task

    with step(TRAIN):
        cfg = candidate_config(examples_uri=examples_uri, run_dir=run_dir, model_dir=model_dir,
                               warm_start=warm_start, train=train)
        if cfg.warm_start:
            log.info("candidate version %d, warm-started from the served pair %s version %d",
                     cfg.version, cfg.warm_start, cfg.warm_start_version)
        else:
            log.info("candidate version %d, cold start (%s)", cfg.version,
                     "warm start off" if not warm_start else f"no served pair under {model_dir}")
        if cfg.version in artifacts.versions(artifacts.tower_base(cfg.model_dir, "query_tower")):
            log.info("%s already holds the committed candidate version %d (a retried step): "
                     "reused", cfg.model_dir, cfg.version)
        else:
            task.train(cfg)
        return cfg.model_dir, cfg.version


def _recalls(result: dict, protocol: str) -> dict[str, float]:
    return {key.removeprefix("recall_at_"): value
            for key, value in result["protocols"][protocol].items()}


def evaluate_models(*, examples_uri: str, run_dir: str, candidate: str, version: int,
                    model_dir: str, gate: dict) -> dict:
    """Recall@K of the candidate and of the served pair on the same held-out split (this run's,
    or gate.eval_data), by the function `ebr evaluate` calls; the report is written to
    RUN/evaluation.json and returned (with its URI under "uri")."""
    from trainer.config import CORPUS_PATTERN, EVAL_PATTERN, TRAIN_PATTERN
    from trainer.corpus import load_corpus
    from trainer.evaluate import evaluate

    with step(EVALUATE):
        g = ebr_config.from_dict(GateConfig, gate, "gate")
        d = artifacts.resolve(g.eval_data or examples_uri, "examples")
        eval_pattern = storage.join(d, EVAL_PATTERN)
        corpus = load_corpus(storage.join(d, CORPUS_PATTERN))
        train_pattern = storage.join(d, TRAIN_PATTERN) if g.protocol == "exclude_train" else None
        ks = g.cutoffs()

        def measure(model: str, v: int) -> dict:
            towers = tower_dirs(model, v)
            result = evaluate(towers["query_tower"], eval_pattern=eval_pattern, corpus=corpus,
                              doc_tower_path=towers["doc_tower"], train_pattern=train_pattern,
                              ks=ks, batch_size=g.batch_size, data_dir=d)
            return {"model_dir": model, "version": v, "recall": _recalls(result, g.protocol),
                    "examples": result["examples"], "split": result["split"]}

        cand = measure(candidate, int(version))
        served_v = served_version(model_dir)
        served = measure(storage.normalize(model_dir), served_v) if served_v else None
        split = cand.pop("split")
        if served:
            served.pop("split")
        report = {
            "protocol": g.protocol, "ks": ks, "k": g.k, "tolerance": g.tolerance,
            "model_dir": storage.normalize(model_dir), "candidate": cand, "served": served,
            "split": {"examples": d, "eval_pattern": eval_pattern, "examples_count": cand["examples"],
                      "eval_files": split.get("eval_files", []),
                      "description": {k: v for k, v in split.items()
                                      if k not in ("eval_files", "train_files")}},
        }
        uri = storage.join(run_dir, EVALUATION)
        storage.write_bytes(uri, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
        log.info("evaluation of candidate v%d%s on %s: %s", version,
                 f" and served v{served_v}" if served_v else "", d,
                 json.dumps({"candidate": cand["recall"], "served": served and served["recall"]}))
        return {**report, "uri": uri}


def check_gate(*, report_uri: str, gate: dict) -> str:
    """Reads the evaluation report and decides (retraining/gate.py); raises GateFailed, naming
    the step, both numbers, the tolerance and the split, when the candidate is worse."""
    from retraining import gate as gating

    with step(GATE):
        g = ebr_config.from_dict(GateConfig, gate, "gate")
        report = storage.read_json(report_uri, "evaluation report")
        if int(g.k) not in [int(k) for k in report["ks"]]:
            raise ValueError(f"{report_uri} has no recall@{g.k} (it holds {report['ks']}); "
                             f"the evaluate step ran with other gate settings")
        decision = gating.decide(report, g)
        if not decision.passed:
            raise GateFailed(gating.failure_message(report, decision))
        text = gating.summary(report, decision)
        log.info("%s", text)
        return text


def embed_corpus(*, examples_uri: str, run_dir: str, candidate: str, version: int,
                 embed: dict, beam_args: list) -> str:
    """The run's corpus through the candidate's doc tower -> RUN/embeddings/VERSION (`ebr
    embed`); returns the version dir."""
    from beam_pipelines import embed as pipeline

    with step(EMBED):
        cfg = build_stage("embed", embed, model=tower_dirs(candidate, version)["doc_tower"],
                          corpus=examples_uri, output=storage.join(run_dir, "embeddings"))
        ebr_config.announce("embed", cfg)
        summary = pipeline.run(cfg, [str(a) for a in beam_args])
        if str(summary.get("model_version")) != str(version):
            raise ValueError(f"{summary['output']}: embeddings made with model version "
                             f"{summary.get('model_version')}, not the candidate's {version}")
        return summary["output"]


def build_index(*, embeddings: str, run_dir: str, version: int, index: dict) -> str:
    """Embeddings -> RUN/index/VERSION (`ebr index build`), its manifest naming the candidate's
    version; returns the version dir."""
    from index import persistence
    from index.builder import build_from_config

    with step(INDEX):
        cfg = build_stage("index", index, embeddings=embeddings,
                          output=storage.join(run_dir, "index"), model_version=str(version))
        ebr_config.announce("index build", cfg)
        vdir = build_from_config(cfg)
        manifest = persistence.read_manifest(vdir)
        if str(manifest["model_version"]) != str(version):
            raise ValueError(f"{vdir}: index built for model version "
                             f"{manifest['model_version']}, not the candidate's {version}")
        return vdir


def publish(*, candidate: str, version: int, staged_index: str, model_dir: str,
            index_base: str) -> dict:
    """The candidate pair into the served bases, towers first, index last
    (retraining/publish.py); returns {"model_version", "towers", "index"}."""
    from retraining import publish as publishing

    with step(PUBLISH):
        return publishing.publish_pair(candidate=candidate, version=int(version),
                                       staged_index=staged_index, model_dir=model_dir,
                                       index_base=index_base)


def gate_outputs(report: dict, gate: dict) -> tuple[dict[str, float], str]:
    """What the evaluate step displays for the gate: its metrics and the HTML page of the
    recall@K curves (retraining/gate.py), shown whether or not the gate will pass."""
    from retraining import gate as gating

    with step(EVALUATE):
        decision = gating.decide(report, ebr_config.from_dict(GateConfig, gate, "gate"))
        log.info("%s", gating.summary(report, decision))
        return gating.metrics(report, decision), gating.plot_html(report, decision)
