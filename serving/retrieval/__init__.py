"""The retrieval service: `ebr.retrieval.v1.Retrieval/Retrieve` over gRPC
(serving/protos/retrieval.proto, docs/contracts.md section 6).

End of the data flow (paper section 5, "serving"): a request's query text and searcher
features are embedded by the exported query tower (TF Serving's PredictionService or
in-process) and the vector is searched in the ANN index built from the document tower's
embeddings (`index.open_index(...).search`, docs/contracts.md section 5), with an optional
boolean filter and radius. A *pair* (query-tower version, index version) serves every request;
a newer index version is loaded with its model and swapped in without dropping a request.

  config.py      ServeConfig: the settings (`ebr serve retrieval` flags)
  embedder.py    the query tower: request features in, vectors out (in-process or remote)
  pairs.py       the serving pair, the index poller, model pins, refusals and the swap
  validation.py  a request's fields checked before any work is spent on it
  batching.py    concurrent requests embedded and searched together
  ensembles.py   named ensembles a request may ask for (paper section 6.2)
  servicer.py    the Retrieve RPC: stages, deadlines, status codes
  metrics.py     Prometheus metrics
  threads.py     TensorFlow's and FAISS's thread pools
  server.py      the gRPC server, health, TLS, drain: `RetrievalServer`, `serve`
  client.py      the Python client (`ebr query`, the demo, tests, the benchmark)
  retrieval_pb2.py, retrieval_pb2_grpc.py  generated (serving/protos/generate.py)
"""
