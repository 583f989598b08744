"""The greedy k-center engine of core-set: squared distances in blocked float32 GEMMs, and a greedy that
reads at each pick only the rows that can still be picked."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from lowbudget import faiss_ops

_ROW_BLOCK = 4096  # rows per distance tile: a float32 copy of them and the tile stay in cache-sized blocks
_CENTRE_BLOCK = 512  # centres per distance tile
_FRONTIER_ROWS = 1024  # rows the greedy keeps exact at a time (see GreedyKCenter)
_RESERVE_FRONTIERS = 32  # the reserve the frontiers are drawn from holds this many frontiers' rows


def feature_rows(feats: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """The features as a tensor on `device`, float16 kept as float16 (no copy on the CPU)."""
    dtype = feats.dtype if feats.dtype in (np.float16, np.float32) else np.float32
    with warnings.catch_warnings():  # read-only (memory-mapped) arrays are only read here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=dtype)).to(device)


def row_blocks(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 rows) for consecutive blocks of `_ROW_BLOCK` rows. float16 storage is widened one
    block at a time into one reused buffer (valid until the next block), so distances are float32
    without a float32 copy of all rows, and no allocation per block piles up in the process' memory."""
    buffer = None if x.dtype == torch.float32 else torch.empty((min(len(x), _ROW_BLOCK), x.shape[1]),
                                                               device=x.device)
    for start in range(0, len(x), _ROW_BLOCK):
        rows = x[start:start + _ROW_BLOCK]
        yield start, rows if buffer is None else buffer[:len(rows)].copy_(rows)


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.einsum("ij,ij->i", rows, rows) for _, rows in row_blocks(x)])  # no rows x D temporary


