"""The model server: TF Serving's gRPC and REST APIs over its `BASE/NAME/VERSION/` layout, the
stand-in for the official `tensorflow/serving` image (docs/contracts.md 6). The towers' serving
end: it holds the exported SavedModels the retrieval service (`serving.retrieval`) embeds with.

  config.py    ModelServerConfig: the settings, and the defaults they share
  registry.py  which versions are loaded, kept in step with the base path (polling, retries)
  tensors.py   TensorProto <-> numpy, bounded against hostile protos
  handlers.py  what Predict, GetModelMetadata and GetModelStatus do (TF Serving's checks)
  metrics.py   Prometheus metrics named as TF Serving names them
  rest.py      the REST front end
  server.py    the gRPC front end, health, TLS, drain: `start_model_server`, `run`
  client.py    a small client of the PredictionService / ModelService
"""
