"""Aggregation over seeds and the verdicts against the paper.

Place in the data flow: every seed's row -> metrics (`seed_run`) -> `aggregate` (mean and sample
standard deviation per row and metric) -> `claims`: one rule per statement of the paper, over
the rows the plan names (`rows.row_key`), each giving a status and a detail -> the report.

The rules (`RULES_TEXT`, printed in the report's header):
- A difference is clear when at least `MIN_SEEDS` (3) seeds measured both rows and the difference
  of their means exceeds twice its standard error, sqrt(s_a^2/n_a + s_b^2/n_b) (`compare`). With
  fewer seeds every verdict is "inconclusive".
- Direction claims ("B beats A", "B is lower than A"): "agrees" when the difference is clear in
  the paper's direction, "disagrees" when it is clear in the other, else "inconclusive".
- Size: every verdict shows the effect size, the relative change (B - A) / A, with its ±2 SE
  interval ((B - A ± 2 SE) / A) beside the paper's magnitude. When the paper gives a number and the
  direction agrees, the verdict is "agrees in direction and size" when that number lies inside the
  interval, "agrees in direction, size differs" when it does not.
- "No gain" claims: "disagrees" when B is clearly higher, "agrees" when the interval's upper end
  is below +`NO_GAIN_MARGIN` (a gain larger than 2% is ruled out), else "inconclusive".
- "Best of k" claims: the best setting (highest mean) must beat the runner-up clearly. "agrees"
  when the paper's setting is that clear winner; "disagrees" when another setting is, or when the
  paper's setting is clearly below the best; else "inconclusive".
- Composite claims (experiment 8: recall rises with nprobe, rises with pq_bytes, OPQ above PQ) judge
  each part by the same rule; "agrees" when every part agrees, "disagrees" when none agrees and
  one disagrees, "inconclusive" when none agrees or disagrees, else "partly".
"""
from __future__ import annotations

import math

import numpy as np

from beam_pipelines import mining
from experiments.paper_tables.config import PaperTablesConfig
from experiments.paper_tables.rows import row_key

MIN_SEEDS = 3  # fewer seeds: no verdict (a standard error from one or two values is not one)
NO_GAIN_MARGIN = 0.02  # relative gain a "no gain" claim tolerates at the upper end of the interval

RULES_TEXT = (
    f"A difference counts as clear only with at least {MIN_SEEDS} seeds and when it exceeds twice "
    "its standard error, sqrt(s_a²/n_a + s_b²/n_b); with fewer seeds every verdict is "
    "**inconclusive**. A direction claim **agrees** when the difference is clear in the paper's "
    "direction, **disagrees** when it is clear in the other, else is **inconclusive**. Every verdict "
    "shows the effect size, the relative change (B - A) / A, with its interval (B - A ± 2 SE) / A "
    "beside the paper's magnitude; "
    "when the paper gives a number and the direction agrees, the verdict says **agrees in direction "
    "and size** if that number lies in the interval and **agrees in direction, size differs** if not. "
    f"A \"no gain\" claim agrees when the interval's upper end is below +{NO_GAIN_MARGIN:.0%}, disagrees "
    "when the gain is clear. A \"best of k\" claim agrees only when the paper's setting beats the "
    "runner-up clearly, disagrees when another setting does or the paper's setting is clearly below "
    "the best, else is inconclusive. Experiment 8's claim has three parts judged alike (recall rises "
    "with nprobe, with pq_bytes, OPQ above PQ): agrees when all agree, partly when some do.")


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """row -> metric -> {"mean", "std", "n", "values"} (std: sample std, 0 for one seed)."""
    out: dict[str, dict[str, dict]] = {}
    for seed_result in per_seed:
        for row, metrics in seed_result.items():
            for name, value in flatten(metrics).items():
                out.setdefault(row, {}).setdefault(name, {"values": []})["values"].append(value)
    for row in out.values():
        for m in row.values():
            v = np.asarray(m["values"], dtype=float)
            m.update(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n=len(v))
    return out


