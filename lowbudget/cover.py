"""ProbCover's engine: the k-NN pass, the purity heuristic for δ, the δ-ball graph as a sparse edge list
(never N x N), and the greedy max-coverage state."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lowbudget import faiss_ops, ivf


@dataclass(frozen=True)
class Neighbours:
    """The k nearest rows of every row (exact, or as the inverted file found them): squared L2
    distances (ascending) and row indices."""
    sq_dist: np.ndarray  # N x k
    index: np.ndarray  # N x k int64 (exact) or int32 (inverted file, below 2^31 rows)


PROBCOVER_KNN = 64  # neighbours of ProbCover's k-NN pass; the inverted file is tuned to its recall@k


def probcover_index(feats: np.ndarray, method: str, k: int = PROBCOVER_KNN, seed: int = 0, gpu: bool = False
                    ) -> ivf.CellIndex | None:
    """The inverted file ProbCover searches when `method` ("auto", "exact", "ivf") asks for one (ivf.uses_ivf),
    its probes tuned to recall@k >= 0.95 on a seeded sample; None for exact search."""
    if not ivf.uses_ivf(method, len(feats), gpu):
        return None
    return ivf.tuned_cell_index(feats, k, seed)


def nearest_neighbours(feats: np.ndarray, k: int, gpu: bool = False,
                       approximate: ivf.CellIndex | None = None) -> Neighbours:
    """k-NN of every row among all rows (the row itself included), O(N k) memory: faiss exact search,
    or the `approximate` inverted file's search (a row it finds fewer than k neighbours for is padded with
    itself at infinite distance)."""
    k = min(k, len(feats))
    if approximate is None:
        sq_dist, index = faiss_ops.flat_search(feats, feats, k, gpu)
        return Neighbours(np.maximum(sq_dist, 0), index)
    sq_dist, index = ivf.search(feats, approximate, np.arange(len(feats)), k)
    missing = index < 0
    index[missing] = np.nonzero(missing)[0]
    return Neighbours(sq_dist, index)


def nearest_other_label(feats: np.ndarray, labels: np.ndarray, rows: np.ndarray, gpu: bool = False,
                        approximate: ivf.CellIndex | None = None) -> np.ndarray:
    """Distance from each of `rows` to the nearest row with another label (inf when there is none): per
    label, one faiss search of its rows among all rows of other labels, exact, or among the probed cells
    of the `approximate` inverted file (exact, a block of rows at a time, for the rows it finds none for)."""
    dist = np.full(len(rows), np.inf)
    for label in np.unique(labels[rows]):
        queries = np.flatnonzero(labels[rows] == label)
        others = labels != label
        if not others.any():
            continue
        if approximate is not None:
            sq, found = ivf.nearest_allowed(feats, approximate, rows[queries], others)
            dist[queries] = np.sqrt(sq)
            queries = queries[found < 0]
            if len(queries):
                dist[queries] = np.sqrt(ivf.exact_search(feats, feats[rows[queries]], 1, others)[0][:, 0])
        elif len(queries):
            sq, _ = faiss_ops.flat_search(feats[others], feats[rows[queries]], 1, gpu)
            dist[queries] = np.sqrt(np.maximum(sq[:, 0], 0))
    return dist


def purity_delta(feats: np.ndarray, pseudo_labels: np.ndarray, purity: float, neighbours: Neighbours,
                 gpu: bool = False, approximate: ivf.CellIndex | None = None) -> float:
    """The largest δ whose balls are pure for at least a `purity` share of the points (ProbCover's
    heuristic), computed exactly instead of on a grid.

    The ball B_δ(x) = {y : |x - y| < δ} is pure iff δ <= d(x), the distance from x to the nearest
    point of another pseudo-label, so δ is the ceil(purity * N)-th largest d(x). d(x) is read off
    the k nearest neighbours when one has another label; otherwise d(x) >= the k-th neighbour's
    distance, and only the points for which that bound cannot settle the answer are searched in full.
    """
    n = len(feats)
    labels = pseudo_labels.astype(np.int32)  # the N x k gather below at half the memory
    other = labels[neighbours.index] != labels[:, None]
    found = other.any(1)
    dist = np.full(n, np.inf)
    dist[found] = np.sqrt(neighbours.sq_dist[found, other[found].argmax(1)])
    rank = n - int(np.ceil(purity * n))  # ascending position of the answer
    bound = np.sqrt(neighbours.sq_dist[:, -1])
    unsure = np.flatnonzero(~found & (bound < np.partition(dist, rank)[rank]))
    dist[unsure] = nearest_other_label(feats, pseudo_labels, unsure, gpu, approximate)
    delta = float(np.partition(dist, rank)[rank])
    if not np.isfinite(delta):
        raise ValueError("every ball is pure at any radius: the pseudo-labels need at least two clusters")
    return delta


class TooManyEdges(ValueError):
    """A ball graph would hold more edges than memory allows."""

    def __init__(self, delta: float, max_edges: int):
        super().__init__(f"δ = {delta:.4g} gives more than {max_edges} edges; choose a smaller δ")


@dataclass(frozen=True)
class CoverGraph:
    """Symmetric δ-ball graph in CSR form: the ball of row i is indices[indptr[i]:indptr[i+1]] (itself included)."""
    indptr: np.ndarray  # N + 1 int64
    indices: np.ndarray  # E int32 (int64 beyond 2^31 rows)


def _csr(n: int, rows: np.ndarray, cols: np.ndarray) -> CoverGraph:
    """CSR of the symmetric closure of the edges rows -> cols, duplicates removed."""
    keys = np.unique(np.concatenate([rows * n + cols, cols * n + rows]))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(keys // n, minlength=n))])
    return CoverGraph(indptr.astype(np.int64), (keys % n).astype(np.int32 if n < 2 ** 31 else np.int64))


def _range_blocks(feats: np.ndarray, rows: np.ndarray, delta: float, approximate: ivf.CellIndex | None,
                  block: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row, y) pairs with |x_row - y| < δ, a block at a time: faiss range searches of an exact flat index
    (CPU: faiss has no range search on GPU flat indexes), or among the `approximate` inverted file's probed cells."""
    if approximate is not None:
        yield from ivf.range_pairs(feats, approximate, rows, delta * delta)
        return
    index = faiss_ops.flat_index(feats, gpu=False)
    for start in range(0, len(rows), block):
        queries = rows[start:start + block]
        lims, _, found = index.range_search(faiss_ops.as_float32(feats[queries]), delta * delta)
        limits = lims.astype(np.int64)  # uint64 from faiss, which repeat refuses
        yield np.repeat(queries, limits[1:] - limits[:-1]), found


