"""Judging a run against the truth: pair-level precision, recall and detection latency.

Definitions (also in docs/field-testing.md):

* A pair of devices is **detected** when their token stores share a token (the same witness
  token on both devices: paper 3, step 5). Its **first token** is the earliest scenario second
  at which a shared token was on both devices (the later of the two stores, earliest over the
  pair's shared tokens).
* **precision** = detected pairs that are true pairs / detected pairs (None: nothing detected);
  **recall** = true pairs that are detected / true pairs (None: no true pair).
* **latency** of a detected true pair = its first token - the start of its first true
  contact, in scenario seconds (negative: a token from an earlier, shorter encounter, or noise
  that brought the pair within the radius before the true contact began). Percentiles are
  nearest-rank.
* **close recall** (with ``[truth] close_radius_m``): the recall on the **close pairs**, the
  pairs with a close contact (the same definition at the closer radius: the contacts that must
  count); they are a subset of the true pairs, so a close pair detected is also a hit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from .truth import Pair, TrueContact, pair


def detections(stored: Mapping[str, Mapping[str, float]]) -> dict[Pair, float]:
    """The detected pairs and their first token.

    Args:
        stored: per device name, its tokens with the scenario second each was first stored.

    Returns:
        ``{pair: first token, scenario seconds}`` for every pair sharing a token.
    """
    holders: dict[str, list[tuple[str, float]]] = {}
    for device, tokens in stored.items():
        for token, t_s in tokens.items():
            holders.setdefault(token, []).append((device, t_s))
    out: dict[Pair, float] = {}
    for devices in holders.values():
        for (a, ta), (b, tb) in combinations(devices, 2):
            key, both = pair(a, b), max(ta, tb)
            out[key] = min(out.get(key, math.inf), both)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; None if empty."""
    if not 0 < q <= 100:
        raise ValueError(f"q: expected a percentile in (0, 100], got {q!r}")
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Metrics:
    """How a run's detections compare with the truth (see the module docstring).

    Attributes:
        true_pairs / detected_pairs: how many.
        hits: detected true pairs; ``false_pairs``: detected pairs that are not true;
            ``missed_pairs``: true pairs not detected (sorted).
        precision / recall: fractions in [0, 1], None when undefined.
        latencies_s: per detected true pair, sorted, scenario seconds.
    """

    true_pairs: int
    detected_pairs: int
    hits: int
    precision: float | None
    recall: float | None
    latencies_s: tuple[float, ...]
    false_pairs: tuple[Pair, ...]
    missed_pairs: tuple[Pair, ...]

    def latency(self, q: float) -> float | None:
        """The ``q``-th percentile of the latencies (nearest rank), scenario seconds."""
        return percentile(self.latencies_s, q)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {"true_pairs": self.true_pairs, "detected_pairs": self.detected_pairs,
                "hits": self.hits, "precision": self.precision, "recall": self.recall,
                "latency_s": {"p50": self.latency(50), "p90": self.latency(90),
                              "max": self.latency(100)},
                "latencies_s": list(self.latencies_s),
                "false_pairs": [list(p) for p in self.false_pairs],
                "missed_pairs": [list(p) for p in self.missed_pairs]}


def evaluate(contacts: Sequence[TrueContact], detected: Mapping[Pair, float]) -> Metrics:
    """Compare detections (from :func:`detections`) with the true contacts."""
    first_contact: dict[Pair, float] = {}
    for contact in contacts:
        first_contact[contact.pair] = min(first_contact.get(contact.pair, math.inf),
                                          contact.start_s)
    truth, found = set(first_contact), set(detected)
    hits = truth & found
    return Metrics(
        true_pairs=len(truth), detected_pairs=len(found), hits=len(hits),
        precision=len(hits) / len(found) if found else None,
        recall=len(hits) / len(truth) if truth else None,
        latencies_s=tuple(sorted(detected[p] - first_contact[p] for p in hits)),
        false_pairs=tuple(sorted(found - truth)), missed_pairs=tuple(sorted(truth - found)))


@dataclass(frozen=True)
class CloseRecall:
    """The recall on the close pairs (``[truth] close_radius_m``; see the module docstring).

    Attributes:
        radius_m: the close radius, metres.
        true_pairs: close pairs; ``hits``: those detected; ``missed_pairs``: the others
            (sorted).
        recall: ``hits / true_pairs`` in [0, 1], None when there is no close pair.
    """

    radius_m: float
    true_pairs: int
    hits: int
    recall: float | None
    missed_pairs: tuple[Pair, ...]

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {"radius_m": self.radius_m, "true_pairs": self.true_pairs, "hits": self.hits,
                "recall": self.recall, "missed_pairs": [list(p) for p in self.missed_pairs]}


def close_recall(radius_m: float, close_contacts: Sequence[TrueContact],
                 detected: Mapping[Pair, float]) -> CloseRecall:
    """The recall of detections (from :func:`detections`) on the pairs of ``close_contacts``
    (the true contacts at the close radius ``radius_m``, metres)."""
    close = {c.pair for c in close_contacts}
    hits = close & set(detected)
    return CloseRecall(radius_m=radius_m, true_pairs=len(close), hits=len(hits),
                       recall=len(hits) / len(close) if close else None,
                       missed_pairs=tuple(sorted(close - hits)))
