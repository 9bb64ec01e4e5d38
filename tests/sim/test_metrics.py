"""Precision, recall and latency on known detections."""

from __future__ import annotations

import pytest

from fanny_tui.sim.metrics import close_recall, detections, evaluate, percentile
from fanny_tui.sim.truth import TrueContact


def test_a_pair_is_detected_when_both_stores_hold_the_token_and_dated_by_the_later():
    stored = {"a": {"t1": 10.0, "t2": 500.0}, "b": {"t1": 14.0}, "c": {"t2": 480.0, "t3": 7.0},
              "d": {}}
    assert detections(stored) == {("a", "b"): 14.0, ("a", "c"): 500.0}


def test_the_first_shared_token_of_a_pair_counts():
    stored = {"a": {"old": 100.0, "new": 400.0}, "b": {"old": 130.0, "new": 401.0}}
    assert detections(stored) == {("a", "b"): 130.0}


def test_precision_recall_and_latency():
    contacts = [TrueContact("a", "b", 100.0, 500.0, 1.0),
                TrueContact("a", "b", 700.0, 1000.0, 1.0),   # the first contact counts
                TrueContact("c", "d", 0.0, 400.0, 2.0),
                TrueContact("e", "f", 50.0, 400.0, 2.0)]
    detected = {("a", "b"): 130.0, ("c", "d"): 300.0, ("a", "c"): 20.0}
    m = evaluate(contacts, detected)
    assert (m.true_pairs, m.detected_pairs, m.hits) == (3, 3, 2)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)
    assert m.latencies_s == (30.0, 300.0)
    assert m.latency(50) == 30.0 and m.latency(90) == 300.0
    assert m.false_pairs == (("a", "c"),)
    assert m.missed_pairs == (("e", "f"),)
    summary = m.as_dict()
    assert summary["latency_s"] == {"p50": 30.0, "p90": 300.0, "max": 300.0}


def test_a_token_before_the_true_contact_gives_a_negative_latency():
    m = evaluate([TrueContact("a", "b", 100.0, 500.0, 1.0)], {("a", "b"): 60.0})
    assert m.latencies_s == (-40.0,)


def test_undefined_ratios_are_none():
    nothing = evaluate([], {})
    assert (nothing.precision, nothing.recall, nothing.latency(50)) == (None, None, None)
    only_false = evaluate([], {("a", "b"): 1.0})
    assert (only_false.precision, only_false.recall) == (0.0, None)
    only_missed = evaluate([TrueContact("a", "b", 0.0, 400.0, 1.0)], {})
    assert (only_missed.precision, only_missed.recall) == (None, 0.0)


def test_percentile_is_nearest_rank():
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 30) == 20.0
    assert percentile(values, 40) == 20.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 100) == 50.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="q"):
        percentile(values, 0)


def test_close_recall_is_the_recall_on_the_close_pairs_only():
    close = [TrueContact("a", "b", 0.0, 400.0, 1.5), TrueContact("a", "b", 600.0, 900.0, 2.0),
             TrueContact("c", "d", 0.0, 400.0, 2.5), TrueContact("e", "f", 0.0, 400.0, 1.0)]
    detected = {("a", "b"): 30.0, ("c", "d"): 90.0, ("a", "c"): 10.0, ("g", "h"): 5.0}
    c = close_recall(3.0, close, detected)
    assert (c.radius_m, c.true_pairs, c.hits) == (3.0, 3, 2)
    assert c.recall == pytest.approx(2 / 3)
    assert c.missed_pairs == (("e", "f"),)
    assert c.as_dict() == {"radius_m": 3.0, "true_pairs": 3, "hits": 2,
                           "recall": pytest.approx(2 / 3), "missed_pairs": [["e", "f"]]}
    none = close_recall(3.0, [], detected)
    assert (none.true_pairs, none.recall) == (0, None)
