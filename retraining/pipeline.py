"""The retraining pipeline's wiring (KFP v2), its compiled spec and a local run.

Place in the data flow: on top of every stage; retraining/pipeline.yaml is this module compiled
(`ebr retrain compile`, the checked-in spec a test keeps current). Steps, in order,
each waiting for the one before (retraining/steps.py says what each does):

    validate-inputs -> make-examples -> train-candidate -> evaluate-models -> gate
                    -> embed-corpus -> build-index -> publish

Parameters: raw_logs, model_dir, index_base, work_root (URIs), warm_start, beam_args, and the
stage settings examples / train / embed / index / gate (mappings rebuilt into the stages' typed
configurations inside the steps; retraining/config.py). Outputs: the published model version and
index version directory. Caching is off for every step: a day's run must run (and a cached
publish would publish nothing).
"""
import os
from typing import NamedTuple

from kfp import dsl

from retraining import components
from retraining.config import DEFAULT_IMAGE

NAME = "ebr-retrain"
DESCRIPTION = ("EBR retraining: raw logs -> examples -> train (warm start) -> evaluate -> gate -> "
               "embed -> index -> publish the model / index pair")
SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline.yaml")  # checked in


def build(image: str = DEFAULT_IMAGE):
    """The pipeline function, every step running in `image`."""
    c = components.make(image)

    @dsl.pipeline(name=NAME, description=DESCRIPTION)
    def retrain(raw_logs: str, model_dir: str, index_base: str, work_root: str,
                warm_start: bool = True, beam_args: list = [], examples: dict = {},
                train: dict = {}, embed: dict = {}, index: dict = {},
                gate: dict = {}) -> NamedTuple("Outputs", model_version=int, index=str):
        validated = c["validate_inputs"](
            raw_logs=raw_logs, model_dir=model_dir, index_base=index_base, work_root=work_root,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, warm_start=warm_start, beam_args=beam_args,
            examples=examples, train=train, embed=embed, index=index, gate=gate)
        run_dir = validated.output
        made = c["make_examples"](raw_logs=raw_logs, run_dir=run_dir, examples=examples,
                                  beam_args=beam_args)
        trained = c["train_candidate"](examples_uri=made.output, run_dir=run_dir,
                                       model_dir=model_dir, warm_start=warm_start, train=train)
        candidate, version = trained.outputs["candidate"], trained.outputs["version"]
        evaluated = c["evaluate_models"](examples_uri=made.output, run_dir=run_dir,
                                         candidate=candidate, version=version,
                                         model_dir=model_dir, gate=gate)
        gated = c["gate"](report=evaluated.outputs["Output"], gate=gate)
        embedded = c["embed_corpus"](examples_uri=made.output, run_dir=run_dir,
                                     candidate=candidate, version=version, embed=embed,
                                     beam_args=beam_args).after(gated)
        indexed = c["build_index"](embeddings=embedded.output, run_dir=run_dir, version=version,
                                   index=index)
        published = c["publish"](candidate=candidate, version=version,
                                 staged_index=indexed.output, model_dir=model_dir,
                                 index_base=index_base)
        for task in (validated, made, trained, evaluated, gated, embedded, indexed, published):
            task.set_caching_options(False)
        outputs = NamedTuple("Outputs", model_version=int, index=str)
        return outputs(model_version=published.outputs["model_version"],
                       index=published.outputs["index"])

    return retrain


def compile_spec(path: str, image: str = DEFAULT_IMAGE) -> str:
    """Writes the compiled spec (YAML, deterministic: no timestamps) to `path` (local)."""
    from kfp import compiler

    compiler.Compiler().compile(build(image), package_path=path)
    return path


def run_locally(cfg, pipeline_root: str | None = None) -> dict:
    """One run of `cfg` (a RetrainConfig) in this Python environment with `kfp.local`'s
    SubprocessRunner (each step a subprocess, no containers; the URIs may be gs://, KFP's own
    outputs stay on local disk); returns the pipeline's outputs.
    A failed step raises `steps.RetrainError` with the step's own message (naming the step)."""
    import logging
    import os
    import re
    import tempfile
    import warnings
    from pathlib import Path

    from kfp import local

    from ebr import storage
    from retraining import steps
    from retraining.config import pipeline_arguments

    root = pipeline_root or cfg.kfp_root()
    if not storage.is_local(root):  # kfp.local writes its own outputs on this machine
        root = tempfile.mkdtemp(prefix="ebr-retrain-kfp-")
        logging.getLogger(__name__).info("KFP's outputs of this local run go to %s (the run's "
                                         "artifacts stay under %s)", root, cfg.work_root)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    errors = tempfile.NamedTemporaryFile(prefix="ebr-retrain-errors-", suffix=".txt", delete=False)
    errors.close()
    previous = os.environ.get(steps.ERROR_FILE_ENV)
    os.environ[steps.ERROR_FILE_ENV] = errors.name  # the step subprocesses inherit it
    try:
        with warnings.catch_warnings():
            # kfp.local warns on every step that the image is not a Python image: running the
            # steps in this environment instead of the image is what a local run is for.
            warnings.filterwarnings("ignore", message="You may be attemping", category=RuntimeWarning)
            task = build(cfg.image)(**pipeline_arguments(cfg))
    except RuntimeError as e:
        reason = Path(errors.name).read_text(encoding="utf-8").strip()
        raise steps.RetrainError(reason or re.sub(r"\x1b\[[0-9;]*m", "", str(e))) from e
    finally:
        if previous is None:
            os.environ.pop(steps.ERROR_FILE_ENV, None)
        else:
            os.environ[steps.ERROR_FILE_ENV] = previous
        os.unlink(errors.name)
    return {"model_version": task.outputs["model_version"], "index": task.outputs["index"]}
