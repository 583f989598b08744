"""Query strategies: exact budgets, uniqueness, seeds, and equality with brute-force references."""
import math

import faiss
import numpy as np
import pytest

import strategies as S
from lowbudget import faiss_ops, kcenter
from tests.helpers import assert_valid, unit_rows

# ---------------------------------------------------------------- random / uniform

def test_random_pools_nested_seeded_exact():
    pools = S.random_pools(1000, [10, 50, 200], seed=3)
    for budget, pool in pools.items():
        assert_valid(pool, budget, 1000)
    assert np.array_equal(pools[50][:10], pools[10]) and np.array_equal(pools[200][:50], pools[50])
    again = S.random_pools(1000, [10, 50, 200], seed=3)
    assert all(np.array_equal(again[b], pools[b]) for b in pools)
    assert not np.array_equal(S.random_pools(1000, [200], seed=4)[200], pools[200])


def test_random_budget_larger_than_pool():
    with pytest.raises(ValueError):
        S.random_pools(10, [11])


def test_uniform_balanced_and_exact_when_divisible():
    labels = np.repeat(np.arange(10), 30)
    pools = S.uniform_pools(labels, [10, 100], seed=0)
    for budget, pool in pools.items():
        assert_valid(pool, budget, len(labels))
        assert np.all(np.bincount(labels[pool], minlength=10) == budget // 10)


def test_uniform_remainder_spread_one_per_class():
    labels = np.repeat(np.arange(10), 30)
    pool = S.uniform_pools(labels, [25], seed=1)[25]
    counts = np.bincount(labels[pool], minlength=10)
    assert len(pool) == 25 and counts.max() - counts.min() <= 1 and counts.sum() == 25


def test_uniform_long_tail_small_classes_give_everything():
    # ImageNet-LT-like: classes of 1, 2 and 50 images; quota 5 per class cannot be met by the small ones.
    labels = np.concatenate([np.full(1, 0), np.full(2, 1), np.full(50, 2), np.full(50, 3)])
    pool = S.uniform_pools(labels, [20], seed=0)[20]
    assert_valid(pool, 20, len(labels))
    counts = np.bincount(labels[pool], minlength=4)
    assert counts[0] == 1 and counts[1] == 2 and sorted(counts[2:]) == [8, 9]


def test_uniform_pools_nested_across_budgets():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 400)
    labels[:3] = 6  # make sure all classes exist
    budgets = [7, 10, 33, 70, 150]
    pools = S.uniform_pools(labels, budgets, seed=5)
    for small, large in zip(budgets, budgets[1:], strict=False):
        assert set(pools[small]) <= set(pools[large])


@pytest.mark.parametrize("budget", range(1, 60))
def test_class_quotas_water_filling(budget):
    sizes = np.array([1, 3, 10, 20, 25])
    priority = np.array([4, 2, 0, 3, 1])
    counts = S.class_quotas(sizes, budget, priority)
    assert counts.sum() == budget and np.all(counts <= sizes)
    open_counts = counts[counts < sizes]  # classes that could take more are within one of each other
    assert open_counts.size == 0 or open_counts.max() - open_counts.min() <= 1
    assert np.all(counts[counts < sizes] >= counts.max() - 1)
    if budget > 1:
        assert np.all(S.class_quotas(sizes, budget - 1, priority) <= counts)  # monotone -> nested pools


# ---------------------------------------------------------------- k-means family

