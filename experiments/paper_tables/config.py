"""What `ebr experiment paper-tables` runs: one dataclass for the run (where, how many seeds), the
base recipe every model shares and the experiments' grids.

Place in the data flow: command line (`experiments/cli.py`, flags generated from
`PaperTablesConfig` by `ebr.config`) or `runner.main` -> this configuration -> the plan
(`rows.plan`), the seed runs (`seed_run`) and the report, which prints it whole.
"""
from __future__ import annotations

import copy
import dataclasses
import typing

from ebr import config as ebr_config
from beam_pipelines import mining


# `--quick`: small data, and a grid without the intermediate easy:hard ratios. Batch 64 for six
# epochs (about 430 steps) because the unified model, unlike the text-only one, is far from
# trained after 70 steps (recall@10 0.53 -> 0.85 on seed 0, the tuning seed, which no report
# shows: reported seeds start at `first_seed`; chosen on the unified model alone).
# One seed takes 3.4 min on an idle 2-core machine, keeping 1.2 cores busy (tracing and step
# dispatch are single-threaded Python), so the seeds run side by side in processes (`jobs`).
QUICK = {"documents": 2_000, "sessions": 6_000, "epochs": 6, "batch_size": 64,
         "hidden_units": [64], "hash_bucket_cap": 20_000, "text_buckets": 20_000,
         "ratios": ["100:1", "0:1"], "ann_pq_bytes": [4, 8, 16], "ann_nprobes": [1, 2, 4, 8, 16]}


def _help(text: str) -> dict:
    return {"help": text}


