"""The one command line, `ebr`.

Each component registers its own subcommands from its `cli.py` (`register(subparsers)`), and
every subcommand calls the same functions the tests call; this module only assembles them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ebr import logs

# Component CLIs in data-flow order.
COMPONENTS = (
    "ebr.datasets.cli",
    "beam_pipelines.cli",
    "trainer.cli",
    "index.cli",
    "serving.cli",
    "retraining.cli",
    "experiments.cli",
    "ebr.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebr", description="Embedding-based retrieval stack")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMPONENTS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Run as a program (no argv given), the command owns stderr and may filter it (ebr.logs).
    logs.setup(args.verbose, filter_native=argv is None)
    from ebr.storage import StorageError

    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, StorageError) as e:
        # Bad input, and storage failures (ebr.storage names the operation and the path), are
        # one clear line, not a traceback; anything else is a bug and keeps its traceback.
        print(f"ebr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
