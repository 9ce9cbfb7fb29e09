"""Submitting the retraining pipeline on a daily schedule: Vertex AI Pipelines or Kubeflow.

Place in the data flow: the deployment of retraining/pipeline.py. `ebr retrain submit --config
k8s/pipelines/retrain.yaml [--target kubeflow]` compiles the pipeline with the configured image
(the checked-in retraining/pipeline.yaml is the same spec with the default image), then

  vertex    `aiplatform.PipelineJob(template_path=spec, pipeline_root=gs://...,
            parameter_values=..., enable_caching=False)` and `.create_schedule(cron=...)`: a
            Vertex AI schedule that starts one PipelineJob a day, at most one at a time;
  kubeflow  `kfp.Client(host).create_recurring_run(experiment, cron_expression=...,
            pipeline_package_path=spec, params=..., max_concurrency=1)`.

The request objects and arguments are built by functions that do not touch the network
(`vertex_job`, `vertex_schedule_args`, `kubeflow_run_args`), so `--dry-run` prints them and the
tests check them; only `submit` sends. Credentials are the environment's (application default
credentials for Vertex AI; kube config or in-cluster for Kubeflow).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

from retraining.config import RetrainConfig, SubmitConfig, pipeline_arguments

log = logging.getLogger(__name__)


def cron_expression(cfg: RetrainConfig, target: str) -> str:
    """The schedule's cron as each scheduler reads it: Vertex AI takes five fields with an
    optional `TZ=` prefix; Kubeflow Pipelines takes six (seconds first) on the API server's
    clock, UTC."""
    cron, tz = cfg.schedule.cron, cfg.schedule.time_zone
    if target == "vertex":
        return cron if tz in ("", "UTC") else f"TZ={tz} {cron}"
    if tz not in ("", "UTC"):
        raise ValueError(f"schedule.time_zone {tz!r}: Kubeflow Pipelines recurring runs follow "
                         f"the API server's clock (UTC); give schedule.cron in UTC")
    return f"0 {cron}"


def _check_remote(cfg: RetrainConfig) -> None:
    """A scheduled run's steps run in containers: every URI must be one they can reach."""
    from ebr import storage

    local = [name for name in ("raw_logs", "model_dir", "index_base", "work_root")
             if storage.is_local(getattr(cfg, name))]
    if local:
        raise ValueError(f"{local} are local paths; the pipeline's steps run in containers: "
                         f"give gs:// URIs (or run it here with `ebr retrain run`)")


def vertex_job(cfg: RetrainConfig, spec_path: str, credentials=None):
    """The `aiplatform.PipelineJob` of one run of `cfg` (not submitted)."""
    from google.cloud import aiplatform

    _check_remote(cfg)
    if not cfg.vertex.project:
        raise ValueError("vertex.project is required to submit to Vertex AI Pipelines")
    root = cfg.kfp_root()
    if not root.startswith("gs://"):
        raise ValueError(f"pipeline_root {root}: Vertex AI Pipelines needs a gs:// pipeline root")
    return aiplatform.PipelineJob(
        display_name=cfg.schedule.name, template_path=spec_path, pipeline_root=root,
        parameter_values=pipeline_arguments(cfg), enable_caching=False,
        project=cfg.vertex.project, location=cfg.vertex.location, credentials=credentials,
        labels={"app": "ebr", "pipeline": "ebr-retrain"})


def vertex_schedule_args(cfg: RetrainConfig) -> dict:
    """Arguments of `PipelineJob.create_schedule` for the daily schedule."""
    args = {"cron": cron_expression(cfg, "vertex"), "display_name": cfg.schedule.name,
            "max_concurrent_run_count": cfg.schedule.max_concurrent_runs,
            "allow_queueing": False}
    if cfg.vertex.service_account:
        args["service_account"] = cfg.vertex.service_account
    if cfg.vertex.network:
        args["network"] = cfg.vertex.network
    return args


def kubeflow_run_args(cfg: RetrainConfig, spec_path: str, experiment_id: str) -> dict:
    """Arguments of `kfp.Client.create_recurring_run` for the daily recurring run."""
    _check_remote(cfg)
    args = {"experiment_id": experiment_id, "job_name": cfg.schedule.name,
            "description": "EBR retraining: raw logs to a gated, published model / index pair",
            "cron_expression": cron_expression(cfg, "kubeflow"),
            "max_concurrency": cfg.schedule.max_concurrent_runs, "no_catchup": True,
            "params": pipeline_arguments(cfg), "pipeline_package_path": spec_path,
            "pipeline_root": cfg.kfp_root(), "enable_caching": False, "enabled": True}
    if cfg.kubeflow.service_account:
        args["service_account"] = cfg.kubeflow.service_account
    return args


def _vertex_request(job, schedule_args: dict) -> dict:
    body = type(job._gca_resource).to_dict(job._gca_resource)
    body.pop("pipeline_spec", None)  # the compiled spec itself: printed by `ebr retrain compile`
    return {"pipeline_job": body, "schedule": schedule_args}


def submit(cfg: SubmitConfig) -> dict:
    """Compiles, builds the target's request and sends it (unless `cfg.dry_run`); returns what
    was (or would be) sent, with the created schedule's resource name when sent."""
    from retraining.pipeline import compile_spec

    with tempfile.TemporaryDirectory(prefix="ebr-retrain-spec-") as tmp:
        spec = compile_spec(os.path.join(tmp, "pipeline.yaml"), cfg.image)
        if cfg.target == "vertex":
            credentials = None
            if cfg.dry_run:
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()  # nothing is sent
            job = vertex_job(cfg, spec, credentials)
            schedule = vertex_schedule_args(cfg)
            out = {"target": "vertex", "image": cfg.image, **_vertex_request(job, schedule)}
            if not cfg.dry_run:
                created = job.create_schedule(**schedule)
                out["created"] = created.resource_name
                log.info("created Vertex AI schedule %s", created.resource_name)
            return out
        if cfg.target != "kubeflow":
            raise ValueError(f"target must be vertex or kubeflow, got {cfg.target!r}")
        if cfg.dry_run:
            args = kubeflow_run_args(cfg, "<compiled spec>", f"<id of experiment "
                                                              f"{cfg.kubeflow.experiment}>")
            return {"target": "kubeflow", "image": cfg.image, "recurring_run": args}
        import kfp

        client = kfp.Client(host=cfg.kubeflow.host or None,
                            namespace=cfg.kubeflow.namespace or "kubeflow")
        experiment = client.create_experiment(cfg.kubeflow.experiment,
                                              namespace=cfg.kubeflow.namespace or None)
        args = kubeflow_run_args(cfg, spec, experiment.experiment_id)
        created = client.create_recurring_run(**args)
        log.info("created Kubeflow recurring run %s", created.recurring_run_id)
        return {"target": "kubeflow", "image": cfg.image, "recurring_run": args,
                "created": created.recurring_run_id}


def describe(result: dict) -> str:
    return json.dumps(result, indent=2, sort_keys=True, default=str)
