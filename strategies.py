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
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lowbudget import cover, dcom, faiss_ops, herding, kcenter
from lowbudget.cover import CoverGraph
from lowbudget.herding import HerdingKernel
from lowbudget.selection import Selection, check_budget, eligible_mask, seeded_fill

_NONE = np.iinfo(np.int64).max


# ---------------------------------------------------------------- random and uniform

def random_pools(num_images: int, budgets: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Nested random pools: each budget takes the first entries of one seeded permutation."""
    for budget in budgets:
        check_budget(budget, num_images)
    order = np.random.default_rng(seed).permutation(num_images).astype(np.int64)
    return {budget: order[:budget].copy() for budget in budgets}


def class_quotas(class_sizes: np.ndarray, budget: int, priority: np.ndarray) -> np.ndarray:
    """Per-class counts summing to `budget`, as equal as class sizes allow (water-filling).

    Every class gets min(size, t) for the largest level t that fits; the remaining r < #classes
    images go one each to the classes still larger than t, in `priority` order. Counts never
    decrease as the budget grows, so pools built from them are nested.
    """
    check_budget(budget, int(class_sizes.sum()))
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
    return Selection(selection.indices, selection.filled, _kmeans_params(settings, dist))


def _kmeans_params(settings: faiss_ops.KmeansSettings, sq_dist: np.ndarray) -> dict[str, float | int | None]:
    """What a sidecar records of a k-means run: the settings it ran with and its objective."""
    return {"niter": settings.niter, "nredo": settings.nredo, "sample": settings.sample,
            "kmeans_objective": float(sq_dist.sum())}


def kmeans_select(feats: np.ndarray, budget: int, seed: int = 0, gpu: bool = False, verbose: bool = False,
                  settings: faiss_ops.KmeansSettings = faiss_ops.ORIGINAL_KMEANS) -> Selection:
    """Single-batch k-means: `budget` clusters over all points, each sends its point nearest the centroid.
    `settings`: restarts and training sample (the defaults are the original's)."""
    check_budget(budget, len(feats))
    return _kmeans_representatives(feats, np.ones(len(feats), dtype=bool), budget, seed=seed, gpu=gpu,
                                   verbose=verbose, settings=settings)


def uncovered_kmeans_select(feats: np.ndarray, labeled: np.ndarray, budget: int, seed: int = 0, gpu: bool = False,
                            verbose: bool = False, settings: faiss_ops.KmeansSettings = faiss_ops.ORIGINAL_KMEANS
                            ) -> Selection:
    """k-means that sees the labelled pool: |pool| + `budget` clusters over all points; the largest clusters
    that hold no labelled point (at least `budget` of them: the pool sits in at most |pool|) each send their
    point nearest the centroid (ties: lowest index), in cluster order, and a seeded random fill where empty
    clusters leave too few. From an empty pool it is kmeans_select. Multi-batch k-means, with `budget`
    clusters, puts them where the pool's own clusters are when the pool came from k-means, and takes the
    points next to its picks."""
    labeled = np.asarray(labeled, dtype=np.int64)
    eligible = eligible_mask(len(feats), labeled)
    check_budget(budget, int(eligible.sum()))
    k = len(labeled) + budget
    _, assign, dist = faiss_ops.kmeans(feats, k, seed, settings, gpu=gpu, verbose=verbose)
    nearest = _nearest_per_cluster(assign, dist, eligible, k)
    sizes = np.bincount(assign, minlength=k)
    uncovered = np.ones(k, dtype=bool)
    uncovered[assign[labeled]] = False
    order = np.argsort(-sizes, kind="stable")
    picks = nearest[np.sort(order[uncovered[order] & (nearest[order] >= 0)][:budget])]  # in cluster order
    eligible[picks] = False
    fill = seeded_fill(eligible, budget - len(picks), seed)
    return Selection(np.concatenate([picks, fill]), len(fill), {"clusters": k, **_kmeans_params(settings, dist)})


def accu_kmeans_select(feats: np.ndarray, labeled: np.ndarray, budget: int, seed: int = 0, gpu: bool = False,
                       verbose: bool = False, settings: faiss_ops.KmeansSettings = faiss_ops.ORIGINAL_KMEANS
                       ) -> Selection:
    """Multi-batch k-means: `budget` clusters over all points (labelled included); each cluster sends
    its unlabelled point nearest the centroid. Returns only the new indices."""
    eligible = eligible_mask(len(feats), labeled)
    check_budget(budget, int(eligible.sum()))
    return _kmeans_representatives(feats, eligible, budget, seed=seed, gpu=gpu, verbose=verbose, settings=settings)


# ---------------------------------------------------------------- core-set (greedy k-center)

def coreset_select(feats: np.ndarray, labeled: np.ndarray, budget: int, device: str | torch.device = "cpu",
                   gpu_faiss: bool = False, progress: bool = True) -> Selection:
    """Greedy k-center (Sener & Savarese): repeatedly take the point farthest (squared L2) from the
    labelled pool and the points taken so far. Ties: lowest index.

    With an empty pool the first point is the one nearest the mean of all features. The picks are the
    plain greedy's, but each pick reads only the rows that can still be picked (kcenter.GreedyKCenter), on
    `device`; the distances to the labelled pool come from one faiss search (on the GPUs with
    `gpu_faiss`). float16 features stay float16 in memory and are widened to float32 a block at a
    time. Memory: the features, a few N-vectors, the picks' features and a frontier of a few
    thousand rows.
    """
    labeled = np.asarray(labeled, dtype=np.int64)
    check_budget(budget, len(feats) - len(labeled))
    x = kcenter.feature_rows(feats, device)
    norms = kcenter.sq_norms(x)
    if len(labeled):
        bound = torch.as_tensor(kcenter.pool_distances(feats, labeled, gpu_faiss)).to(x.device)
        bound[torch.as_tensor(labeled, device=x.device)] = -1
        greedy = kcenter.GreedyKCenter(x, norms, bound, budget)
    else:
        greedy = kcenter.GreedyKCenter(x, norms, torch.full((len(x),), torch.inf, device=x.device), budget)
        mean = torch.stack([rows.sum(0) for _, rows in kcenter.row_blocks(x)]).sum(0) / len(x)
        greedy.start_from(int(torch.argmin(kcenter.min_sq_dist(x, norms, mean[None], (mean @ mean)[None]))))
    for _ in tqdm(range(budget - len(greedy.picks)), desc="select candidates", disable=not progress or None):
        greedy.pick()
    return Selection(np.asarray(greedy.picks, dtype=np.int64), 0)


# ---------------------------------------------------------------- low-budget: TypiClust, ProbCover, MaxHerding

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
    eligible = eligible_mask(len(feats), labeled)
    check_budget(budget, int(eligible.sum()))
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


def probcover_select(graph: CoverGraph, labeled: np.ndarray, budget: int, seed: int = 0) -> tuple[Selection, float]:
    """ProbCover (Yehuda et al. 2022): greedy max coverage of δ-balls. Each pick is the point whose
    ball holds the most uncovered points (ties: lowest index); points covered by `labeled` count as
    covered from the start. Once everything is covered the rest of the budget is a seeded random
    fill (`filled`). Returns the new indices and the share of points covered after them."""
    labeled = np.asarray(labeled, dtype=np.int64)
    n = len(graph.indptr) - 1
    eligible = eligible_mask(n, labeled)
    check_budget(budget, int(eligible.sum()))
    state = cover.Coverage(graph)
    if len(labeled):
        state.add(labeled)
    picks: list[int] = []
    while len(picks) < budget and state.degree.max() > 0:
        pick = int(np.argmax(state.degree))
        state.add(np.array([pick]))
        eligible[pick] = False
        picks.append(pick)
    fill = seeded_fill(eligible, budget - len(picks), seed)
    return Selection(np.concatenate([np.asarray(picks, dtype=np.int64), fill]), len(fill)), float(state.covered.mean())


def dcom_select(feats: np.ndarray, labeled: np.ndarray, budget: int, *, labels: np.ndarray,
                predictions: np.ndarray, margins: np.ndarray, neighbours: cover.Neighbours, seed: int = 0,
                device: str | torch.device = "cpu") -> Selection:
    """DCoM (Mishal & Weinshall 2024): each labelled row gets the largest ball whose purity under the model's
    pseudo-labels (`predictions` of every row; the labelled rows' own `labels`) reaches 0.2 * coverage + 0.4,
    found by binary search, the coverage being that of the balls themselves (dcom.consistent_radii). The
    coverage sets the competence weight c (dcom.competence). On the ball graph of the mean radius, each pick
    maximises c * margin uncertainty + (1 - c) * density of uncovered rows (dcom.dcom_greedy); `margins` are
    the model's 1 - (p1 - p2) of every row. Radii and coverage are exact; the graph is ProbCover's, read off
    the k-NN pass `neighbours` alone: a ball counts at most its k nearest rows, which bounds memory by N k
    where the mean radius reaches thousands of rows (as it does once the model's predictions are smooth)."""
    labeled = np.asarray(labeled, dtype=np.int64)
    if not len(labeled):
        raise ValueError("dcom needs a labelled pool: its radii come from the labels")
    balls = dcom.labelled_balls(feats, labeled, labels[labeled], predictions, device)
    radii = dcom.consistent_radii(balls, len(feats))
    delta = float(radii.radii.mean())
    graph = cover.cover_graph(feats, delta, neighbours, complete=False)
    weight = dcom.competence(radii.coverage)
    selection = dcom.dcom_greedy(graph, radii.covered, labeled, margins, weight, budget, seed)
    return Selection(selection.indices, selection.filled, {
        "coverage": radii.coverage, "competence": weight, "purity_threshold": radii.threshold, "delta": delta,
        "radius_min": float(radii.radii.min()), "radius_max": float(radii.radii.max()), "edges": len(graph.indices)})


AUTO_READY = 5.0  # labels per class from which `auto` uses the model (measured: docs/strategies.md)


def auto_method(pool_labels: np.ndarray, ready_at: float = AUTO_READY) -> tuple[str, str]:
    """The method of an `auto` round and why, from the labelled pool's labels alone: label-free k-means
    ("kmeans": uncovered_kmeans_select, k-means itself from an empty pool) until the pool holds `ready_at`
    labels per class it has seen, DropQuery from then on."""
    if not len(pool_labels):
        return "kmeans", "no labels yet"
    per_class = len(pool_labels) / len(np.unique(pool_labels))
    if per_class >= ready_at:
        return "dropquery", f"{per_class:.1f} labels per class, at least {ready_at:g}: the model is ready"
    return "kmeans", f"{per_class:.1f} labels per class, fewer than {ready_at:g}: label-free"


def labelled_bandwidth(feats: np.ndarray, labeled: np.ndarray, gpu: bool = False) -> float | None:
    """UHerding's adaptive bandwidth: the smallest distance between two labelled rows (exact duplicates
    left out); None when fewer than two distinct labelled rows exist."""
    distinct = np.unique(feats[np.asarray(labeled, dtype=np.int64)], axis=0)
    if len(distinct) < 2:
        return None
    sq_dist, _ = faiss_ops.flat_search(distinct, distinct, 2, gpu)  # the first neighbour is the row itself
    return float(np.sqrt(max(sq_dist[:, 1].min(), 0)))


HERDING_BANDWIDTH = 0.5  # h measured best for MaxHerding (docs/strategies.md); also auto's while labels are few


def herding_sample(num_rows: int, size: int, seed: int = 0) -> np.ndarray | None:
    """The rows, ascending, that MaxHerding and UHerding cover and pick from when the pool has more than `size`
    (a seeded random sample, drawn once per run: the kernel objective is a mean over the rows, which the
    sample estimates); None when every row is used (`size` 0, or no more rows than that)."""
    if size == 0 or num_rows <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(num_rows, size, replace=False))


class SampleTooSmall(ValueError):
    """A herding round asks more picks than its sample has unlabelled rows."""


def herding_rows(num_rows: int, sample: np.ndarray | None, labeled: np.ndarray, budget: int) -> np.ndarray:
    """A round's rows, ascending: every row, or the sample with the labelled pool added. SampleTooSmall when
    the sample has fewer than `budget` unlabelled rows."""
    if sample is None:
        return np.arange(num_rows)
    rows = np.union1d(sample, labeled)
    if budget > len(rows) - len(labeled):
        raise SampleTooSmall(f"{budget} picks asked of a sample with {len(rows) - len(labeled)} unlabelled images")
    return rows


def herding_bandwidth(feats: np.ndarray, labeled: np.ndarray, bandwidth: float | None, gpu: bool = False) -> float:
    """A round's h: `bandwidth`, or when None (auto) the smallest distance between two labelled rows
    (HERDING_BANDWIDTH while there are fewer than two)."""
    if bandwidth is not None:
        return float(bandwidth)
    return labelled_bandwidth(feats, labeled, gpu) or HERDING_BANDWIDTH


def _in_rows(selection: Selection, rows: np.ndarray, num_rows: int) -> Selection:
    """A selection made among `rows` (positions) as row indices, with the sample's size when it is one."""
    sampled = {"herding_sample": len(rows)} if len(rows) < num_rows else {}
    return Selection(rows[selection.indices], selection.filled, {**selection.params, **sampled})


def _kernel_over(feats: np.ndarray, rows: np.ndarray, bandwidth: float, device: str | torch.device) -> HerdingKernel:
    """The kernel of bandwidth h over `rows` (every row: the features themselves, no copy)."""
    return herding.herding_kernel(feats if len(rows) == len(feats) else feats[rows], bandwidth, device)


class MaxHerding:
    """MaxHerding (Bae et al. 2024) over the rounds of one run: greedy maximisation of the kernel coverage
    sum_j max_{l in L} k(x_j, x_l), each pick adding argmax_x sum_j max(k(x_j, x) - c_j, 0), on every row or
    on `herding_sample` rows. A round that starts where the last one ended (same rows, same h, no fill)
    continues its greedy instead of computing every gain again: one blocked pass for all rounds."""

    def __init__(self, feats: np.ndarray, *, bandwidth: float | None = HERDING_BANDWIDTH, sample: int = 0,
                 seed: int = 0, device: str | torch.device = "cpu", gpu: bool = False, progress: bool = False):
        self.feats, self.bandwidth, self.seed, self.device = feats, bandwidth, seed, device
        self.gpu, self.progress = gpu, progress
        self.sample = herding_sample(len(feats), sample, seed)
        self.last: tuple[np.ndarray, herding.HerdingGreedy] | None = None

    def __call__(self, labeled: np.ndarray, budget: int) -> Selection:
        """`budget` new row indices on top of `labeled`."""
        rows = herding_rows(len(self.feats), self.sample, labeled, budget)
        local = np.searchsorted(rows, labeled)
        bandwidth = herding_bandwidth(self.feats, labeled, self.bandwidth, self.gpu)
        if not (self.last and np.array_equal(self.last[0], rows) and self.last[1].continues(bandwidth, local)):
            kernel = _kernel_over(self.feats, rows, bandwidth, self.device)
            self.last = rows, herding.HerdingGreedy(kernel, local, progress=self.progress)
        return _in_rows(self.last[1].take(budget, seed=self.seed), rows, len(self.feats))


def uherding_select(feats: np.ndarray, labeled: np.ndarray, budget: int, *, labels: np.ndarray,
                    margins: Callable[[np.ndarray, float], np.ndarray],
                    probe_logits: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    bandwidth: float | None = None, holdout: float = 0.3, sample: np.ndarray | None = None,
                    seed: int = 0, device: str | torch.device = "cpu", gpu: bool = False, progress: bool = False
                    ) -> Selection:
    """UHerding (Bae, Oliveira, Sutherland 2025): MaxHerding's greedy coverage with each row weighted by the
    model's calibrated margin uncertainty there (labelled rows weigh 0; every weight 1 without labels, which
    is MaxHerding). The temperature is the ECE-optimal one on a seeded `holdout` share of the labelled pool
    for a head trained on the rest. The model enters through two callables: `margins(rows, T)`, the
    margin_uncertainty of rows under the head trained on the pool, and `probe_logits(train, held)`, the
    logits of `held` under a fresh head trained on `train`. `sample`: herding_sample's rows, or None."""
    labeled = np.asarray(labeled, dtype=np.int64)
    rows = herding_rows(len(feats), sample, labeled, budget)
    weights, temperature = np.ones(len(rows)), 1.0
    if len(labeled):
        split = holdout_split(labeled, holdout, seed)
        if split is not None:
            train, held = split
            logits = torch.from_numpy(probe_logits(train, held))
            temperature = calibrated_temperature(logits, labels[held])
        candidates = np.setdiff1d(rows, labeled, assume_unique=True)
        weights[np.searchsorted(rows, candidates)] = margins(candidates, temperature)
    h = herding_bandwidth(feats, labeled, bandwidth, gpu)
    greedy = herding.HerdingGreedy(_kernel_over(feats, rows, h, device), np.searchsorted(rows, labeled), weights,
                                   progress)
    selection = greedy.take(budget, seed)
    return _in_rows(Selection(selection.indices, selection.filled, {**selection.params, "temperature": temperature,
                                                                    "calibration_holdout": holdout}),
                    rows, len(feats))


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
    check_budget(budget, len(unlabelled))
    positions, threshold = dropquery_candidates(disagreements, passes, CANDIDATES_PER_PICK * budget)
    candidates = unlabelled[positions]
    params = {"candidates": len(candidates), "threshold": threshold}
    if len(candidates) <= budget:
        others = np.zeros(len(feats), dtype=bool)
        others[unlabelled] = True
        others[candidates] = False
        fill = seeded_fill(others, budget - len(candidates), seed)
        return Selection(np.concatenate([candidates, fill]), len(fill), params)
    chosen = kmeans_select(feats[candidates], budget, seed=seed, gpu=gpu, verbose=verbose)
    return Selection(candidates[chosen.indices], chosen.filled, {**params, **chosen.params})
