"""Approximate nearest neighbours of many rows: an inverted file (rows grouped into cells by their nearest
coarse centroid) searched a cell at a time by matrix products, its probes tuned to a measured recall.

A faiss IVF index computes distances one vector at a time and holds a copy of every row. Here the cells
hold row ids only, and the rows of one cell are searched together among the rows of the cells nearest
its centroid: one float32 matrix product per cell, at matrix-multiply speed (docs/speed.md)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import faiss
import numpy as np
import torch
from tqdm import tqdm

from lowbudget import faiss_ops

NEIGHBOUR_SEARCHES = ("auto", "exact", "ivf")
APPROXIMATE_FROM_ROWS = 200_000  # --neighbours auto searches the inverted file from this many rows on (docs/speed.md)
TARGET_RECALL = 0.95  # recall@k the number of probed cells is raised until it reaches
FIRST_PROBES, MAX_PROBES = 8, 256  # probed cells: doubled from the first until the target or the cap
TRAINING_ROWS_PER_CELL = 64  # the coarse centroids are trained on at most this many sampled rows per cell
RECALL_QUERIES = 1000  # sampled rows whose exact neighbours measure the recall
_ROW_BLOCK = 65536  # rows per block of an exact search or of the assignment to cells


def uses_ivf(method: str, rows: int, gpu: bool) -> bool:
    """Whether `method` ("auto", "exact", "ivf") searches the inverted file for `rows` rows: auto does from
    APPROXIMATE_FROM_ROWS rows on a CPU, and never on a GPU, where exact search is fast."""
    if method not in NEIGHBOUR_SEARCHES:
        raise ValueError(f"unknown neighbour search {method!r}; choose one of {', '.join(NEIGHBOUR_SEARCHES)}")
    return method == "ivf" or (method == "auto" and not gpu and rows >= APPROXIMATE_FROM_ROWS)


def cell_count(rows: int) -> int:
    """Cells of the inverted file: 2 sqrt(N), rounded (about sqrt(N) / 2 rows each)."""
    return max(1, round(2 * math.sqrt(rows)))


@dataclass(frozen=True)
class CellIndex:
    """Rows grouped by cell, and each cell's cells by distance between centroids (itself first). The rows
    of cell c are order[starts[c]:starts[c + 1]]; a query row is searched among the rows of the `probes`
    cells nearest its own. `recall` is the recall@`k` the probes reached on a sample (None untuned)."""

    order: np.ndarray  # N int64 row ids, grouped by cell
    starts: np.ndarray  # cells + 1 int64
    cell: np.ndarray  # N int64: each row's cell
    near_cells: np.ndarray  # cells x min(cells, MAX_PROBES) int64
    probes: int = FIRST_PROBES
    k: int = 1
    recall: float | None = None

    @property
    def cells(self) -> int:
        return len(self.starts) - 1

    def members(self, cells: np.ndarray) -> np.ndarray:
        """The rows of `cells`, concatenated."""
        return np.concatenate([self.order[self.starts[c]:self.starts[c + 1]] for c in cells])

    def groups(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in `rows`, candidate rows) for each cell holding some of `rows`: the candidates are the
        rows of the `probes` cells nearest that cell."""
        cells = self.cell[rows]
        by_cell = np.argsort(cells, kind="stable")
        bounds = np.flatnonzero(np.diff(cells[by_cell])) + 1
        for positions in np.split(by_cell, bounds) if len(rows) else []:
            yield positions, self.members(self.near_cells[cells[positions[0]], :self.probes])


def _float32_rows(feats: np.ndarray, rows: np.ndarray | slice) -> torch.Tensor:
    """Rows of `feats` (float16 or float32, possibly memory-mapped) as a float32 tensor."""
    block = faiss_ops.as_float32(feats[rows])
    return torch.from_numpy(block if block.flags.writeable else block.copy())  # a memory map is read-only


