"""The two data sets in the canonical raw-log format (docs/data-format.md): a generated
social-search log (`social`) and MovieLens-100K (`movielens`), plus JSON Lines I/O (`jsonl`)."""
import ebr  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
