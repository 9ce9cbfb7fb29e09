"""Request validation: a RetrieveRequest's fields checked against the limits, the tower's
feature schema and the filter language before any work is spent on it.

Place in the data flow: the first stage of a Retrieve call (`serving.retrieval.servicer`); the
values it returns are the query tower's inputs for one query (`ebr.features.QUERY_INPUTS`), and
a refusal is an `InvalidRequest` naming the offending field (answered INVALID_ARGUMENT).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from ebr import features
from serving.retrieval import retrieval_pb2

MAX_FILTER_CHARS = 4_096
MAX_FIELD_CHARS = 256  # one searcher id / city / attribute term / friend / doc id

# The query text input of the towers, and proto SearcherFeatures field -> tower input name
# (a field is named as its feature, minus the `searcher_` prefix). Derived, so a schema change
# that the proto does not follow fails here at import, not silently at serving time.
TEXT_INPUT = features.features(features.QUERY, [features.TEXT])[0].name
SEARCHER_INPUTS = {
    f.name: (f.name if f.name in features.QUERY_INPUTS else f"searcher_{f.name}")
    for f in retrieval_pb2.SearcherFeatures.DESCRIPTOR.fields
}
if set(SEARCHER_INPUTS.values()) | {TEXT_INPUT} != set(features.QUERY_INPUTS):
    raise ImportError(f"retrieval.proto SearcherFeatures {sorted(SEARCHER_INPUTS.values())} do "
                      f"not cover ebr.features.QUERY_INPUTS {sorted(features.QUERY_INPUTS)}")


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def validate(request, *, max_k: int, backends: Sequence[str],
             ensemble_names: Sequence[str], parse_filter: Callable[[str], object] | None = None
             ) -> dict:
    """Tower feature values of a request, or InvalidRequest naming the offending field."""
    query = request.query
    if len(query) > features.MAX_TEXT_CHARS:
        raise InvalidRequest("query", f"{len(query)} characters, limit {features.MAX_TEXT_CHARS}")
    values: dict = {TEXT_INPUT: query}
    searcher = request.searcher
    has_searcher = False
    for field, name in SEARCHER_INPUTS.items():
        value = getattr(searcher, field)
        if features.BY_NAME[name].kind == features.MULTI:
            value = list(value)
            for i, v in enumerate(value):
                if len(v) > MAX_FIELD_CHARS:
                    raise InvalidRequest(f"searcher.{field}[{i}]",
                                         f"{len(v)} characters, limit {MAX_FIELD_CHARS}")
        elif len(value) > MAX_FIELD_CHARS:
            raise InvalidRequest(f"searcher.{field}",
                                 f"{len(value)} characters, limit {MAX_FIELD_CHARS}")
        given = any(v.strip() for v in value) if isinstance(value, list) else bool(value.strip())
        has_searcher = has_searcher or given
        values[name] = value
    if not query.strip() and not has_searcher:
        # Without text a request is recommendation-style and needs searcher features.
        raise InvalidRequest("query", "empty and no searcher features given")
    if request.k <= 0:
        raise InvalidRequest("k", f"must be >= 1, got {request.k}")
    if request.k > max_k:
        raise InvalidRequest("k", f"{request.k} is above the limit {max_k}")
    if len(request.filter) > MAX_FILTER_CHARS:
        raise InvalidRequest("filter",
                             f"{len(request.filter)} characters, limit {MAX_FILTER_CHARS}")
    if request.filter and parse_filter is not None:
        try:  # syntax is checked before any embedding work is spent on the request
            parse_filter(request.filter)
        except (ValueError, RecursionError) as e:  # the parser bounds depth; belt and braces
            raise InvalidRequest("filter", str(e)) from None
    if request.HasField("radius") and not math.isfinite(request.radius):
        raise InvalidRequest("radius", f"must be finite, got {request.radius}")
    if request.backend and request.backend not in backends:
        raise InvalidRequest("backend",
                             f"unknown backend {request.backend!r}; served: {list(backends)}")
    if request.ensemble and request.ensemble not in ensemble_names:
        raise InvalidRequest("ensemble", f"unknown ensemble {request.ensemble!r}; "
                                         f"registered: {sorted(ensemble_names)}")
    return values


def filter_parser():
    """index.filters' parser and error type (the index owns the filter language)."""
    from index.filters import FilterSyntaxError, parse

    return parse, (FilterSyntaxError,)
