"""The plan: which models are trained on which data (`ModelSpec`) and which rows the report
shows (`Row`), each row named by `row_key`.

Place in the data flow: `PaperTablesConfig` -> `plan` -> the seed runs train the models the
selected rows need (`seed_run`) and measure every row; the claims (`claims.claims`) and the
report find rows by the same `row_key`, so a row's name is spelled in one place.
"""
from __future__ import annotations

import dataclasses

from ebr import features
from beam_pipelines import mining
from experiments.paper_tables.config import PaperTablesConfig

# The text-only baseline of experiment 1: query text against document text.
TEXT_ONLY_FEATURES = (features.QUERY_TEXT, features.DOC_TEXT)


def ratio_tag(ratio: str) -> str:
    """An easy:hard ratio as it appears in names and paths: "100:1" -> "100to1"."""
    return ratio.replace(":", "to")


def row_key(experiment: int, *names: str, **settings) -> str:
    """The name of a row: `e{experiment}`, then each name, then each setting as `{name}_{value}`,
    joined by dots (floats as `%g`, ratios as `ratio_tag` spells them), e.g.
    `row_key(5, window="101-500", ratio="100:1")` is "e5.window_101-500.ratio_100to1". The plan
    names its rows with it and the claims and plots look them up with it; `--only` takes it."""
    def value(v) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        return ratio_tag(v) if isinstance(v, str) else str(v)

    return ".".join([f"e{experiment}", *names, *(f"{k}_{value(v)}" for k, v in settings.items())])


# The ceiling beside every table: not a model of the plan but the Bayes-optimal ranking's
# expected recall@K on the held-out sessions, read from the generator's truth file
# (`RAW/truth/ceiling.jsonl[.gz]`, `ebr.datasets.social_ceiling`). A pseudo-row of each seed's
# results with metrics {"recall@K": ...}, present only for logs that carry that file.
CEILING = row_key(0, "ceiling")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    key: str
    data: str  # base | impression_negatives | impression_positives | hard_positives | mined:W:R
    loss: tuple = ()  # LossConfig overrides as (name, value) pairs
    extra_only: bool = False  # no random (easy) negatives: only the example's negative_doc_ids
    tower_features: tuple = ()  # TrainConfig.tower_features; () = every feature (unified)
    about: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    experiment: int
    name: str
    about: str
    kind: str = "model"  # model | ensemble | ann
    model: str = ""  # ModelSpec key for kind=model
    params: tuple = ()  # ensemble / ann parameters as (name, value) pairs
    baseline: bool = False

    def param(self, name, default=None):
        return dict(self.params).get(name, default)


def mined_key(window: str, ratio: str) -> str:
    return f"mined_{window}_{ratio}"


