"""Shared core of the EBR stack: the feature schema, configuration and the `ebr` CLI.

TFRS needs Keras 2, so the legacy-Keras switch is set here, before anything imports
TensorFlow; every top-level package of the project imports `ebr` first.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
