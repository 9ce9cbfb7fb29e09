"""Typed configuration of a training run (`ebr train`, `python -m trainer.task`).

Loaded with `ebr.config.load(TrainConfig, file, overrides)`; the loss / negative-sampling part
is `trainer.losses.LossConfig`. Hash sizes default to `ebr.features`; `hash_bucket_cap` and the
`text_*_buckets` fields shrink them for tests and small data (recorded in the export metadata).
"""
from __future__ import annotations

import dataclasses

from ebr import features
from trainer.losses import LossConfig


@dataclasses.dataclass
class TrainConfig:
    # --- data (`ebr pipeline examples`, docs/contracts.md section 2) -----------------------
    # data_dir: the examples artifact EX (newest committed version) or EX/VERSION, any URI;
    # the patterns are relative to the resolved version directory.
    data_dir: str = ""
    train_pattern: str = "train/examples-*.tfrecord.gz"
    eval_pattern: str = "eval/examples-*.tfrecord.gz"
    corpus_pattern: str = "corpus/documents-*.tfrecord.gz"
    # --- outputs: URIs (local or gs://); Vertex AI's AIP_* variables fill these when empty -
    model_dir: str = ""
    checkpoint_dir: str = ""
    tensorboard_dir: str = ""
    version: int = 0  # export version; 0 = one more than the newest already in model_dir
    # --- model ---------------------------------------------------------------------------
    embedding_dim: int = 64  # output dimension of both towers (L2-normalised)
    feature_dim: int = 32  # per-feature embedding size (categorical, multi, history)
    text_dim: int = 64  # n-gram embedding size (char and word tables each)
    hidden_units: list[int] = dataclasses.field(default_factory=lambda: [256])
    share_text_tables: bool = True  # paper: the towers share some parameters
    history_attention: bool = True  # history pooled by attention on the query text, plus mean
    # Schema features the towers embed; empty = all. ["query", "doc_text"] is the text-only
    # baseline the paper measures the unified model against. The serving signatures take every
    # input of the schema and ignore the rest, so clients, pipelines and TF Serving configs stay.
    tower_features: list[str] = dataclasses.field(default_factory=list)
    hash_bucket_cap: int = 0  # 0 = schema sizes; else min(schema size, cap) per table
    text_char_buckets: int = features.TEXT_CHAR_BUCKETS
    text_word_buckets: int = features.TEXT_WORD_BUCKETS
    # --- optimisation --------------------------------------------------------------------
    optimizer: str = "adam"  # adam | adagrad | sgd
    learning_rate: float = 0.001
    batch_size: int = 256  # global batch (split across replicas)
    epochs: int = 1
    steps_per_epoch: int = 0  # 0 = one pass over the training files per epoch
    shuffle_buffer: int = 10_000
    use_extra_negatives: bool = True  # resolve `negative_doc_ids` through the corpus
    seed: int = 42
    # --- job -----------------------------------------------------------------------------
    checkpoint_every_steps: int = 200  # BackupAndRestore frequency (resume after a kill)
    eval_ks: list[int] = dataclasses.field(default_factory=lambda: [10, 50, 100, 500])
    eval_batch_size: int = 1024
    hypertune_metric: str = "recall_at_100"
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)

    def __post_init__(self):
        if self.embedding_dim <= 0 or self.feature_dim <= 0 or self.text_dim <= 0:
            raise ValueError("embedding_dim, feature_dim and text_dim must be positive")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.optimizer not in ("adam", "adagrad", "sgd"):
            raise ValueError(f"optimizer must be adam, adagrad or sgd, got {self.optimizer!r}")
        if self.epochs <= 0 or self.steps_per_epoch < 0:
            raise ValueError("epochs must be positive and steps_per_epoch >= 0")
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

    def buckets(self, feature: features.Feature) -> int:
        if self.hash_bucket_cap > 0:
            return min(feature.hash_buckets, self.hash_bucket_cap)
        return feature.hash_buckets
