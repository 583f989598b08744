"""The kernel herding engine of MaxHerding and UHerding: the Gaussian kernel computed block by block where
it is needed (never N x N), and the greedy that updates the gains a pick changes instead of recomputing them."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from lowbudget.kcenter import feature_rows
from lowbudget.selection import Selection, check_budget, eligible_mask, seeded_fill


@dataclass(frozen=True)
class HerdingKernel:
    """The Gaussian kernel k(a, b) = exp(-|a - b|^2 / h^2) of MaxHerding and UHerding over all feature rows,
    computed block by block where it is needed: exact (no truncation), memory O(block x N), never N x N."""
    feats: torch.Tensor  # N x D on the device the kernel is computed on
    sq_norms: torch.Tensor  # N
    bandwidth: float  # h
    block_elements: int = 2 ** 24  # kernel entries held at once (64 MiB in float32)

    @property
    def num_rows(self) -> int:
        return len(self.feats)

    @property
    def rounding(self) -> float:
        """The relative float32 error of one kernel entry, whichever block shape computed it: the squared
        distance |a|^2 + |b|^2 - 2 a.b of unit rows is off by up to 8 float32 steps of 1 (its terms reach 2)
        plus the D-term sums' rounding (about sqrt(D) steps); the Gaussian divides that by h^2, and exp
        rounds once more. tests/test_low_budget.py checks it against the kernel in float64."""
        return float(np.finfo(np.float32).eps) * (1 + (8 + math.sqrt(self.feats.shape[1])) / self.bandwidth ** 2)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """k(x_r, x_j) for r in `rows` (a block) and every row j: len(rows) x N."""
        sq_dist = torch.addmm(self.sq_norms[rows, None] + self.sq_norms[None, :], self.feats[rows], self.feats.T,
                              alpha=-2).clamp_(min=0)
        return sq_dist.div_(-self.bandwidth ** 2).exp_()

    def blocks(self, rows: torch.Tensor, progress: bool = False, desc: str = "kernel") -> Iterable[torch.Tensor]:
        """`rows` cut into blocks whose kernel rows fit in `block_elements` (none when `rows` is empty)."""
        size = max(1, self.block_elements // max(self.num_rows, 1))
        return tqdm(rows.split(size) if len(rows) else (), desc=desc, leave=False, disable=not progress or None)


def herding_kernel(feats: np.ndarray, bandwidth: float, device: str | torch.device = "cpu") -> HerdingKernel:
    """The herding kernel of bandwidth h over `feats` (L2-normalised rows, as the cache stores them), on
    `device` (CUDA when given: the same code). Nothing is computed until a selection asks for it."""
    x = feature_rows(feats, device).float()
    return HerdingKernel(x, torch.einsum("ij,ij->i", x, x), float(bandwidth))


class HerdingState:
    """Greedy state of weighted kernel herding: each row's coverage m_j = max over the chosen rows of
    k(x_j, x), its weight u_j, and the gain of a candidate x, sum_j u_j max(0, k(x, x_j) - m_j). Terms are
    summed in float64, but their kernel entries are float32 and differ in their last bits between matrix
    products of different shapes, so an updated gain equals a recomputed one within the kernel's rounding
    times the candidate's weighted kernel mass sum_j u_j k(x, x_j), not to float64 precision."""

    def __init__(self, kernel: HerdingKernel, weights: torch.Tensor, labeled: np.ndarray, progress: bool):
        self.kernel, self.weights, self.progress = kernel, weights.double(), progress
        self.cover = torch.zeros_like(kernel.sq_norms)
        for block in kernel.blocks(torch.as_tensor(labeled, device=kernel.feats.device), progress, "labelled"):
            torch.maximum(self.cover, kernel.rows(block).amax(0), out=self.cover)

    def gains(self, rows: torch.Tensor, desc: str = "gains") -> tuple[torch.Tensor, torch.Tensor]:
        """The gains of `rows` (float64), block by block, and each one's slack: how far float32 rounding
        of its kernel entries may move it (the kernel's rounding times its weighted kernel mass)."""
        cover = self.cover.double()
        gains, masses = [rows.new_zeros(0, dtype=torch.float64)], [rows.new_zeros(0, dtype=torch.float64)]
        for block in self.kernel.blocks(rows, self.progress and len(rows) > 1024, desc):
            k = self.kernel.rows(block).double()
            masses.append(k @ self.weights)
            gains.append(k.sub_(cover).clamp_(min=0).mul_(self.weights).sum(1))
        return torch.cat(gains), torch.cat(masses).mul_(self.kernel.rounding)

    def add(self, pick: int) -> torch.Tensor:
        """Cover with `pick`; every row's gain falls by the returned amount (float64, N). Only the rows
        whose coverage the pick raises (those nearer to it than to any chosen row) change a gain, so
        the update reads their kernel rows alone: about N / (chosen rows) of them."""
        row = self.kernel.rows(torch.tensor([pick], device=self.cover.device))[0]
        raised = (row > self.cover).nonzero()[:, 0]
        before, after = self.cover[raised].double(), row[raised].double()
        self.cover[raised] = row[raised]
        fall = torch.zeros(len(self.cover), dtype=torch.float64, device=self.cover.device)
        for start, block in _offsets(self.kernel.blocks(raised, self.progress and len(raised) > 1024, "update")):
            k = self.kernel.rows(block).double()
            part = slice(start, start + len(block))
            old = (k - before[part, None]).clamp_(min=0)
            k.sub_(after[part, None]).clamp_(min=0)
            fall += old.sub_(k).mul_(self.weights[block, None]).sum(0)
        return fall


