"""Hard-positive extraction on hand-made sessions (paper 6.1.2)."""
import pytest

from experiments import hard_positives as hp


def s(sid, searcher, t, query, clicks=(), impressions=None):
    return {"session_id": sid, "searcher_id": searcher, "timestamp": t, "query": query,
            "clicks": list(clicks), "impressions": list(impressions if impressions is not None else clicks)}


def test_failed_then_reformulated_within_window():
    sessions = [
        s("a1", "u1", 1000, "jon smth", impressions=["d9"]),  # failed (typo)
        s("a2", "u1", 1060, "jon smith", ["d1", "d2"]),  # reformulation clicked
        s("b1", "u2", 1000, "ann lee", ["d5"]),  # success: nothing to add
    ]
    out = hp.hard_positives(sessions)
    assert out == [hp.HardPositive("a1", "u1", 1000, "jon smth", "a2", "jon smith", ("d1", "d2"))]
    rec = hp.as_session(out[0])
    assert rec["session_id"] == "a1" + hp.SESSION_SUFFIX
    assert rec["query"] == "jon smth" and rec["clicks"] == ["d1", "d2"]
    assert set(rec["clicks"]) <= set(rec["impressions"]) and rec["timestamp"] == 1000


def test_window_boundary_and_configurable():
    sessions = [s("a1", "u1", 0, "x y"), s("a2", "u1", 300, "x yy", ["d1"])]
    assert len(hp.hard_positives(sessions)) == 1  # exactly 5 minutes: inside
    sessions[1]["timestamp"] = 301
    assert hp.hard_positives(sessions) == []  # one second late
    assert len(hp.hard_positives(sessions, window_seconds=400)) == 1
    with pytest.raises(ValueError, match="positive"):
        hp.hard_positives(sessions, window_seconds=0)


def test_not_hard_positives():
    sessions = [
        s("a1", "u1", 0, "jon"),
        s("a2", "u1", 10, "  JON ", ["d1"]),  # same query after normalisation: not a reformulation
        s("b1", "u2", 0, "ann"),
        s("b2", "u3", 10, "anne", ["d2"]),  # another searcher
        s("c1", "u4", 0, "", []),  # empty query (recommendation): not a failed search
        s("c2", "u4", 10, "bob", ["d3"]),
        s("e1", "u5", 0, "zed", ["d4"]),  # clicked: not failed
        s("e2", "u5", 10, "zedd", ["d5"]),
    ]
    assert hp.hard_positives(sessions) == []


def test_first_clicking_reformulation_wins_and_chains():
    sessions = [  # given out of order: sorted by time inside
        s("a3", "u1", 120, "jonathan smith", ["d3"]),
        s("a1", "u1", 0, "jon"),
        s("a2", "u1", 60, "jon s"),  # also failed
        s("a4", "u1", 130, "jon smith", ["d4"]),
    ]
    out = hp.hard_positives(sessions)
    assert [(h.failed_session_id, h.later_session_id, h.doc_ids) for h in out] == [
        ("a1", "a3", ("d3",)), ("a2", "a3", ("d3",))]


def test_bad_records_are_named():
    with pytest.raises(ValueError, match=r"session #1.*timestamp"):
        hp.hard_positives([s("a", "u", 0, "q"), {"session_id": "b", "searcher_id": "u"}])
    with pytest.raises(ValueError, match=r"'b'.*clicks"):
        hp.hard_positives([{"session_id": "b", "searcher_id": "u", "timestamp": 1, "clicks": "d1"}])


def test_beam_transform_matches_plain_function():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    sessions = [s("a1", "u1", 0, "jon"), s("a2", "u1", 50, "jon smith", ["d1"]),
                s("b1", "u2", 0, "ann"), s("b2", "u2", 400, "ann lee", ["d2"]),
                s("c1", "u3", 5, "bo"), s("c2", "u3", 9, "bob", ["d3", "d3"])]
    expected = hp.hard_positives(sessions)
    assert len(expected) == 2
    with beam.Pipeline(options=PipelineOptions(runner="DirectRunner",
                                               direct_running_mode="in_memory")) as p:
        out = p | beam.Create(sessions) | hp.ExtractHardPositives()
        assert_that(out, equal_to(expected))
