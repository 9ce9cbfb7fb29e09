"""CLI of the paper's techniques: `ebr mine-negatives` and `ebr experiment paper-tables`.

Every path option takes any URI (local paths or gs://...); artifacts are read and written by
the stages' own functions through `ebr.storage` / `ebr.artifacts` (docs/contracts.md).
Heavy imports (TensorFlow, Beam, FAISS) happen inside the handlers so `ebr --help` stays fast.
"""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    mine = subparsers.add_parser(
        "mine-negatives", help="offline hard negatives from the current model (paper 6.1.1)",
        description="Embed training queries with the query tower, search the index, sample "
                    "documents at ranks inside a window as negatives for a share of the examples "
                    "(easy:hard ratio = share of examples carrying hard negatives, H/(E+H)). "
                    "Beam options follow `--` (e.g. -- --runner=DataflowRunner --project=P ...).")
    mine.add_argument("--examples", required=True,
                      help="examples artifact of `ebr pipeline examples`: EX (newest committed "
                           "version) or EX/VERSION, any URI")
    mine.add_argument("--model", required=True, help="MODEL_DIR/query_tower[/VERSION], any URI")
    mine.add_argument("--index", required=True,
                      help="INDEX_BASE[/VERSION] of the same model, any URI")
    mine.add_argument("--output", required=True,
                      help="examples artifact base, any URI: each run commits a new version "
                           "OUT/VERSION of the same layout")
    mine.add_argument("--window", default="101-500", help="1-based inclusive rank window (default 101-500)")
    mine.add_argument("--per-query", type=int, default=1, help="hard negatives per selected example")
    mine.add_argument("--ratio", default="100:1", help="easy:hard share of examples (default 100:1)")
    mine.add_argument("--seed", type=int, default=0)
    mine.add_argument("--batch-size", type=int, default=256)
    mine.add_argument("--search-params", default=None, help='JSON, e.g. {"nprobe": 64}')
    mine.add_argument("--allow-model-mismatch", action="store_true",
                      help="mine with a query tower of another version than the index's model")
    mine.add_argument("beam_args", nargs="*", metavar="-- BEAM_OPTION",
                      help="Beam pipeline options after `--`, e.g. -- --runner=DataflowRunner")
    mine.set_defaults(func=_mine)

    exp = subparsers.add_parser("experiment", help="the paper's experiments")
    exp_sub = exp.add_subparsers(dest="experiment", required=True)
    tables = exp_sub.add_parser(
        "paper-tables", help="reproduce the paper's findings on `ebr data social` logs",
        description="Runs the paper's 8 training-data and serving experiments over several seeds and writes a Markdown "
                    "report with tables (mean and std) and PNG plots.")
    tables.add_argument("--quick", action="store_true",
                        help="small data: 3 seeds in under 10 minutes on 2 cores")
    tables.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    tables.add_argument("--jobs", type=int, default=None,
                        help="seeds run side by side in processes (default: seeds, at most CPUs + 1)")
    tables.add_argument("--out", default="paper_tables",
                        help="where report.md, results.json and the PNG plots go, any URI "
                             "(local or gs://...)")
    tables.add_argument("--work", default=None,
                        help="scratch directory for every seed's raw logs, examples, models and "
                             "indexes, any URI (default: OUT/work when OUT is local; a local "
                             "temp directory, removed at the end, when OUT is remote)")
    tables.add_argument("--only", default="", help="comma-separated experiment numbers (1-8) or row names")
    tables.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of experiments.paper_tables.HarnessConfig")
    tables.set_defaults(func=_paper_tables)


def _mine(args: argparse.Namespace) -> int:
    from beam_pipelines.mine_negatives import MineConfig, run
    from beam_pipelines.mining import MiningConfig, parse_window

    start, end = parse_window(args.window)
    cfg = MineConfig(
        examples=args.examples, model=args.model, index=args.index, output=args.output,
        mining=MiningConfig(window_start=start, window_end=end, per_query=args.per_query,
                            ratio=args.ratio, seed=args.seed),
        batch_size=args.batch_size,
        search_params=json.loads(args.search_params) if args.search_params else None,
        allow_model_mismatch=args.allow_model_mismatch)
    summary = run(cfg, getattr(args, "beam_args", None) or [])
    print(json.dumps(summary["counts"], indent=2))
    return 0


def _paper_tables(args: argparse.Namespace) -> int:
    from experiments import paper_tables

    report = paper_tables.main(quick=args.quick, seeds=args.seeds, out=args.out,
                               only=[s for s in args.only.split(",") if s], overrides=args.set,
                               jobs=args.jobs, work=args.work)
    print(f"report: {report}")
    return 0
