"""DCoM's engine (Mishal & Weinshall 2024): a coverage radius per labelled row, tuned to the purity of its
ball under the model's pseudo-labels, the coverage and the competence those radii give, and the greedy that
mixes the density of uncovered points with the model's margin uncertainty."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lowbudget import cover
from lowbudget.kcenter import feature_rows
from lowbudget.selection import Selection, check_budget, eligible_mask, seeded_fill

COMPETENCE_STEEPNESS = 50.0  # k of the logistic competence weight (the paper's)
COMPETENCE_CENTRE = 0.8  # a: the coverage at which the weight is half-way (the paper's)
THRESHOLD_BASE, THRESHOLD_SLOPE = 0.4, 0.2  # purity a ball must keep: 0.2 * coverage + 0.4
COVERAGE_STEPS = 12  # bisection steps of the self-consistent coverage (resolution 2^-12)
LABELLED_BLOCK = 64  # labelled rows whose distances to every row are sorted at once


def purity_threshold(coverage: float) -> float:
    """The purity a labelled row's ball must keep at this coverage: stricter as more of the data is covered."""
    return THRESHOLD_BASE + THRESHOLD_SLOPE * coverage


def competence(coverage: float, steepness: float = COMPETENCE_STEEPNESS, centre: float = COMPETENCE_CENTRE
               ) -> float:
    """DCoM's weight of the margin term, p / (1 + e^{-k (coverage - a)}) with p = 1 + e^{-k (1 - a)}, so that
    full coverage gives 1: near 0 while the labelled balls cover little, near 1 past coverage a."""
    scale = 1 + math.exp(-steepness * (1 - centre))
    return scale / (1 + math.exp(-steepness * (coverage - centre)))


@dataclass(frozen=True)
class Ball:
    """The rows around one labelled row by distance (ties: lower row first), up to the last size at which
    the share of them whose pseudo-label is the labelled row's label still reaches THRESHOLD_BASE: no
    larger ball can meet any threshold. `dist` holds one entry more where a farther row exists."""

    rows: np.ndarray  # nearest first, the labelled row itself first (int32 below 2^31 rows)
    dist: np.ndarray  # float32 distances of rows, and of the next row when there is one
    purity: np.ndarray  # float64 share of matching pseudo-labels among the first m rows, m = 1..len(rows)
    total: int  # the rows a ball may hold: all of them (sizes past len(rows) are below every threshold)

    def size(self, threshold: float) -> int:
        """The ball's size by binary search over 1..total, as the paper searches its radius: the largest size
        the search reaches whose purity is at least `threshold`, halving the range at each probe (purity is
        not monotone in the size, so this is the paper's search, not a scan)."""
        low, high = 1, self.total
        while low < high:
            middle = (low + high + 1) // 2
            if middle <= len(self.purity) and self.purity[middle - 1] >= threshold:
                low = middle
            else:
                high = middle - 1
        return low

    def radius(self, size: int) -> float:
        """The radius of the open ball {y : |x - y| < r} holding the first `size` rows: the next row's
        distance, or just past the last row's when the ball holds every row the search kept."""
        return float(self.dist[size]) if size < len(self.dist) else float(np.nextafter(self.dist[-1], np.inf))


