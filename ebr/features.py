"""The one feature schema: what every `tf.train.Example` holds and what every tower reads.

Pipelines (`beam_pipelines/`) write these features, the trainer's towers read them, the
exported `query_tower` / `doc_tower` signatures take them as named raw inputs, and the
retrieval service builds serving requests from them. Nothing else in the project spells a
feature name: import it from here (as TFX templates keep one `features.py`).

Kinds:
  text         one string, featurised in-graph as hashed char 3-grams + word uni/bigrams (paper 4.1)
  categorical  one string, hashed into `hash_buckets`
  multi        a list of strings (e.g. friends, attributes "key:value"), hashed and pooled
  numeric      one float
  id           one string carried for bookkeeping (accidental-hit removal, joins), not a tower input
  label        example-level value used by losses (sampling probability, timestamp)

Serving signatures take every tower input as a string tensor: scalar kinds as shape [B],
multi-valued kinds as a padded [B, N] tensor where "" means "no value".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterable

QUERY = "query"
DOCUMENT = "document"
EXAMPLE = "example"

TEXT = "text"
CATEGORICAL = "categorical"
MULTI = "multi"
NUMERIC = "numeric"
ID = "id"
LABEL = "label"

# Hashing sizes for text featurisation, shared by both towers (paper 4.1: char 3-grams are
# robust to typos, word n-grams add +1.5% recall despite collisions).
TEXT_CHAR_NGRAM = 3
TEXT_CHAR_BUCKETS = 200_000
TEXT_WORD_BUCKETS = 200_000
# Queries or titles longer than this are dead-lettered by the pipeline and rejected by serving.
MAX_TEXT_CHARS = 1_000
# Recent clicks before the session, oldest dropped first.
HISTORY_LENGTH = 10


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str  # key in tf.train.Example and input name in serving signatures
    side: str  # QUERY | DOCUMENT | EXAMPLE
    kind: str  # TEXT | CATEGORICAL | MULTI | NUMERIC | ID | LABEL
    dtype: str  # "string" | "int64" | "float32"
    source: str  # where it comes from in the canonical raw log (docs/data-format.md)
    hash_buckets: int = 0  # for CATEGORICAL and MULTI
    max_values: int = 0  # for MULTI: longer lists are truncated (keeps tensors bounded)
    table: str = ""  # embedding table name; features with the same table share parameters
    default: str | float | int = ""


F = Feature
SCHEMA: tuple[Feature, ...] = (
    # --- query side: the searcher and the query text --------------------------------------
    F("query", QUERY, TEXT, "string", "sessions.query"),
    F("searcher_id", QUERY, CATEGORICAL, "string", "sessions.searcher_id", 100_000),
    F("searcher_city", QUERY, CATEGORICAL, "string", "searchers.city", 10_000, table="city"),
    F("searcher_region", QUERY, CATEGORICAL, "string", "searchers.region", 1_000, table="region"),
    F("searcher_country", QUERY, CATEGORICAL, "string", "searchers.country", 300, table="country"),
    F("searcher_language", QUERY, CATEGORICAL, "string", "searchers.language", 300, table="language"),
    F("searcher_attributes", QUERY, MULTI, "string", "searchers.attributes", 10_000, 32),
    # Friends and document members share one entity table so that mutual connections show up
    # in the dot product (paper 4.2, social embedding features).
    F("searcher_friends", QUERY, MULTI, "string", "searchers.friends", 200_000, 64, table="entity"),
    F("history_doc_ids", QUERY, MULTI, "string", "sessions (earlier clicks)", 200_000,
      HISTORY_LENGTH, table="doc_id"),
    # --- document side -------------------------------------------------------------------
    F("doc_id", DOCUMENT, CATEGORICAL, "string", "documents.doc_id", 200_000, table="doc_id"),
    F("doc_text", DOCUMENT, TEXT, "string", "documents.text"),
    F("doc_type", DOCUMENT, CATEGORICAL, "string", "documents.type", 100),
    F("doc_city", DOCUMENT, CATEGORICAL, "string", "documents.city", 10_000, table="city"),
    F("doc_region", DOCUMENT, CATEGORICAL, "string", "documents.region", 1_000, table="region"),
    F("doc_country", DOCUMENT, CATEGORICAL, "string", "documents.country", 300, table="country"),
    F("doc_language", DOCUMENT, CATEGORICAL, "string", "documents.language", 300, table="language"),
    F("doc_attributes", DOCUMENT, MULTI, "string", "documents.attributes", 10_000, 32),
    F("doc_members", DOCUMENT, MULTI, "string", "documents.members", 200_000, 64, table="entity"),
    # --- example level: bookkeeping and loss inputs --------------------------------------
    F("session_id", EXAMPLE, ID, "string", "sessions.session_id"),
    F("timestamp", EXAMPLE, LABEL, "int64", "sessions.timestamp", default=0),
    # Sampling probability of the positive document in the training stream (its click share),
    # used for the logQ correction (Yi et al. 2019). Written by `ebr pipeline examples`.
    F("doc_sampling_prob", EXAMPLE, LABEL, "float32", "click frequencies", default=0.0),
    # Extra negatives for this example (offline hard negatives, non-click impressions): doc ids
    # resolved against the document corpus by the trainer.
    F("negative_doc_ids", EXAMPLE, ID, "string", "mined / impressions", max_values=64),
)
del F

BY_NAME: dict[str, Feature] = {f.name: f for f in SCHEMA}


def features(side: str | None = None, kinds: Iterable[str] | None = None) -> tuple[Feature, ...]:
    """Features of one side (and kinds), in schema order."""
    kinds = set(kinds) if kinds is not None else None
    return tuple(f for f in SCHEMA if (side is None or f.side == side)
                 and (kinds is None or f.kind in kinds))


# Tower inputs: what the exported serving signatures take, by name, as strings.
QUERY_INPUTS = tuple(f.name for f in features(QUERY))
DOC_INPUTS = tuple(f.name for f in features(DOCUMENT))


def schema_dict() -> list[dict]:
    return [dataclasses.asdict(f) for f in SCHEMA]


def schema_hash() -> str:
    """Fingerprint of the schema and text hashing constants.

    Stored in model metadata and index manifests: an index built from embeddings of one schema
    must not be served with a query tower of another.
    """
    payload = json.dumps({
        "schema": schema_dict(),
        "text": [TEXT_CHAR_NGRAM, TEXT_CHAR_BUCKETS, TEXT_WORD_BUCKETS, MAX_TEXT_CHARS],
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def normalize_text(text: str) -> str:
    """Python twin of the in-graph normalisation (lower-case, collapse whitespace).

    The towers apply the same rules with tf.strings; this one is for pipelines that need
    comparable keys (e.g. the generator's boolean engine)."""
    return " ".join(text.lower().split())


def attribute_terms(attributes: dict | None) -> list[str]:
    """`{"tag": ["a", "b"], "year": "1995"}` -> `["tag:a", "tag:b", "year:1995"]`.

    The same terms feed the `*_attributes` features and the index's boolean filters
    (`attributes.tag:a`)."""
    terms: list[str] = []
    for key in sorted(attributes or {}):
        value = attributes[key]
        values = value if isinstance(value, list) else [value]
        terms.extend(f"{key}:{normalize_text(str(v))}" for v in values)
    return terms


def _bytes_list(values) -> "object":
    from tensorflow.core.example import feature_pb2  # imported lazily: protos only

    return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(
        value=[v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]))