def min_sq_dist(rows: torch.Tensor, row_norms: torch.Tensor, centres: torch.Tensor,
                 centre_norms: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of each of `rows` (float16 or float32) to its nearest of `centres` (float32),
    as |r|^2 + min_c (|c|^2 - 2 r.c): float32 GEMMs into one reused tile of at most `_ROW_BLOCK` rows
    x `_CENTRE_BLOCK` centres (a matrix-vector product for one centre), no rows x centres temporary."""
    nearest = torch.empty(len(rows), device=rows.device)
    tile_size = min(len(rows), _ROW_BLOCK) * min(len(centres), _CENTRE_BLOCK)
    buffer = torch.empty(tile_size if len(centres) > 1 else 0, device=rows.device)
    for start, block in row_blocks(rows):
        out, norms = nearest[start:start + len(block)], row_norms[start:start + len(block)]
        if len(centres) == 1:
            torch.addmv(norms + centre_norms, block, centres[0], alpha=-2, out=out)
            continue
        out.fill_(torch.inf)
        for first in range(0, len(centres), _CENTRE_BLOCK):
            chunk = centres[first:first + _CENTRE_BLOCK]
            tile = buffer[:len(block) * len(chunk)].view(len(block), len(chunk))
            torch.addmm(centre_norms[first:first + len(chunk)], block, chunk.T, alpha=-2, out=tile)
            torch.minimum(out, tile.amin(1), out=out)
        out += norms
    return nearest


def pool_distances(feats: np.ndarray, labeled: np.ndarray, gpu_faiss: bool) -> np.ndarray:
    """Squared distance of every row to its nearest labelled row: one faiss index over the pool,
    searched a block of rows at a time (float16 rows are widened a block at a time)."""
    index = faiss_ops.flat_index(feats[labeled], gpu_faiss)
    return np.concatenate([index.search(faiss_ops.as_float32(feats[start:start + _ROW_BLOCK]), 1)[0][:, 0]
                           for start in range(0, len(feats), _ROW_BLOCK)])


def _top_rows(values: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
    """Positions of the `count` largest values (more when tied), in index order, and the largest value
    outside them (-inf when none is left out)."""
    if count >= len(values):
        return torch.arange(len(values), device=values.device), -math.inf
    inside = values >= torch.topk(values, count, sorted=False).values.min()
    return torch.nonzero(inside)[:, 0], float(torch.where(inside, -torch.inf, values).max())


class GreedyKCenter:
    """Greedy k-center that, at each pick, reads only the rows that can still be picked (lazy evaluation).

    `bound[i]` is row i's exact squared distance to the labelled pool and the first `seen[i]` picks:
    an upper bound on its distance to the nearest centre, which only ever falls. The rows with the
    largest bounds (the frontier, gathered into one float32 block, in index order) are kept exact:
    every pick updates them with one matrix-vector product. Every row outside has a bound of at most
    `ceiling`, so when the largest frontier distance is above the ceiling it is the farthest row of
    all, and the first frontier row at that distance the lowest-index one. Otherwise the frontier is
    written back and the rows with the largest bounds are gathered again, each group of rows that
    missed about as many picks brought up to date with one GEMM. The frontier is drawn from a
    reserve (the rows with the largest bounds of all, found in one pass over N), so that a new
    frontier costs no pass over all rows until the reserve runs out. Rows far inside the covered
    region are never read again; the picks are the plain greedy's (which updates every row at every
    pick), up to floating-point rounding of the distances.
    """

    def __init__(self, x: torch.Tensor, norms: torch.Tensor, bound: torch.Tensor, budget: int):
        self.x, self.norms, self.bound = x, norms, bound
        self.seen = torch.zeros(len(x), dtype=torch.int64, device=x.device)
        self.centres = torch.empty((budget, x.shape[1]), device=x.device)
        self.centre_norms = torch.empty(budget, device=x.device)
        self.picks: list[int] = []
        self.reserve = torch.zeros(0, dtype=torch.int64, device=x.device)  # row indices, in index order
        self.reserve_ceiling = math.inf  # largest bound outside the reserve
        self.rows = self.reserve  # the frontier: row indices, in index order
        self.dist = torch.zeros(0, device=x.device)  # its exact squared distances (-1: taken)
        self.feats, self.feat_norms = self.centres[:0], self.centre_norms[:0]  # its features, squared norms
        self.ceiling = math.inf  # largest bound outside the frontier

    def start_from(self, row: int) -> None:
        """Make `row` the first centre, with one pass over all rows (for an empty labelled pool)."""
        centre, norm = self.x[row].float(), self.norms[row]
        torch.minimum(self.bound, min_sq_dist(self.x, self.norms, centre[None], norm[None]), out=self.bound)
        self._add(row, centre, norm)
        self.seen.fill_(len(self.picks))

    def pick(self) -> None:
        """Take the row farthest from every centre so far (ties: lowest index)."""
        farthest = self.dist.max(0) if len(self.dist) else None
        while farthest is None or float(farthest.values) <= self.ceiling:
            self._new_frontier()
            farthest = self.dist.max(0) if len(self.dist) else None
        at = int(farthest.indices)  # the first of equal maxima: the lowest row index
        self._add(int(self.rows[at]), self.feats[at], self.feat_norms[at])
        self.dist[at] = -1
        torch.minimum(self.dist, min_sq_dist(self.feats, self.feat_norms, self.feats[at:at + 1],
                                              self.feat_norms[at:at + 1]), out=self.dist)
        if 2 * int((self.dist > self.ceiling).sum()) < len(self.dist):
            self._store(keep=self.dist > self.ceiling)  # the rest cannot be picked before the next frontier

    def _add(self, row: int, feat: torch.Tensor, norm: torch.Tensor) -> None:
        self.centres[len(self.picks)], self.centre_norms[len(self.picks)] = feat, norm
        self.picks.append(row)
        self.bound[row] = -1

    def _store(self, keep: torch.Tensor | None) -> None:
        """Write the frontier's exact distances back to the bounds; keep only its rows where `keep`."""
        self.bound[self.rows] = torch.minimum(self.bound[self.rows], self.dist)
        self.seen[self.rows] = len(self.picks)
        if keep is not None:
            self.rows, self.dist = self.rows[keep], self.dist[keep]
            self.feats, self.feat_norms = self.feats[keep], self.feat_norms[keep]

    def _new_frontier(self) -> None:
        """Gather the rows with the largest bounds and bring them up to date with the picks they missed."""
        self._store(keep=None)
        self.reserve = self.reserve[self.bound[self.reserve] > self.reserve_ceiling]
        if not len(self.reserve):
            self.reserve, self.reserve_ceiling = _top_rows(self.bound, _RESERVE_FRONTIERS * _FRONTIER_ROWS)
        at, ceiling = _top_rows(self.bound[self.reserve], _FRONTIER_ROWS)
        self.rows, self.ceiling = self.reserve[at], max(ceiling, self.reserve_ceiling)
        self.feats, self.feat_norms = self.x.index_select(0, self.rows).float(), self.norms[self.rows]
        self.dist = self.bound[self.rows].clone()
        missed = len(self.picks) - self.seen[self.rows]
        level = torch.where(missed > 0, torch.log2(missed.clamp(min=1).float()).floor().long(), -1)
        for value in torch.unique(level).tolist():  # rows that missed about as many picks: one GEMM
            if value >= 0:
                group = torch.nonzero(level == value)[:, 0]
                start = int(self.seen[self.rows[group]].min())
                nearest = min_sq_dist(self.feats[group], self.feat_norms[group],
                                       self.centres[start:len(self.picks)], self.centre_norms[start:len(self.picks)])
                self.dist[group] = torch.minimum(self.dist[group], nearest)
