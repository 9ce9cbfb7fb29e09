"""Orchestration of `ebr experiment paper-tables`: the plan, every seed, the aggregate and the report.

Place in the data flow: `PaperTablesConfig` (from the command line, `experiments/cli.py`, or
`main`) -> `rows.plan` and `rows.select_rows` -> `seed_run.run_seeds` (WORK/seed{N}/) ->
`claims.aggregate` -> OUT/results.json and `report.write_report` (OUT/report.md and the PNG
plots). WORK defaults to OUT/work for a local OUT and to a local temp directory (removed at the
end) for a remote one. The logs are the generator's (each seed its own) or, with `--raw DIR`,
any canonical raw logs (docs/data-format.md) shared by every seed; results.json's `source`
(`seed_run.source_summary`) says which, and which rows these logs could not measure and why.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
import tempfile
import time

from ebr import storage
from experiments.paper_tables.claims import aggregate
from experiments.paper_tables.config import PaperTablesConfig, make_config
from experiments.paper_tables.report import write_report
from experiments.paper_tables.rows import plan, select_rows
from experiments.paper_tables.seed_run import default_jobs, run_seeds, source_summary

log = logging.getLogger(__name__)

# Where and how the run happens, not what it measures: flags of their own in `command_line`.
RUN_FIELDS = ("out", "work", "quick", "seeds", "jobs", "only")


def command_line(cfg: PaperTablesConfig) -> str:
    """The command that reruns `cfg`: its mode, seeds, OUT and rows, and `--set` for every
    setting that differs from the mode's defaults (WORK and jobs do not change the numbers)."""
    base = make_config(cfg.quick)
    sets = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in RUN_FIELDS or f.name == "raw" or value == getattr(base, f.name):
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        sets.append(" --set " + shlex.quote(f"{f.name}={'none' if value is None else value}"))
    return (f"ebr experiment paper-tables{' --quick' if cfg.quick else ''} --seeds {cfg.seeds} "
            + (f"--raw {shlex.quote(cfg.raw)} " if cfg.raw else "")
            + f"--out {cfg.out}" + (f" --only {','.join(cfg.only)}" if cfg.only else "") + "".join(sets))


def run(cfg: PaperTablesConfig, command: str | None = None) -> str:
    """Runs the selected rows over `cfg.seeds` seeds (`cfg.jobs` processes at a time); writes
    OUT/results.json, OUT/report.md and the plots (any URI); returns the report's path.
    `command` is what the report says reproduces it (default: `command_line(cfg)`)."""
    started = time.time()
    jobs = default_jobs(cfg.seeds) if cfg.jobs is None else cfg.jobs
    models, rows = plan(cfg)
    rows = select_rows(rows, cfg.only)
    out, work, scratch = cfg.out, cfg.work, None
    if work is None:
        if storage.is_local(out):
            work = storage.join(out, "work")
        else:  # FAISS / TF scratch stays on local disk; only the results go to OUT
            work = scratch = tempfile.mkdtemp(prefix="ebr-paper-tables-work-")
            log.info("OUT %s is remote: work directory %s (removed at the end)", out, work)
    first = getattr(cfg, "first_seed", 0)  # seed 0 tunes the quick settings and is never reported
    seeds = list(range(first, first + cfg.seeds))
    try:
        done = run_seeds(cfg, models, rows, seeds, work, jobs)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    per_seed, facts = [r for r, _ in done], [f for _, f in done]
    agg = aggregate(per_seed)
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds, "source": source_summary(cfg, facts),
               "rows": [dataclasses.asdict(r) for r in rows], "per_seed": per_seed,
               "aggregate": agg, "facts": facts}
    storage.write_bytes(storage.join(out, "results.json"),
                        json.dumps(results, indent=1, default=str).encode("utf-8"))
    return write_report(out, cfg, models, rows, agg, seeds, cfg.quick,
                        command_line(cfg) if command is None else command, facts,
                        time.time() - started, jobs)


def main(quick: bool = False, seeds: int | None = None, out: str | None = None,
         only: list[str] | None = None, overrides: list[str] | None = None,
         command: str | None = None, jobs: int | None = None, work: str | None = None,
         raw: str | None = None) -> str:
    """`run` with the configuration of `make_config(quick, overrides)` and the given run
    settings (None: the configuration's); returns the report's path."""
    cfg = make_config(quick, overrides)
    given = {"seeds": seeds, "out": out, "only": only, "jobs": jobs, "work": work, "raw": raw}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    return run(cfg, command)
