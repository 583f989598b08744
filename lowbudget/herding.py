"""The kernel herding engine of MaxHerding and UHerding: the Gaussian kernel computed block by block where
it is needed (never N x N), and a lazy greedy that computes every gain once, then per pick only the gains
that could still be the largest."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from lowbudget.kcenter import feature_rows
from lowbudget.selection import Selection, check_budget, eligible_mask, seeded_fill

FEW_ROWS = 64  # kernel rows computed as a transposed product, where that is faster on a CPU


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
        """k(x_r, x_j) for r in `rows` (a block) and every row j: len(rows) x N (a transposed N x len(rows)
        product for a few rows: BLAS then packs only those rows, not all N, which costs more than the few
        multiplications)."""
        picked = self.feats[rows]
        if len(rows) <= FEW_ROWS:
            sq_dist = torch.addmm(self.sq_norms[:, None], self.feats, picked.T, alpha=-2).T
        else:
            sq_dist = torch.addmm(self.sq_norms[None, :], picked, self.feats.T, alpha=-2)
        return sq_dist.add_(self.sq_norms[rows, None]).clamp_(min=0).div_(-self.bandwidth ** 2).exp_()

    def blocks(self, rows: torch.Tensor, progress: bool = False, desc: str = "kernel") -> Iterable[torch.Tensor]:
        """`rows` cut into blocks whose kernel rows fit in `block_elements` (none when `rows` is empty)."""
        size = max(1, self.block_elements // max(self.num_rows, 1))
        return tqdm(rows.split(size) if len(rows) else (), desc=desc, leave=False, disable=not progress or None)


def herding_kernel(feats: np.ndarray, bandwidth: float, device: str | torch.device = "cpu") -> HerdingKernel:
    """The herding kernel of bandwidth h over `feats` (L2-normalised rows, as the cache stores them), on
    `device` (CUDA when given: the same code). Nothing is computed until a selection asks for it."""
    x = feature_rows(feats, device).float()
    return HerdingKernel(x, torch.einsum("ij,ij->i", x, x), float(bandwidth))


CHUNK_ELEMENTS = 2 ** 20  # kernel entries widened to float64 at once: 8 MiB, summed while still in cache
FIRST_BATCH = 8  # the fewest stale gains recomputed together (one pass over the features reads them all)


class HerdingState:
    """Greedy state of weighted kernel herding: each row's coverage m_j = max over the chosen rows of
    k(x_j, x), its weight u_j, and the gain of a candidate x, sum_j u_j max(0, k(x, x_j) - m_j). Terms are
    summed in float64, but their kernel entries are float32 and differ in their last bits between matrix
    products of different shapes, so a gain computed from one block equals the gain of another block
    within the kernel's rounding times the candidate's weighted kernel mass sum_j u_j k(x, x_j)."""

    def __init__(self, kernel: HerdingKernel, weights: torch.Tensor, labeled: np.ndarray, progress: bool):
        self.kernel, self.weights, self.progress = kernel, weights.double(), progress
        self.cover = torch.zeros_like(kernel.sq_norms)
        for block in kernel.blocks(torch.as_tensor(labeled, device=kernel.feats.device), progress, "labelled"):
            torch.maximum(self.cover, kernel.rows(block).amax(0), out=self.cover)

    @property
    def rounding(self) -> float:
        """The relative error of a gain against its weighted kernel mass: the kernel entries' rounding, and
        the float64 difference k - m of two float32 values (exact, or within 2^-53 of it) and the float64 sum
        of N non-negative terms (N steps of 2^-53)."""
        return self.kernel.rounding + (self.kernel.num_rows + 1) * float(np.finfo(np.float64).eps) / 2

    def gains(self, rows: torch.Tensor, desc: str = "gains") -> tuple[torch.Tensor, torch.Tensor]:
        """The gains of `rows` (float64) at the current coverage, block by block, and each one's slack: how
        far float32 rounding of its kernel entries may move it (the rounding times its weighted kernel mass)."""
        gains, masses = [rows.new_zeros(0, dtype=torch.float64)], [rows.new_zeros(0, dtype=torch.float64)]
        for block in self.kernel.blocks(rows, self.progress and len(rows) > 1024, desc):
            gain, mass = self.block_gains(self.kernel.rows(block))
            gains.append(gain)
            masses.append(mass)
        return torch.cat(gains), torch.cat(masses).mul_(self.rounding)

    def block_gains(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gain and the weighted kernel mass (float64) of each row of the kernel block `k`, left as it is.
        Rows are widened to float64 a few at a time into one small buffer, so the differences, the clamp
        and both matrix-vector products stay in cache: one read of `k` from memory, no block-sized copy."""
        gains, masses = k.new_empty((2, len(k)), dtype=torch.float64)
        step = max(1, CHUNK_ELEMENTS // max(k.shape[1], 1))
        wide = k.new_empty((min(step, len(k)), k.shape[1]), dtype=torch.float64)
        cover = self.cover.double()
        for start in range(0, len(k), step):
            part = slice(start, start + step)
            chunk = wide[:len(k[part])].copy_(k[part])
            torch.mv(chunk, self.weights, out=masses[part])
            torch.mv(chunk.sub_(cover).clamp_(min=0), self.weights, out=gains[part])
        return gains, masses

    def cover_with(self, row: torch.Tensor) -> None:
        """Raise every row's coverage to its kernel entry with a new pick (`row`: the pick's kernel row)."""
        torch.maximum(self.cover, row, out=self.cover)


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

    Lazy, with the picks of recomputing every gain before every pick: one blocked pass computes every gain,
    then a pick only raises coverage, so a gain computed earlier stays an upper bound (plus twice its slack:
    the two computations' rounding). A pick recomputes, from the candidate's own kernel row, the stale
    gains in order of their bound until the largest bound is a gain of the current coverage and no stale
    bound reaches the tie window below it; then every gain that could be the pick or tie with it is
    current, and _best chooses among them. A pick reads the kernel rows of the gains it recomputes (a
    few hundred at N = 60,000, more where many gains crowd below the largest) instead of those of every
    row it covers better. take() may be called again: it goes on from the pool and every pick so far
    with the bounds carried over, so the rounds of one run cost one blocked pass."""

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
        self.current = torch.zeros(kernel.num_rows, dtype=torch.bool, device=device)  # gain of this coverage
        self.current[candidates] = True
        self.recomputed: tuple[torch.Tensor, torch.Tensor] | None = None  # the last rows recomputed, kernel rows
        self.recomputed_count = 0  # gains recomputed for the last pick

    def continues(self, bandwidth: float, labeled: np.ndarray) -> bool:
        """Whether a round on `labeled` with this bandwidth is where this greedy stands (no fill taken)."""
        return (self.pool is not None and bandwidth == self.kernel.bandwidth
                and np.array_equal(np.asarray(labeled, dtype=np.int64), self.pool))

    def take(self, budget: int, seed: int = 0) -> Selection:
        """The next `budget` picks; a seeded random fill takes over once no row adds coverage (`filled`)."""
        check_budget(budget, int(self.eligible.sum()))
        picks: list[int] = []
        for _ in tqdm(range(budget), desc="herding", leave=False, disable=not self.progress or None):
            pick = self._next()
            if pick is None:
                break
            self._choose(pick)
            picks.append(pick)
        fill = seeded_fill(self.eligible, budget - len(picks), seed)
        chosen = np.concatenate([np.asarray(picks, dtype=np.int64), fill])
        self.pool = None if len(fill) or self.pool is None else np.concatenate([self.pool, chosen])
        return Selection(chosen, len(fill), {"bandwidth": self.kernel.bandwidth})

    def _next(self) -> int | None:
        """_best of the current gains, recomputing stale ones (largest bound first, in doubling batches, the
        first half as many as the last pick recomputed) until no stale bound reaches the tie window of the
        largest bound, which is then a current gain."""
        most = max(1, self.kernel.block_elements // self.kernel.num_rows)
        batch, self.recomputed_count = min(max(FIRST_BATCH, self.recomputed_count // 2), most), 0
        while True:
            bound = torch.where(self.current, self.gains, self.gains + 2 * self.slack)
            stale = torch.where(self.current, -math.inf, bound)
            top = int(bound.argmax())
            if float(stale.max()) < float(bound[top]) - float(self.slack[top]):
                return _best(torch.where(self.current, self.gains, -math.inf), self.slack)
            self._recompute(stale, min(batch, int(stale.isfinite().sum())))
            batch = min(2 * batch, most)

    def _recompute(self, stale: torch.Tensor, count: int) -> None:
        """Recompute the gains of the `count` rows of largest stale bound, from their own kernel rows."""
        rows = stale.topk(count).indices
        self.recomputed_count += count
        k = self.kernel.rows(rows)
        self.gains[rows] = self.state.block_gains(k)[0]
        self.current[rows] = True
        self.recomputed = rows, k

    def _choose(self, pick: int) -> None:
        """Cover with `pick`: every gain left becomes a bound."""
        self.state.cover_with(self._kernel_row(pick))
        self.gains[pick] = -math.inf
        self.current[:] = False
        self.recomputed = None
        self.eligible[pick] = False

    def _kernel_row(self, pick: int) -> torch.Tensor:
        """The kernel row of `pick`: kept from its recomputation if that was the last one, else computed."""
        if self.recomputed is not None:
            rows, k = self.recomputed
            at = (rows == pick).nonzero()
            if len(at):
                return k[int(at[0, 0])]
        return self.kernel.rows(torch.tensor([pick], device=self.gains.device))[0]
