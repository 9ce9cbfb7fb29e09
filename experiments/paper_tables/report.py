"""The Markdown report and its PNG plots.

Place in the data flow: the plan (`rows.plan`), the aggregate over seeds and the verdicts
(`claims`) and every seed's facts -> OUT/report.md with one table per experiment, a summary
against the paper and an appendix with every model's configuration, and OUT/*.png (any URI,
written whole through `ebr.storage`). Every recall shown is `ebr.recall`'s, ties broken at random in
expectation; the tables comparing text-only models add the ties-against figure. When the seeds'
results hold a ceiling pseudo-row (the generator's Bayes-optimal ranking), it is shown beside the
models as "ceiling (Bayes-optimal)".
"""
from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np

from ebr import storage
from experiments.paper_tables.claims import MIN_SEEDS, RULES_TEXT, claims, compare, effect
from experiments.paper_tables.config import PaperTablesConfig
from experiments.paper_tables.metrics import DOC_TYPES
from experiments.paper_tables.rows import TEXT_ONLY_FEATURES, ModelSpec, Row, row_key
from experiments.paper_tables.seed_run import GENERATOR, source_summary


TIES = "recall with ties broken at random in expectation"
CEILING = "ceiling (Bayes-optimal)"
STATUSES_WITHOUT_WHY = ("agrees", "agrees in direction and size")


def ceiling_row(agg: dict) -> str | None:
    """The aggregate's ceiling pseudo-row, if the seeds' results hold one ("ceiling", or a row
    named like `row_key(0, "ceiling")`)."""
    for name in (row_key(0, "ceiling"), "ceiling"):
        if name in agg:
            return name
    return next((name for name in sorted(agg) if name.split(".")[-1] == "ceiling"), None)


def _fmt(m: dict | None, pct: bool = False) -> str:
    if not m:
        return "-"
    if pct:
        return f"{m['mean']:.1%} ± {m['std']:.1%}"
    return f"{m['mean']:.3f} ± {m['std']:.3f}"


