"""Typed configuration of the pipeline commands: `ExamplesConfig` (`ebr pipeline examples`) and
`EmbedConfig` (`ebr embed`); `ebr mine-negatives` has `beam_pipelines.mining.MineConfig`.

Place in the data flow: `beam_pipelines/cli.py` turns these dataclasses into flags with
`ebr.config` (`num_shards` -> `--num-shards`, `--config FILE`, `--set key=value`; the nested
train / eval split is set with `--set split.method=time --set split.time_cutoff=T`), and
`examples.run` / `embed.run` take them and write them as `config.json` into the version they
commit. Every default lives here; the module imports no Beam or TensorFlow, so building the
`ebr` command line stays fast. Beam's own options (`--runner`, ... after `--`) are not settings
of these commands: they go to Beam unchanged (`beam_pipelines.options`).
"""
from __future__ import annotations

import dataclasses

from beam_pipelines import rawlog, split
from ebr import config, features


def check_num_shards(num_shards: int) -> None:
    if num_shards < 0:
        raise ValueError(f"--num-shards must be >= 0, got {num_shards}")


@dataclasses.dataclass
class ExamplesConfig:
    """Settings of `ebr pipeline examples` (docs/contracts.md section 2)."""

    input: str = config.required("raw-log directory, any URI (docs/data-format.md)")
    output: str = config.required("examples artifact base (any URI): each run commits a new "
                                  "version OUT/VERSION, keeping the newest 2")
    split: split.SplitConfig = dataclasses.field(default_factory=split.SplitConfig)
    history: int = features.HISTORY_LENGTH  # the searcher's last N training clicks as history
    allow_empty_query: bool = dataclasses.field(default=False, metadata={
        "help": "accept sessions without a query (recommendation logs, MovieLens); otherwise "
                "an empty query is dead-lettered"})
    num_shards: int = 0  # shards per output, 0 = the runner decides
    chunk_lines: int = rawlog.CHUNK_LINES  # raw-log lines read per chunk

    def __post_init__(self):
        cap = features.BY_NAME[features.HISTORY_DOC_IDS].max_values
        if not 0 <= self.history <= cap:
            raise ValueError(f"--history must be in [0, {cap}] ({features.HISTORY_DOC_IDS} "
                             f"max_values in ebr/features.py), got {self.history}")
        check_num_shards(self.num_shards)


@dataclasses.dataclass
class EmbedConfig:
    """Settings of `ebr embed` (docs/contracts.md section 4)."""

    model: str = config.required("MODEL_DIR/doc_tower or MODEL_DIR/doc_tower/VERSION, any URI")
    corpus: str = config.required("examples artifact EX or EX/VERSION of `ebr pipeline "
                                  "examples` (also EX/corpus, or a glob of corpus TFRecords)")
    output: str = config.required("embeddings artifact base (any URI): each run commits a new "
                                  "version EMB/VERSION, keeping the newest 2")
    batch_size: int = 256  # documents per doc-tower call
    num_shards: int = 0  # output shards, 0 = the runner decides

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        check_num_shards(self.num_shards)
