"""Query strategies as pure functions on arrays: no files, no flags, a seed where randomness enters.

Every function returns exactly the requested number of unique dataset indices (int64) or raises
ValueError when the pool cannot supply them. Features are expected L2-normalised, as the cache stores
them; distances are squared Euclidean, which ranks like cosine on unit vectors.

Filling rule (kmeans, accu_kmeans): each cluster contributes its eligible member nearest to its
centroid (ties: lowest index). When a cluster has no eligible member (empty, or every member already
labelled), the shortfall is filled one point per cluster from the clusters with the most eligible
members left (ties: lowest cluster id), each giving its next-nearest eligible member, repeated until
the budget is met. The number of points filled this way is reported.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lowbudget import faiss_ops, ivf

_NONE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Selection:
    """What a strategy returns: the picks, how many came from a fill rule, and the parameters it used."""

    indices: np.ndarray  # int64 row indices, exactly the budget, unique
    filled: int = 0  # how many came from the filling rule instead of the strategy's own criterion
    params: dict[str, Any] = field(default_factory=dict)  # values the sidecar records (e.g. k-means niter)


def _check_budget(budget: int, available: int) -> None:
    if budget <= 0 or budget > available:
        raise ValueError(f"budget {budget} is not within 1..{available}, the number of selectable images")


def _eligible_mask(n: int, taken: np.ndarray) -> np.ndarray:
    """True for the n rows but those `taken`."""
    eligible = np.ones(n, dtype=bool)
    eligible[taken] = False
    return eligible


# ---------------------------------------------------------------- random and uniform

def random_pools(num_images: int, budgets: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Nested random pools: each budget takes the first entries of one seeded permutation."""
    for budget in budgets:
        _check_budget(budget, num_images)
    order = np.random.default_rng(seed).permutation(num_images).astype(np.int64)
    return {budget: order[:budget].copy() for budget in budgets}


def class_quotas(class_sizes: np.ndarray, budget: int, priority: np.ndarray) -> np.ndarray:
    """Per-class counts summing to `budget`, as equal as class sizes allow (water-filling).

    Every class gets min(size, t) for the largest level t that fits; the remaining r < #classes
    images go one each to the classes still larger than t, in `priority` order. Counts never
    decrease as the budget grows, so pools built from them are nested.
    """
    _check_budget(budget, int(class_sizes.sum()))
    low, high = 0, int(class_sizes.max())
    while low < high:  # largest t with sum(min(size, t)) <= budget
        mid = (low + high + 1) // 2
        low, high = (mid, high) if np.minimum(class_sizes, mid).sum() <= budget else (low, mid - 1)
    counts = np.minimum(class_sizes, low)
    extra = budget - int(counts.sum())
    open_classes = priority[class_sizes[priority] > low]
    counts[open_classes[:extra]] += 1
    return counts


