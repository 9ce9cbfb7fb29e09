"""Hard positives from failed sessions (paper section 6.1.2, "hard positive mining").

Place in the data flow: canonical raw sessions (docs/data-format.md) -> this module -> hard
positives, either as extra canonical sessions that `ebr pipeline examples` turns into ordinary
training examples (`as_session`), or joined with the training examples of an examples artifact
by `experiments.ablations.hard_positive_examples`, which commits the result as a new examples
artifact (docs/contracts.md 2). No file I/O happens here.

A *failed* search is a session with a non-empty query and no click. If the same searcher,
within `window_seconds` after it, issues a *reformulated* query (a different normalised text)
that gets clicks, the documents clicked there are what the failed query was after: the paper
adds (failed query, later click) pairs as positives. Only the first clicking reformulation in
the window counts, so one failed search yields at most one group of positives.

Everything here is a plain function over session dicts; `ExtractHardPositives` wraps them as
a Beam transform (group by searcher, then the same function per searcher).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

from ebr.features import normalize_text

DEFAULT_WINDOW_SECONDS = 300  # 5 minutes: "the same searcher's session window"
# Synthetic sessions get ids that cannot collide with real ones (ids are opaque strings).
SESSION_SUFFIX = "~hardpos"


@dataclasses.dataclass(frozen=True)
class HardPositive:
    failed_session_id: str
    searcher_id: str
    timestamp: int  # of the failed search: history features stop before it
    query: str  # the failed query, as typed
    later_session_id: str
    later_query: str
    doc_ids: tuple[str, ...]  # documents clicked by the reformulation


def _check(session: dict, where: str) -> None:
    for field in ("session_id", "searcher_id", "timestamp"):
        if field not in session:
            raise ValueError(f"{where}: session record lacks required field {field!r}")
    if not isinstance(session.get("clicks", []), list):
        raise ValueError(f"{where}: session {session['session_id']!r}: field 'clicks' must be a list")
    if not isinstance(session["timestamp"], (int, float)) or isinstance(session["timestamp"], bool):
        raise ValueError(f"{where}: session {session['session_id']!r}: field 'timestamp' must be a number")


def is_failed(session: dict) -> bool:
    return bool(normalize_text(session.get("query") or "")) and not session.get("clicks")


def searcher_hard_positives(sessions: Iterable[dict],
                            window_seconds: float = DEFAULT_WINDOW_SECONDS) -> Iterator[HardPositive]:
    """Hard positives among one searcher's sessions (any order; sorted here by time, then id)."""
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be positive, got {window_seconds}")
    ordered = list(sessions)
    for i, s in enumerate(ordered):
        _check(s, f"session #{i}")
    ordered.sort(key=lambda s: (s["timestamp"], str(s["session_id"])))
    searchers = {s["searcher_id"] for s in ordered}
    if len(searchers) > 1:
        raise ValueError(f"searcher_hard_positives got sessions of several searchers: {sorted(searchers)[:3]}")
    for i, failed in enumerate(ordered):
        if not is_failed(failed):
            continue
        failed_text = normalize_text(failed["query"])
        for later in ordered[i + 1:]:
            if later["timestamp"] - failed["timestamp"] > window_seconds:
                break
            later_text = normalize_text(later.get("query") or "")
            if not later.get("clicks") or not later_text or later_text == failed_text:
                continue  # another failure, a recommendation, or the same query re-run
            yield HardPositive(
                failed_session_id=str(failed["session_id"]), searcher_id=str(failed["searcher_id"]),
                timestamp=int(failed["timestamp"]), query=failed["query"],
                later_session_id=str(later["session_id"]), later_query=later["query"],
                doc_ids=tuple(dict.fromkeys(later["clicks"])))
            break


def hard_positives(sessions: Iterable[dict],
                   window_seconds: float = DEFAULT_WINDOW_SECONDS) -> list[HardPositive]:
    """Hard positives over sessions of any number of searchers (in-memory; Beam for big logs)."""
    by_searcher: dict[str, list[dict]] = {}
    for i, s in enumerate(sessions):
        _check(s, f"session #{i}")
        by_searcher.setdefault(s["searcher_id"], []).append(s)
    out = []
    for searcher in sorted(by_searcher):
        out.extend(searcher_hard_positives(by_searcher[searcher], window_seconds))
    return out


def as_session(hp: HardPositive) -> dict:
    """A canonical session record for a hard positive: the failed query clicking the later docs.

    Fed to `ebr pipeline examples` with the real sessions it becomes ordinary training examples
    (history cut at the failed search's timestamp). Impressions equal the clicks so the
    pipeline's "click on a document that was not impressed" check holds."""
    return {
        "session_id": hp.failed_session_id + SESSION_SUFFIX,
        "searcher_id": hp.searcher_id,
        "timestamp": hp.timestamp,
        "query": hp.query,
        "impressions": list(hp.doc_ids),
        "clicks": list(hp.doc_ids),
        "hard_positive_of": hp.later_session_id,
    }


def ExtractHardPositives(window_seconds: float = DEFAULT_WINDOW_SECONDS):  # noqa: N802 (Beam style)
    """Beam PTransform: PCollection[session dict] -> PCollection[HardPositive]."""
    import apache_beam as beam

    class _Extract(beam.PTransform):
        def expand(self, sessions):
            return (sessions
                    | "KeyBySearcher" >> beam.Map(lambda s: (s["searcher_id"], s))
                    | "GroupBySearcher" >> beam.GroupByKey()
                    | "FindHardPositives" >> beam.FlatMap(
                        lambda kv: list(searcher_hard_positives(kv[1], window_seconds))))

    return _Extract()
