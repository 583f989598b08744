"""What every strategy returns, and the checks and the fill that the strategies and their numeric engines
share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Selection:
    """What a strategy returns: the picks, how many came from a fill rule, and the parameters it used."""

    indices: np.ndarray  # int64 row indices, exactly the budget, unique
    filled: int = 0  # how many came from the filling rule instead of the strategy's own criterion
    params: dict[str, Any] = field(default_factory=dict)  # values the sidecar records (e.g. k-means niter)
    scores: np.ndarray | None = None  # the strategy's score of each pick, larger = worth labelling sooner


def check_budget(budget: int, available: int) -> None:
    if budget <= 0 or budget > available:
        raise ValueError(f"budget {budget} is not within 1..{available}, the number of selectable images")


def eligible_mask(n: int, taken: np.ndarray) -> np.ndarray:
    """True for the n rows but those `taken`."""
    eligible = np.ones(n, dtype=bool)
    eligible[taken] = False
    return eligible


def seeded_fill(eligible: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` eligible indices in a seeded random order: the fill once a greedy objective is exhausted."""
    return np.random.default_rng(seed).permutation(np.flatnonzero(eligible))[:count].astype(np.int64)


def most_uncertain(scores: np.ndarray, candidates: np.ndarray, budget: int) -> Selection:
    """The `budget` candidates with the largest scores (ties: the candidate listed first), with their scores."""
    check_budget(budget, len(candidates))
    order = np.argsort(-scores, kind="stable")[:budget]
    return Selection(np.asarray(candidates, dtype=np.int64)[order], scores=np.asarray(scores, dtype=np.float64)[order])
