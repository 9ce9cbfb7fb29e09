"""Serving, two products (docs/contracts.md 6):

  serving.model_server  the TF Serving API stand-in: the exported towers over gRPC and REST
  serving.retrieval     the retrieval service: embeds queries through the query tower (in
                        process or at the model server) and searches the index

and `serving/cli.py`, their commands (`ebr serve model`, `ebr serve retrieval`, `ebr query`).
"""
import ebr  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
