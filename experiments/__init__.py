import ebr  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

# The paper's training-data and ensemble techniques and the experiment harness (issue 7):
#   hard_positives  failed-then-reformulated sessions -> extra positives (paper 6.1.2)
#   mining          offline hard-negative rank window over ANN results (paper 6.1.1)
#   ensembles       weighted concatenation and cascade of embedding models (paper 6.2)
#   paper_tables    `ebr experiment paper-tables`: the paper's findings on generated logs
