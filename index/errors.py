"""Errors of the index layer (docs/contracts.md section 5).

Every error a bad index directory or bad input can cause is a `ValueError` subclass whose
message names the file (or argument) at fault, so `ebr` prints one clear line and the
retrieval service can refuse a version and keep serving the previous one. The errors that
the artifact layer defines too (`ebr.artifacts`: model mismatch, uncommitted version) are
subclasses of both, so callers may catch either.
"""
from __future__ import annotations

from ebr import artifacts


class IndexError_(ValueError):
    """Base class: something about an index directory or an index request is wrong."""


class CorruptIndexFile(IndexError_):
    """A file of a published index is missing, truncated or fails its checksum."""


class DimensionMismatch(IndexError_):
    """Vectors whose dimension differs from the index's (or a manifest that lies about it)."""


class ModelMismatch(IndexError_, artifacts.ModelMismatch):
    """The index was built from another embedding model (schema hash / model version)."""


class UncommittedIndex(IndexError_, artifacts.UncommittedVersion):
    """An index version directory whose publish never finished (no `_COMMITTED`)."""


class EmbeddingsError(IndexError_):
    """An embeddings directory (contracts section 4) is missing, inconsistent or corrupt."""
