"""`ebr pipeline examples`, `ebr embed` and `ebr mine-negatives`: command-line front ends of the
Beam pipelines.

Settings are the dataclasses `beam_pipelines.config.ExamplesConfig` / `EmbedConfig` and
`beam_pipelines.mining.MineConfig`; `ebr.config` makes one flag per field, `--config FILE` and
`--set key=value` (nested sections: `--split.method=time`, `--mining.ratio=1:1`). Each
command logs its resolved configuration first and writes it as `config.json` into the version it
commits.

Beam options go after `--` and reach Beam unchanged, e.g.
  ebr pipeline examples --input raw --output out -- --runner=DataflowRunner --project=P \
      --region=R --temp_location=gs://B/tmp
The local runner flags are also accepted directly (`--runner`, `--direct_running_mode`,
`--direct_num_workers`). Every path takes any URI (local, gs://); outputs are versioned
artifacts (`beam_pipelines.outputs`, docs/contracts.md "Commit protocol"). Beam and TensorFlow
are imported inside the command functions so `ebr --help` stays fast.
"""
from __future__ import annotations

import argparse
import json

from beam_pipelines.config import EmbedConfig, ExamplesConfig
from beam_pipelines.mining import MineConfig
from ebr import config


def _beam_args(args) -> list[str]:
    out = [a for a in (args.beam_args or []) if a != "--"]
    for flag in ("runner", "direct_running_mode", "direct_num_workers"):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"--{flag}={value}")
    return out


def _add_beam_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", help="Beam runner (default: local FnApiRunner, no download; "
                                    "DataflowRunner, FlinkRunner, SparkRunner, ...)")
    p.add_argument("--direct_running_mode", choices=("in_memory", "multi_threading",
                                                     "multi_processing"),
                   help="local runner mode (default in_memory)")
    p.add_argument("--direct_num_workers", type=int, help="local runner workers")
    p.add_argument("beam_args", nargs=argparse.REMAINDER,
                   help="further Beam pipeline options, after `--`")


def _examples(args) -> int:
    from beam_pipelines import examples

    cfg = config.from_args(ExamplesConfig, args)
    config.announce("pipeline examples", cfg)
    stats = examples.run(cfg, _beam_args(args))
    print(json.dumps({"output": stats["output"], "totals": stats["totals"],
                      "written": stats["written"], "timings": stats["timings"]}, indent=2))
    return 0


def _embed(args) -> int:
    from beam_pipelines import embed

    cfg = config.from_args(EmbedConfig, args)
    config.announce("embed", cfg)
    summary = embed.run(cfg, _beam_args(args))
    print(json.dumps(summary, indent=2))
    return 0


def _mine(args) -> int:
    from beam_pipelines import mine_negatives

    cfg = config.from_args(MineConfig, args)
    config.announce("mine-negatives", cfg)
    summary = mine_negatives.run(cfg, _beam_args(args))
    print(json.dumps(summary["counts"], indent=2))
    return 0


def register(subparsers) -> None:
    pipeline = subparsers.add_parser("pipeline", help="Beam data pipelines")
    sub = pipeline.add_subparsers(dest="pipeline", required=True)
    ex = sub.add_parser(
        "examples", help="raw logs -> training/eval examples, corpus, stats "
                         "(docs/contracts.md section 2)",
        description="Raw logs -> training and evaluation examples, corpus, click frequencies "
                    "and statistics, committed as a new version of --output. The train / eval "
                    "split of sessions is the `split` section (--split.method hash: "
                    "--split.eval-fraction and --split.salt; --split.method time: "
                    "--split.time-cutoff in unix seconds, sessions at or after it are evaluation).")
    config.add_arguments(ex, ExamplesConfig)
    _add_beam_flags(ex)
    ex.set_defaults(func=_examples)

    em = subparsers.add_parser("embed", help="document corpus -> doc_tower embeddings "
                                             "(docs/contracts.md section 4)")
    config.add_arguments(em, EmbedConfig)
    _add_beam_flags(em)
    em.set_defaults(func=_embed)

    mine = subparsers.add_parser(
        "mine-negatives", help="offline hard negatives from the current model (paper 6.1.1)",
        description="Embed training queries with the query tower, search the index, sample "
                    "documents at ranks inside a window as negatives for a share of the examples "
                    "(easy:hard ratio = share of examples carrying hard negatives, H/(E+H)). "
                    "The window (1-based, inclusive), the negatives per selected example, the "
                    "ratio and the seed are the `mining` section (--mining.window ...). Beam "
                    "options follow `--` (e.g. -- "
                    "--runner=DataflowRunner --project=P ...).")
    config.add_arguments(mine, MineConfig)
    _add_beam_flags(mine)
    mine.set_defaults(func=_mine)
