"""Typed configuration of the trainer's commands: `TrainConfig` (`ebr train`, `python -m
trainer.task`), its loss / negative-sampling part `LossConfig`, and `EvaluateConfig` (`ebr
evaluate`).

Every default lives here. `ebr.config` turns these dataclasses into flags (`batch_size` ->
`--batch-size`, the nested loss settings to `--loss.temperature`; Vertex AI's `--batch_size`
spelling is accepted too), reads `--config FILE` and `--set key=value` and records the resolved
configuration; the module imports no TensorFlow, so building the `ebr` command line stays fast.
Hash sizes default to `ebr.features`; `hash_bucket_cap` and the `text_*_buckets` fields shrink
them for tests and small data (recorded in the export metadata).
"""
from __future__ import annotations

import dataclasses

from ebr import config, features

# File patterns inside one examples version (docs/contracts.md section 2).
TRAIN_PATTERN = "train/examples-*.tfrecord.gz"
EVAL_PATTERN = "eval/examples-*.tfrecord.gz"
CORPUS_PATTERN = "corpus/documents-*.tfrecord.gz"
# Recall@K cut-offs of the offline evaluation.
DEFAULT_KS = (10, 50, 100, 500)

LOSSES = ("softmax", "triplet")
LOGQ = ("none", "pipeline", "streaming")
MIXED_SOURCES = ("tower", "cache")
REDUCTIONS = ("sum", "mean")
OPTIMIZERS = ("adam", "adagrad", "sgd")


