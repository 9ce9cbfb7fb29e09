"""`python -m serving.model_server`: the model server without the `ebr` command, with the same
flags as `ebr serve model` (generated from `ModelServerConfig`, plus `--config` and `--set`).
"""
from __future__ import annotations

import argparse
import logging
import sys

from ebr import config
from serving.model_server.config import ModelServerConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.model_server",
                                     description="TF Serving gRPC API over MODEL_DIR/NAME/VERSION")
    config.add_arguments(parser, ModelServerConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.from_args(ModelServerConfig, args)
    except ValueError as e:
        parser.error(str(e))
    config.announce("serve model", cfg)
    from serving.model_server.server import run

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
