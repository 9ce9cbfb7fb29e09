"""The ANN index layer: exact, FAISS IVF-PQ and ScaNN backends behind one small interface.

Data flow: `ebr embed` writes document embeddings (contracts section 4) -> `build_index`
publishes a versioned index directory (section 5) -> `open_index(path).search(...)` serves the
retrieval service and the experiments. Heavy libraries (faiss, scann) are imported lazily.
"""
import ebr  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

from index.errors import IndexDataError  # noqa: E402


def open_index(path, **kwargs):
    """`index.searcher.open_index` (imported lazily so `import index` stays light): `path` is
    INDEX_BASE or INDEX_BASE/VERSION on any URI, a str or an os.PathLike."""
    import os

    from index.searcher import open_index as _open

    return _open(os.fspath(path), **kwargs)


def build_index(*args, **kwargs):
    """`index.builder.build_index`: embeddings -> published index version directory."""
    from index.builder import build_index as _build

    return _build(*args, **kwargs)


__all__ = ["open_index", "build_index", "IndexDataError"]