def uniform_pools(labels: np.ndarray, budgets: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Class-balanced nested pools: per class a seeded permutation, of which each budget takes a prefix.

    Classes smaller than their share (ImageNet-LT) give all their images and the rest of the budget
    goes to the larger classes, so every pool has exactly `budget` unique images.
    """
    rng = np.random.default_rng(seed)
    classes, class_of = np.unique(labels, return_inverse=True)
    shuffled = rng.permutation(len(labels))
    grouped = shuffled[np.argsort(class_of[shuffled], kind="stable")]  # by class, random inside
    class_sizes = np.bincount(class_of, minlength=len(classes))
    starts = np.concatenate(([0], np.cumsum(class_sizes)[:-1]))
    rank = np.arange(len(labels)) - np.repeat(starts, class_sizes)  # position inside its class
    priority = rng.permutation(len(classes))
    pools = {}
    for budget in budgets:
        counts = class_quotas(class_sizes, budget, priority)
        pools[budget] = grouped[rank < np.repeat(counts, class_sizes)].astype(np.int64)
    return pools


# ---------------------------------------------------------------- k-means family

def _nearest_per_cluster(assign: np.ndarray, dist: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """For each cluster, the candidate with the smallest distance to its centroid (ties: lowest
    index), or -1 when it has none. O(N): one pass of ufunc.at, no loop over clusters."""
    ids = np.flatnonzero(candidates)
    groups, values = assign[ids], dist[ids]
    best = np.full(k, np.inf, dtype=values.dtype)
    np.minimum.at(best, groups, values)
    at_best = values == best[groups]
    pick = np.full(k, _NONE, dtype=np.int64)
    np.minimum.at(pick, groups[at_best], ids[at_best])
    pick[pick == _NONE] = -1
    return pick


def cluster_representatives(assign: np.ndarray, dist: np.ndarray, eligible: np.ndarray, budget: int
                            ) -> Selection:
    """One eligible point per cluster (there are `budget` clusters) nearest its centroid, then the
    documented fill up to `budget`."""
    k = budget
    picks = _nearest_per_cluster(assign, dist, eligible, k)
    selected = picks[picks >= 0]
    remaining = eligible.copy()
    remaining[selected] = False
    filled = 0
    while len(selected) < budget:
        sizes = np.bincount(assign[remaining], minlength=k)
        order = np.argsort(-sizes, kind="stable")
        order = order[sizes[order] > 0][:budget - len(selected)]
        extra = _nearest_per_cluster(assign, dist, remaining, k)[order]
        remaining[extra] = False
        selected = np.concatenate([selected, extra])
        filled += len(extra)
    return Selection(selected.astype(np.int64), filled)


def _kmeans_representatives(feats: np.ndarray, eligible: np.ndarray, budget: int, *, seed: int, gpu: bool,
                            verbose: bool, settings: faiss_ops.KmeansSettings) -> Selection:
    """`budget` faiss k-means clusters over all points, each sending its eligible point nearest the centroid."""
    _, assign, dist = faiss_ops.kmeans(feats, budget, seed, settings, gpu=gpu, verbose=verbose)
    selection = cluster_representatives(assign, dist, eligible, budget)
    return Selection(selection.indices, selection.filled, {"niter": settings.niter, "nredo": settings.nredo,
                                                           "sample": settings.sample,
                                                           "kmeans_objective": float(dist.sum())})


def kmeans_select(feats: np.ndarray, budget: int, seed: int = 0, gpu: bool = False, verbose: bool = False,
                  settings: faiss_ops.KmeansSettings = faiss_ops.ORIGINAL_KMEANS) -> Selection:
    """Single-batch k-means: `budget` clusters over all points, each sends its point nearest the centroid.
    `settings`: restarts and training sample (the defaults are the original's)."""
    _check_budget(budget, len(feats))
    return _kmeans_representatives(feats, np.ones(len(feats), dtype=bool), budget, seed=seed, gpu=gpu,
                                   verbose=verbose, settings=settings)


def accu_kmeans_select(feats: np.ndarray, labeled: np.ndarray, budget: int, seed: int = 0, gpu: bool = False,
                       verbose: bool = False, settings: faiss_ops.KmeansSettings = faiss_ops.ORIGINAL_KMEANS
                       ) -> Selection:
    """Multi-batch k-means: `budget` clusters over all points (labelled included); each cluster sends
    its unlabelled point nearest the centroid. Returns only the new indices."""
    eligible = _eligible_mask(len(feats), labeled)
    _check_budget(budget, int(eligible.sum()))
    return _kmeans_representatives(feats, eligible, budget, seed=seed, gpu=gpu, verbose=verbose, settings=settings)


# ---------------------------------------------------------------- core-set (greedy k-center)

_ROW_BLOCK = 4096  # rows per distance tile: a float32 copy of them and the tile stay in cache-sized blocks
_CENTRE_BLOCK = 512  # centres per distance tile
_FRONTIER_ROWS = 1024  # rows the greedy keeps exact at a time (see _GreedyKCenter)
_RESERVE_FRONTIERS = 32  # the reserve the frontiers are drawn from holds this many frontiers' rows


def _feature_rows(feats: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """The features as a tensor on `device`, float16 kept as float16 (no copy on the CPU)."""
    dtype = feats.dtype if feats.dtype in (np.float16, np.float32) else np.float32
    with warnings.catch_warnings():  # read-only (memory-mapped) arrays are only read here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=dtype)).to(device)


def _row_blocks(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 rows) for consecutive blocks of `_ROW_BLOCK` rows. float16 storage is widened one
    block at a time into one reused buffer (valid until the next block), so distances are float32
    without a float32 copy of all rows, and no allocation per block piles up in the process' memory."""
    buffer = None if x.dtype == torch.float32 else torch.empty((min(len(x), _ROW_BLOCK), x.shape[1]),
                                                               device=x.device)
    for start in range(0, len(x), _ROW_BLOCK):
        rows = x[start:start + _ROW_BLOCK]
        yield start, rows if buffer is None else buffer[:len(rows)].copy_(rows)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.einsum("ij,ij->i", rows, rows) for _, rows in _row_blocks(x)])  # no rows x D temporary


def _min_sq_dist(rows: torch.Tensor, row_norms: torch.Tensor, centres: torch.Tensor,
                 centre_norms: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of each of `rows` (float16 or float32) to its nearest of `centres` (float32),
    as |r|^2 + min_c (|c|^2 - 2 r.c): float32 GEMMs into one reused tile of at most `_ROW_BLOCK` rows
    x `_CENTRE_BLOCK` centres (a matrix-vector product for one centre), no rows x centres temporary."""
    nearest = torch.empty(len(rows), device=rows.device)
    tile_size = min(len(rows), _ROW_BLOCK) * min(len(centres), _CENTRE_BLOCK)
    buffer = torch.empty(tile_size if len(centres) > 1 else 0, device=rows.device)
    for start, block in _row_blocks(rows):
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


def _pool_distances(feats: np.ndarray, labeled: np.ndarray, gpu_faiss: bool) -> np.ndarray:
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


class _GreedyKCenter:
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
        torch.minimum(self.bound, _min_sq_dist(self.x, self.norms, centre[None], norm[None]), out=self.bound)
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
        torch.minimum(self.dist, _min_sq_dist(self.feats, self.feat_norms, self.feats[at:at + 1],
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
                nearest = _min_sq_dist(self.feats[group], self.feat_norms[group],
                                       self.centres[start:len(self.picks)], self.centre_norms[start:len(self.picks)])
                self.dist[group] = torch.minimum(self.dist[group], nearest)


def coreset_select(feats: np.ndarray, labeled: np.ndarray, budget: int, device: str | torch.device = "cpu",
                   gpu_faiss: bool = False, progress: bool = True) -> Selection:
    """Greedy k-center (Sener & Savarese): repeatedly take the point farthest (squared L2) from the
    labelled pool and the points taken so far. Ties: lowest index.

    With an empty pool the first point is the one nearest the mean of all features. The picks are the
    plain greedy's, but each pick reads only the rows that can still be picked (_GreedyKCenter), on
    `device`; the distances to the labelled pool come from one faiss search (on the GPUs with
    `gpu_faiss`). float16 features stay float16 in memory and are widened to float32 a block at a
    time. Memory: the features, a few N-vectors, the picks' features and a frontier of a few
    thousand rows.
    """
    labeled = np.asarray(labeled, dtype=np.int64)
    _check_budget(budget, len(feats) - len(labeled))
    x = _feature_rows(feats, device)
    norms = _sq_norms(x)
    if len(labeled):
        bound = torch.as_tensor(_pool_distances(feats, labeled, gpu_faiss)).to(x.device)
        bound[torch.as_tensor(labeled, device=x.device)] = -1
        greedy = _GreedyKCenter(x, norms, bound, budget)
    else:
        greedy = _GreedyKCenter(x, norms, torch.full((len(x),), torch.inf, device=x.device), budget)
        mean = torch.stack([rows.sum(0) for _, rows in _row_blocks(x)]).sum(0) / len(x)
        greedy.start_from(int(torch.argmin(_min_sq_dist(x, norms, mean[None], (mean @ mean)[None]))))
    for _ in tqdm(range(budget - len(greedy.picks)), desc="select candidates", disable=not progress or None):
        greedy.pick()
    return Selection(np.asarray(greedy.picks, dtype=np.int64), 0)


# ---------------------------------------------------------------- low-budget: TypiClust, ProbCover, MaxHerding

def _seeded_fill(eligible: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` eligible indices in a seeded random order: the fill once a greedy objective is exhausted."""
    return np.random.default_rng(seed).permutation(np.flatnonzero(eligible))[:count].astype(np.int64)


def typicality(feats: np.ndarray, knn: int, squared: bool = True, gpu: bool = False) -> np.ndarray:
    """1 / (mean distance to the `knn` nearest other rows + 1e-5), as TypiClust.

    `squared=True` averages squared L2 distances, as the authors' code does (faiss returns squared
    distances); `squared=False` averages plain distances, as the paper's formula writes.
    """
    if len(feats) == 1:
        return np.ones(1)
    knn = max(1, min(knn, len(feats) // 2))
    dist, _ = faiss_ops.flat_search(feats, feats, knn + 1, gpu)
    dist = np.maximum(dist[:, 1:].astype(np.float64), 0)  # the first neighbour is the row itself
    return 1 / ((dist if squared else np.sqrt(dist)).mean(1) + 1e-5)


def typiclust_kmeans(clusters: int) -> faiss_ops.KmeansSettings:
    """TypiClust's faiss k-means: 20 iterations, the best of 5 runs up to 50 clusters and of 2 above,
    where each run costs more and the best of 2 picks as well as the best of 5 (docs/speed.md). The
    authors' code also switches there, from KMeans to MiniBatchKMeans."""
    return faiss_ops.KmeansSettings(niter=20, nredo=5 if clusters <= 50 else 2)


def _typiclust_cluster(sizes: np.ndarray, taken_per_cluster: np.ndarray,
                       left_per_cluster: np.ndarray, min_cluster_size: int) -> int:
    """The cluster to query next: among clusters with candidates left, those larger than
    `min_cluster_size` first, then fewest labelled or selected points, then largest, then lowest id."""
    open_ids = np.flatnonzero(left_per_cluster > 0)
    keys = (open_ids, -sizes[open_ids], taken_per_cluster[open_ids], sizes[open_ids] <= min_cluster_size)
    return int(open_ids[np.lexsort(keys)[0]])


def typiclust_select(feats: np.ndarray, labeled: np.ndarray, budget: int, knn: int = 20, max_clusters: int = 500,
                     min_cluster_size: int = 5, squared: bool = True, seed: int = 0, gpu: bool = False,
                     verbose: bool = False, kmeans: faiss_ops.KmeansSettings | None = None) -> Selection:
    """TypiClust (Hacohen et al. 2022): min(|L| + budget, max_clusters) k-means clusters; each query
    takes the most typical unlabelled point of the cluster with the fewest labelled (or already
    selected) points, largest first. Typicality is computed among the cluster's remaining
    candidates with k = min(knn, candidates // 2).

    Clusters of `min_cluster_size` points or fewer are skipped while larger ones have candidates;
    picks from them are counted as `filled`. k-means runs with `kmeans`, by default
    typiclust_kmeans(clusters). Returns only the new indices, with the k-means settings and
    objective in `params`.
    """
    labeled = np.asarray(labeled, dtype=np.int64)
    eligible = _eligible_mask(len(feats), labeled)
    _check_budget(budget, int(eligible.sum()))
    k = min(len(labeled) + budget, max_clusters, len(feats))
    kmeans = kmeans or typiclust_kmeans(k)
    _, assign, sq_dist = faiss_ops.kmeans(feats, k, seed, kmeans, gpu=gpu, verbose=verbose)
    sizes = np.bincount(assign, minlength=k)
    taken = np.bincount(assign[labeled], minlength=k)
    left = np.bincount(assign[eligible], minlength=k)
    picks, filled = [], 0
    for _ in range(budget):
        cluster = _typiclust_cluster(sizes, taken, left, min_cluster_size)
        candidates = np.flatnonzero(eligible & (assign == cluster))
        pick = int(candidates[np.argmax(typicality(feats[candidates], knn, squared, gpu))])
        eligible[pick] = False
        taken[cluster] += 1
        left[cluster] -= 1
        filled += int(sizes[cluster] <= min_cluster_size)
        picks.append(pick)
    return Selection(np.asarray(picks, dtype=np.int64), filled,
                     {"niter": kmeans.niter, "nredo": kmeans.nredo, "kmeans_objective": float(sq_dist.sum())})


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
    """All (row, y) with |x_row - y| < δ for `rows` (_range_blocks); ValueError past `max_edges`."""
    sources, targets, edges = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0
    for source, target in _range_blocks(feats, rows, delta, approximate) if len(rows) else []:
        sources.append(source)
        targets.append(target)
        edges += len(target)
        if edges > max_edges:
            raise ValueError(f"δ = {delta:.4g} gives more than {max_edges} edges; choose a smaller δ")
    return np.concatenate(sources), np.concatenate(targets)


def cover_graph(feats: np.ndarray, delta: float, neighbours: Neighbours, max_edges: int = 2 ** 29,
                approximate: ivf.CellIndex | None = None) -> CoverGraph:
    """Edges x - y for |x - y| < δ, and x - x, as a sparse edge list: memory grows with the number
    of edges, never N x N. A ball smaller than the k precomputed neighbours is read off them; the
    rows whose k-th neighbour is still inside δ are range-searched in full (in the `approximate`
    index when given). Raises ValueError past `max_edges` (δ too large for memory)."""
    n = len(feats)
    inside = neighbours.sq_dist < delta * delta
    overflow = np.flatnonzero(inside[:, -1]) if neighbours.index.shape[1] < n else np.zeros(0, np.int64)
    inside[overflow] = False
    if inside.sum() > max_edges:
        raise ValueError(f"δ = {delta:.4g} gives more than {max_edges} edges; choose a smaller δ")
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


def _ball_members(graph: CoverGraph, rows: np.ndarray) -> np.ndarray:
    """Concatenated balls of `rows`."""
    starts, ends = graph.indptr[rows], graph.indptr[rows + 1]
    lengths = ends - starts
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return graph.indices[np.arange(lengths.sum()) + offsets]


class _Coverage:
    """Greedy max-coverage state: which points are covered and how many uncovered points each ball holds."""

    def __init__(self, graph: CoverGraph):
        self.graph = graph
        self.covered = np.zeros(len(graph.indptr) - 1, dtype=bool)
        self.degree = np.diff(graph.indptr)

    def add(self, centres: np.ndarray) -> None:
        """Cover the balls of `centres`; every ball that held a newly covered point loses it."""
        members = np.unique(_ball_members(self.graph, np.atleast_1d(centres)))
        new = members[~self.covered[members]]
        self.covered[new] = True
        np.subtract.at(self.degree, _ball_members(self.graph, new), 1)  # symmetric: y's ball = balls holding y


def probcover_select(graph: CoverGraph, labeled: np.ndarray, budget: int, seed: int = 0) -> tuple[Selection, float]:
    """ProbCover (Yehuda et al. 2022): greedy max coverage of δ-balls. Each pick is the point whose
    ball holds the most uncovered points (ties: lowest index); points covered by `labeled` count as
    covered from the start. Once everything is covered the rest of the budget is a seeded random
    fill (`filled`). Returns the new indices and the share of points covered after them."""
    labeled = np.asarray(labeled, dtype=np.int64)
    n = len(graph.indptr) - 1
    eligible = _eligible_mask(n, labeled)
    _check_budget(budget, int(eligible.sum()))
    state = _Coverage(graph)
    if len(labeled):
        state.add(labeled)
    picks: list[int] = []
    while len(picks) < budget and state.degree.max() > 0:
        pick = int(np.argmax(state.degree))
        state.add(np.array([pick]))
        eligible[pick] = False
        picks.append(pick)
    fill = _seeded_fill(eligible, budget - len(picks), seed)
    return Selection(np.concatenate([np.asarray(picks, dtype=np.int64), fill]), len(fill)), float(state.covered.mean())


def ball_coverage(graph: CoverGraph, pool: np.ndarray) -> float:
    """Share of points within δ of a point of `pool`."""
    state = _Coverage(graph)
    if len(pool):
        state.add(np.asarray(pool, dtype=np.int64))
    return float(state.covered.mean())


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
    x = _feature_rows(feats, device).float()
    return HerdingKernel(x, torch.einsum("ij,ij->i", x, x), float(bandwidth))


def labelled_bandwidth(feats: np.ndarray, labeled: np.ndarray, gpu: bool = False) -> float | None:
    """UHerding's adaptive bandwidth: the smallest distance between two labelled rows (exact duplicates
    left out); None when fewer than two distinct labelled rows exist."""
    distinct = np.unique(feats[np.asarray(labeled, dtype=np.int64)], axis=0)
    if len(distinct) < 2:
        return None
    sq_dist, _ = faiss_ops.flat_search(distinct, distinct, 2, gpu)  # the first neighbour is the row itself
    return float(np.sqrt(max(sq_dist[:, 1].min(), 0)))


class _Herding:
    """Greedy state of weighted kernel herding: each row's coverage m_j = max over the chosen rows of
    k(x_j, x), its weight u_j, and the gain of a candidate x, sum_j u_j max(0, k(x, x_j) - m_j). Terms are
    taken in float64 from the float32 kernel, so an updated gain equals a recomputed one up to the order
    of the float64 sums."""

    def __init__(self, kernel: HerdingKernel, weights: torch.Tensor, labeled: np.ndarray, progress: bool):
        self.kernel, self.weights, self.progress = kernel, weights.double(), progress
        self.cover = torch.zeros_like(kernel.sq_norms)
        for block in kernel.blocks(torch.as_tensor(labeled, device=kernel.feats.device), progress, "labelled"):
            torch.maximum(self.cover, kernel.rows(block).amax(0), out=self.cover)

    def gains(self, rows: torch.Tensor, desc: str = "gains") -> torch.Tensor:
        """Exact gains of `rows` (float64), block by block."""
        cover = self.cover.double()
        out = [self.kernel.rows(block).double().sub_(cover).clamp_(min=0).mul_(self.weights).sum(1)
               for block in self.kernel.blocks(rows, self.progress and len(rows) > 1024, desc)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=rows.device)

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


_TIE = 1e-12  # gains within this share of the largest are equal: float64 sums taken in another order


def _best(gains: torch.Tensor) -> tuple[int, float]:
    """The row of largest gain (ties: lowest index) and its gain."""
    best = float(gains.max())
    return int((gains >= best - _TIE * max(abs(best), 1.0)).nonzero()[0, 0]), best


class HerdingGreedy:
    """Greedy weighted kernel herding from a labelled pool: each pick is argmax_x sum_j u_j max(0, k(x, x_j) - m_j)
    over the unlabelled rows x, m_j being the coverage of x_j by the labelled rows and the picks so far (ties:
    lowest index); u = `weights` (None: all 1, MaxHerding). Exact for the full kernel: one blocked pass
    computes every gain, then each pick lowers every gain by exactly what it took away, reading only the
    kernel rows of the points it covers better than before. take() may be called again: it goes on from the
    pool and every pick so far with the gains carried over, so the rounds of one run cost one blocked pass."""

    def __init__(self, kernel: HerdingKernel, labeled: np.ndarray, weights: np.ndarray | None = None,
                 progress: bool = False):
        labeled = np.asarray(labeled, dtype=np.int64)
        device = kernel.feats.device
        self.kernel, self.progress = kernel, progress
        self.eligible = _eligible_mask(kernel.num_rows, labeled)
        self.pool: np.ndarray | None = labeled  # the labelled rows and every pick so far; None after a fill
        u = torch.ones_like(kernel.sq_norms) if weights is None else torch.tensor(weights).to(kernel.sq_norms)
        u[torch.as_tensor(labeled, device=device)] = 0  # a labelled row is covered already: it adds nothing
        self.state = _Herding(kernel, u, labeled, progress)
        candidates = torch.as_tensor(np.flatnonzero(self.eligible), device=device)
        self.gains = torch.full((kernel.num_rows,), -math.inf, dtype=torch.float64, device=device)
        self.gains[candidates] = self.state.gains(candidates, "herding gains")
        self.exhausted = _TIE * max(float(self.gains.max()), 1.0) if len(candidates) else 0.0

    def continues(self, bandwidth: float, labeled: np.ndarray) -> bool:
        """Whether a round on `labeled` with this bandwidth is where this greedy stands (no fill taken)."""
        return (self.pool is not None and bandwidth == self.kernel.bandwidth
                and np.array_equal(np.asarray(labeled, dtype=np.int64), self.pool))

    def take(self, budget: int, seed: int = 0) -> Selection:
        """The next `budget` picks; a seeded random fill takes over once no row adds coverage (`filled`)."""
        _check_budget(budget, int(self.eligible.sum()))
        picks: list[int] = []
        for _ in tqdm(range(budget), desc="herding", leave=False, disable=not self.progress or None):
            pick, gain = _best(self.gains)
            if gain <= self.exhausted:
                break
            self.gains -= self.state.add(pick)
            self.gains[pick] = -math.inf
            self.eligible[pick] = False
            picks.append(pick)
        fill = _seeded_fill(self.eligible, budget - len(picks), seed)
        chosen = np.concatenate([np.asarray(picks, dtype=np.int64), fill])
        self.pool = None if len(fill) or self.pool is None else np.concatenate([self.pool, chosen])
        return Selection(chosen, len(fill), {"bandwidth": self.kernel.bandwidth})


def herding_select(kernel: HerdingKernel, labeled: np.ndarray, budget: int, weights: np.ndarray | None = None, *,
                   seed: int = 0, progress: bool = False) -> Selection:
    """`budget` picks of HerdingGreedy from `labeled` (u = `weights`; None: all 1, MaxHerding)."""
    return HerdingGreedy(kernel, labeled, weights, progress).take(budget, seed)


def maxherding_select(kernel: HerdingKernel, labeled: np.ndarray, budget: int, seed: int = 0,
                      progress: bool = False) -> Selection:
    """MaxHerding (Bae et al. 2024): greedy maximisation of the kernel coverage sum_j max_{l in L} k(x_j, x_l),
    each pick adding argmax_x sum_j max(k(x_j, x) - c_j, 0) (herding_select with every weight 1)."""
    return herding_select(kernel, labeled, budget, seed=seed, progress=progress)


def uherding_select(kernel: HerdingKernel, labeled: np.ndarray, budget: int, uncertainty: np.ndarray,
                    seed: int = 0, progress: bool = False) -> Selection:
    """UHerding (Bae, Oliveira, Sutherland 2025): MaxHerding's greedy coverage with each row weighted by
    the model's `uncertainty` there (labelled rows weigh 0); with every weight 1 it is MaxHerding."""
    return herding_select(kernel, labeled, budget, uncertainty, seed=seed, progress=progress)


# ---------------------------------------------------------------- uncertainty (model in the loop)

def uncertainty(logits: torch.Tensor, name: str) -> torch.Tensor:
    """Per-row uncertainty from logits, larger = more uncertain.

    entropy: -sum p log p, from log_softmax (no NaN when a probability underflows to 0);
    margin: -(p1 - p2), the gap between the two most probable classes;
    least_confidence: -max p.
    """
    log_p = torch.log_softmax(logits.double(), dim=1)
    if name == "entropy":
        return -(log_p.exp() * log_p).sum(1)
    if name == "margin":
        top2 = log_p.topk(2, dim=1).values.exp()
        return -(top2[:, 0] - top2[:, 1])
    if name == "least_confidence":
        return -log_p.max(1).values.exp()
    raise ValueError(f"unknown uncertainty {name!r}")


def most_uncertain(scores: np.ndarray, candidates: np.ndarray, budget: int) -> np.ndarray:
    """The `budget` candidates with the largest scores (ties: the candidate listed first)."""
    _check_budget(budget, len(candidates))
    return np.asarray(candidates, dtype=np.int64)[np.argsort(-scores, kind="stable")[:budget]]


# ---------------------------------------------------------------- UHerding's calibrated uncertainty

TEMPERATURES = np.arange(10, 201) / 10  # UHerding's grid of softmax temperatures: 1.0, 1.1, ..., 20.0


def expected_calibration_error(logits: torch.Tensor, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of softmax(logits) with `bins` equal-width confidence bins (lo, hi]: sum over bins of
    |bin| / n * |accuracy - mean confidence| in the bin."""
    confidence, predicted = torch.softmax(logits.double(), dim=1).max(1)
    correct = (predicted == torch.as_tensor(labels, device=logits.device)).double()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    gaps = torch.zeros(bins, dtype=torch.float64, device=logits.device).index_add_(0, which, correct - confidence)
    return float(gaps.abs().sum() / len(labels))


def calibrated_temperature(logits: torch.Tensor, labels: np.ndarray, temperatures: np.ndarray = TEMPERATURES
                           ) -> float:
    """The temperature T whose softmax(logits / T) has the smallest ECE on held-out rows (ties: the
    smallest T): how UHerding calibrates the model's probabilities."""
    errors = [expected_calibration_error(logits.double() / t, labels) for t in temperatures]
    return float(temperatures[int(np.argmin(errors))])


def holdout_split(labeled: np.ndarray, share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows to train on, rows held out): a seeded `share` of the labelled rows held out for calibration;
    None when either part would be empty."""
    order = np.random.default_rng(seed).permutation(np.asarray(labeled, dtype=np.int64))
    held = int(round(share * len(order)))
    if held == 0 or held == len(order):
        return None
    return np.sort(order[held:]), np.sort(order[:held])


def margin_uncertainty(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """UHerding's uncertainty 1 - (p1 - p2), the margin of softmax(logits / T): in [0, 1]."""
    return 1 + uncertainty(logits.double() / temperature, "margin")


# ---------------------------------------------------------------- DropQuery

CANDIDATES_PER_PICK = 25  # DropQuery widens its candidates until it has this many per image to pick
_MASK64 = (1 << 64) - 1
KEEP_BLOCK_ROWS = 256  # rows of dropout masks hashed at a time: the uint64 counters stay in cache


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic), in place: a well-mixed hash of a counter.
    Returns `x`."""
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def dropout_keep(rows: np.ndarray, dim: int, p: float, seed: int, draw: int) -> np.ndarray:
    """Which of the `dim` input features of each of `rows` survive dropout with probability `p` in pass
    `draw` (len(rows) x dim booleans). A hash of (seed, pass, row, feature), not a random stream, so a
    row's mask is the same whatever batch, torchrun process or device scores it. A feature is kept when
    its hash's top 53 bits u, as the uniform u / 2^53, are >= p: compared as integers, u >= ceil(p·2^53),
    exactly the same test, KEEP_BLOCK_ROWS rows at a time."""
    key = _splitmix64(np.array([(seed * 1_000_003 + draw) & _MASK64], dtype=np.uint64))[0]
    threshold = np.uint64(math.ceil(p * 2.0 ** 53))
    rows, columns = np.asarray(rows, dtype=np.uint64), np.arange(dim, dtype=np.uint64)
    keep = np.empty((len(rows), dim), dtype=bool)
    for start in range(0, len(rows), KEEP_BLOCK_ROWS):
        counters = rows[start:start + KEEP_BLOCK_ROWS, None] * np.uint64(dim) + columns
        counters ^= key
        hashed = _splitmix64(counters)
        hashed >>= np.uint64(11)
        np.greater_equal(hashed, threshold, out=keep[start:start + KEEP_BLOCK_ROWS])
    return keep


def dropout_disagreements(head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: np.ndarray, *,
                          p: float, passes: int, seed: int) -> torch.Tensor:
    """For each row, in how many of `passes` predictions of `head` under dropout of its input features
    (each zeroed with probability `p`, the others scaled by 1 / (1 - p), as torch's dropout) the class
    differs from the prediction without dropout. `rows` are x's row indices: they seed the masks."""
    clean = head(x).argmax(1)
    flips = torch.zeros(len(x), dtype=torch.int64, device=x.device)
    for draw in range(passes):
        keep = torch.from_numpy(dropout_keep(rows, x.shape[1], p, seed, draw)).to(x.device)
        flips += head(x * keep / (1 - p)).argmax(1) != clean
    return flips


def dropquery_candidates(disagreements: np.ndarray, passes: int, wanted: int) -> tuple[np.ndarray, int]:
    """(positions of the rows whose dropout predictions differ from the clean one in more than t passes,
    t): t starts at passes // 2 (more than half the passes) and is lowered, down to 0, until at least
    `wanted` rows qualify."""
    for threshold in range(passes // 2, 0, -1):
        chosen = np.flatnonzero(disagreements > threshold)
        if len(chosen) >= wanted:
            return chosen, threshold
    return np.flatnonzero(disagreements > 0), 0


def dropquery_select(feats: np.ndarray, unlabelled: np.ndarray, disagreements: np.ndarray, budget: int, *,
                     passes: int, seed: int = 0, gpu: bool = False, verbose: bool = False) -> Selection:
    """DropQuery (Gupte et al. 2024): the candidates are the `unlabelled` rows whose predictions flip under
    input dropout (`disagreements`, in `unlabelled` order; dropquery_candidates, widened until
    CANDIDATES_PER_PICK x budget). With fewer candidates than the budget, all of them and a seeded random
    fill of other unlabelled rows (`filled`); otherwise k-means with `budget` clusters over the candidates'
    features, each cluster sending its candidate nearest the centroid."""
    unlabelled = np.asarray(unlabelled, dtype=np.int64)
    _check_budget(budget, len(unlabelled))
    positions, threshold = dropquery_candidates(disagreements, passes, CANDIDATES_PER_PICK * budget)
    candidates = unlabelled[positions]
    params = {"candidates": len(candidates), "threshold": threshold}
    if len(candidates) <= budget:
        others = np.zeros(len(feats), dtype=bool)
        others[unlabelled] = True
        others[candidates] = False
        fill = _seeded_fill(others, budget - len(candidates), seed)
        return Selection(np.concatenate([candidates, fill]), len(fill), params)
    chosen = kmeans_select(feats[candidates], budget, seed=seed, gpu=gpu, verbose=verbose)
    return Selection(candidates[chosen.indices], chosen.filled, {**params, **chosen.params})