@dataclasses.dataclass
class LossConfig:
    """The loss and its negatives (`trainer.losses.RetrievalLoss`; the math is in its docstring)."""
    loss: str = "softmax"  # softmax | triplet
    temperature: float = 0.05  # softmax only; logits are cosine / temperature
    logq: str = "pipeline"  # none | pipeline (doc_sampling_prob) | streaming (Yi et al.)
    remove_accidental_hits: bool = True
    # CBNS memory queue (0 = off)
    queue_size: int = 0
    queue_warmup_steps: int = 100
    # MNS mixed negatives: per replica and step (0 = off), through the doc tower or the cache
    mixed_negatives: int = 0
    mixed_source: str = "tower"  # tower | cache
    cache_size: int = 0  # 0 = min(corpus size, 65536)
    cache_refresh_steps: int = 100
    # Online hard negatives: triplet -> k hardest as negatives; softmax -> keep positive + k hardest
    hard_negatives: int = 0
    random_negatives: int = 1  # triplet only: uniformly drawn pool negatives per query
    margin: float = 0.2  # triplet margin (paper: 0.1-0.3 depending on task)
    # Streaming frequency estimator (logq=streaming)
    estimator_buckets: int = 1 << 20
    estimator_alpha: float = 0.05
    estimator_hashes: int = 2
    reduction: str = "sum"  # sum | mean
    seed: int = 0

    def __post_init__(self):
        choices = {"loss": LOSSES, "logq": LOGQ, "mixed_source": MIXED_SOURCES,
                   "reduction": REDUCTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"loss.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be positive, got {self.temperature}")
        for name in ("queue_size", "queue_warmup_steps", "mixed_negatives", "cache_size",
                     "hard_negatives", "random_negatives"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.cache_refresh_steps <= 0:
            raise ValueError(f"loss.cache_refresh_steps must be positive, got {self.cache_refresh_steps}")
        if self.margin < 0:
            raise ValueError(f"loss.margin must be >= 0, got {self.margin}")


@dataclasses.dataclass
class TrainConfig:
    # --- data (`ebr pipeline examples`, docs/contracts.md section 2) -----------------------
    data_dir: str = config.required("examples artifact of `ebr pipeline examples`: EX (newest "
                                    "committed version) or EX/VERSION, any URI")
    train_pattern: str = TRAIN_PATTERN  # inside the resolved examples version directory
    eval_pattern: str = EVAL_PATTERN  # inside the examples version; no match: no evaluation
    corpus_pattern: str = CORPUS_PATTERN  # inside the examples version
    # --- outputs: URIs (local or gs://); Vertex AI's AIP_* variables fill these when empty -
    model_dir: str = config.setting("", "export base, any URI (empty: AIP_MODEL_DIR)")
    checkpoint_dir: str = config.setting("", "checkpoints, any URI (empty: AIP_CHECKPOINT_DIR, "
                                              "else MODEL_DIR/checkpoints)")
    tensorboard_dir: str = config.setting("", "TensorBoard logs, any URI (empty: "
                                               "AIP_TENSORBOARD_LOG_DIR, else MODEL_DIR/logs)")
    version: int = 0  # export version; 0 = one more than the newest already in model_dir
    output: str = ""  # also write the result JSON here (any URI)
    # --- model ---------------------------------------------------------------------------
    embedding_dim: int = 64  # output dimension of both towers (L2-normalised)
    feature_dim: int = 32  # per-feature embedding size (categorical, multi, history)
    text_dim: int = 64  # n-gram embedding size (char and word tables each)
    hidden_units: list[int] = config.setting([256], "MLP layer sizes of each tower, before the "
                                                    "output layer")
    share_text_tables: bool = True  # paper: the towers share some parameters
    history_attention: bool = True  # history pooled by attention on the query text, plus mean
    # The serving signatures take every input of the schema and ignore the rest, so clients,
    # pipelines and TF Serving configs stay the same whatever the towers embed.
    tower_features: list[str] = config.setting(
        [], "schema features the towers embed; empty = all. query,doc_text is the text-only "
            "baseline the paper measures the unified model against")
    hash_bucket_cap: int = 0  # 0 = schema sizes; else min(schema size, cap) per table
    text_char_buckets: int = features.TEXT_CHAR_BUCKETS
    text_word_buckets: int = features.TEXT_WORD_BUCKETS
    # --- warm start: the towers begin from an export's variables (optimizer and loss state fresh)
    warm_start: str = ""  # MODEL_DIR of an exported tower pair (any URI) to start from; empty = cold start
    warm_start_version: int = 0  # version of the pair in warm_start; 0 = its newest committed pair
    # --- optimisation --------------------------------------------------------------------
    optimizer: str = "adam"  # adam | adagrad | sgd
    learning_rate: float = 0.001
    batch_size: int = 256  # global batch (split across replicas)
    epochs: int = 1  # passes of steps_per_epoch steps each
    steps_per_epoch: int = 0  # 0 = one pass over the training files per epoch
    shuffle_buffer: int = 10_000
    use_extra_negatives: bool = True  # resolve `negative_doc_ids` through the corpus
    seed: int = 42
    # --- job -----------------------------------------------------------------------------
    checkpoint_every_steps: int = 200  # BackupAndRestore frequency (resume after a kill)
    eval_ks: list[int] = config.setting(list(DEFAULT_KS), "recall@K cut-offs of the evaluation "
                                                          "after training")
    eval_batch_size: int = 1024
    hypertune_metric: str = "recall_at_100"  # headline metric reported in the cloudml-hypertune file
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)

    def __post_init__(self):
        if self.embedding_dim <= 0 or self.feature_dim <= 0 or self.text_dim <= 0:
            raise ValueError("embedding_dim, feature_dim and text_dim must be positive")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be adam, adagrad or sgd, got {self.optimizer!r}")
        if self.epochs <= 0 or self.steps_per_epoch < 0:
            raise ValueError("epochs must be positive and steps_per_epoch >= 0")
        if self.warm_start_version < 0 or (self.warm_start_version and not self.warm_start):
            raise ValueError(f"warm_start_version {self.warm_start_version} needs warm_start (a "
                             f"MODEL_DIR) and must be >= 0 (0 = newest committed pair)")
        if self.tower_features:
            known = features.QUERY_INPUTS + features.DOC_INPUTS
            unknown = sorted(set(self.tower_features) - set(known))
            if unknown:
                raise ValueError(f"tower_features: {unknown} are not tower inputs of ebr.features; "
                                 f"known: {list(known)}")
            for side, names in (("query", features.QUERY_INPUTS), ("document", features.DOC_INPUTS)):
                if not set(self.tower_features) & set(names):
                    raise ValueError(f"tower_features {self.tower_features} leave the {side} tower "
                                     f"without inputs; pick from {list(names)}")
        if (self.loss.loss == "triplet" and self.loss.random_negatives == 0
                and self.loss.hard_negatives == 0 and not self.use_extra_negatives):
            raise ValueError("triplet loss without random or hard negatives trains on the examples' "
                             "negative_doc_ids only: set use_extra_negatives")


