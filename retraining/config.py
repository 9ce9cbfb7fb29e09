"""Typed configuration of the retraining pipeline (`ebr retrain run|compile|submit`).

Place in the data flow: on top of every stage. `RetrainConfig` names the day's raw logs, the
served MODEL_DIR and INDEX_BASE (what TF Serving and the retrieval service poll), a work root
for each run's staged artifacts, and each stage's own settings. Those are the stages' typed
configurations (`beam_pipelines.config.ExamplesConfig`, `trainer.config.TrainConfig`,
`beam_pipelines.config.EmbedConfig`, `index.config.IndexBuildConfig`) given as mappings of the
settings to change: they reach KFP as dict parameters and every step rebuilds its stage's
dataclass with `ebr.config.from_dict` (unknown keys are an error, at submission and in the
step). The paths between stages, the candidate's version number and the warm start are the
pipeline's to set (`PIPELINE_SET`); giving one is an error.

`ebr.config` makes the flags (`--raw-logs`, `--train epochs=3`, `--gate.tolerance 0.01`,
`--config FILE`, `--set train.loss.temperature=0.1`); every default lives here or in the stage's
own dataclass. The module imports neither kfp nor TensorFlow, so `ebr --help` stays fast.
"""
from __future__ import annotations

import dataclasses

from beam_pipelines.config import EmbedConfig, ExamplesConfig
from ebr import config as ebr_config
from index.config import IndexBuildConfig
from trainer.config import DEFAULT_KS, TrainConfig

# This repository's Dockerfile, tagged as the k8s/ manifests name it; a scheduled run sets `image`
# to where the cluster or Vertex AI pulls it from (k8s/pipelines/retrain.yaml).
DEFAULT_IMAGE = "ebr:0.1.0"

STAGES = {"examples": ExamplesConfig, "train": TrainConfig, "embed": EmbedConfig,
          "index": IndexBuildConfig}
# Settings of each stage that the pipeline sets itself: the URIs one step hands the next, the
# candidate's version number (the served MODEL_DIR's next one) and the warm start (the served
# pair, when `warm_start` is on).
PIPELINE_SET = {
    "examples": ("input", "output"),
    "train": ("data_dir", "model_dir", "version", "warm_start", "warm_start_version"),
    "embed": ("model", "corpus", "output"),
    "index": ("embeddings", "output", "model_version", "schema_hash"),
}
PROTOCOLS = ("all", "exclude_train")  # trainer.evaluate's two protocols
TARGETS = ("vertex", "kubeflow")


def stage_settings(stage: str, settings, where: str | None = None) -> dict:
    """Checks `settings` (a mapping of the stage's settings to change) against the stage's
    dataclass and returns them typed (`{"epochs": "3"}` -> `{"epochs": 3}`); an unknown key, a
    bad value or a setting the pipeline sets itself is a ValueError naming it."""
    where = where or stage
    cls = STAGES[stage]
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} settings, got "
                         f"{settings!r}")
    taken = sorted(set(settings) & set(PIPELINE_SET[stage]))
    if taken:
        raise ValueError(f"{where}: {taken} are set by the pipeline (the URIs between its steps, "
                         f"the candidate's version, the warm start); remove them")
    typed = build_stage(stage, settings, where=where)
    full = dataclasses.asdict(typed)
    return {key: full[key] for key in settings}


def build_stage(stage: str, settings: dict, where: str | None = None, **pipeline_set):
    """The stage's dataclass from the user's settings and the values the pipeline sets."""
    cls = STAGES[stage]
    try:
        cfg = ebr_config.from_dict(cls, {**settings, **pipeline_set}, where or stage)
    except TypeError as e:  # e.g. a number where the dataclass wants a list
        raise ValueError(f"{where or stage}: {e}") from None
    if stage == "index" and cfg.shards != 1:
        raise ValueError(f"{where or stage}: shards={cfg.shards}: the pipeline builds one index "
                         f"(sharded builds are `ebr index build --shards`)")
    return cfg


