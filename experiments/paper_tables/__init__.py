"""`ebr experiment paper-tables`: the paper's training-data and serving findings, re-measured.

Place in the data flow: the whole stack end to end, per seed: `ebr data social` (raw logs) ->
`ebr pipeline examples` -> training-set variants (experiments/ablations.py, offline mining of
`beam_pipelines.mine_negatives`) -> `trainer.task.train` (exported towers) -> recall@K by exact
search on the held-out split -> ensembles (paper 6.2) and ANN indexes (index/) -> a Markdown
report with mean and standard deviation over seeds, and PNG plots.

The eight experiments (paper sections in brackets):
  1 unified vs text-only embedding, recall by document type             [2.3]
  2 random vs non-click-impression negatives                          [2.4]
  3 click vs click+impression positives                               [2.4]
  4 online hard negatives per positive (0, 1, 2, 4)                     [6.1.1]
  5 offline hard-negative rank windows and easy:hard ratios             [6.1.1]
  6 hard positives from failed sessions                                [6.1.2]
  7 weighted-concatenation and cascade ensembles vs single models       [6.2]
  8 ANN: pq_bytes, PQ vs OPQ, nprobe vs recall and documents scanned     [4.1]

Every row names the models (and their full configuration, in the appendix) it comes from, and
`--only ROW` reruns it alone. Verdicts against the paper are computed from the numbers by the
rules of `claims.claims` (difference of means against twice its standard error over seeds);
the explanations printed next to a disagreement are fixed text about this data set, written
before any run and never adjusted to the outcome.

All models share one base recipe (the paper's: triplet loss on cosine distance with a margin
and random in-batch negatives, `PaperTablesConfig`); each row changes one thing.

One module per step:
  config    `PaperTablesConfig` (the run, the base recipe, the grids) and the `--quick` preset
  rows      the plan: models (`ModelSpec`) and report rows (`Row`), named by `row_key`
  variants  training sets cut from a mining run at another easy:hard ratio
  metrics   recall of a model, an ensemble or an ANN index on the held-out split
  seed_run  one seed end to end (`SeedRun`), and every seed in worker processes
  claims    aggregation over seeds, comparisons and the verdicts against the paper
  report    report.md and its PNG plots
  runner    orchestration: `run(cfg)` and `main(...)`

Storage: every path is a URI (local or gs://). The report, `results.json` and the PNG plots are
written to OUT through `ebr.storage`. Each seed's artifacts live under WORK/seed{N}/ as the
stages' own artifacts (docs/contracts.md): raw logs, examples artifacts (the base one and every
training-set variant: `OUT/VERSION/...` + `_COMMITTED`, read through `ebr.artifacts.resolve`),
tower pairs and index versions. WORK defaults to OUT/work for a local OUT and to a local temp
directory (removed at the end) for a remote one.
"""
from experiments.paper_tables.claims import aggregate, claims, compare
from experiments.paper_tables.config import QUICK, PaperTablesConfig, from_args, make_config
from experiments.paper_tables.report import EXPERIMENT_TITLES, write_report
from experiments.paper_tables.rows import ModelSpec, Row, plan, row_key, select_rows
from experiments.paper_tables.runner import command_line, main, run
from experiments.paper_tables.variants import restrict_ratio

__all__ = ["EXPERIMENT_TITLES", "QUICK", "ModelSpec", "PaperTablesConfig", "Row", "aggregate",
           "claims", "command_line", "compare", "from_args", "main", "make_config", "plan",
           "restrict_ratio", "row_key", "run", "select_rows", "write_report"]