# The settings that decide the towers' variables (their number, order and shapes; see
# trainer/towers.py): a warm start needs each equal to the export's recorded training configuration.
ARCHITECTURE = ("embedding_dim", "feature_dim", "text_dim", "hidden_units", "tower_features",
                "hash_bucket_cap", "text_char_buckets", "text_word_buckets", "share_text_tables",
                "history_attention")


def table_buckets(cap: int) -> dict[str, int]:
    """Hash buckets of each schema table (a feature without `table` has its own) under
    `hash_bucket_cap` `cap`: the towers' embedding tables (`trainer.towers.build_tables`).
    Shared tables must hash every feature into the same buckets, or the same entity would land
    on different rows from the two sides."""
    sizes: dict[str, int] = {}
    for f in features.features(kinds=(features.CATEGORICAL, features.MULTI)):
        if f.side in (features.QUERY, features.DOCUMENT):
            n = min(f.hash_buckets, cap) if cap > 0 else f.hash_buckets
            sizes[f.table or f.name] = max(sizes.get(f.table or f.name, 0), n)
    return sizes


def _architecture_value(name: str, value):
    if name == "tower_features":  # empty = every input; the order is the schema's
        return sorted(value or (features.QUERY_INPUTS + features.DOC_INPUTS))
    if name == "hash_bucket_cap":  # caps above every table's size change nothing
        return table_buckets(int(value))
    if name == "hidden_units":
        return [int(u) for u in value]
    return value


def architecture_mismatch(config: TrainConfig, exported: dict) -> str | None:
    """The first `ARCHITECTURE` setting in which `config` differs from an export's recorded
    training configuration (`exported`: the "config" of its ebr_metadata.json), as
    "NAME: VALUE here, VALUE in the export"; None when the towers have the same variables."""
    for name in ARCHITECTURE:
        mine = getattr(config, name)
        if name not in exported:
            return f"{name}: {mine!r} here, not recorded in the export"
        if _architecture_value(name, mine) != _architecture_value(name, exported[name]):
            return f"{name}: {mine!r} here, {exported[name]!r} in the export"
    return None


@dataclasses.dataclass
class EvaluateConfig:
    """`ebr evaluate`: recall@K of exported towers on the held-out split (`trainer.evaluate`)."""
    model: str = config.required("query tower export: MODEL_DIR/query_tower[/VERSION], any URI")
    doc_model: str = config.setting("", "doc tower export: MODEL_DIR/doc_tower[/VERSION] (empty: "
                                         "the query tower's sibling of the same version)")
    data_dir: str = config.required("examples artifact of `ebr pipeline examples`: EX or "
                                    "EX/VERSION")
    eval_pattern: str = config.setting("", f"held-out examples, any URI (empty: "
                                            f"EX/VERSION/{EVAL_PATTERN})")
    corpus: str = config.setting("", f"corpus files, any URI (empty: EX/VERSION/{CORPUS_PATTERN})")
    ks: list[int] = config.setting(list(DEFAULT_KS), "recall@K cut-offs")
    exclude_train: bool = config.setting(True, "also report the protocol that removes the "
                                                "searcher's training items")
    batch_size: int = 1024
    output: str = ""  # write the JSON report here (any URI); the configuration goes beside it

    def __post_init__(self):
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError(f"ks must be positive cut-offs, got {self.ks}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
