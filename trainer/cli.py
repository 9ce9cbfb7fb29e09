"""`ebr train` and `ebr evaluate`: thin wrappers over `trainer.task.run` and `trainer.evaluate`.

Flags come from `trainer.config.TrainConfig` / `EvaluateConfig` (`ebr.config`). Every path is a
URI (local or gs://); `--data-dir` is an examples artifact, EX or EX/VERSION.
"""
from __future__ import annotations

import argparse
import json

from ebr import config
from trainer.config import EvaluateConfig, TrainConfig


def _train(args: argparse.Namespace) -> int:
    from trainer import task

    return task.run(args)


def _evaluate(args: argparse.Namespace) -> int:
    from ebr import storage
    from trainer.config import CORPUS_PATTERN, EVAL_PATTERN, TRAIN_PATTERN
    from trainer.evaluate import evaluate
    from trainer.task import resolve_data_dir

    cfg = config.from_args(EvaluateConfig, args)
    config.announce("evaluate", cfg)
    d = resolve_data_dir(cfg.data_dir)
    result = evaluate(
        cfg.model, eval_pattern=cfg.eval_pattern or storage.join(d, EVAL_PATTERN),
        corpus=cfg.corpus or storage.join(d, CORPUS_PATTERN),
        doc_tower_path=cfg.doc_model or None,
        train_pattern=storage.join(d, TRAIN_PATTERN) if cfg.exclude_train else None,
        ks=cfg.ks, data_dir=d, output=cfg.output or None, batch_size=cfg.batch_size)
    if cfg.output:  # REPORT.json -> REPORT.config.json beside it
        out = storage.normalize(cfg.output)
        name = storage.basename(out).removesuffix(".json")
        config.save(cfg, storage.parent(out), f"{name}.config.json")
    print(json.dumps(result["protocols"], indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the two-tower model, evaluate and export the towers",
                              description="Train the unified embedding model (the flags of "
                                          "`python -m trainer.task`); the resolved configuration "
                                          "is logged first and exported with the towers.")
    config.add_arguments(p, TrainConfig)
    p.set_defaults(func=_train)

    e = subparsers.add_parser("evaluate", help="recall@K of exported towers on the held-out split")
    config.add_arguments(e, EvaluateConfig)
    e.set_defaults(func=_evaluate)
