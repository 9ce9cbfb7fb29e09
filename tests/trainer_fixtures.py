"""Hand-made pipeline output (docs/contracts.md section 2) for the trainer tests.

`write_dataset` publishes one examples version OUT/VERSION/{train,eval,corpus}/ GZIP TFRecords
(+ doc_frequencies, split.json, schema.json, then `_COMMITTED`; OUT may be any URI) of `ebr.features.make_example`
over a small synthetic search log with learnable structure: each document has a topic and a
unique title word, queries name the document (sometimes with a typo) and searchers are
friends with the members of documents of their favourite topic. `movielens_like=True` leaves
the query text empty (recommendation data) so only ids, history and social features carry signal.
"""
from __future__ import annotations

import json
import os
import random

import tensorflow as tf

from ebr import artifacts, features, storage

TOPIC_WORDS = ["music", "hiking", "chess", "cooking", "python", "soccer", "poetry", "cycling",
               "gardening", "movies", "travel", "physics"]
CITIES = ["seattle", "paris", "tokyo", "lagos", "lima"]


def _write(path: str, records: list[bytes]) -> None:
    if storage.is_local(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for r in records:
            w.write(r)


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def build_log(n_docs: int = 120, n_searchers: int = 60, n_examples: int = 1500, seed: int = 0,
              movielens_like: bool = False):
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        topic = i % len(TOPIC_WORDS)
        docs.append({
            "doc_id": f"d{i}", "text": f"{TOPIC_WORDS[topic].title()} club t{i}x",
            "type": "group" if i % 3 else "page", "city": CITIES[i % len(CITIES)],
            "region": "", "country": "c", "language": "en",
            "attributes": {"topic": TOPIC_WORDS[topic]},
            "members": [f"u{topic}_{k}" for k in range(4)] + [f"u{rng.randrange(50)}_x"],
        })
    searchers = []
    for s in range(n_searchers):
        fav = s % len(TOPIC_WORDS)
        searchers.append({"searcher_id": f"s{s}", "city": CITIES[s % len(CITIES)], "region": "",
                          "country": "c", "language": "en", "attributes": {"age": str(20 + s % 3)},
                          "friends": [f"u{fav}_{k}" for k in range(3)], "fav": fav})
    examples = []
    history: dict[str, list[str]] = {}
    for e in range(n_examples):
        s = searchers[rng.randrange(n_searchers)]
        # Mostly the searcher's favourite topic: social and history features carry signal.
        topic = s["fav"] if rng.random() < 0.8 else rng.randrange(len(TOPIC_WORDS))
        candidates = [d for i, d in enumerate(docs) if i % len(TOPIC_WORDS) == topic]
        doc = candidates[min(int(rng.expovariate(0.5)), len(candidates) - 1)]
        name = doc["text"].split()[-1]
        query = "" if movielens_like else (f"{name} {TOPIC_WORDS[topic]}" if rng.random() < 0.7
                                           else _typo(f"{name}", rng))
        hist = history.setdefault(s["searcher_id"], [])
        examples.append((f"q{e}", s, query, doc, list(hist), 1000 + e))
        hist.append(doc["doc_id"])
        del hist[:-features.HISTORY_LENGTH]
    return docs, searchers, examples


def write_dataset(out: str, *, n_docs: int = 120, n_searchers: int = 60, n_examples: int = 1500,
                  seed: int = 0, movielens_like: bool = False, shards: int = 2,
                  negatives: int = 0) -> dict:
    """Publish the next examples version under `out`; returns counts and its `version_dir`."""
    vdir = artifacts.begin_version(out)
    docs, searchers, examples = build_log(n_docs, n_searchers, n_examples, seed, movielens_like)
    rng = random.Random(seed + 1)
    clicks: dict[str, int] = {}
    split = [("eval" if rng.random() < 0.15 else "train") for _ in examples]
    for (sid, s, q, d, h, ts), part in zip(examples, split):
        if part == "train":
            clicks[d["doc_id"]] = clicks.get(d["doc_id"], 0) + 1
    total = sum(clicks.values())
    prob = {k: v / total for k, v in clicks.items()}
    rows = {"train": [], "eval": []}
    for (sid, s, q, d, h, ts), part in zip(examples, split):
        values = {**features.query_values(q, s, h), **features.document_values(d),
                  features.SESSION_ID: sid, features.TIMESTAMP: ts,
                  features.DOC_SAMPLING_PROB: prob.get(d["doc_id"], 1.0 / total)}
        if negatives:
            values[features.NEGATIVE_DOC_IDS] = [docs[rng.randrange(len(docs))]["doc_id"]
                                                 for _ in range(negatives)]
        rows[part].append(features.make_example(values))
    for part, recs in rows.items():
        for k in range(shards):
            _write(storage.join(vdir, part, f"examples-{k:05d}-of-{shards:05d}.tfrecord.gz"), recs[k::shards])
    corpus = [features.make_example(features.document_values(d)) for d in docs]
    for k in range(shards):
        _write(storage.join(vdir, "corpus", f"documents-{k:05d}-of-{shards:05d}.tfrecord.gz"), corpus[k::shards])
    storage.write_bytes(storage.join(vdir, "doc_frequencies-00000-of-00001.tsv"), "".join(
        f"{doc_id}\t{n}\t{prob[doc_id]}\n" for doc_id, n in sorted(clicks.items())).encode())
    storage.write_bytes(storage.join(vdir, "split.json"), json.dumps(
        {"method": "hash", "eval_fraction": 0.15, "seed": seed + 1}).encode())
    storage.write_bytes(storage.join(vdir, "schema.json"), json.dumps(
        {"schema": features.schema_dict(), "schema_hash": features.schema_hash()}).encode())
    counts = {"train": len(rows["train"]), "eval": len(rows["eval"]), "docs": len(docs)}
    artifacts.commit(vdir, {"kind": "examples", "counts": counts})
    return {**counts, "version_dir": vdir}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny model for tests: small dims and hash tables, few steps.
TINY = ["embedding_dim=16", "feature_dim=8", "text_dim=16", "hidden_units=32",
        "hash_bucket_cap=2000", "text_char_buckets=2000", "text_word_buckets=2000",
        "batch_size=64", "learning_rate=0.01", "shuffle_buffer=2000"]


def tiny_config(data_dir: str, model_dir: str, *overrides: str):
    from ebr import config as ebr_config
    from trainer.config import TrainConfig

    return ebr_config.load(TrainConfig, None, [f"data_dir={data_dir}", f"model_dir={model_dir}",
                                               *TINY, *overrides])


def task_command(data_dir: str, model_dir: str, *overrides: str) -> list[str]:
    import sys

    sets = [a for o in (*TINY, *overrides) for a in ("--set", o)]
    return [sys.executable, "-m", "trainer.task", "--data-dir", data_dir, "--model-dir", model_dir, *sets]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env
