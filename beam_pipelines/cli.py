"""`ebr pipeline examples` and `ebr embed`: command-line front ends of the Beam pipelines.

Beam options go after `--` and reach Beam unchanged, e.g.
  ebr pipeline examples --input raw --output out -- --runner=DataflowRunner --project=P \
      --region=R --temp_location=gs://B/tmp
The local runner flags are also accepted directly (`--runner`, `--direct_running_mode`,
`--direct_num_workers`). Every path takes any URI (local, gs://); outputs are versioned
artifacts (`beam_pipelines.outputs`, docs/contracts.md "Commit protocol"). Heavy imports happen inside the command functions so `ebr --help`
stays fast.
"""
from __future__ import annotations

import argparse
import json


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
    from beam_pipelines import examples, split

    cfg = examples.ExamplesConfig(
        input=args.input, output=args.output,
        split=split.SplitConfig(method=args.split, eval_fraction=args.eval_fraction,
                                salt=args.split_salt, time_cutoff=args.time_cutoff),
        history=args.history, allow_empty_query=args.allow_empty_query,
        num_shards=args.num_shards)
    stats = examples.run(cfg, _beam_args(args))
    print(json.dumps({"output": stats["output"], "totals": stats["totals"],
                      "written": stats["written"], "timings": stats["timings"]}, indent=2))
    return 0


def _embed(args) -> int:
    from beam_pipelines import embed

    cfg = embed.EmbedConfig(model=args.model, corpus=args.corpus, output=args.output,
                            batch_size=args.batch_size, num_shards=args.num_shards)
    summary = embed.run(cfg, _beam_args(args))
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    from beam_pipelines import split
    from ebr import features

    pipeline = subparsers.add_parser("pipeline", help="Beam data pipelines")
    sub = pipeline.add_subparsers(dest="pipeline", required=True)
    ex = sub.add_parser("examples", help="raw logs -> training/eval examples, corpus, stats "
                                         "(docs/contracts.md section 2)")
    ex.add_argument("--input", required=True,
                    help="raw-log directory, any URI (docs/data-format.md)")
    ex.add_argument("--output", required=True,
                    help="examples artifact base (any URI): each run commits a new version "
                         "OUT/VERSION, keeping the newest 2")
    ex.add_argument("--split", choices=(split.HASH, split.TIME), default=split.HASH)
    ex.add_argument("--eval-fraction", type=float, default=0.1, help="hash split: eval share")
    ex.add_argument("--split-salt", default=split.DEFAULT_SALT, help="hash split: salt")
    ex.add_argument("--time-cutoff", type=int, help="time split: sessions at or after this "
                                                    "unix time are evaluation")
    ex.add_argument("--history", type=int, default=features.HISTORY_LENGTH,
                    help="searcher's last N training clicks as the history feature")
    ex.add_argument("--allow-empty-query", action="store_true",
                    help="accept sessions without a query (recommendation logs, MovieLens); "
                         "otherwise an empty query is dead-lettered")
    ex.add_argument("--num-shards", type=int, default=0, help="shards per output (0: runner)")
    _add_beam_flags(ex)
    ex.set_defaults(func=_examples)

    em = subparsers.add_parser("embed", help="document corpus -> doc_tower embeddings "
                                             "(docs/contracts.md section 4)")
    em.add_argument("--model", required=True, help="MODEL_DIR/doc_tower[/VERSION]")
    em.add_argument("--corpus", required=True,
                    help="examples artifact EX or EX/VERSION of `ebr pipeline examples` "
                         "(also EX/corpus, or a glob of corpus TFRecords)")
    em.add_argument("--output", required=True,
                    help="embeddings artifact base (any URI): each run commits a new version "
                         "EMB/VERSION, keeping the newest 2")
    em.add_argument("--batch-size", type=int, default=256)
    em.add_argument("--num-shards", type=int, default=0, help="output shards (0: runner)")
    _add_beam_flags(em)
    em.set_defaults(func=_embed)
