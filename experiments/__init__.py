import ebr  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

# The paper's training-data and ensemble techniques and the experiment harness. Every path
# they take is a URI (local or gs://); the training sets they derive are examples artifacts
# (docs/contracts.md 2, `ebr.artifacts`):
#   hard_positives  failed-then-reformulated sessions -> extra positives (paper 6.1.2)
#   ablations       impression negatives / positives, hard positives -> derived examples artifacts
#   mining          offline hard-negative rank window over ANN results (paper 6.1.1)
#   ensembles       weighted concatenation and cascade of embedding models (paper 6.2)
#   paper_tables    `ebr experiment paper-tables`: the paper's findings on generated logs
