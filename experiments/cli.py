"""CLI of the paper's experiments: `ebr experiment paper-tables`.

Flags are generated from `experiments.paper_tables.PaperTablesConfig` (`ebr.config`), with
`--config FILE` and `--set KEY=VALUE` beside them. Every path option takes any URI (local paths
or gs://...); artifacts are read and written by the stages' own functions through
`ebr.storage` / `ebr.artifacts` (docs/contracts.md). Heavy imports (TensorFlow, Beam, FAISS)
happen inside the handlers so `ebr --help` stays fast.
"""
from __future__ import annotations

import argparse

from ebr import config
from experiments.paper_tables.config import PaperTablesConfig


def register(subparsers) -> None:
    exp = subparsers.add_parser("experiment", help="the paper's experiments")
    exp_sub = exp.add_subparsers(dest="experiment", required=True)
    tables = exp_sub.add_parser(
        "paper-tables", help="reproduce the paper's findings on `ebr data social` logs or your own (--raw DIR)",
        description="Runs the paper's 8 training-data and serving experiments over several seeds and writes a "
                    "Markdown report with tables (mean and std) and PNG plots. The logs are generated per seed "
                    "(`ebr data social`) unless --raw DIR names canonical raw logs (docs/data-format.md), "
                    "which every seed then shares; rows those logs cannot measure are reported with the "
                    "reason, and the report names the source.")
    config.add_arguments(tables, PaperTablesConfig)
    tables.set_defaults(func=_paper_tables)


def _paper_tables(args: argparse.Namespace) -> int:
    from experiments import paper_tables

    cfg = paper_tables.from_args(args)
    config.announce("experiment paper-tables", cfg)
    report = paper_tables.run(cfg)
    config.save(cfg, cfg.out)
    print(f"report: {report}")
    return 0
