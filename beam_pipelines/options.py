"""Runner selection for every pipeline of the project: local by default, remote by options.

Place in the data flow: each pipeline (`examples`, `embed`, `mine_negatives`) builds its
`beam.Pipeline` through `make_pipeline(beam_args)`.

Why not Beam's default: in Beam 2.77 `DirectRunner` is the "switching" runner, which first
tries the Prism runner and Prism downloads a Go binary on first use. The local default here is
the FnApiRunner (the runner DirectRunner falls back to for batch pipelines), created directly,
so a run never touches the network:

  (no --runner)                               FnApiRunner, --direct_running_mode=in_memory
  --runner=DirectRunner                       the same (mapped, so it never tries Prism)
  --direct_running_mode=multi_processing --direct_num_workers=2
                                              FnApiRunner with 2 subprocess SDK workers
  --runner=DataflowRunner|FlinkRunner|SparkRunner|PortableRunner|PrismRunner ...
                                              passed through to Beam unchanged
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "SwitchingDirectRunner")


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _drop_flag(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def normalize_args(beam_args: list[str] | None) -> tuple[list[str], bool]:
    """(argv for PipelineOptions, whether the local FnApiRunner is used)."""
    argv = [a for a in (beam_args or []) if a != "--"]
    runner = _flag_value(argv, "--runner")
    if runner is None or runner.split(".")[-1] in LOCAL_RUNNERS:
        argv = _drop_flag(argv, "--runner") + ["--runner=FnApiRunner"]
        if _flag_value(argv, "--direct_running_mode") is None:
            argv.append("--direct_running_mode=in_memory")
        if (_flag_value(argv, "--direct_running_mode") == "in_memory"
                and _flag_value(argv, "--direct_num_workers") is None):
            argv.append("--direct_num_workers=1")
        return argv, True
    return argv, False


def make_pipeline(beam_args: list[str] | None = None):
    """A `beam.Pipeline` on the runner the options name (local FnApiRunner by default)."""
    import apache_beam as beam

    argv, local = normalize_args(beam_args)
    options = beam.options.pipeline_options.PipelineOptions(argv)
    if not local:
        log.info("beam runner from options: %s", _flag_value(argv, "--runner"))
        return beam.Pipeline(options=options)
    # Built as DirectRunner builds it for batch pipelines, so subprocess workers
    # (multi_processing) receive the pipeline options through the provision info.
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    runner = fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))
    # The local job service re-logs every worker log line at INFO; keep warnings only.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.WARNING)
    log.info("beam runner: FnApiRunner (%s, %s workers)",
             _flag_value(argv, "--direct_running_mode"),
             _flag_value(argv, "--direct_num_workers") or "default")
    return beam.Pipeline(runner=runner, options=options)
