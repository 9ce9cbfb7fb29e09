"""The retraining pipeline: raw logs -> a gated, published model / index pair (KFP v2).

Place in the data flow: on top of every stage. It runs the stages the `ebr` commands run, in
order (examples -> train -> evaluate -> gate -> embed -> index -> publish), as a Kubeflow
Pipelines v2 pipeline that Vertex AI Pipelines, Kubeflow Pipelines and `kfp.local` all run.
Nothing imports this package.
"""
import ebr  # noqa: F401 - TF_USE_LEGACY_KERAS before TensorFlow (docs/contracts.md)
