"""The train / eval split of sessions, reproducible from `OUT/split.json` alone.

Place in the data flow: `ebr pipeline examples` assigns every valid session to a split with
`is_eval` and records the `SplitConfig` in `split.json`; any tool (evaluation, experiments)
can call `load(path)` and `is_eval` to get the same answer for a session.

  hash: eval iff sha256(f"{salt}:{session_id}")[:8] as a big-endian integer < eval_fraction * 2**64
  time: eval iff timestamp >= time_cutoff (unix seconds)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

HASH, TIME = "hash", "time"
DEFAULT_SALT = "ebr-split-v1"


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    method: str = HASH
    eval_fraction: float = 0.1  # hash split only
    salt: str = DEFAULT_SALT  # hash split only
    time_cutoff: int | None = None  # time split only

    def __post_init__(self):
        if self.method not in (HASH, TIME):
            raise ValueError(f"split method must be {HASH!r} or {TIME!r}, got {self.method!r}")
        if self.method == HASH and not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval fraction must be in [0, 1), got {self.eval_fraction}")
        if self.method == TIME and self.time_cutoff is None:
            raise ValueError("a time split needs split.time_cutoff (unix seconds, e.g. --set "
                             "split.time_cutoff=T; sessions at or after it are evaluation)")


def is_eval(cfg: SplitConfig, session_id: str, timestamp: int) -> bool:
    if cfg.method == TIME:
        return timestamp >= cfg.time_cutoff
    digest = hashlib.sha256(f"{cfg.salt}:{session_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < int(cfg.eval_fraction * 2 ** 64)


def to_json(cfg: SplitConfig) -> dict:
    out = {"method": cfg.method}
    if cfg.method == HASH:
        out.update(eval_fraction=cfg.eval_fraction, salt=cfg.salt,
                   rule='eval iff int.from_bytes(sha256(f"{salt}:{session_id}")[:8], "big") '
                        '< eval_fraction * 2**64')
    else:
        out.update(time_cutoff=cfg.time_cutoff, rule="eval iff timestamp >= time_cutoff")
    out["history"] = ("history_doc_ids holds only training-split clicks made strictly before "
                      "the session's timestamp, for training and evaluation examples alike")
    return out


def from_json(data: dict) -> SplitConfig:
    if data.get("method") == TIME:
        return SplitConfig(TIME, time_cutoff=int(data["time_cutoff"]))
    return SplitConfig(HASH, eval_fraction=float(data["eval_fraction"]), salt=str(data["salt"]))


def load(path: str) -> SplitConfig:
    """The split a pipeline run recorded (`OUT/split.json`, any Beam file system)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return from_json(json.loads(f.read().decode("utf-8")))
