import ebr  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

# The paper's training-data and ensemble experiments and the harness that runs them. Every path
# they take is a URI (local or gs://); the training sets they derive are examples artifacts
# (docs/contracts.md 2, `ebr.artifacts`):
#   hard_positives  failed-then-reformulated sessions -> extra positives (paper 6.1.2)
#   ablations       impression negatives / positives, hard positives -> derived examples artifacts
#   ensembles       the cascade evaluated offline (paper 6.2; at serving time: serving.retrieval)
#   paper_tables    `ebr experiment paper-tables`: the paper's findings on generated logs
# Offline hard-negative mining runs in production: `beam_pipelines.mining` and
# `beam_pipelines.mine_negatives`.
