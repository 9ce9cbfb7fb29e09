"""`ebr retrain run|compile|submit`: the retraining pipeline.

  run      one run here, each step a subprocess of this Python (`kfp.local`), on any URIs;
  compile  the pipeline spec: `ebr retrain compile` rewrites the checked-in
           retraining/pipeline.yaml; `--image IMAGE --output FILE` for another image;
  submit   a daily schedule on Vertex AI Pipelines (`--target vertex`) or a recurring run on
           Kubeflow Pipelines (`--target kubeflow`), e.g. `--config k8s/pipelines/retrain.yaml`;
           `--dry-run` prints the request.

Settings are `retraining.config.RetrainConfig` (and `SubmitConfig`, `CompileConfig`) through
`ebr.config`: a flag per field, `--config FILE`, `--set key=value`; stage settings as
`--train epochs=3` or `--set train.loss.temperature=0.1`. kfp, TensorFlow and Beam are imported
inside the command functions so `ebr --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys

from ebr import config
from retraining.config import CompileConfig, RetrainConfig, SubmitConfig


def _run(args: argparse.Namespace) -> int:
    from retraining import pipeline

    cfg = config.from_args(RetrainConfig, args)
    config.announce("retrain run", cfg)  # the validate step writes it into the run's directory
    try:
        outputs = pipeline.run_locally(cfg)
    except RuntimeError as e:  # the failed step's message, naming the step (retraining.steps)
        print(f"ebr retrain run: {e}", file=sys.stderr)
        return 1
    print(json.dumps(outputs, indent=2))
    return 0


def _compile(args: argparse.Namespace) -> int:
    from retraining import pipeline

    cfg = config.from_args(CompileConfig, args)
    config.announce("retrain compile", cfg)
    path = pipeline.compile_spec(cfg.output or pipeline.SPEC, cfg.image)
    print(json.dumps({"spec": path, "image": cfg.image}))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from retraining import submit

    cfg = config.from_args(SubmitConfig, args)
    config.announce("retrain submit", cfg)
    print(submit.describe(submit.submit(cfg)))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "retrain", help="the retraining pipeline (KFP): raw logs -> gated, published model/index",
        description="Raw logs -> examples -> train (warm start from the served pair) -> "
                    "evaluate -> gate -> embed -> index -> publish, as a Kubeflow Pipelines v2 "
                    "pipeline (Vertex AI Pipelines, Kubeflow, or locally).")
    sub = p.add_subparsers(dest="retrain_command", required=True)
    for name, cls, func, help_text in (
            ("run", RetrainConfig, _run, "one run here (kfp.local, each step a subprocess)"),
            ("compile", CompileConfig, _compile, "write the pipeline spec (default: the "
                                                 "checked-in retraining/pipeline.yaml)"),
            ("submit", SubmitConfig, _submit, "schedule it daily on Vertex AI Pipelines or "
                                              "Kubeflow Pipelines")):
        c = sub.add_parser(name, help=help_text, description=help_text)
        config.add_arguments(c, cls)
        c.set_defaults(func=func)
