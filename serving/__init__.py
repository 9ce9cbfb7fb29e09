"""Serving: the model server (TF Serving's gRPC API over its model directory layout) and the
retrieval service that embeds queries through it and searches the index (docs/contracts.md 6)."""
import ebr  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
