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


# Feature keys, one constant each: every other module spells a feature through these (as the
# TFX taxi template's `features.py` does), so a rename is one edit and a typo an import error.
QUERY_TEXT = "query"
SEARCHER_ID = "searcher_id"
SEARCHER_CITY = "searcher_city"
SEARCHER_REGION = "searcher_region"
SEARCHER_COUNTRY = "searcher_country"
SEARCHER_LANGUAGE = "searcher_language"
SEARCHER_ATTRIBUTES = "searcher_attributes"
SEARCHER_FRIENDS = "searcher_friends"
HISTORY_DOC_IDS = "history_doc_ids"
DOC_ID = "doc_id"
DOC_TEXT = "doc_text"
DOC_TYPE = "doc_type"
DOC_CITY = "doc_city"
DOC_REGION = "doc_region"
DOC_COUNTRY = "doc_country"
DOC_LANGUAGE = "doc_language"
DOC_ATTRIBUTES = "doc_attributes"
DOC_MEMBERS = "doc_members"
SESSION_ID = "session_id"
TIMESTAMP = "timestamp"
DOC_SAMPLING_PROB = "doc_sampling_prob"
NEGATIVE_DOC_IDS = "negative_doc_ids"

F = Feature
S = "string"
SCHEMA: tuple[Feature, ...] = (
    # --- query side: the searcher and the query text --------------------------------------
    F(QUERY_TEXT, side=QUERY, kind=TEXT, dtype=S, source="sessions.query"),
    F(SEARCHER_ID, side=QUERY, kind=CATEGORICAL, dtype=S, source="sessions.searcher_id",
      hash_buckets=100_000),
    F(SEARCHER_CITY, side=QUERY, kind=CATEGORICAL, dtype=S, source="searchers.city",
      hash_buckets=10_000, table="city"),
    F(SEARCHER_REGION, side=QUERY, kind=CATEGORICAL, dtype=S, source="searchers.region",
      hash_buckets=1_000, table="region"),
    F(SEARCHER_COUNTRY, side=QUERY, kind=CATEGORICAL, dtype=S, source="searchers.country",
      hash_buckets=300, table="country"),
    F(SEARCHER_LANGUAGE, side=QUERY, kind=CATEGORICAL, dtype=S, source="searchers.language",
      hash_buckets=300, table="language"),
    F(SEARCHER_ATTRIBUTES, side=QUERY, kind=MULTI, dtype=S, source="searchers.attributes",
      hash_buckets=10_000, max_values=32),
    # Friends and document members share one entity table so that mutual connections show up
    # in the dot product (paper 4.2, social embedding features).
    F(SEARCHER_FRIENDS, side=QUERY, kind=MULTI, dtype=S, source="searchers.friends",
      hash_buckets=200_000, max_values=64, table="entity"),
    F(HISTORY_DOC_IDS, side=QUERY, kind=MULTI, dtype=S, source="sessions (earlier clicks)",
      hash_buckets=200_000, max_values=HISTORY_LENGTH, table="doc_id"),
    # --- document side -------------------------------------------------------------------
    F(DOC_ID, side=DOCUMENT, kind=CATEGORICAL, dtype=S, source="documents.doc_id",
      hash_buckets=200_000, table="doc_id"),
    F(DOC_TEXT, side=DOCUMENT, kind=TEXT, dtype=S, source="documents.text"),
    F(DOC_TYPE, side=DOCUMENT, kind=CATEGORICAL, dtype=S, source="documents.type",
      hash_buckets=100),
    F(DOC_CITY, side=DOCUMENT, kind=CATEGORICAL, dtype=S, source="documents.city",
      hash_buckets=10_000, table="city"),
    F(DOC_REGION, side=DOCUMENT, kind=CATEGORICAL, dtype=S, source="documents.region",
      hash_buckets=1_000, table="region"),
    F(DOC_COUNTRY, side=DOCUMENT, kind=CATEGORICAL, dtype=S, source="documents.country",
      hash_buckets=300, table="country"),
    F(DOC_LANGUAGE, side=DOCUMENT, kind=CATEGORICAL, dtype=S, source="documents.language",
      hash_buckets=300, table="language"),
    F(DOC_ATTRIBUTES, side=DOCUMENT, kind=MULTI, dtype=S, source="documents.attributes",
      hash_buckets=10_000, max_values=32),
    F(DOC_MEMBERS, side=DOCUMENT, kind=MULTI, dtype=S, source="documents.members",
      hash_buckets=200_000, max_values=64, table="entity"),
    # --- example level: bookkeeping and loss inputs --------------------------------------
    F(SESSION_ID, side=EXAMPLE, kind=ID, dtype=S, source="sessions.session_id"),
    F(TIMESTAMP, side=EXAMPLE, kind=LABEL, dtype="int64", source="sessions.timestamp",
      default=0),
    # Sampling probability of the positive document in the training stream (its click share),
    # used for the logQ correction (Yi et al. 2019). Written by `ebr pipeline examples`.
    F(DOC_SAMPLING_PROB, side=EXAMPLE, kind=LABEL, dtype="float32", source="click frequencies",
      default=0.0),
    # Extra negatives for this example (offline hard negatives, non-click impressions): doc ids
    # resolved against the document corpus by the trainer.
    F(NEGATIVE_DOC_IDS, side=EXAMPLE, kind=ID, dtype=S, source="mined / impressions",
      max_values=64),
)
del F, S

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
        QUERY_TEXT: query or "",
        SEARCHER_ID: searcher["searcher_id"],
        SEARCHER_CITY: searcher.get("city") or "",
        SEARCHER_REGION: searcher.get("region") or "",
        SEARCHER_COUNTRY: searcher.get("country") or "",
        SEARCHER_LANGUAGE: searcher.get("language") or "",
        SEARCHER_ATTRIBUTES: attribute_terms(searcher.get("attributes")),
        SEARCHER_FRIENDS: list(searcher.get("friends") or []),
        HISTORY_DOC_IDS: list(history),
    }


def document_values(doc: dict) -> dict:
    """Document-side feature values from a canonical document record."""
    return {
        DOC_ID: doc["doc_id"],
        DOC_TEXT: doc["text"],
        DOC_TYPE: doc.get("type") or "",
        DOC_CITY: doc.get("city") or "",
        DOC_REGION: doc.get("region") or "",
        DOC_COUNTRY: doc.get("country") or "",
        DOC_LANGUAGE: doc.get("language") or "",
        DOC_ATTRIBUTES: attribute_terms(doc.get("attributes")),
        DOC_MEMBERS: list(doc.get("members") or []),
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
    terms += [f"attributes.{t}" for t in values.get(DOC_ATTRIBUTES, [])]
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