@dataclasses.dataclass
class PaperTablesConfig:
    # the run
    out: str = dataclasses.field(default="paper_tables", metadata=_help(
        "where report.md, results.json, config.json and the PNG plots go, any URI (local or gs://...)"))
    work: str | None = dataclasses.field(default=None, metadata=_help(
        "scratch directory for every seed's raw logs, examples, models and indexes, any URI "
        "(none: OUT/work when OUT is local; a local temp directory, removed at the end, when OUT "
        "is remote)"))
    quick: bool = dataclasses.field(default=False, metadata=_help(
        "small data, 3 seeds in under 10 minutes on 2 cores: these defaults under every other "
        "setting: " + "; ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                                for k, v in QUICK.items())))
    seeds: int = 3  # number of reported seeds (first_seed, first_seed + 1, ...)
    first_seed: int = dataclasses.field(default=1, metadata=_help(
        "the first reported seed; seed 0 is the tuning seed (the defaults and the quick preset were "
        "chosen on it), so it is never reported"))
    jobs: int | None = dataclasses.field(default=None, metadata=_help(
        "seeds run side by side in processes (none: seeds, at most CPUs + 1)"))
    only: list[str] = dataclasses.field(default_factory=list, metadata=_help(
        "experiment numbers (1-8) or row names, with their experiments' baselines (none: all)"))
    # data (`ebr data social`)
    documents: int = 10_000  # documents in each seed's generated logs
    sessions: int = 60_000  # search sessions in each seed's generated logs
    raw: str | None = ebr_config.setting(None, (
        "canonical raw logs (docs/data-format.md; a team's own logs), any URI: every seed trains "
        "and evaluates on them (one examples run, so every seed has the same held-out split; the "
        "seed varies model initialisation, shuffling, sampling and mining) instead of generating "
        "its own logs (none: `ebr data social` with DOCUMENTS and SESSIONS, seed S)"))

    def _check_raw(self):
        # Whether the logs exist and parse is the examples pipeline's check (`rawlog`), made
        # once before any seed runs; here only that the setting names something.
        if self.raw is not None and not str(self.raw).strip():
            raise ValueError("raw must be the URI of canonical raw logs (docs/data-format.md), "
                             "or none for the generator")
    # model and training (the base recipe; trainer.config.TrainConfig / trainer.losses.LossConfig)
    embedding_dim: int = 32  # output dimension of both towers
    feature_dim: int = 16  # embedding dimension of each categorical and multi-valued feature
    text_dim: int = 32  # embedding dimension of the text n-gram features
    hidden_units: list[int] = dataclasses.field(default_factory=lambda: [128])  # tower MLP layers
    hash_bucket_cap: int = 50_000  # upper bound on any feature's hash buckets
    text_buckets: int = 50_000  # char 3-gram and word n-gram hash buckets
    batch_size: int = 128  # training batch size
    epochs: int = 4  # training epochs of every model
    learning_rate: float = 0.003  # Adam learning rate
    base_loss: str = "triplet"  # triplet (the paper's) | softmax
    margin: float = 0.2  # triplet loss margin on cosine distance
    random_negatives: int = 1  # random in-batch negatives per positive
    temperature: float = 0.05  # softmax only
    # evaluation
    ks: list[int] = dataclasses.field(default_factory=lambda: [10, 50, 100])  # recall@K reported
    primary_k: int = 10  # verdicts use recall at this K
    # experiment grids
    impression_negatives_max: int = 8  # experiment 2: impression negatives per example at most
    online_hard: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 4])  # experiment 4
    e1_online_hard: int = dataclasses.field(default=0, metadata=_help(
        "> 0: experiment 1 also compares text-only and unified with this many online hard "
        "negatives in both models (a second recipe beside the base one; not one of the paper's "
        "claims)"))
    windows: list[str] = dataclasses.field(
        default_factory=lambda: ["1-100", "101-500", "501-1000"])  # experiment 5 rank windows
    ratios: list[str] = dataclasses.field(
        default_factory=lambda: ["100:1", "10:1", "1:1", "0:1"])  # experiment 5 easy:hard ratios
    default_window: str = "101-500"  # the window the ratios are measured at
    default_ratio: str = "100:1"  # the ratio the windows are measured at
    hard_per_query: int = 1  # offline hard negatives per selected example
    hard_positive_window: int = 300  # experiment 6: seconds from a failed search to its reformulation
    ensemble_hard_model: str = "mined_101-500_0:1"  # the "hard" model of experiment 7
    ensemble_alphas: list[float] = dataclasses.field(
        default_factory=lambda: [0.5, 1.0, 2.0])  # experiment 7: weights of the hard model
    cascade_n: int = 100  # experiment 7: candidates the cascade's first model retrieves
    ann_nlist: int = 0  # 0 = about 2 * sqrt(documents), a power of two
    ann_pq_bytes: list[int] = dataclasses.field(default_factory=lambda: [4, 8, 16])  # experiment 8
    ann_nprobes: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # experiment 8
    beam_args: list[str] = dataclasses.field(default_factory=list)  # Beam pipeline options

    def __post_init__(self):
        self._check_raw()
        for w in self.windows + [self.default_window]:
            mining.parse_window(w)
        for r in self.ratios + [self.default_ratio]:
            mining.parse_ratio(r)
        if self.base_loss not in ("triplet", "softmax"):
            raise ValueError(f"base_loss must be triplet or softmax, got {self.base_loss!r}")
        if self.primary_k not in self.ks:
            raise ValueError(f"primary_k {self.primary_k} must be one of ks {self.ks}")
        if self.cascade_n < max(self.ks):
            raise ValueError(f"cascade_n {self.cascade_n} must be >= the largest K {max(self.ks)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.first_seed < 1:
            raise ValueError(f"first_seed must be >= 1 (seed 0 is the tuning seed and never "
                             f"reported), got {self.first_seed}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")


def make_config(quick: bool = False, overrides: list[str] | None = None) -> PaperTablesConfig:
    """The defaults (under the QUICK preset when `quick`), then `KEY=VALUE` overrides."""
    base = {**QUICK, "quick": True} if quick else {}
    cfg = ebr_config.from_dict(PaperTablesConfig, base, "paper-tables")
    if overrides:
        data = dataclasses.asdict(cfg)
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"--set {item!r} is not KEY=VALUE")
            key, value = item.split("=", 1)
            if key not in data:
                raise ValueError(f"--set {key}: unknown field of PaperTablesConfig; known: {sorted(data)}")
            data[key] = value
        cfg = ebr_config.from_dict(PaperTablesConfig, data, "paper-tables")
    return cfg


def _quick_defaults() -> type:
    """`PaperTablesConfig` with the QUICK preset (and quick=True) as its defaults: resolving the
    command line against it puts the preset under every setting the user gave."""
    hints = typing.get_type_hints(PaperTablesConfig)
    preset = {**QUICK, "quick": True}
    return dataclasses.make_dataclass(
        "PaperTablesConfig",
        [(k, hints[k], dataclasses.field(default_factory=lambda v=v: copy.deepcopy(v))) for k, v in preset.items()],
        bases=(PaperTablesConfig,))


def from_args(args) -> PaperTablesConfig:
    """The command line's configuration (`ebr.config.from_args`: defaults <- --config <- flags
    <- --set); when it asks for `quick`, the QUICK preset replaces the defaults underneath."""
    cfg = ebr_config.from_args(PaperTablesConfig, args)
    if not cfg.quick:
        return cfg
    quick = ebr_config.from_args(_quick_defaults(), args)
    return PaperTablesConfig(**{f.name: getattr(quick, f.name) for f in dataclasses.fields(PaperTablesConfig)})