def _save_png(fig, path: str) -> None:
    """A matplotlib figure as one PNG object at `path` (any URI, through `ebr.storage`)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def _plot(path: str, title: str, labels: list[str], series: dict[str, list[tuple[float, float]]],
          ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + i * width, [v[0] for v in vals], width, yerr=[v[1] for v in vals], label=name, capsize=3)
    ax.set_xticks(x + width * (len(series) - 1) / 2)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def _plot_ann(path: str, agg: dict, cfg: PaperTablesConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = cfg.primary_k
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in ("PQ", "OPQ"):
        for b in cfg.ann_pq_bytes:
            pts = [(agg[r]["scanned"]["mean"], agg[r][f"ann_recall@{k}"]["mean"])
                   for r in (row_key(8, f"{label}{b}", nprobe=p) for p in cfg.ann_nprobes) if r in agg]
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if label == "PQ" else "--", label=f"IVF-{label}{b}")
    ax.set_xscale("log")
    ax.set_xlabel("documents scanned per query (mean)")
    ax.set_ylabel(f"recall@{k} against exact search")
    ax.set_title("Experiment 8: IVF-PQ recall vs documents scanned (nprobe sweep)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


# Tables whose rows include a text-only model (alone or in an ensemble): ties against shown too.
TIES_AGAINST_EXPERIMENTS = (1, 7)

EXPERIMENT_TITLES = {
    1: "Unified embedding vs text-only embedding",
    2: "Random negatives vs non-click impressions as negatives",
    3: "Click positives vs click + impression positives",
    4: "Online hard negatives per positive",
    5: "Offline hard negatives: rank windows and easy:hard ratios",
    6: "Hard positives from failed sessions",
    7: "Ensembles: weighted concatenation and cascade",
    8: "ANN: pq_bytes, PQ vs OPQ, nprobe",
}


def write_report(out: str, cfg: PaperTablesConfig, models: dict[str, ModelSpec], rows: list[Row],
                 agg: dict, seeds: list[int], quick: bool, command: str, facts: list[dict],
                 seconds: float, jobs: int = 1) -> str:
    """Writes OUT/report.md and its PNG plots (any URI, through `ebr.storage`); returns the
    report's path."""
    ks = cfg.ks
    k = cfg.primary_k
    source = source_summary(cfg, facts)
    lines = [
        "# The paper's findings on "
        + ("generated social-search logs" if source["kind"] == GENERATOR else f"the logs at {cfg.raw}"),
        "",
        f"Command: `{command}`  ",
        f"Seeds: {seeds} ({'quick mode' if quick else 'full mode'}); wall time {seconds / 60:.1f} min "
        f"with {jobs} seed(s) at a time on {os.cpu_count()} CPU(s).  ",
        f"Logs ({source['kind']}): `{source['logs']}`, then `ebr pipeline examples` (hash split, 10% of "
        f"sessions held out): {source['split']}.  ",
        f"Ceiling (Bayes-optimal ranking from the generator's hidden world, `ebr.datasets.social_ceiling`): "
        f"{source['ceiling']}.  ",
        *[f"Not measured on these logs: {row}: {why}.  " for row, why in source["not_measured"].items()],
        *[f"Note: {note}.  " for note in source["notes"]],
        f"Seed 0 is the tuning seed (the settings were chosen on it) and is never reported; the "
        f"reported seeds start at {cfg.first_seed}.  ",
        f"Metric: recall@K = share of held-out (query, clicked document) pairs whose document ranks in "
        f"the top K of the whole corpus by exact search (mean ± sample std over seeds), {TIES}: a "
        f"positive with g documents scoring higher and t tied with it counts clip((K - g) / (t + 1), 0, 1) "
        f"(`ebr.recall`). \"ties against\" counts every tie above the positive (hit iff g + t < K); "
        f"it is shown where text-only models, which score namesakes alike, are compared. Cascade and "
        f"ANN rows count ties within the list they return.",
        "",
        f"Verdicts use recall@{k}. " + RULES_TEXT,
        "",
        "Base recipe of every model (each row changes one thing): "
        f"{cfg.base_loss} loss" + (f" (margin {cfg.margin}, {cfg.random_negatives} random in-batch "
                                  "negative per positive)" if cfg.base_loss == "triplet" else "")
        + f", {cfg.embedding_dim}-d towers, batch {cfg.batch_size}, {cfg.epochs} epochs, "
        f"Adam lr {cfg.learning_rate}. Rerun a row alone with "
        f"`ebr experiment paper-tables{' --quick' if quick else ''} --seeds {len(seeds)} --only ROW`.",
        "",
    ]
    verdicts = []
    for c in claims(cfg):
        status, detail = c["rule"](agg)
        verdicts.append({**{k2: v for k2, v in c.items() if k2 != "rule"}, "status": status, "detail": detail})
    lines += ["## Summary against the paper", "",
              f"Effect sizes: relative change [±2 SE interval], {TIES}"
              + (f"; with fewer than {MIN_SEEDS} seeds every verdict is inconclusive" if len(seeds) < MIN_SEEDS
                 else "") + ".", "",
              "| # | paper | here | verdict |", "|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['experiment']} | {v['claim']} | {v['detail']} | **{v['status']}** |")
    lines.append("")
    ceiling = ceiling_row(agg)
    by_exp: dict[int, list[Row]] = {}
    for r in rows:
        by_exp.setdefault(r.experiment, []).append(r)
    for exp, exp_rows in sorted(by_exp.items()):
        lines += [f"## {exp}. {EXPERIMENT_TITLES[exp]}", ""]
        base = next((r for r in exp_rows if r.baseline), None)
        if exp == 8:
            lines += [f"Click recall: {TIES} among the index's returned scores.", "",
                      "| row | configuration | recall@%d vs exact | click recall@%d | documents scanned | "
                      "bytes/vector |" % (k, k), "|---|---|---|---|---|---|"]
            for r in exp_rows:
                a = agg.get(r.name, {})
                if "scanned" not in a:
                    lines.append(f"| `{r.name}` | {r.about} | - | - | - | - |")
                    continue
                lines.append(f"| `{r.name}` | {r.about} | {_fmt(a.get(f'ann_recall@{k}'))} | "
                             f"{_fmt(a.get(f'recall@{k}'))} | {a['scanned']['mean']:.0f} "
                             f"({a['scanned_fraction']['mean']:.1%}) | {a['bytes_per_vector']['mean']:.1f} |")
            if ceiling:
                lines.append(f"| {CEILING} | the generator's own ranking | - | "
                             f"{_fmt(agg[ceiling].get(f'recall@{k}'))} | - | - |")
            _plot_ann(storage.join(out, "e8_ann.png"), agg, cfg)
            lines += ["", "![experiment 8](e8_ann.png)", ""]
        else:
            against = exp in TIES_AGAINST_EXPERIMENTS
            header = ("| row | what | " + " | ".join(f"recall@{x}" for x in ks)
                      + (f" | recall@{k} ties against" if against else "") + f" | Δ recall@{k} vs baseline |")
            lines += [f"Recall: {TIES} (mean ± sample std over seeds); Δ: relative change [±2 SE interval].",
                      "", header, "|" + "---|" * (len(ks) + 3 + against)]
            for r in exp_rows:
                a = agg.get(r.name, {})
                delta = "baseline" if r.baseline or base is None else "-"
                if base is not None and not r.baseline and r.name in agg and base.name in agg:
                    c = compare(agg, base.name, r.name, f"recall@{k}")
                    delta = f"{effect(c)} ({c['verdict']})"
                model = f" (model `{r.model}`)" if r.model else ""
                lines.append(f"| `{r.name}` | {r.about}{model} | "
                             + " | ".join(_fmt(a.get(f"recall@{x}")) for x in ks)
                             + (f" | {_fmt(a.get(f'ties_against.recall@{k}'))}" if against else "")
                             + f" | {delta} |")
            if ceiling:
                c = agg[ceiling]
                lines.append(f"| {CEILING} | the generator's click model ranks every document | "
                             + " | ".join(_fmt(c.get(f"recall@{x}")) for x in ks)
                             + (" | -" if against else "") + " | - |")
            if exp == 1:
                lines += ["", f"Recall@{k} by document type ({TIES}):", "",
                          "| row | " + " | ".join(DOC_TYPES) + " |", "|" + "---|" * (len(DOC_TYPES) + 1)]
                for r in exp_rows:
                    a = agg.get(r.name, {})
                    lines.append(f"| `{r.name}` | " + " | ".join(
                        _fmt(a.get(f"by_type.{t}.recall@{k}")) for t in DOC_TYPES) + " |")
                if ceiling and any(f"by_type.{t}.recall@{k}" in agg[ceiling] for t in DOC_TYPES):
                    lines.append(f"| {CEILING} | " + " | ".join(
                        _fmt(agg[ceiling].get(f"by_type.{t}.recall@{k}")) for t in DOC_TYPES) + " |")
                series = {r.name: [(agg.get(r.name, {}).get(f"by_type.{t}.recall@{k}", {}).get("mean", 0.0),
                                    agg.get(r.name, {}).get(f"by_type.{t}.recall@{k}", {}).get("std", 0.0))
                                   for t in DOC_TYPES] for r in exp_rows}
                _plot(storage.join(out, "e1_by_type.png"), f"Experiment 1: recall@{k} by document type",
                      list(DOC_TYPES), series, f"recall@{k}")
                lines += ["", "![experiment 1](e1_by_type.png)"]
                hard = cfg.e1_online_hard
                pair = (row_key(1, "text_only", online_hard=hard), row_key(1, "unified", online_hard=hard))
                if hard and all(p in agg for p in pair):
                    c = compare(agg, *pair, f"recall@{k}")
                    lines += ["", f"Second recipe (not a paper claim): with {hard} online hard negatives in "
                              f"both models, unified vs text-only recall@{k} {effect(c)} "
                              f"({c['verdict']})."]
            else:
                series = {f"recall@{x}": [(agg.get(r.name, {}).get(f"recall@{x}", {}).get("mean", 0.0),
                                          agg.get(r.name, {}).get(f"recall@{x}", {}).get("std", 0.0))
                                         for r in exp_rows] for x in ks}
                png = f"e{exp}.png"
                _plot(storage.join(out, png), f"Experiment {exp}: {EXPERIMENT_TITLES[exp]}",
                      [r.name.split(".", 1)[1] for r in exp_rows], series, "recall (ties at random, expected)")
                lines += ["", f"![experiment {exp}]({png})"]
            lines.append("")
        for v in verdicts:
            if v["experiment"] == exp:
                lines.append(f"- Paper: {v['claim']}. Here: {v['detail']}. **{v['status']}**.")
                if v["status"] not in STATUSES_WITHOUT_WHY:
                    lines.append(f"  Why it may differ: {v['why']}")
        lines.append("")
    lines += [
        "## Notes",
        "",
        f"- Text-only model: `TrainConfig.tower_features = {list(TEXT_ONLY_FEATURES)}`; same data, "
        "loss and training as the unified model, its towers embed nothing else.",
        "- Hard only (easy:hard 0:1) and impression negatives train with no random negatives: "
        "the triplet loss sees only the example's `negative_doc_ids`.",
        f"- Offline mining: the unified model of the same seed is model N; the index is exact over its "
        f"document embeddings; {cfg.hard_per_query} negative(s) sampled per selected example; the "
        "ratio is the share of training examples carrying mined negatives, H/(E+H); ratios are cut "
        "from one mining pass per window (same selection hash and per-example RNG as a direct run).",
        f"- Ensembles are evaluated by exact search over the concatenation (weighted concat) or "
        f"through an exact index of the first model (cascade, N = {cfg.cascade_n}).",
        "",
        "## Appendix: models",
        "",
        "| model | training data | overrides | about |",
        "|---|---|---|---|",
    ]
    for key in sorted(models):
        s = models[key]
        over = dict(s.loss)
        if s.extra_only:
            over.update(random_negatives=0, hard_negatives=0)
        if s.tower_features:
            over["tower_features"] = list(s.tower_features)
        lines.append(f"| `{key}` | {s.data} | `{json.dumps(over)}` | {s.about} |")
    lines += ["", "Harness configuration:", "", "```json", json.dumps(dataclasses.asdict(cfg), indent=1), "```", "",
              "Per-seed facts (data sizes, mined counts, training steps, timings):", "", "```json",
              json.dumps(facts, indent=1, default=str)[:20000], "```", ""]
    path = storage.join(out, "report.md")
    storage.write_bytes(path, "\n".join(lines).encode("utf-8"))  # one object, written whole
    return path

