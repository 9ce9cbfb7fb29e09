"""The unified embedding model (paper section 3-4) on TensorFlow Recommenders: towers, training
job, export of `query_tower` / `doc_tower` SavedModels and offline evaluation.

Reads the TFRecords of `ebr pipeline examples` (docs/contracts.md section 2) and writes the
SavedModels of section 3. `import ebr` first: it selects Keras 2, which TFRS needs.
"""
import ebr  # noqa: F401
