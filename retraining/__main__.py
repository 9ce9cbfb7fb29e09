"""`python -m retraining run|compile|submit`: the `ebr retrain` commands (retraining/cli.py)."""
import argparse
import sys

from ebr import logs
from ebr.storage import StorageError
from retraining import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retraining",
                                     description=cli.__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    cli.add_commands(parser.add_subparsers(dest="retrain_command", required=True))
    args = parser.parse_args(argv)
    logs.setup(args.verbose, filter_native=argv is None)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, StorageError) as e:
        print(f"python -m retraining {args.retrain_command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
