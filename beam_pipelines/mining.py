"""Offline hard negatives: the rank window over ANN results and the easy:hard mix (paper 6.1.1).

Place in the data flow: `beam_pipelines/mine_negatives.py` embeds training queries with the
current query tower, searches the index, and calls these functions to pick each query's hard
negatives; the trainer then reads them from the `negative_doc_ids` feature. `MineConfig`, the
settings of that command (`ebr mine-negatives`), lives here too: it imports no Beam, so building
the `ebr` command line stays fast.

The paper found that the *hardest* documents (top ranks) are often unlabelled positives, and that
documents at ranks 101-500 work best; it also found a blend of easy and hard negatives beats
hard only. Definitions used throughout:

* Ranks are 1-based positions in the ANN result list; the window `(start, end)` is inclusive
  on both ends, so the default `(101, 500)` is `results[100:500]`.
* Positives and known clicks of the query are removed *before* sampling, so a query never
  gets one of its own positives as a negative, whatever its rank.
* The easy:hard ratio `E:H` is the share of *training examples* that carry mined hard
  negatives: each example independently (by a seeded hash of its key, so reruns and Beam
  workers agree) carries them with probability `H / (E + H)`; every example keeps the
  trainer's easy (random / in-batch) negatives. `100:1` -> 1 example in 101; `1:0` -> none;
  `0:1` -> all ("hard only": the trainer must then also be told to drop easy negatives).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Sequence

import numpy as np

from beam_pipelines.config import check_num_shards
from ebr import config, features

DEFAULT_WINDOW = (101, 500)
DEFAULT_RATIO = "100:1"


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    window_start: int = DEFAULT_WINDOW[0]  # 1-based, inclusive
    window_end: int = DEFAULT_WINDOW[1]  # inclusive
    per_query: int = 1  # hard negatives sampled per selected example
    ratio: str = DEFAULT_RATIO  # easy:hard share of examples, see module docstring
    seed: int = 0

    def __post_init__(self):
        if self.window_start < 1 or self.window_end < self.window_start:
            raise ValueError(f"mining window must satisfy 1 <= start <= end, got "
                             f"({self.window_start}, {self.window_end})")
        if self.per_query < 1:
            raise ValueError(f"per_query must be >= 1, got {self.per_query}")
        limit = features.BY_NAME[features.NEGATIVE_DOC_IDS].max_values
        if self.per_query > limit:
            raise ValueError(f"per_query={self.per_query} exceeds negative_doc_ids.max_values={limit}")
        hard_fraction(self.ratio)  # validates

    @property
    def fetch_k(self) -> int:
        """How many ANN results a query needs for the window."""
        return self.window_end


@dataclasses.dataclass
class MineConfig:
    """Settings of `ebr mine-negatives` (`beam_pipelines.mine_negatives`). Flags are generated
    from the fields (`ebr.config`); the rank window and the easy:hard mix are the `mining`
    section: `--set mining.window_start=101 --set mining.ratio=1:1`."""

    examples: str = config.required("examples artifact of `ebr pipeline examples`: EX (newest "
                                    "committed version) or EX/VERSION, any URI")
    model: str = config.required("MODEL_DIR/query_tower[/VERSION], any URI")
    index: str = config.required("INDEX_BASE[/VERSION] of the same model, any URI")
    output: str = config.required("examples artifact base, any URI: each run commits a new "
                                  "version OUT/VERSION of the same layout")
    mining: MiningConfig = dataclasses.field(default_factory=MiningConfig)
    batch_size: int = 256  # queries embedded and searched per batch
    search_params: dict | None = None  # backend search params, e.g. nprobe=64
    allow_model_mismatch: bool = False  # mine model N+1's queries against model N's index
    num_shards: int = 0  # train/ output shards, 0 = the runner decides

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        check_num_shards(self.num_shards)


def parse_window(text: str) -> tuple[int, int]:
    """`"101-500"` -> (101, 500)."""
    try:
        start, end = (int(p) for p in text.split("-"))
    except ValueError:
        raise ValueError(f"window {text!r} is not START-END (1-based ranks, e.g. 101-500)") from None
    if start < 1 or end < start:
        raise ValueError(f"window {text!r}: need 1 <= START <= END")
    return start, end


def parse_ratio(text: str) -> tuple[float, float]:
    """`"100:1"` -> (100.0, 1.0)."""
    try:
        easy, hard = (float(p) for p in str(text).split(":"))
    except ValueError:
        raise ValueError(f"ratio {text!r} is not EASY:HARD (e.g. 100:1)") from None
    if easy < 0 or hard < 0 or easy + hard == 0 or not np.isfinite(easy + hard):
        raise ValueError(f"ratio {text!r}: both parts must be >= 0 and not both 0")
    return easy, hard


def hard_fraction(ratio: str) -> float:
    """Share of training examples that carry hard negatives: H / (E + H)."""
    easy, hard = parse_ratio(ratio)
    return hard / (easy + hard)


def _unit_hash(*parts: object) -> float:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def carries_hard_negatives(key: str, ratio: str, seed: int = 0) -> bool:
    """Whether the example with this key (e.g. session id + doc id) gets hard negatives."""
    return _unit_hash("select", seed, key) < hard_fraction(ratio)


def rng_for(key: str, seed: int = 0) -> np.random.Generator:
    """A generator seeded by (seed, key): the same example samples the same negatives on any
    worker in any order."""
    return np.random.default_rng(int(_unit_hash("rng", seed, key) * 2 ** 63))


def window_candidates(ranked_ids: Sequence[str], exclude: Iterable[str],
                      window: tuple[int, int] = DEFAULT_WINDOW) -> list[str]:
    """Documents at 1-based ranks `window[0]..window[1]` (inclusive), minus `exclude`,
    in rank order (duplicates kept once)."""
    start, end = window
    if start < 1 or end < start:
        raise ValueError(f"window must satisfy 1 <= start <= end, got {window}")
    excluded = set(exclude)
    seen: set[str] = set()
    out = []
    for doc in ranked_ids[start - 1:end]:
        if doc and doc not in excluded and doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def sample_window(ranked_ids: Sequence[str], exclude: Iterable[str], n: int,
                  rng: np.random.Generator, window: tuple[int, int] = DEFAULT_WINDOW) -> list[str]:
    """Up to `n` documents sampled uniformly without replacement from the window."""
    candidates = window_candidates(ranked_ids, exclude, window)
    if len(candidates) <= n:
        return candidates
    picks = rng.choice(len(candidates), size=n, replace=False)
    return [candidates[i] for i in sorted(picks)]


def mine_batch(ann_ids: Sequence[Sequence[str]], excludes: Sequence[Iterable[str]],
               keys: Sequence[str], config: MiningConfig) -> list[list[str]]:
    """Hard negatives for a batch of queries given their ANN results (best first).

    `excludes[i]` holds query i's positives and known clicks; `keys[i]` its example key. An
    example not selected by the ratio gets `[]`."""
    if not (len(ann_ids) == len(excludes) == len(keys)):
        raise ValueError(f"mine_batch: {len(ann_ids)} result lists, {len(excludes)} exclusion "
                         f"sets and {len(keys)} keys must have the same length")
    window = (config.window_start, config.window_end)
    out = []
    for ranked, exclude, key in zip(ann_ids, excludes, keys):
        if not carries_hard_negatives(key, config.ratio, config.seed):
            out.append([])
            continue
        out.append(sample_window(ranked, exclude, config.per_query, rng_for(key, config.seed), window))
    return out