def _offsets(blocks: Iterable[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """(position of its first element, block) for consecutive blocks."""
    start = 0
    for block in blocks:
        yield start, block
        start += len(block)


def _best(gains: torch.Tensor, slack: torch.Tensor) -> int | None:
    """The row of largest gain, a gain within the largest one's slack (its float32 rounding) counting as
    equal (ties: lowest index); None when the largest gain is within its slack of zero: no row adds
    coverage that rounding could not account for (a copy of a chosen row, say)."""
    top = int(gains.argmax())
    best, tie = float(gains[top]), float(slack[top])
    return None if best <= tie else int((gains >= best - tie).nonzero()[0, 0])


class HerdingGreedy:
    """Greedy weighted kernel herding from a labelled pool: each pick is argmax_x sum_j u_j max(0, k(x, x_j) - m_j)
    over the unlabelled rows x, m_j being the coverage of x_j by the labelled rows and the picks so far (gains
    within float32 rounding of the largest are ties: lowest index); u = `weights` (None: all 1, MaxHerding).
    Exact for the full kernel: one blocked pass computes every gain, then each pick lowers every gain by
    what it took away, reading only the kernel rows of the points it covers better than before. take() may
    be called again: it goes on from the pool and every pick so far with the gains carried over, so the
    rounds of one run cost one blocked pass."""

    def __init__(self, kernel: HerdingKernel, labeled: np.ndarray, weights: np.ndarray | None = None,
                 progress: bool = False):
        labeled = np.asarray(labeled, dtype=np.int64)
        device = kernel.feats.device
        self.kernel, self.progress = kernel, progress
        self.eligible = eligible_mask(kernel.num_rows, labeled)
        self.pool: np.ndarray | None = labeled  # the labelled rows and every pick so far; None after a fill
        u = torch.ones_like(kernel.sq_norms) if weights is None else torch.tensor(weights).to(kernel.sq_norms)
        u[torch.as_tensor(labeled, device=device)] = 0  # a labelled row is covered already: it adds nothing
        self.state = HerdingState(kernel, u, labeled, progress)
        candidates = torch.as_tensor(np.flatnonzero(self.eligible), device=device)
        self.gains = torch.full((kernel.num_rows,), -math.inf, dtype=torch.float64, device=device)
        self.slack = torch.zeros_like(self.gains)
        self.gains[candidates], self.slack[candidates] = self.state.gains(candidates, "herding gains")

    def continues(self, bandwidth: float, labeled: np.ndarray) -> bool:
        """Whether a round on `labeled` with this bandwidth is where this greedy stands (no fill taken)."""
        return (self.pool is not None and bandwidth == self.kernel.bandwidth
                and np.array_equal(np.asarray(labeled, dtype=np.int64), self.pool))

    def take(self, budget: int, seed: int = 0) -> Selection:
        """The next `budget` picks; a seeded random fill takes over once no row adds coverage (`filled`)."""
        check_budget(budget, int(self.eligible.sum()))
        picks: list[int] = []
        for _ in tqdm(range(budget), desc="herding", leave=False, disable=not self.progress or None):
            pick = _best(self.gains, self.slack)
            if pick is None:
                break
            self.gains -= self.state.add(pick)
            self.gains[pick] = -math.inf
            self.eligible[pick] = False
            picks.append(pick)
        fill = seeded_fill(self.eligible, budget - len(picks), seed)
        chosen = np.concatenate([np.asarray(picks, dtype=np.int64), fill])
        self.pool = None if len(fill) or self.pool is None else np.concatenate([self.pool, chosen])
        return Selection(chosen, len(fill), {"bandwidth": self.kernel.bandwidth})
