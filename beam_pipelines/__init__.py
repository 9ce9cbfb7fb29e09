import ebr  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

# Apache Beam pipelines: raw logs -> training examples and corpus (`examples`), corpus ->
# document embeddings (`embed`), examples -> offline hard negatives (`mine_negatives`).
# Each runs on a local runner that needs no download by default (`options.py`) and on
# Dataflow / Flink / Spark by pipeline options alone; all I/O goes through Beam's file systems.