def make_example(values: dict) -> bytes:
    """Serialise a dict of feature values (by schema name) as a `tf.train.Example`.

    Scalars may be given bare; MULTI features are lists (truncated to `max_values`, keeping the
    most recent end for history). Unknown names are an error so typos cannot silently vanish.
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    feats = {}
    for name, value in values.items():
        spec = BY_NAME.get(name)
        if spec is None:
            raise KeyError(f"feature {name!r} is not in ebr.features.SCHEMA")
        vals = value if isinstance(value, (list, tuple)) else [value]
        if spec.max_values and len(vals) > spec.max_values:
            vals = vals[-spec.max_values:]
        if spec.dtype == "string":
            feats[name] = _bytes_list(vals)
        elif spec.dtype == "int64":
            feats[name] = feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(v) for v in vals]))
        else:
            feats[name] = feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[float(v) for v in vals]))
    return example_pb2.Example(features=feature_pb2.Features(feature=feats)).SerializeToString()


def parse_example(serialized: bytes) -> dict:
    """Inverse of `make_example` in plain Python (tests, tools): name -> list of values."""
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example.FromString(serialized)
    out = {}
    for name, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        vals = list(getattr(feat, kind).value) if kind else []
        out[name] = [v.decode("utf-8") for v in vals] if kind == "bytes_list" else vals
    return out


def query_values(query: str, searcher: dict, history: list[str]) -> dict:
    """Query-side feature values from a canonical searcher record (docs/data-format.md)."""
    return {
        "query": query or "",
        "searcher_id": searcher["searcher_id"],
        "searcher_city": searcher.get("city") or "",
        "searcher_region": searcher.get("region") or "",
        "searcher_country": searcher.get("country") or "",
        "searcher_language": searcher.get("language") or "",
        "searcher_attributes": attribute_terms(searcher.get("attributes")),
        "searcher_friends": list(searcher.get("friends") or []),
        "history_doc_ids": list(history),
    }


def document_values(doc: dict) -> dict:
    """Document-side feature values from a canonical document record."""
    return {
        "doc_id": doc["doc_id"],
        "doc_text": doc["text"],
        "doc_type": doc.get("type") or "",
        "doc_city": doc.get("city") or "",
        "doc_region": doc.get("region") or "",
        "doc_country": doc.get("country") or "",
        "doc_language": doc.get("language") or "",
        "doc_attributes": attribute_terms(doc.get("attributes")),
        "doc_members": list(doc.get("members") or []),
    }


def document_filter_terms(values: dict) -> list[str]:
    """Terms a boolean filter can match for a document, from its document-side feature values
    (as in the corpus TFRecords): `type:group`, `city:seattle`, `attributes.tag:spam`.
    The index's attribute inverted index is built from these."""
    def first(v):
        return (v[0] if v else "") if isinstance(v, (list, tuple)) else v
    terms = []
    for key in ("type", "city", "region", "country", "language"):
        value = first(values.get(f"doc_{key}", ""))
        if value:
            terms.append(f"{key}:{normalize_text(str(value))}")
    terms += [f"attributes.{t}" for t in values.get("doc_attributes", [])]
    return terms


