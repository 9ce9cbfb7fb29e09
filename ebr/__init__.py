"""Shared core of the EBR stack: the feature schema, configuration and the `ebr` CLI.

TFRS needs Keras 2, so the legacy-Keras switch is set here, before anything imports
TensorFlow; every top-level package of the project imports `ebr` first.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's GCS file system caches stat results for 5 s by default; the commit protocol
# (docs/contracts.md, "Commit protocol") decides visibility by whether a marker exists now.
os.environ.setdefault("GCS_STAT_CACHE_MAX_AGE", "0")

__version__ = "0.1.0"
