"""Errors of the index layer (docs/contracts.md section 5).

Every error a bad index directory or bad input can cause is a `ValueError` subclass whose
message names the file (or argument) at fault, so `ebr` prints one clear line and the
retrieval service can refuse a version and keep serving the previous one. The errors that
the artifact layer defines too (`ebr.artifacts`: model mismatch, uncommitted version) are
subclasses of both, so callers may catch either.
"""
from __future__ import annotations

from ebr import artifacts


class IndexDataError(ValueError):
    """Base class: an index directory, the embeddings it is built from or a request to it is
    wrong (missing, uncommitted, corrupt, of another format, dimension or model)."""


class CorruptIndexFile(IndexDataError):
    """A file of a published index is missing, truncated or fails its checksum."""


class DimensionMismatch(IndexDataError):
    """Vectors whose dimension differs from the index's (or a manifest that lies about it)."""


class ModelMismatch(IndexDataError, artifacts.ModelMismatch):
    """The index was built from another embedding model (schema hash / model version)."""


class UncommittedIndex(IndexDataError, artifacts.UncommittedVersion):
    """An index version directory whose publish never finished (no `_COMMITTED`)."""


class EmbeddingsError(IndexDataError):
    """An embeddings directory (contracts section 4) is missing, inconsistent or corrupt."""