def tower_inputs(rows, names: tuple[str, ...]) -> dict:
    """Serving-signature inputs for a batch of feature-value dicts (`query_values` /
    `document_values` shapes): scalar kinds as [B] bytes, MULTI kinds as [B, N] padded with b""
    (N = longest list, at least 1). Missing features are empty; lists longer than `max_values`
    keep their most recent end, as `make_example` does for training data."""
    import numpy as np

    def as_bytes(value, name: str) -> bytes:
        if isinstance(value, bytes):
            return value
        if not isinstance(value, str):  # a nested list or a number is bad input, not text
            raise TypeError(f"feature {name!r}: expected a string, got {type(value).__name__}")
        return value.encode("utf-8")

    out = {}
    for name in names:
        spec = BY_NAME[name]
        if spec.kind != MULTI:
            out[name] = np.array([as_bytes(row.get(name) or "", name) for row in rows], dtype=object)
            continue
        lists = [list(row.get(name) or [])[-spec.max_values:] if spec.max_values
                 else list(row.get(name) or []) for row in rows]
        arr = np.full((len(rows), max([1, *map(len, lists)])), b"", dtype=object)
        for i, vals in enumerate(lists):
            arr[i, :len(vals)] = [as_bytes(v, name) for v in vals]
        out[name] = arr
    return out
