"""`ebr data social` and `ebr data movielens`: write the two data sets in the canonical
raw-log format (docs/data-format.md) to a plain directory on any URI (`--out gs://...` too).
Thin wrappers over `generate_social` / `convert_movielens`.

Flags come from `SocialDataConfig` / `MovielensDataConfig` (`ebr.config`): `--documents`,
`--set clicks.intent=5`, `--config FILE`. The data set's settings (without `--out`, so a data
set reads the same wherever it was written) are saved as config.json beside the logs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from ebr import config
from ebr.datasets.movielens import MovielensConfig
from ebr.datasets.social import SocialConfig

_OUT_HELP = ("output directory, any URI (local, gs://); an earlier raw-log output there is "
             "replaced")


@dataclasses.dataclass
class SocialDataConfig(SocialConfig):
    """`ebr data social`: the generator's settings and where the logs go."""
    out: str = config.required(_OUT_HELP)


@dataclasses.dataclass
class MovielensDataConfig(MovielensConfig):
    """`ebr data movielens`: where MovieLens-100K comes from and where the logs go."""
    out: str = config.required(_OUT_HELP)


def _settings(cfg, cls: type):
    """The `cls` part of a command's configuration: what config.json records."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="write a data set in the canonical raw-log format")
    sub = data.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("social", help="generate the social-search data set",
                       description="Generated social-search logs: people, groups, pages and events "
                                   "with shared names, a friendship graph, a legacy boolean engine's "
                                   "impressions and clicks from a hidden relevance; beside them "
                                   "truth/ceiling.jsonl, each session's Bayes-optimal recall@K. "
                                   "Every knob below shows its default (docs/data-format.md).")
    config.add_arguments(s, SocialDataConfig)
    s.set_defaults(func=_social)

    m = sub.add_parser("movielens", help="convert MovieLens-100K",
                       description="MovieLens-100K as raw logs: each rating a session with an empty "
                                   "query and one click.")
    config.add_arguments(m, MovielensDataConfig)
    m.set_defaults(func=_movielens)


def _social(args: argparse.Namespace) -> int:
    from ebr.datasets.social import _generate

    cfg = config.from_args(SocialDataConfig, args)
    config.announce("data social", cfg)
    settings = _settings(cfg, SocialConfig)
    settings.validate()
    summary = _generate(cfg.out, settings, record=settings)
    print(json.dumps(summary, indent=2))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from ebr.datasets.movielens import convert_movielens

    cfg = config.from_args(MovielensDataConfig, args)
    config.announce("data movielens", cfg)
    settings = _settings(cfg, MovielensConfig)
    summary = convert_movielens(cfg.out, source=settings.source or None,
                                cache_dir=settings.cache_dir, gzip=settings.gzip, record=settings)
    print(json.dumps(summary, indent=2))
    return 0
