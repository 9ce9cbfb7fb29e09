"""`ebr train` and `ebr evaluate`: thin wrappers over `trainer.task.run` and `trainer.evaluate`.

Every path is a URI (local or gs://); `--data-dir` is an examples artifact, EX or EX/VERSION.
"""
from __future__ import annotations

import argparse
import json


def _train(args: argparse.Namespace) -> int:
    from trainer import task

    return task.run(args)


def _evaluate(args: argparse.Namespace) -> int:
    from ebr import storage
    from trainer.evaluate import DEFAULT_KS, evaluate
    from trainer.task import resolve_data_dir

    d = resolve_data_dir(args.data_dir)
    result = evaluate(
        args.model, eval_pattern=args.eval_pattern or storage.join(d, "eval/examples-*.tfrecord.gz"),
        corpus=args.corpus or storage.join(d, "corpus/documents-*.tfrecord.gz"),
        doc_tower_path=args.doc_model,
        train_pattern=None if args.no_exclude_train else storage.join(d, "train/examples-*.tfrecord.gz"),
        ks=[int(k) for k in args.ks.split(",")] if args.ks else DEFAULT_KS,
        data_dir=d, output=args.output, batch_size=args.batch_size)
    print(json.dumps(result["protocols"], indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the two-tower model, evaluate and export the towers",
                              description="Train the unified embedding model (same flags as "
                                          "`python -m trainer.task`); --set key=value overrides "
                                          "config fields.")
    from trainer.task import add_arguments

    add_arguments(p)
    p.set_defaults(func=_train)

    e = subparsers.add_parser("evaluate", help="recall@K of exported towers on the held-out split")
    e.add_argument("--model", required=True, help="MODEL_DIR/query_tower[/VERSION]")
    e.add_argument("--doc-model", help="MODEL_DIR/doc_tower[/VERSION] (default: the sibling export)")
    e.add_argument("--data-dir", required=True,
                   help="examples artifact of `ebr pipeline examples`: EX or EX/VERSION")
    e.add_argument("--eval-pattern", help="default EX/VERSION/eval/examples-*.tfrecord.gz")
    e.add_argument("--corpus", help="default EX/VERSION/corpus/documents-*.tfrecord.gz")
    e.add_argument("--ks", default="10,50,100,500")
    e.add_argument("--no-exclude-train", action="store_true",
                   help="skip the protocol that removes the searcher's training items")
    e.add_argument("--batch-size", type=int, default=1024)
    e.add_argument("--output", help="write the JSON here")
    e.set_defaults(func=_evaluate)
