"""Retrieval quality on one fixed MovieLens-100K split: the unified model's loss variants against
the TFRS basic-retrieval recipe, most-popular and EASE.

    python bench/quality_movielens.py [--work /tmp/ebr_bench_ml] [--split hash|time]
                                      [--variants in_batch,logq,...] [--output result.json]

Data: `ebr data movielens` then `ebr pipeline examples --allow-empty-query` (hash split by
default; the split rule is in OUT/VERSION/split.json and copied into the result). Every method is scored
by exact search over all 1682 movies, recall@10/50/100 under two protocols: `all` (the held-out
interaction ranked among every movie, the TFRS tutorial metric) and `exclude_train` (the user's
training movies removed from the ranking, the usual offline protocol). Unified variants are
trained and evaluated by `trainer.task.train` / `trainer.evaluate`; baselines are evaluated here
with the same protocols. Every recall is `ebr.recall`'s: ties (popularity counts tie often) are
broken at random in expectation.

Baselines:
- TFRS basic retrieval recipe: user id -> movie embeddings (32-d), `tfrs.tasks.Retrieval`,
  Adagrad 0.1, batch 8192, 3 epochs. The movie key is the movie id (the tutorial keys by title,
  which merges the few duplicate titles of ML-100K).
- most-popular: training click counts.
- EASE (Steck 2019), lambda 500: B = I - P diag(1/diag(P)), P = (X^T X + lambda I)^-1, closed form.

Prints one JSON document (also written to --output) and a PNG bar chart next to it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ebr  # noqa: E402,F401  (legacy Keras before TensorFlow)

log = logging.getLogger("bench.quality_movielens")
KS = (10, 50, 100)

# Shared model settings: hash tables capped for a 1.7K-movie / 943-user data set.
BASE = ["hash_bucket_cap=20000", "text_char_buckets=20000", "text_word_buckets=20000",
        "batch_size=512", "learning_rate=0.003", "epochs=3", "eval_ks=10,50,100",
        "loss.temperature=0.05"]
VARIANTS = {
    "in_batch": ["loss.logq=none"],
    "logq": ["loss.logq=pipeline"],
    "logq_streaming": ["loss.logq=streaming"],
    "cbns": ["loss.logq=pipeline", "loss.queue_size=4096", "loss.queue_warmup_steps=100"],
    "mns_tower": ["loss.logq=pipeline", "loss.mixed_negatives=256"],
    "mns_cache": ["loss.logq=pipeline", "loss.mixed_negatives=1024", "loss.mixed_source=cache",
                  "loss.cache_refresh_steps=20"],
    "softmax_hard": ["loss.logq=pipeline", "loss.hard_negatives=64"],
    "triplet": ["loss.loss=triplet", "loss.margin=0.2", "loss.random_negatives=1"],
    "triplet_hard": ["loss.loss=triplet", "loss.margin=0.2", "loss.random_negatives=1",
                     "loss.hard_negatives=2"],
}


def _cli(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "ebr.cli", *args]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-3000:]}")


def prepare(work: Path, split: str) -> Path:
    """The newest committed examples version of WORK/examples_SPLIT (made when there is none)."""
    from ebr import artifacts

    raw, out = work / "raw", work / f"examples_{split}"
    if not (raw / "sessions.jsonl").exists() and not (raw / "sessions.jsonl.gz").exists():
        _cli("data", "movielens", "--out", str(raw))
    if not (out.exists() and artifacts.versions(str(out))):
        args = ["pipeline", "examples", "--input", str(raw), "--output", str(out), "--split.method",
                split, "--allow-empty-query"]
        if split == "time":
            args += ["--split.time-cutoff", str(_time_cutoff(raw))]
        _cli(*args)
    return Path(artifacts.resolve(str(out), "examples"))


def _time_cutoff(raw: Path, eval_fraction: float = 0.1) -> int:
    """Timestamp leaving the last `eval_fraction` of sessions for evaluation."""
    import numpy as np

    path = raw / "sessions.jsonl"
    stamps = np.array([json.loads(line)["timestamp"] for line in path.open()], np.int64)
    return int(np.quantile(stamps, 1 - eval_fraction))


# --------------------------------------------------------------------------- data for baselines


def load_interactions(ex: Path):
    """(train pairs, eval pairs, corpus doc ids): lists of (searcher_id, doc_id)."""
    from ebr.features import DOC_ID, SEARCHER_ID
    from trainer import data
    from trainer.config import CORPUS_PATTERN, EVAL_PATTERN, TRAIN_PATTERN

    def pairs(pattern):
        out = []
        for batch in data.make_dataset(str(ex / pattern), 8192, shuffle=False,
                                       names=(SEARCHER_ID, DOC_ID)):
            out += [(s.decode(), d.decode()) for s, d in zip(batch[SEARCHER_ID].numpy(),
                                                              batch[DOC_ID].numpy())]
        return out

    docs = []
    for batch in data.make_dataset(str(ex / CORPUS_PATTERN), 8192, shuffle=False, names=(DOC_ID,)):
        docs += [d.decode() for d in batch[DOC_ID].numpy()]
    return pairs(TRAIN_PATTERN), pairs(EVAL_PATTERN), docs


def recall(score_fn, train, evals, docs) -> dict:
    """Recall@K under both protocols. score_fn(user_rows [n]) -> [n, N] scores over `docs`."""
    import numpy as np

    from ebr import recall as exact_recall

    col = {d: i for i, d in enumerate(docs)}
    users = sorted({u for u, _ in train} | {u for u, _ in evals})
    row = {u: i for i, u in enumerate(users)}
    seen = [[] for _ in users]
    for u, d in train:
        seen[row[u]].append(col[d])

    counts = {p: ([], []) for p in ("all", "exclude_train")}
    for start in range(0, len(evals), 2048):
        chunk = evals[start:start + 2048]
        scores = np.asarray(score_fn(np.array([row[u] for u, _ in chunk])), np.float64)
        positives = [col[d] for _, d in chunk]
        # The project's tie rule (ebr.recall): ties broken at random in expectation.
        for proto, exclude in (("all", None), ("exclude_train", [seen[row[u]] for u, _ in chunk])):
            g, t = exact_recall.tie_counts(scores, positives, exclude=exclude)
            counts[proto][0].append(g)
            counts[proto][1].append(t)
    return {p: exact_recall.recall_at(np.concatenate(g), np.concatenate(t), KS, key="recall_at_{k}")
            for p, (g, t) in counts.items()}, users, row


def most_popular(train, evals, docs) -> dict:
    import numpy as np

    col = {d: i for i, d in enumerate(docs)}
    counts = np.zeros(len(docs))
    for _, d in train:
        counts[col[d]] += 1
    return recall(lambda rows: np.broadcast_to(counts, (len(rows), len(docs))), train, evals, docs)[0]


def ease(train, evals, docs, lam: float = 500.0) -> dict:
    import numpy as np

    col = {d: i for i, d in enumerate(docs)}
    users = sorted({u for u, _ in train} | {u for u, _ in evals})
    row = {u: i for i, u in enumerate(users)}
    x = np.zeros((len(users), len(docs)))
    for u, d in train:
        x[row[u], col[d]] = 1.0
    g = x.T @ x + lam * np.eye(len(docs))
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    scores = x @ b
    return recall(lambda rows: scores[rows], train, evals, docs)[0]


def tfrs_recipe(train, evals, docs, seed: int = 42) -> dict:
    """The TFRS basic retrieval tutorial, trained on this split."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    tf.keras.utils.set_random_seed(seed)
    user_ids = np.array(sorted({u for u, _ in train}))
    doc_vocab = np.array(docs)

    user_model = tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=user_ids, mask_token=None),
        tf.keras.layers.Embedding(len(user_ids) + 1, 32)])
    movie_model = tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=doc_vocab, mask_token=None),
        tf.keras.layers.Embedding(len(doc_vocab) + 1, 32)])

    class Recipe(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.user_model, self.movie_model = user_model, movie_model
            self.task = tfrs.tasks.Retrieval()

        def compute_loss(self, features, training=False):
            return self.task(self.user_model(features["user"]), self.movie_model(features["movie"]),
                             compute_metrics=False)

    ds = tf.data.Dataset.from_tensor_slices({"user": [u for u, _ in train],
                                             "movie": [d for _, d in train]})
    ds = ds.shuffle(100_000, seed=seed, reshuffle_each_iteration=False).batch(8192).cache()
    model = Recipe()
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
    t0 = time.time()
    model.fit(ds, epochs=3, verbose=0)
    seconds = time.time() - t0
    doc_emb = movie_model(tf.constant(doc_vocab)).numpy()
    users = sorted({u for u, _ in train} | {u for u, _ in evals})
    user_emb = user_model(tf.constant(users)).numpy()
    out = recall(lambda rows: user_emb[rows] @ doc_emb.T, train, evals, docs)[0]
    out["train_seconds"] = round(seconds, 2)
    return out


# --------------------------------------------------------------------------- unified model


def unified(ex: Path, work: Path, name: str, overrides: list[str], seed: int) -> dict:
    import shutil

    import tensorflow as tf

    from ebr import config as ebr_config
    from trainer.config import TrainConfig
    from trainer.task import train

    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh run: no BackupAndRestore resume
    cfg = ebr_config.load(TrainConfig, None, [
        f"data_dir={ex}", f"model_dir={run_dir / 'model'}", f"checkpoint_dir={run_dir / 'ckpt'}",
        f"tensorboard_dir={run_dir / 'tb'}", f"seed={seed}", *BASE, *overrides])
    t0 = time.time()
    result = train(cfg)
    tf.keras.backend.clear_session()
    ev = result["metrics"]["eval"]
    return {**{p: {k: v for k, v in m.items() if int(k.rsplit("_", 1)[1]) in KS}
               for p, m in ev["protocols"].items()},
            "train_seconds": result["metrics"]["train_seconds"], "steps": result["steps"],
            "total_seconds": round(time.time() - t0, 1), "overrides": overrides}


def _metrics(r: dict) -> dict:
    return {f"{p}/{k}": r[p][k] for p in ("all", "exclude_train") for k in r[p]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    keys = list(_metrics(results[names[0]]))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 1.1), 4.5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar(np.arange(len(names)) + i * width, [_metrics(results[n])[key] for n in names],
               width, label=key)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel("recall")
    ax.set_title("MovieLens-100K retrieval, one fixed split")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/ebr_bench_ml", help="data and run directory")
    parser.add_argument("--split", choices=("hash", "time"), default="hash")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="unified-model loss variants to train (comma separated)")
    parser.add_argument("--best", default="", help="extra overrides (comma separated) for a "
                        "'unified_best' run; empty: best = best variant")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default="", help="JSON output (default WORK/quality_SPLIT.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ex = prepare(work, args.split)
    train, evals, docs = load_interactions(ex)
    log.info("split %s: %d train, %d eval interactions, %d movies", args.split, len(train),
             len(evals), len(docs))
    results: dict[str, dict] = {}
    results["most_popular"] = most_popular(train, evals, docs)
    results["ease_lambda500"] = ease(train, evals, docs)
    results["tfrs_recipe"] = tfrs_recipe(train, evals, docs, args.seed)
    log.info("baselines: %s", json.dumps(results))
    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
        results[f"unified_{name}"] = unified(ex, work, name, VARIANTS[name], args.seed)
        log.info("%s: %s", name, json.dumps(results[f"unified_{name}"]))
    if args.best:
        results["unified_best"] = unified(ex, work, "best", args.best.split(","), args.seed)
    unified_names = [n for n in results if n.startswith("unified_")]
    best = max(unified_names, key=lambda n: sum(_metrics(results[n]).values())) if unified_names else None
    summary = {}
    if best:
        b = _metrics(results[best])
        summary = {
            "best_unified": best,
            "beats_tfrs_recipe": {k: b[k] > v for k, v in _metrics(results["tfrs_recipe"]).items()},
            "beats_most_popular": {k: b[k] > v for k, v in _metrics(results["most_popular"]).items()},
            "ratio_to_ease": {k: round(b[k] / v, 3) for k, v in _metrics(results["ease_lambda500"]).items()},
            "ratio_to_tfrs_recipe": {k: round(b[k] / v, 3)
                                     for k, v in _metrics(results["tfrs_recipe"]).items()},
        }
        summary["beats_all"] = all(summary["beats_tfrs_recipe"].values()) and all(
            summary["beats_most_popular"].values())
    split = json.loads((ex / "split.json").read_text())
    out = {"split": split, "train_interactions": len(train), "eval_interactions": len(evals),
           "movies": len(docs), "base_config": BASE, "results": results, "summary": summary}
    path = Path(args.output or work / f"quality_{args.split}.json")
    path.write_text(json.dumps(out, indent=2))
    plot(results, path.with_suffix(".png"))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