def _range_edges(feats: np.ndarray, rows: np.ndarray, delta: float, max_edges: int,
                 approximate: ivf.CellIndex | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (row, y) with |x_row - y| < δ for `rows` (_range_blocks); TooManyEdges past `max_edges`."""
    sources, targets, edges = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0
    for source, target in _range_blocks(feats, rows, delta, approximate) if len(rows) else []:
        sources.append(source)
        targets.append(target)
        edges += len(target)
        if edges > max_edges:
            raise TooManyEdges(delta, max_edges)
    return np.concatenate(sources), np.concatenate(targets)


def cover_graph(feats: np.ndarray, delta: float, neighbours: Neighbours, max_edges: int = 2 ** 29,
                approximate: ivf.CellIndex | None = None, complete: bool = True) -> CoverGraph:
    """Edges x - y for |x - y| < δ, and x - x, as a sparse edge list: memory grows with the number
    of edges, never N x N. A ball smaller than the k precomputed neighbours is read off them; the
    rows whose k-th neighbour is still inside δ are range-searched in full (in the `approximate`
    index when given), or with `complete` False keep their k neighbours alone (at most N (2k + 1)
    edges, whatever δ). Raises TooManyEdges past `max_edges` (δ too large for memory)."""
    n = len(feats)
    inside = neighbours.sq_dist < delta * delta
    overflow = (np.flatnonzero(inside[:, -1]) if complete and neighbours.index.shape[1] < n
                else np.zeros(0, np.int64))
    inside[overflow] = False
    if inside.sum() > max_edges:
        raise TooManyEdges(delta, max_edges)
    far_rows, far_cols = _range_edges(feats, overflow, delta, max_edges, approximate=approximate)
    rows = np.concatenate([np.arange(n), np.nonzero(inside)[0], far_rows])
    cols = np.concatenate([np.arange(n), neighbours.index[inside], far_cols])
    return _csr(n, rows.astype(np.int64), cols.astype(np.int64))


def probcover_graph(feats: np.ndarray, delta: float | None = None, purity: float = 0.95,
                    pseudo_classes: int | None = 10, neighbours: int = PROBCOVER_KNN, seed: int = 0,
                    gpu: bool = False, approximate: ivf.CellIndex | None = None) -> tuple[CoverGraph, float]:
    """ProbCover's ball graph and its δ: the given one, or when None the purity heuristic under
    k-means pseudo-labels with `pseudo_classes` clusters (one faiss run, seeded). One k-NN pass with
    `neighbours` neighbours serves both the heuristic and the graph; every search is exact, or made in
    the `approximate` index (probcover_index) when given."""
    near = nearest_neighbours(feats, neighbours, gpu, approximate)
    if delta is None:
        if pseudo_classes is None:
            raise ValueError("the purity heuristic needs the number of pseudo-classes")
        _, pseudo_labels, _ = faiss_ops.kmeans(feats, pseudo_classes, seed, faiss_ops.KmeansSettings(nredo=1), gpu=gpu)
        delta = purity_delta(feats, pseudo_labels, purity, near, gpu, approximate)
    return cover_graph(feats, delta, near, approximate=approximate), delta


def ball_members(graph: CoverGraph, rows: np.ndarray) -> np.ndarray:
    """Concatenated balls of `rows`."""
    starts, ends = graph.indptr[rows], graph.indptr[rows + 1]
    lengths = ends - starts
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return graph.indices[np.arange(lengths.sum()) + offsets]


class Coverage:
    """Greedy max-coverage state: which points are covered and how many uncovered points each ball holds."""

    def __init__(self, graph: CoverGraph):
        self.graph = graph
        self.covered = np.zeros(len(graph.indptr) - 1, dtype=bool)
        self.degree = np.diff(graph.indptr)

    def add(self, centres: np.ndarray) -> None:
        """Cover the balls of `centres`."""
        self.cover_rows(np.unique(ball_members(self.graph, np.atleast_1d(centres))))

    def cover_rows(self, rows: np.ndarray) -> None:
        """Cover `rows` (unique); every ball that held a newly covered row loses it."""
        new = rows[~self.covered[rows]]
        self.covered[new] = True
        np.subtract.at(self.degree, ball_members(self.graph, new), 1)  # symmetric: y's ball = balls holding y