def nearest_member_reference(feats, centroids):
    """Brute force: assign every point to its nearest centroid, then each cluster's nearest member."""
    d = ((feats[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    assign = d.argmin(1)
    picks = []
    for c in range(len(centroids)):
        members = np.flatnonzero(assign == c)
        if members.size:
            picks.append(members[np.argmin(d[members, c])])
    return np.array(picks)


def test_kmeans_picks_member_nearest_each_centroid():
    feats = unit_rows(600, 16, seed=1)
    centroids, _, _ = faiss_ops.kmeans(feats, 20, seed=0)
    selection = S.kmeans_select(feats, 20, seed=0)
    assert_valid(selection.indices, 20, 600)
    assert selection.filled == 0
    assert np.array_equal(np.sort(selection.indices), np.sort(nearest_member_reference(feats, centroids)))


def test_kmeans_sample_and_restarts_reach_faiss_and_every_point_is_assigned(monkeypatch):
    seen = {}
    real_kmeans = faiss.Kmeans

    class RecordingKmeans(real_kmeans):
        def __init__(self, d, k, **kwargs):
            seen.update(kwargs)
            super().__init__(d, k, **kwargs)
    monkeypatch.setattr(faiss, "Kmeans", RecordingKmeans)
    feats = unit_rows(6000, 16, seed=2)
    exact = S.kmeans_select(feats, 100, seed=0)
    assert seen["max_points_per_centroid"] == 120 and seen["nredo"] == 5  # 2N / k: faiss never subsamples
    sampled = S.accu_kmeans_select(feats, np.arange(50), 100, seed=0,
                                   settings=faiss_ops.KmeansSettings(nredo=1, sample=12))
    assert seen["max_points_per_centroid"] == 12 and seen["nredo"] == 1
    assert sampled.params == {"niter": 20, "nredo": 1, "sample": 12,
                              "kmeans_objective": pytest.approx(sampled.params["kmeans_objective"])}
    assert exact.params["sample"] is None and exact.params["nredo"] == 5
    assert_valid(sampled.indices, 100, 6000, exclude=np.arange(50))
    # trained on 1,200 of 6,000 structureless points with 1 run instead of 5, assigned over all of them
    objective = sampled.params["kmeans_objective"]
    assert exact.params["kmeans_objective"] <= objective <= exact.params["kmeans_objective"] * 1.10


def test_kmeans_on_separated_blobs_takes_each_blob_centre():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3] * 10
    feats = np.concatenate([c + rng.standard_normal((40, 8)).astype(np.float32) * 0.1 for c in centres])
    picks = S.kmeans_select(feats, 3, seed=0).indices
    expected = [b * 40 + np.argmin(((feats[b * 40:(b + 1) * 40] - feats[b * 40:(b + 1) * 40].mean(0)) ** 2).sum(1))
                for b in range(3)]
    assert sorted(picks.tolist()) == sorted(expected)


def test_kmeans_is_seeded():
    feats = unit_rows(500, 16, seed=2)
    a = S.kmeans_select(feats, 25, seed=7).indices
    assert np.array_equal(a, S.kmeans_select(feats, 25, seed=7).indices)


def test_kmeans_with_duplicate_points_still_meets_budget():
    feats = np.repeat(unit_rows(10, 8, seed=3), 5, axis=0)  # 10 distinct points, 50 rows
    selection = S.kmeans_select(feats, 20, seed=0)
    assert_valid(selection.indices, 20, 50)
    assert selection.filled >= 10  # only 10 clusters can be non-empty


def test_cluster_representatives_fill_rule_is_documented_order():
    # clusters 0 (4 points), 1 (empty), 2 (2 points); budget 3 -> one per non-empty cluster, then the
    # largest cluster (0) gives its next-nearest point.
    assign = np.array([0, 0, 0, 0, 2, 2])
    dist = np.array([0.4, 0.1, 0.3, 0.2, 0.5, 0.6])
    selection = S.cluster_representatives(assign, dist, np.ones(6, bool), 3)
    assert selection.indices.tolist() == [1, 4, 3] and selection.filled == 1


def test_accu_kmeans_avoids_labelled_and_fills_covered_clusters():
    rng = np.random.default_rng(0)
    a = np.array([10, 0, 0, 0], np.float32) + rng.standard_normal((30, 4)).astype(np.float32) * 0.1
    b = np.array([0, 10, 0, 0], np.float32) + rng.standard_normal((30, 4)).astype(np.float32) * 0.1
    feats = np.concatenate([a, b])
    labelled = np.arange(30)  # blob a is fully labelled
    selection = S.accu_kmeans_select(feats, labelled, 2, seed=0)
    assert_valid(selection.indices, 2, 60, exclude=labelled)
    assert selection.filled == 1 and np.all(selection.indices >= 30)


def test_accu_kmeans_properties_and_empty_pool_equals_kmeans():
    feats = unit_rows(800, 16, seed=4)
    labelled = np.random.default_rng(1).choice(800, 100, replace=False)
    selection = S.accu_kmeans_select(feats, labelled, 40, seed=0)
    assert_valid(selection.indices, 40, 800, exclude=labelled)
    assert np.array_equal(S.accu_kmeans_select(feats, np.zeros(0, np.int64), 30, seed=0).indices,
                          S.kmeans_select(feats, 30, seed=0).indices)


def test_kmeans_budget_larger_than_pool():
    with pytest.raises(ValueError):
        S.kmeans_select(unit_rows(10, 4), 11)
    with pytest.raises(ValueError):
        S.accu_kmeans_select(unit_rows(10, 4), np.arange(5), 6)


# ---------------------------------------------------------------- core-set

def coreset_reference(feats, labelled, budget):
    """Plain greedy k-center in float64, one point at a time, as in Sener & Savarese. Each pick is the
    farthest row by more than float32 rounding of the distances (a few float32 steps per term, and the
    sqrt(D) of the dot products' sums, of the largest squared norm), or tied exactly (lattice rows):
    otherwise a float32 engine could take the runner-up, and the reference cannot say which is right."""
    x = feats.astype(np.float64)
    rounding = 2 * (8 + 2 * np.sqrt(x.shape[1])) * np.finfo(np.float32).eps * (x ** 2).sum(1).max()
    if len(labelled):
        min_dist = ((x[:, None] - x[labelled][None]) ** 2).sum(-1).min(1)
        picks = []
    else:
        first = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
        min_dist, picks = ((x - x[first]) ** 2).sum(1), [first]
    taken = set(labelled.tolist()) | set(picks)
    while len(picks) < budget:
        order = [i for i in np.argsort(-min_dist, kind="stable") if i not in taken]
        pick = int(order[0])
        gap = min_dist[pick] - min_dist[order[1]] if len(order) > 1 else math.inf
        assert gap == 0 or gap > rounding, f"pick {len(picks)}: a near-tie within float32 rounding"
        picks.append(pick)
        taken.add(pick)
        min_dist = np.minimum(min_dist, ((x - x[pick]) ** 2).sum(1))
    return np.array(picks)


@pytest.fixture(params=[1024, 3], ids=["one-frontier", "small-frontiers"])
def frontier_rows(request, monkeypatch):
    """The greedy's frontier and blocks as shipped, and tiny, so that frontiers are renewed and shrunk,
    the reserve runs out, ties straddle a frontier's edge, and stale rows are brought up to date in
    several groups and blocks."""
    if request.param < 1024:
        monkeypatch.setattr(kcenter, "_FRONTIER_ROWS", request.param)
        monkeypatch.setattr(kcenter, "_RESERVE_FRONTIERS", 3)
        monkeypatch.setattr(kcenter, "_ROW_BLOCK", 7)
        monkeypatch.setattr(kcenter, "_CENTRE_BLOCK", 5)
    return request.param


@pytest.mark.parametrize("n_labelled", [0, 1, 25])
def test_coreset_equals_brute_force(n_labelled, frontier_rows):
    feats = unit_rows(300, 8, seed=5)
    labelled = np.random.default_rng(2).choice(300, n_labelled, replace=False)
    selection = S.coreset_select(feats, labelled, 40, progress=False)
    assert_valid(selection.indices, 40, 300, exclude=labelled)
    assert np.array_equal(selection.indices, coreset_reference(feats, labelled, 40))


def lattice(n, d, seed):
    """Rows with small integer coordinates: every squared distance is exact in float32, so ties are exact."""
    return np.random.default_rng(seed).integers(0, 4, (n, d)).astype(np.float32)


@pytest.mark.parametrize("budget", [1, 17, 60, 200 - 9])
def test_coreset_ties_go_to_the_lowest_index(budget, frontier_rows):
    feats = lattice(200, 3, seed=7)  # 64 distinct points for 200 rows: duplicates and many equal distances
    labelled = np.array([3, 50, 120, 121, 150, 151, 152, 190, 199])
    selection = S.coreset_select(feats, labelled, budget, progress=False)
    assert_valid(selection.indices, budget, 200, exclude=labelled)
    assert np.array_equal(selection.indices, coreset_reference(feats, labelled, budget))


def test_coreset_float16_features_pick_as_their_float32_values(frontier_rows):
    feats = lattice(150, 6, seed=8)
    labelled = np.array([0, 1, 2])
    on_half = S.coreset_select(feats.astype(np.float16), labelled, 30, progress=False).indices
    assert np.array_equal(on_half, coreset_reference(feats, labelled, 30))


def test_coreset_long_run_on_clusters_equals_brute_force(frontier_rows):
    rng = np.random.default_rng(9)  # the plain greedy's regime: many picks, most rows far from the frontier
    centres = rng.standard_normal((12, 16))
    feats = (centres[rng.integers(0, 12, 400)] + 0.3 * rng.standard_normal((400, 16))).astype(np.float32)
    labelled = rng.choice(400, 10, replace=False)
    assert np.array_equal(S.coreset_select(feats, labelled, 100, progress=False).indices,
                          coreset_reference(feats, labelled, 100))


def test_coreset_with_duplicates_never_repeats_a_point(frontier_rows):
    feats = np.repeat(unit_rows(5, 4, seed=6), 4, axis=0)
    selection = S.coreset_select(feats, np.array([0]), 19, progress=False)  # every unlabelled row
    assert_valid(selection.indices, 19, 20, exclude=[0])


def test_coreset_budget_larger_than_unlabelled():
    with pytest.raises(ValueError):
        S.coreset_select(unit_rows(10, 4), np.arange(5), 6, progress=False)


# ---------------------------------------------------------------- TypiClust's k-means

@pytest.mark.parametrize("budget, nredo", [(50, 5), (51, 2)])
def test_typiclust_restarts_kmeans_less_for_many_clusters(budget, nredo, monkeypatch):
    seen = []
    real_kmeans = faiss_ops.kmeans

    def recording(feats, k, seed, settings, **kwargs):
        seen.append((k, settings))
        return real_kmeans(feats, k, seed, settings, **kwargs)
    monkeypatch.setattr(faiss_ops, "kmeans", recording)
    feats = unit_rows(300, 8, seed=3)
    selection = S.typiclust_select(feats, np.zeros(0, np.int64), budget, seed=2)
    settings = faiss_ops.KmeansSettings(niter=20, nredo=nredo)
    assert seen == [(budget, settings)]
    assert selection.params["niter"] == 20 and selection.params["nredo"] == nredo
    objective = real_kmeans(feats, budget, 2, settings)[2].sum()
    assert selection.params["kmeans_objective"] == pytest.approx(float(objective), rel=1e-6)