def compare(agg: dict, a: str, b: str, metric: str) -> dict:
    """b against a: difference of means, its standard error, the relative change (b - a) / a with
    its ±2 SE interval ((diff ± 2 SE) / a) and whether the difference is clear (`MIN_SEEDS` seeds
    and more than 2 SE)."""
    ma, mb = agg[a][metric], agg[b][metric]
    diff = mb["mean"] - ma["mean"]
    va, vb = ma["std"] ** 2 / ma["n"], mb["std"] ** 2 / mb["n"]
    se = math.sqrt(va + vb)
    if ma["mean"] > 0:
        # on the baseline's scale, so the interval excludes 0 exactly when the difference is clear
        rel, rel_se = diff / ma["mean"], se / ma["mean"]
    else:
        rel = rel_se = float("nan")
    n = min(ma["n"], mb["n"])
    if n < MIN_SEEDS:
        clear = False
        verdict = f"{n} seed(s): no verdict below {MIN_SEEDS}"
    else:
        clear = abs(diff) > 2 * se
        verdict = ("higher" if diff > 0 else "lower") if clear else "no clear difference"
    return {"diff": diff, "se": se, "relative": rel, "relative_se": rel_se,
            "interval": (rel - 2 * rel_se, rel + 2 * rel_se), "n": n, "clear": clear, "verdict": verdict,
            "direction": (1 if diff > 0 else -1) if clear else 0}


def effect(c: dict) -> str:
    """The relative change with its ±2 SE interval, e.g. "+12.0% [+8.1%, +15.9%]"."""
    if math.isnan(c["relative"]):
        return "n/a (baseline recall 0)"
    if c["n"] < 2:
        return f"{c['relative']:+.1%} (one seed: no interval)"
    lo, hi = c["interval"]
    return f"{c['relative']:+.1%} [{lo:+.1%}, {hi:+.1%}]"


def direction_status(c: dict, expect: int, paper: float | None = None) -> str:
    """The verdict of a direction claim (`expect` +1: b above a, -1: below), with the size rule
    when the paper gives a relative change `paper`."""
    if c["direction"] == 0:
        return "inconclusive"
    if c["direction"] != expect:
        return "disagrees"
    if paper is None:
        return "agrees"
    lo, hi = c["interval"]
    return "agrees in direction and size" if lo <= paper <= hi else "agrees in direction, size differs"


def no_gain_status(c: dict) -> str:
    if c["n"] < MIN_SEEDS:
        return "inconclusive"
    if c["direction"] > 0:
        return "disagrees"
    return "agrees" if c["interval"][1] < NO_GAIN_MARGIN else "inconclusive"


def _ranked(agg, names, metric):
    present = [n for n in names if n in agg and metric in agg[n]]
    return sorted(present, key=lambda n: -agg[n][metric]["mean"])


def _best(agg, names, metric):
    ranked = _ranked(agg, names, metric)
    return ranked[0] if ranked else None


def best_of_status(agg: dict, names: list[str], target: str, metric: str) -> tuple[str, str]:
    """"Best of k" rule: (status, detail without the paper's part)."""
    ranked = _ranked(agg, names, metric)
    if target not in ranked or len(ranked) < 2:
        return "not measured", ""
    best, runner = ranked[0], ranked[1]
    lead = compare(agg, runner, best, metric)
    text = f"best {best} ({agg[best][metric]['mean']:.3f}), {effect(lead)} over runner-up {runner}"
    if lead["n"] < MIN_SEEDS:
        return "inconclusive", text + f" ({lead['verdict']})"
    if lead["clear"]:
        return ("agrees" if best == target else "disagrees"), text + " (clear)"
    if best != target:
        behind = compare(agg, best, target, metric)  # the paper's setting against the best
        text += f"; {target} {effect(behind)} against the best"
        if behind["clear"]:
            return "disagrees", text + " (clearly below the best)"
    return "inconclusive", text + " (no clear winner)"


def combine(parts: list[str]) -> str:
    """Composite verdict from the parts' statuses (see the module docstring)."""
    agree = sum(p.startswith("agrees") for p in parts)
    if parts and agree == len(parts):
        return "agrees"
    if agree == 0:
        return "disagrees" if "disagrees" in parts else "inconclusive"
    return "partly"