@dataclasses.dataclass
class GateConfig:
    """The gate between training and publishing (retraining/gate.py)."""
    k: int = 100  # recall@K cut-off the gate decides on
    ks: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_KS), metadata={
        "help": "recall@K cut-offs evaluated, logged and plotted (k is always among them)"})
    tolerance: float = 0.01  # the candidate may be this much below the served model's recall@k
    protocol: str = dataclasses.field(default="all", metadata={
        "choices": PROTOCOLS, "help": "trainer.evaluate protocol: all documents, or without the "
                                      "searcher's training clicks (exclude_train)"})
    eval_data: str = dataclasses.field(default="", metadata={
        "help": "a fixed examples artifact EX[/VERSION] whose held-out split both models are "
                "evaluated on; empty: this run's"})
    batch_size: int = 1024  # evaluation batch

    def __post_init__(self):
        if self.k <= 0 or any(int(k) <= 0 for k in self.ks):
            raise ValueError(f"gate.k and gate.ks must be positive cut-offs, got {self.k}, {self.ks}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"gate.tolerance must be in [0, 1] (a recall difference), got "
                             f"{self.tolerance}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"gate.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.batch_size <= 0:
            raise ValueError(f"gate.batch_size must be positive, got {self.batch_size}")

    def cutoffs(self) -> list[int]:
        return sorted({int(k) for k in self.ks} | {int(self.k)})


@dataclasses.dataclass
class ScheduleConfig:
    """When the submitted pipeline runs (retraining/submit.py)."""
    cron: str = "0 3 * * *"  # five-field cron: daily at 03:00 (Kubeflow's six-field form is derived)
    time_zone: str = "UTC"  # the cron's time zone (IANA name)
    name: str = "ebr-retrain-daily"  # display name of the schedule / recurring run
    max_concurrent_runs: int = 1  # one run at a time: one writer per served base

    def __post_init__(self):
        if len(self.cron.split()) != 5:
            raise ValueError(f"schedule.cron must have five fields (minute hour day month "
                             f"weekday), got {self.cron!r}")
        if self.max_concurrent_runs <= 0:
            raise ValueError(f"schedule.max_concurrent_runs must be positive, got "
                             f"{self.max_concurrent_runs}")


@dataclasses.dataclass
class VertexConfig:
    """Vertex AI Pipelines (`aiplatform.PipelineJob`)."""
    project: str = ""  # Google Cloud project (empty: the environment's default)
    location: str = "us-central1"  # Vertex AI region
    service_account: str = ""  # the runs' service account (it needs the bucket); empty: the default
    network: str = ""  # VPC network to peer with (projects/NUMBER/global/networks/NAME), if any


@dataclasses.dataclass
class KubeflowConfig:
    """Kubeflow Pipelines (`kfp.Client`)."""
    host: str = ""  # KFP API endpoint, e.g. http://localhost:8080 (empty: in-cluster)
    namespace: str = ""  # the profile namespace of a multi-user Kubeflow; empty: single-user
    experiment: str = "ebr-retrain"  # experiment the recurring run belongs to
    service_account: str = ""  # Kubernetes service account of the run's pods (workload identity)


@dataclasses.dataclass
class RetrainConfig:
    """`ebr retrain run|submit`: one retraining run, and where and when it is submitted."""
    raw_logs: str = ebr_config.required(
        "the raw-log directory to train on, any URI (docs/data-format.md)")
    model_dir: str = ebr_config.required(
        "served MODEL_DIR, any URI: TF Serving polls it; a candidate that passes the gate is "
        "published here as its next version")
    index_base: str = ebr_config.required(
        "served INDEX_BASE, any URI: the retrieval service hot-reloads its newest version; the "
        "candidate's index is published here")
    work_root: str = ebr_config.required(
        "staging, any URI: each run writes WORK_ROOT/RUN/{examples, candidate, evaluation.json, "
        "embeddings, index}; nothing served")
    pipeline_root: str = ""  # KFP's own outputs (metrics, plot), any URI; empty: WORK_ROOT/kfp
    warm_start: bool = True  # start the candidate from the served pair when there is one
    image: str = DEFAULT_IMAGE  # container image of every step: this repository's Dockerfile
    beam_args: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "Beam options of the examples and embed steps, e.g. --runner=DataflowRunner "
                "(give as --beam-args=--runner=...)"})
    examples: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "ExamplesConfig settings (beam_pipelines/config.py) but input/output, e.g. "
                "history=10"})
    train: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "TrainConfig settings (trainer/config.py) but data_dir/model_dir/version/"
                "warm_start*, e.g. epochs=3"})
    embed: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "EmbedConfig settings (beam_pipelines/config.py) but model/corpus/output"})
    index: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "IndexBuildConfig settings (index/config.py) but embeddings/output/"
                "model_version/schema_hash, e.g. backend=scann"})
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    vertex: VertexConfig = dataclasses.field(default_factory=VertexConfig)
    kubeflow: KubeflowConfig = dataclasses.field(default_factory=KubeflowConfig)

    def __post_init__(self):
        for stage in STAGES:
            setattr(self, stage, stage_settings(stage, getattr(self, stage)))
        self.beam_args = [str(a) for a in self.beam_args]

    def kfp_root(self) -> str:
        from ebr import storage

        return self.pipeline_root or storage.join(self.work_root, "kfp")


def pipeline_arguments(cfg: RetrainConfig) -> dict:
    """The pipeline's parameter values for one run of `cfg` (retraining/pipeline.py)."""
    return {"raw_logs": cfg.raw_logs, "model_dir": cfg.model_dir, "index_base": cfg.index_base,
            "work_root": cfg.work_root, "warm_start": cfg.warm_start,
            "beam_args": list(cfg.beam_args), **{s: dict(getattr(cfg, s)) for s in STAGES},
            "gate": dataclasses.asdict(cfg.gate)}


@dataclasses.dataclass
class SubmitConfig(RetrainConfig):
    """`ebr retrain submit`: the run's settings, and the scheduler that runs them daily."""
    target: str = dataclasses.field(default="vertex", metadata={
        "choices": TARGETS, "help": "vertex: a Vertex AI PipelineJob schedule; kubeflow: a "
                                    "Kubeflow Pipelines recurring run"})
    dry_run: bool = False  # print the request instead of sending it


@dataclasses.dataclass
class CompileConfig:
    """`ebr retrain compile`: the pipeline spec (retraining/pipeline.yaml when checked in)."""
    output: str = ""  # where to write the spec (empty: the checked-in retraining/pipeline.yaml)
    image: str = DEFAULT_IMAGE  # container image of every step
