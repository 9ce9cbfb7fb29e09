"""Errors of the index layer (docs/contracts.md section 5).

Every error a bad index directory or bad input can cause is a `ValueError` subclass whose
message names the file (or argument) at fault, so `ebr` prints one clear line and the
retrieval service can refuse a version and keep serving the previous one.
"""
from __future__ import annotations


class IndexError_(ValueError):
    """Base class: something about an index directory or an index request is wrong."""


class CorruptIndexFile(IndexError_):
    """A file of a published index is missing, truncated or fails its checksum."""


class DimensionMismatch(IndexError_):
    """Vectors whose dimension differs from the index's (or a manifest that lies about it)."""


class ModelMismatch(IndexError_):
    """The index was built from another embedding model (schema hash / model version)."""


class EmbeddingsError(IndexError_):
    """An embeddings directory (contracts section 4) is missing, inconsistent or corrupt."""