def plan(cfg: PaperTablesConfig) -> tuple[dict[str, ModelSpec], list[Row]]:
    models: dict[str, ModelSpec] = {}

    def model(key, data, loss=(), extra_only=False, about="", tower_features=()):
        models[key] = ModelSpec(key, data, tuple(loss), extra_only, tuple(tower_features), about)
        return key

    unified = model("unified", "base", about="unified embedding, base recipe (random negatives, clicks)")
    text = model("text_only", "base", tower_features=TEXT_ONLY_FEATURES,
                 about="text-only embedding: the towers embed the query text and the document text only")
    rows = [
        Row(1, row_key(1, "text_only"), "text-only embedding", model=text, baseline=True),
        Row(1, row_key(1, "unified"), "unified embedding (text + searcher, social, location, history)",
            model=unified),
        Row(2, row_key(2, "random_negatives"), "random (in-batch) negatives", model=unified, baseline=True),
        Row(2, row_key(2, "impression_negatives"), "non-click impressions as the only negatives",
            model=model("impression_negatives", "impression_negatives", extra_only=True,
                        about="negatives: the session's non-clicked impressions, no random ones")),
        Row(3, row_key(3, "click_positives"), "positives: clicks", model=unified, baseline=True),
        Row(3, row_key(3, "click_and_impression_positives"), "positives: clicks and non-click impressions",
            model=model("impression_positives", "impression_positives",
                        about="positives: clicks plus non-clicked impressions")),
    ]

    def online_hard(k):
        return unified if k == 0 else model(f"online_hard_{k}", "base", loss=(("hard_negatives", k),),
                                            about=f"{k} hardest in-batch negatives per positive added")

    if cfg.e1_online_hard:
        k = cfg.e1_online_hard
        rows += [
            Row(1, row_key(1, "text_only", online_hard=k),
                f"text-only embedding, {k} online hard negatives",
                model=model(f"text_only_online_hard_{k}", "base", loss=(("hard_negatives", k),),
                            tower_features=TEXT_ONLY_FEATURES,
                            about=f"text-only embedding, {k} hardest in-batch negatives per positive added")),
            Row(1, row_key(1, "unified", online_hard=k), f"unified embedding, {k} online hard negatives",
                model=online_hard(k)),
        ]
    for k in cfg.online_hard:
        rows.append(Row(4, row_key(4, online_hard=k), f"{k} online hard negatives per positive",
                        model=online_hard(k), baseline=k == 0))
    rows.append(Row(5, row_key(5, "random_only"), "random negatives only (easy:hard 1:0)", model=unified,
                    baseline=True))
    grid = [(w, cfg.default_ratio) for w in cfg.windows]
    grid += [(cfg.default_window, r) for r in cfg.ratios if r != cfg.default_ratio]
    for window, ratio in grid:
        hard_only = mining.hard_fraction(ratio) == 1.0
        key = model(mined_key(window, ratio), f"mined:{window}:{ratio}", extra_only=hard_only,
                    about=f"offline hard negatives from ranks {window} of the unified model, "
                          f"easy:hard {ratio}" + (" (hard only: no random negatives)" if hard_only else ""))
        rows.append(Row(5, row_key(5, window=window, ratio=ratio),
                        f"ranks {window}, easy:hard {ratio}" + (" (hard only)" if hard_only else ""),
                        model=key))
    rows += [
        Row(6, row_key(6, "clicks"), "click positives", model=unified, baseline=True),
        Row(6, row_key(6, "clicks_and_hard_positives"),
            "click positives + hard positives from failed sessions",
            model=model("hard_positives", "hard_positives",
                        about=f"plus (failed query, later click) positives, window {cfg.hard_positive_window}s")),
    ]
    hard = cfg.ensemble_hard_model
    if hard not in models:
        window, ratio = hard[len("mined_"):].split("_", 1) if hard.startswith("mined_") else ("", "")
        if not window:
            raise ValueError(f"ensemble_hard_model {hard!r} is not a model of the plan: {sorted(models)}")
        model(hard, f"mined:{window}:{ratio}", extra_only=mining.hard_fraction(ratio) == 1.0,
              about=f"offline hard negatives from ranks {window}, easy:hard {ratio}")
    rows += [
        Row(7, row_key(7, "single", "unified"), "single model: unified", model=unified, baseline=True),
        Row(7, row_key(7, "single", "text_only"), "single model: text-only", model=text),
        Row(7, row_key(7, "single", "hard"), f"single model: hard ({hard})", model=hard),
    ]
    for a in cfg.ensemble_alphas:
        rows.append(Row(7, row_key(7, "concat", "unified+hard", alpha=float(a)),
                        f"weighted concat: unified (1) + hard ({a:g})", kind="ensemble",
                        params=(("type", "concat"), ("models", (unified, hard)), ("alphas", (1.0, a)))))
    rows += [
        Row(7, row_key(7, "concat", "text+unified", alpha=1.0),
            "weighted concat: text-only (1) + unified (1)",
            kind="ensemble", params=(("type", "concat"), ("models", (text, unified)), ("alphas", (1.0, 1.0)))),
        Row(7, row_key(7, "cascade", "text>unified", n=cfg.cascade_n),
            f"cascade: text-only top {cfg.cascade_n}, unified re-scores", kind="ensemble",
            params=(("type", "cascade"), ("models", (text, unified)), ("n", cfg.cascade_n))),
        Row(7, row_key(7, "cascade", "unified>hard", n=cfg.cascade_n),
            f"cascade: unified top {cfg.cascade_n}, hard model re-scores", kind="ensemble",
            params=(("type", "cascade"), ("models", (unified, hard)), ("n", cfg.cascade_n))),
    ]
    rows.append(Row(8, row_key(8, "exact"), "exact search (FAISS flat inner product)", kind="ann",
                    params=(("model", unified), ("transform", "exact")), baseline=True))
    for transform in ("none", "OPQ"):
        for b in cfg.ann_pq_bytes:
            if cfg.embedding_dim % b:
                continue
            for nprobe in cfg.ann_nprobes:
                label = "PQ" if transform == "none" else "OPQ"
                rows.append(Row(8, row_key(8, f"{label}{b}", nprobe=nprobe),
                                f"IVF-{label}, {b} bytes/vector, nprobe {nprobe}", kind="ann",
                                params=(("model", unified), ("transform", transform), ("pq_bytes", b),
                                        ("nprobe", nprobe))))
    return models, rows


def select_rows(rows: list[Row], only: list[str]) -> list[Row]:
    """Rows named in `only` (experiment numbers or row names) plus their experiments' baselines."""
    if not only:
        return rows
    names = {r.name for r in rows}
    unknown = [o for o in only if not o.isdigit() and o not in names]
    if unknown:
        raise ValueError(f"--only: unknown row(s) {unknown}; rows are: {sorted(names)}")
    picked = [r for r in rows if str(r.experiment) in only or r.name in only]
    experiments = {r.experiment for r in picked}
    return [r for r in rows if r in picked or (r.baseline and r.experiment in experiments)]


def models_needed(rows: list[Row], models: dict[str, ModelSpec], cfg: PaperTablesConfig) -> list[str]:
    keys: list[str] = []

    def add(k):
        spec = models[k]
        if spec.data.startswith("mined:"):
            add("unified")  # the mining model (model N)
        if k not in keys:
            keys.append(k)

    for r in rows:
        if r.kind == "model":
            add(r.model)
        elif r.kind == "ensemble":
            for k in r.param("models"):
                add(k)
        else:
            add(r.param("model"))
    return keys
