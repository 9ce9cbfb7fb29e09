"""The retraining pipeline's steps as KFP v2 lightweight Python components, one per stage.

Place in the data flow: between the pipeline's wiring (retraining/pipeline.py) and the step
functions (retraining/steps.py). KFP stores each function's source in the compiled spec and
runs it in the step's container (the project's image: `install_kfp_package=False`, kfp is
one of its requirements), so every body imports what it uses and only calls its step function,
which calls what the `ebr` command calls. Between steps pass URIs (strings) and the candidate's
version number; the evaluate step also writes KFP artifacts Vertex AI and Kubeflow display:
the gate's `Metrics` and an `HTML` page with the recall@K plot, written whether or not the
gate passes, so a refused candidate's numbers are in the run. `logs.setup()` in each body is
the step process's logging (as every `ebr` entry point's).

Parameter and output names here are the pipeline's interface (its compiled spec and the
README); keep them stable.
"""
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Metrics, Output


def validate_inputs(raw_logs: str, model_dir: str, index_base: str, work_root: str, run_id: str,
                    warm_start: bool, beam_args: list, examples: dict, train: dict, embed: dict,
                    index: dict, gate: dict) -> str:
    """Checks every setting and input before any work; returns this run's staging directory."""
    from ebr import logs
    from retraining import steps

    logs.setup()
    return steps.validate_inputs(
        raw_logs=raw_logs, model_dir=model_dir, index_base=index_base, work_root=work_root,
        run_id=run_id, warm_start=warm_start, beam_args=beam_args, examples=examples,
        train=train, embed=embed, index=index, gate=gate)


def make_examples(raw_logs: str, run_dir: str, examples: dict, beam_args: list) -> str:
    """Raw logs -> the run's examples version (`ebr pipeline examples`)."""
    from ebr import logs
    from retraining import steps

    logs.setup()
    return steps.make_examples(raw_logs=raw_logs, run_dir=run_dir, examples=examples,
                               beam_args=beam_args)


def train_candidate(examples_uri: str, run_dir: str, model_dir: str, warm_start: bool,
                    train: dict) -> NamedTuple("Candidate", candidate=str, version=int):
    """The candidate towers, staged in the run, numbered as the served MODEL_DIR's next version."""
    from collections import namedtuple

    from ebr import logs
    from retraining import steps

    logs.setup()
    candidate, version = steps.train_candidate(examples_uri=examples_uri, run_dir=run_dir,
                                               model_dir=model_dir, warm_start=warm_start,
                                               train=train)
    return namedtuple("Candidate", ["candidate", "version"])(candidate, version)


def evaluate_models(examples_uri: str, run_dir: str, candidate: str, version: int,
                    model_dir: str, gate: dict, metrics: Output[Metrics],
                    plot: Output[HTML]) -> str:
    """Recall@K of the candidate and the served model on one held-out split; returns the
    report's URI and displays the gate's metrics and plot."""
    import os

    from ebr import logs
    from retraining import steps

    logs.setup()
    report = steps.evaluate_models(examples_uri=examples_uri, run_dir=run_dir,
                                   candidate=candidate, version=version, model_dir=model_dir,
                                   gate=gate)
    values, page = steps.gate_outputs(report, gate)
    for name, value in values.items():
        metrics.log_metric(name, value)
    os.makedirs(os.path.dirname(plot.path) or ".", exist_ok=True)
    with open(plot.path, "w", encoding="utf-8") as f:
        f.write(page)
    return report["uri"]


def gate(report: str, gate: dict) -> str:
    """Stops the run (an error naming both numbers, the tolerance and the split) when the
    candidate's recall@k is below the served model's minus the tolerance."""
    from ebr import logs
    from retraining import steps

    logs.setup()
    return steps.check_gate(report_uri=report, gate=gate)


def embed_corpus(examples_uri: str, run_dir: str, candidate: str, version: int, embed: dict,
                 beam_args: list) -> str:
    """The run's corpus through the candidate's doc tower (`ebr embed`)."""
    from ebr import logs
    from retraining import steps

    logs.setup()
    return steps.embed_corpus(examples_uri=examples_uri, run_dir=run_dir, candidate=candidate,
                              version=version, embed=embed, beam_args=beam_args)


def build_index(embeddings: str, run_dir: str, version: int, index: dict) -> str:
    """The candidate's ANN index, staged in the run (`ebr index build`)."""
    from ebr import logs
    from retraining import steps

    logs.setup()
    return steps.build_index(embeddings=embeddings, run_dir=run_dir, version=version,
                             index=index)


def publish(candidate: str, version: int, staged_index: str, model_dir: str,
            index_base: str) -> NamedTuple("Published", model_version=int, index=str):
    """Towers into the served MODEL_DIR as one version, then the index into INDEX_BASE."""
    from collections import namedtuple

    from ebr import logs
    from retraining import steps

    logs.setup()
    out = steps.publish(candidate=candidate, version=version, staged_index=staged_index,
                        model_dir=model_dir, index_base=index_base)
    return namedtuple("Published", ["model_version", "index"])(out["model_version"], out["index"])


STEPS = (validate_inputs, make_examples, train_candidate, evaluate_models, gate, embed_corpus,
         build_index, publish)


def make(image: str) -> dict:
    """Function name -> KFP component running in `image`."""
    return {f.__name__: dsl.component(f, base_image=image, install_kfp_package=False)
            for f in STEPS}