def _sq_distances(queries: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances, queries x base, as |q|^2 + |b|^2 - 2 q.b (one matrix product), at least 0."""
    out = torch.addmm(torch.einsum("ij,ij->i", base, base)[None], queries, base.T, alpha=-2)
    out += torch.einsum("ij,ij->i", queries, queries)[:, None]
    return out.clamp_(min=0)


def nearest_centroids(feats: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid, searched a block of rows at a time (no float32 copy of all rows)."""
    return np.concatenate([faiss.knn(faiss_ops.as_float32(feats[start:start + _ROW_BLOCK]), centroids, 1)[1][:, 0]
                           for start in range(0, len(feats), _ROW_BLOCK)])


def cell_index(feats: np.ndarray, seed: int = 0, cells: int | None = None) -> CellIndex:
    """The inverted file of `feats` with `cells` cells (cell_count by default): faiss k-means (10 iterations)
    on a seeded sample of at most TRAINING_ROWS_PER_CELL rows per cell, every row in its nearest cell."""
    rows = len(feats)
    cells = min(rows, cells or cell_count(rows))
    sample = np.sort(np.random.default_rng(seed).choice(rows, min(rows, TRAINING_ROWS_PER_CELL * cells),
                                                        replace=False))
    centroids, _, _ = faiss_ops.kmeans(feats[sample], cells, seed, faiss_ops.KmeansSettings(niter=10, nredo=1))
    cell = nearest_centroids(feats, centroids).astype(np.int64)
    order = np.argsort(cell, kind="stable")
    starts = np.searchsorted(cell[order], np.arange(cells + 1))
    between = _sq_distances(torch.from_numpy(centroids), torch.from_numpy(centroids))
    between.fill_diagonal_(-1)  # each cell nearest itself, even beside a duplicate centroid
    near = torch.argsort(between, dim=1, stable=True)[:, :min(cells, MAX_PROBES)]
    return CellIndex(order, starts.astype(np.int64), cell, near.numpy().astype(np.int64))


def search(feats: np.ndarray, index: CellIndex, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows (among the probed cells) of each of `rows`: squared distances (ascending) and row
    ids, int32 below 2^31 rows (-1 and inf past the candidates when fewer than k were probed)."""
    sq_dist = np.full((len(rows), k), np.inf, dtype=np.float32)
    found = np.full((len(rows), k), -1, dtype=np.int32 if len(feats) < 2 ** 31 else np.int64)
    for positions, candidates in tqdm(index.groups(rows), desc="ivf k-NN", total=len(np.unique(index.cell[rows])),
                                      disable=len(rows) <= _ROW_BLOCK):
        dist = _sq_distances(_float32_rows(feats, rows[positions]), _float32_rows(feats, candidates))
        near = torch.topk(dist, min(k, len(candidates)), dim=1, largest=False)
        columns = near.indices.shape[1]
        sq_dist[positions, :columns] = near.values.numpy()
        found[positions, :columns] = candidates[near.indices.numpy()]
    return sq_dist, found


def range_pairs(feats: np.ndarray, index: CellIndex, rows: np.ndarray, radius_sq: float
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row, y) pairs with squared distance below `radius_sq`, y among the probed cells of each of `rows`,
    a cell at a time."""
    for positions, candidates in index.groups(rows):
        inside = (_sq_distances(_float32_rows(feats, rows[positions]), _float32_rows(feats, candidates))
                  < radius_sq).numpy()
        query, column = np.nonzero(inside)
        yield rows[positions][query], candidates[column]


def nearest_allowed(feats: np.ndarray, index: CellIndex, rows: np.ndarray, allowed: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each of `rows`, the squared distance and id of the nearest row where the boolean `allowed` is
    True among its probed cells (inf and -1 when none is)."""
    sq_dist, found = np.full(len(rows), np.inf), np.full(len(rows), -1, dtype=np.int64)
    for positions, candidates in index.groups(rows):
        candidates = candidates[allowed[candidates]]
        if len(candidates):
            best = _sq_distances(_float32_rows(feats, rows[positions]), _float32_rows(feats, candidates)).min(1)
            sq_dist[positions], found[positions] = best.values.numpy(), candidates[best.indices.numpy()]
    return sq_dist, found


def exact_search(feats: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `feats` (only where the boolean `allowed` is True, when given) for a few
    `queries` (rows of vectors): squared distances (ascending, inf past the allowed rows) and row ids (-1
    there), over blocks of rows, so neither a float32 copy of all rows nor a selected copy is made."""
    query = torch.from_numpy(faiss_ops.as_float32(queries))
    best = torch.full((len(query), 0), torch.inf)
    ids = torch.zeros((len(query), 0), dtype=torch.int64)
    for start in range(0, len(feats), _ROW_BLOCK):
        dist = _sq_distances(query, _float32_rows(feats, slice(start, start + _ROW_BLOCK)))
        if allowed is not None:
            dist[:, ~torch.from_numpy(allowed[start:start + _ROW_BLOCK])] = torch.inf
        near = torch.topk(dist, min(k, dist.shape[1]), dim=1, largest=False)
        merged, order = torch.sort(torch.cat([best, near.values], 1), dim=1, stable=True)
        best, ids = merged[:, :k], torch.gather(torch.cat([ids, near.indices + start], 1), 1, order[:, :k])
    ids[torch.isinf(best)] = -1
    return best.numpy(), ids.numpy()


def recall_sample(rows: int, seed: int) -> np.ndarray:
    """The seeded random rows (RECALL_QUERIES at most) whose exact neighbours measure a recall."""
    return np.sort(np.random.default_rng(seed).choice(rows, min(rows, RECALL_QUERIES), replace=False))


def found_share(found: np.ndarray, base: np.ndarray, queries: np.ndarray, exact_sq: np.ndarray) -> float:
    """recall@k of `found` (queries x >= k row indices of `base`, -1 for none) given the queries' exact
    squared distances to their k nearest rows (`exact_sq`, k columns): the share of the first k found
    rows that are at most as far as the exact k-th (ties count as found), averaged over the queries."""
    rows = found[:, :exact_sq.shape[1]]
    hit = rows >= 0
    diff = faiss_ops.as_float32(base[np.where(hit, rows, 0).ravel()]).reshape(*rows.shape, -1) \
        - faiss_ops.as_float32(queries)[:, None]
    sq_dist = np.where(hit, np.einsum("qkd,qkd->qk", diff, diff), np.inf)
    return float(np.mean(sq_dist <= exact_sq[:, -1:] * (1 + 1e-5) + 1e-6))


@dataclass(frozen=True)
class RecallProbe:
    """Seeded sample rows and their exact squared distances to their k nearest rows: what a recall@k of
    the inverted file is measured against."""

    rows: np.ndarray
    exact_sq: np.ndarray

    @classmethod
    def sample(cls, feats: np.ndarray, k: int, seed: int) -> RecallProbe:
        rows = recall_sample(len(feats), seed)
        return cls(rows, exact_search(feats, feats[rows], min(k, len(feats)))[0])

    def recall(self, feats: np.ndarray, index: CellIndex) -> float:
        found = search(feats, index, self.rows, self.exact_sq.shape[1])[1]
        return found_share(found, feats, feats[self.rows], self.exact_sq)


def tuned_cell_index(feats: np.ndarray, k: int, seed: int = 0, target: float = TARGET_RECALL) -> CellIndex:
    """cell_index over `feats` with the fewest probed cells (FIRST_PROBES, doubled, at most MAX_PROBES or all
    cells) whose recall@k on the seeded sample reaches `target` (below it only at the cap), and that recall."""
    index = cell_index(feats, seed)
    probe = RecallProbe.sample(feats, k, seed)
    cap = index.near_cells.shape[1]
    probes = min(FIRST_PROBES, cap)
    while True:
        index = replace(index, probes=probes, k=probe.exact_sq.shape[1])
        recall = probe.recall(feats, index)
        if recall >= target or probes >= cap:
            return replace(index, recall=recall)
        probes = min(2 * probes, cap)