# Each claim: (experiment, the paper's statement, rule over the aggregate -> (status, detail),
# fixed text on why this data set may disagree).
def claims(cfg: PaperTablesConfig) -> list[dict]:
    k = cfg.primary_k
    m = f"recall@{k}"
    windows = [row_key(5, window=w, ratio=cfg.default_ratio) for w in cfg.windows]
    ratios = [row_key(5, window=cfg.default_window, ratio=r) for r in cfg.ratios] + [row_key(5, "random_only")]
    hard_only = [row_key(5, window=cfg.default_window, ratio=r) for r in cfg.ratios
                 if mining.hard_fraction(r) == 1.0]
    text_only, unified = row_key(1, "text_only"), row_key(1, "unified")

    def c_type(t, paper: float):
        def rule(agg):
            metric = f"by_type.{t}.{m}"
            if not all(metric in agg.get(r, {}) for r in (text_only, unified)):
                return "not measured", f"no {t} documents among the held-out clicks"
            c = compare(agg, text_only, unified, metric)
            return direction_status(c, +1, paper), (
                f"unified vs text-only on {t}s: {effect(c)} ({c['verdict']}); paper {paper:+.0%}")
        return rule

    def c_direction(base, other, paper_text, expect, paper=None):
        """`other` against `base`: expect "lower", "higher" or "no gain"; `paper`: the paper's
        relative change when it gives one."""
        def rule(agg):
            if base not in agg or other not in agg or m not in agg[base] or m not in agg[other]:
                return "not measured", ""
            c = compare(agg, base, other, m)
            if expect == "no gain":
                status = no_gain_status(c)
            else:
                status = direction_status(c, -1 if expect == "lower" else +1, paper)
            return status, f"{other} vs {base}: {effect(c)} {m} ({c['verdict']}); paper {paper_text}"
        return rule

    def c_best(names, target, paper, what):
        def rule(agg):
            status, text = best_of_status(agg, names, target, m)
            if status == "not measured":
                return status, ""
            return status, f"{what}: {text}; paper {paper}"
        return rule

    def c_ensemble(agg):
        singles = [r for r in agg if r.startswith(row_key(7, "single") + ".")]
        ensembles = [r for r in agg if r.startswith((row_key(7, "concat") + ".", row_key(7, "cascade") + "."))]
        bs, be = _best(agg, singles, m), _best(agg, ensembles, m)
        if not bs or not be:
            return "not measured", ""
        c = compare(agg, bs, be, m)
        return direction_status(c, +1), f"best ensemble {be} vs best single {bs}: {effect(c)} ({c['verdict']})"

    def c_ann(agg):
        metric = f"ann_recall@{k}"
        top = max(cfg.ann_nprobes)

        def cmp(a, b):
            return compare(agg, a, b, metric) if metric in agg.get(a, {}) and metric in agg.get(b, {}) else None

        def present(names):
            return [n for n in names if metric in agg.get(n, {})]

        def rises(pairs):
            """Each (smaller, larger) setting: the larger must not be clearly below; the first
            against the last must be clearly above."""
            cs = [c for c in (cmp(a, b) for a, b in pairs) if c is not None]
            if not cs:
                return None
            if any(c["direction"] < 0 for c in cs):
                return "disagrees"
            return direction_status(cs[-1], +1)

        parts, notes = [], []
        for label in ("PQ", "OPQ"):
            for b in cfg.ann_pq_bytes:
                names = present([row_key(8, f"{label}{b}", nprobe=p) for p in sorted(cfg.ann_nprobes)])
                steps = list(zip(names, names[1:]))
                status = rises(steps + [(names[0], names[-1])]) if len(names) > 1 else None
                if status:
                    parts.append(status)
                    c = cmp(names[0], names[-1])
                    notes.append(f"{label}{b} nprobe {names[0].rsplit('_', 1)[1]}->"
                                 f"{names[-1].rsplit('_', 1)[1]}: {effect(c)} ({status})")
        for label in ("PQ", "OPQ"):
            names = present([row_key(8, f"{label}{b}", nprobe=top) for b in sorted(cfg.ann_pq_bytes)])
            status = rises(list(zip(names, names[1:])) + [(names[0], names[-1])]) if len(names) > 1 else None
            if status:
                parts.append(status)
                c = cmp(names[0], names[-1])
                notes.append(f"{label} {names[0].split('.')[1]}->{names[-1].split('.')[1]}: "
                             f"{effect(c)} ({status})")
        for b in cfg.ann_pq_bytes:
            c = cmp(row_key(8, f"PQ{b}", nprobe=top), row_key(8, f"OPQ{b}", nprobe=top))
            if c is not None:
                status = direction_status(c, +1)
                parts.append(status)
                notes.append(f"OPQ{b} vs PQ{b}: {effect(c)} ({status})")
        if not parts:
            return "not measured", ""
        return combine(parts), f"{metric} against exact search at nprobe {top} unless said: " + "; ".join(notes)

    return [
        {"experiment": 1, "claim": "unified embedding beats text-only: +18% recall on events",
         "rule": c_type("event", 0.18),
         "why": "events are the rarest type in the generator (6% of documents by default), so their "
                "held-out count is small and noisy, and names are drawn from one shared pool, so a short "
                "training may not yet use the social and location signals that separate namesakes."},
        {"experiment": 1, "claim": "unified embedding beats text-only: +16% recall on groups",
         "rule": c_type("group", 0.16),
         "why": "group clicks depend on membership, which the unified model sees through the shared "
                "entity table; with few training clicks per group that signal is learnt slowly."},
        {"experiment": 2, "claim": "non-click impressions as negatives: about -55% recall against random",
         "rule": c_direction(row_key(2, "random_negatives"), row_key(2, "impression_negatives"), "-55%", "lower",
                             paper=-0.55),
         "why": "the generator's boolean engine shows only name matches and many sessions show a single "
                "document, so impression negatives are few and all share the query's name; the "
                "direction should hold, the size depends on how many sessions have negatives."},
        {"experiment": 3, "claim": "click + impression positives: no gain over clicks",
         "rule": c_direction(row_key(3, "click_positives"), row_key(3, "click_and_impression_positives"),
                             "no gain", "no gain"),
         "why": "impressions here are name matches chosen by a text engine; adding them as positives "
                "teaches text matching, which a small model may still lack after a short training."},
        {"experiment": 4, "claim": "online hard negatives: 2 per positive is best",
         "rule": c_best([row_key(4, online_hard=k2) for k2 in cfg.online_hard], row_key(4, online_hard=2),
                        "k=2", "number of online hard negatives"),
         "why": "with small batches the hardest in-batch documents are rarely hard; the best k depends "
                "on batch size and the share of same-named documents in a batch."},
        {"experiment": 5, "claim": "offline hard negatives: ranks 101-500 are the best window",
         "rule": c_best(windows, row_key(5, window="101-500", ratio=cfg.default_ratio), "101-500", "window"),
         "why": f"rank windows are absolute, but this corpus is tiny next to the paper's: ranks 101-500 "
                f"of a {cfg.documents}-document corpus are a far larger, easier slice than in billions, "
                "and at easy:hard 100:1 only 1% of the examples carry a hard negative."},
        {"experiment": 5, "claim": "offline hard negatives: easy:hard 100:1 is the best blend",
         "rule": c_best(ratios, row_key(5, window=cfg.default_window, ratio=cfg.default_ratio), "100:1",
                        "easy:hard ratio"),
         "why": "the value of a ratio depends on how many hard examples exist in absolute terms; with "
                "thousands of training examples 100:1 adds only tens of them."},
        {"experiment": 5, "claim": "hard negatives only is worse than random negatives only",
         "rule": c_direction(row_key(5, "random_only"), hard_only[0] if hard_only else "", "worse", "lower"),
         "why": "if the window's documents are mostly unrelated in a small corpus, 'hard' negatives "
                "behave like random ones."},
        {"experiment": 6, "claim": "hard positives from failed sessions improve recall",
         "rule": c_direction(row_key(6, "clicks"), row_key(6, "clicks_and_hard_positives"), "improves", "higher"),
         "why": "the generator's failed queries are typo'd, prefix or nickname forms of the same "
                "names; character 3-grams already cover much of that, so extra pairs add less."},
        {"experiment": 7, "claim": "ensembles beat the single models",
         "rule": c_ensemble,
         "why": "ensembles help when their members make different mistakes; models trained on the same "
                "small data with the same features are highly correlated."},
        {"experiment": 8, "claim": "recall rises with nprobe (documents scanned) and pq_bytes; OPQ helps",
         "rule": c_ann,
         "why": "with few documents per inverted list the curves saturate early, and OPQ's rotation is "
                "learnt from few vectors."},
    ]