def _sorted_rows(feats: torch.Tensor, sq_norms: torch.Tensor, labelled: np.ndarray
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(distances, rows) of every row to each labelled row, nearest first (the labelled row itself first, then
    ties by row), a block of labelled rows at a time."""
    for start in range(0, len(labelled), LABELLED_BLOCK):
        block = torch.as_tensor(labelled[start:start + LABELLED_BLOCK], device=feats.device)
        dist = torch.addmm(sq_norms[block, None] + sq_norms[None, :], feats[block], feats.T, alpha=-2)
        dist.clamp_(min=0).sqrt_()
        dist[torch.arange(len(block), device=feats.device), block] = -1  # the labelled row itself first
        dist, rows = torch.sort(dist, dim=1, stable=True)
        yield dist.clamp_(min=0), rows


def labelled_balls(feats: np.ndarray, labelled: np.ndarray, labels: np.ndarray, pseudo_labels: np.ndarray,
                   device: str | torch.device = "cpu") -> list[Ball]:
    """The Ball of every labelled row: rows sorted by exact distance, and the purity of each prefix, the share
    whose pseudo-label is the labelled row's label. Pseudo-labels: `pseudo_labels`, the model's predictions
    of every row, except for the labelled rows, whose `labels` (in `labelled` order) they are. Memory
    O(block x N) while sorting; each ball keeps only what a threshold can use."""
    labelled = np.asarray(labelled, dtype=np.int64)
    pseudo_labels = np.array(pseudo_labels)
    pseudo_labels[labelled] = labels
    x = feature_rows(feats, device).float()
    sq_norms = torch.einsum("ij,ij->i", x, x)
    pseudo = torch.as_tensor(pseudo_labels, device=x.device)
    balls, offset = [], 0
    index_type = np.int32 if len(feats) < 2 ** 31 else np.int64
    for dist, rows in _sorted_rows(x, sq_norms, labelled):
        wanted = pseudo[torch.as_tensor(labelled[offset:offset + len(rows)], device=x.device)]
        matches = (pseudo[rows] == wanted[:, None]).cumsum(1, dtype=torch.float64)
        purity = matches / torch.arange(1, rows.shape[1] + 1, device=x.device, dtype=torch.float64)
        reaches = purity >= THRESHOLD_BASE
        keep = rows.shape[1] - reaches.flip(1).int().argmax(1)  # the last size that reaches the base threshold
        for i, size in enumerate(keep.tolist()):
            balls.append(Ball(rows[i, :size].cpu().numpy().astype(index_type), dist[i, :size + 1].cpu().numpy(),
                              purity[i, :size].cpu().numpy(), len(feats)))
        offset += len(rows)
    return balls


@dataclass(frozen=True)
class Radii:
    """The labelled rows' radii at one purity threshold, and which rows their balls cover."""

    threshold: float
    radii: np.ndarray  # float64, one per labelled row
    covered: np.ndarray  # bool N

    @property
    def coverage(self) -> float:
        return float(self.covered.mean())


def radii_at(balls: list[Ball], threshold: float, num_rows: int) -> Radii:
    """Every ball's radius at `threshold` (Ball.size) and the union of the balls."""
    sizes = [ball.size(threshold) for ball in balls]
    covered = np.zeros(num_rows, dtype=bool)
    if balls:
        covered[np.concatenate([ball.rows[:size] for ball, size in zip(balls, sizes, strict=True)])] = True
    return Radii(threshold, np.array([ball.radius(size) for ball, size in zip(balls, sizes, strict=True)]), covered)


def consistent_radii(balls: list[Ball], num_rows: int) -> Radii:
    """The radii whose purity threshold, 0.2 * coverage + 0.4, is set by the coverage they give themselves.
    Coverage falls as the threshold rises, so coverage(threshold(c)) - c falls from >= 0 at c = 0 to <= 0 at
    c = 1; bisection finds where it crosses (the largest c, to 2^-COVERAGE_STEPS, with coverage >= c)."""
    low, high = 0.0, 1.0
    best = radii_at(balls, purity_threshold(low), num_rows)
    for _ in range(COVERAGE_STEPS):
        middle = (low + high) / 2
        radii = radii_at(balls, purity_threshold(middle), num_rows)
        if radii.coverage >= middle:
            low, best = middle, radii
        else:
            high = middle
    return best


def minmax(values: np.ndarray) -> np.ndarray:
    """Values scaled to [0, 1] by their minimum and maximum (all 0 when they are equal)."""
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values, dtype=np.float64) if high <= low else (values - low) / (high - low)


def dcom_greedy(graph: cover.CoverGraph, covered: np.ndarray, labelled: np.ndarray, margins: np.ndarray,
                weight: float, budget: int, seed: int = 0) -> Selection:
    """DCoM's picks: each is the unlabelled row of largest weight * margin + (1 - weight) * density, where
    margin is the margin uncertainty min-max scaled over all rows (0 for labelled rows and picks) and density
    is the number of uncovered rows in the row's ball divided by the largest such number among the candidates.
    A pick covers its ball. Ties: lowest row; once every score is 0 (no uncovered row in any ball, no
    uncertain row left), a seeded random fill (`filled`)."""
    labelled = np.asarray(labelled, dtype=np.int64)
    eligible = eligible_mask(len(covered), labelled)
    check_budget(budget, int(eligible.sum()))
    state = cover.Coverage(graph)
    state.cover_rows(np.flatnonzero(covered))
    margin = minmax(np.asarray(margins, dtype=np.float64))
    margin[labelled] = 0
    picks: list[int] = []
    while len(picks) < budget:
        density = np.where(eligible, state.degree, 0).astype(np.float64)
        scale = density.max()
        score = weight * margin + (1 - weight) * (density / scale if scale > 0 else density)
        score[~eligible] = -np.inf
        pick = int(np.argmax(score))
        if score[pick] <= 0:
            break
        state.add(np.array([pick]))
        margin[pick], eligible[pick] = 0, False
        picks.append(pick)
    fill = seeded_fill(eligible, budget - len(picks), seed)
    return Selection(np.concatenate([np.asarray(picks, dtype=np.int64), fill]), len(fill))
