"""DCoM (its radii, coverage, competence and greedy against plain references) and `auto` (its schedule, its
cold start, what its sidecars say)."""
import json
import math

import numpy as np
import pytest

import active_sampler
import sampler
import strategies
from lowbudget import cover, dcom, faiss_ops
from lowbudget.selection import most_uncertain
from tests.helpers import args_for, call_main, unit_rows, write_feats


def test_competence_is_the_papers_logistic_weight():
    p = 1 + math.exp(-50 * 0.2)
    assert dcom.competence(1.0) == pytest.approx(1.0, rel=1e-12)
    assert dcom.competence(0.8) == pytest.approx(p / 2, rel=1e-12)
    assert dcom.competence(0.0) == pytest.approx(p / (1 + math.exp(40)), rel=1e-12)
    weights = [dcom.competence(c) for c in np.linspace(0, 1, 21)]
    assert weights == sorted(weights)
    assert (dcom.purity_threshold(0.0), dcom.purity_threshold(1.0)) == (0.4, pytest.approx(0.6))


def ball(purity):
    purity = np.asarray(purity, dtype=np.float64)
    return dcom.Ball(np.arange(len(purity)), np.arange(len(purity) + 1, dtype=np.float32), purity, len(purity))


def test_ball_size_is_a_binary_search_that_agrees_with_a_scan_where_purity_falls_monotonically():
    falling = ball([1, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.42])
    for threshold in (0.4, 0.45, 0.5, 0.61, 0.95):
        assert falling.size(threshold) == int((falling.purity >= threshold).sum())
    # not monotone: the search probes size 3 (0.3 < 0.5), then 2 (0.5): it never sees the pure tail
    bumpy = ball([1, 0.5, 0.3, 0.6, 0.6])
    assert bumpy.size(0.5) == 2
    # rows past the kept ones count as impure, but the search still spans every row
    truncated = dcom.Ball(np.arange(4), np.arange(5, dtype=np.float32), np.array([1, 0.3, 0.6, 0.45]), total=10)
    assert (truncated.size(0.5), truncated.size(0.3)) == (3, 4)  # probes 6 (past the kept rows), 3, 4 (and 5)
    assert falling.radius(3) == 3.0 and np.isclose(falling.radius(len(falling.dist)), len(falling.dist) - 1)


def rows_and_separated_centres(n, d, seed, count):
    """Unit rows, their float64 distances, and the first `count` rows whose distances to the others differ
    by far more than float32 rounding (so a float32 sort keeps the float64 order)."""
    x = unit_rows(n, d, seed=seed).astype(np.float64)
    dist = np.linalg.norm(x[:, None] - x[None], axis=2)
    gaps = np.diff(np.sort(dist, axis=1), axis=1).min(1)
    centres = np.flatnonzero(gaps > 1e-4)[:count]
    assert len(centres) == count
    return x.astype(np.float32), dist, centres


def reference_ball(dist_row, self_row, labels_of_rows, label, threshold):
    """The paper's search on a float64 sort: rows by distance, purity of each prefix, binary search."""
    order = np.argsort(dist_row, kind="stable")
    assert order[0] == self_row
    purity = np.cumsum(labels_of_rows[order] == label) / np.arange(1, len(order) + 1)
    low, high = 1, len(order)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if purity[middle - 1] >= threshold else (low, middle - 1)
    return set(order[:low].tolist()), dist_row[order[low]] if low < len(order) else None


@pytest.mark.parametrize("threshold", [0.4, 0.5, 0.6])
def test_labelled_balls_match_a_float64_reference(threshold):
    x, dist, labelled = rows_and_separated_centres(80, 6, seed=3, count=4)
    predictions = np.random.default_rng(3).integers(0, 3, len(x))
    labels = np.array([0, 1, 2, 0])
    balls = dcom.labelled_balls(x, labelled, labels, predictions)
    pseudo = predictions.copy()
    pseudo[labelled] = labels
    radii = dcom.radii_at(balls, threshold, len(x))
    covered = set()
    for i, (row, label) in enumerate(zip(labelled, labels, strict=True)):
        rows, next_distance = reference_ball(dist[row], row, pseudo, label, threshold)
        size = balls[i].size(threshold)
        assert set(balls[i].rows[:size].tolist()) == rows
        if next_distance is not None:
            assert radii.radii[i] == pytest.approx(next_distance, rel=1e-5)
        covered |= rows
    assert set(np.flatnonzero(radii.covered).tolist()) == covered


def test_consistent_radii_meet_their_own_threshold():
    x = unit_rows(200, 5, seed=4)
    predictions = np.random.default_rng(4).integers(0, 4, len(x))
    labelled = np.arange(0, 200, 25)
    balls = dcom.labelled_balls(x, labelled, predictions[labelled], predictions)
    radii = dcom.consistent_radii(balls, len(x))
    level = (radii.threshold - 0.4) / 0.2
    assert radii.coverage >= level
    above = level + 2.0 ** -dcom.COVERAGE_STEPS
    assert dcom.radii_at(balls, dcom.purity_threshold(above), len(x)).coverage < above


def knn_graph(x, delta):
    near = cover.nearest_neighbours(x, len(x))
    return cover.cover_graph(x, delta, near, complete=False)


def test_dcom_greedy_without_competence_is_probcovers_greedy():
    x = unit_rows(300, 4, seed=5)
    graph = knn_graph(x, 0.45)
    labelled = np.array([3, 150])
    covered = np.zeros(len(x), dtype=bool)
    covered[np.unique(cover.ball_members(graph, labelled))] = True
    margins = np.random.default_rng(5).random(len(x))
    picks = dcom.dcom_greedy(graph, covered, labelled, margins, 0.0, 40, seed=2)
    expected, _ = strategies.probcover_select(graph, labelled, 40, seed=2)
    assert np.array_equal(picks.indices, expected.indices) and picks.filled == expected.filled


def test_dcom_greedy_at_full_competence_takes_the_largest_margins():
    x = unit_rows(200, 4, seed=6)
    margins = np.random.default_rng(6).random(len(x))
    labelled = np.array([0, 1, 2])
    picks = dcom.dcom_greedy(knn_graph(x, 0.3), np.zeros(len(x), bool), labelled, margins, 1.0, 25)
    candidates = np.arange(3, len(x))
    assert np.array_equal(picks.indices, most_uncertain(margins[candidates], candidates, 25).indices)


def test_dcom_greedy_fills_once_no_row_scores():
    x = unit_rows(50, 4, seed=7)
    graph = knn_graph(x, 0.2)
    picks = dcom.dcom_greedy(graph, np.ones(len(x), bool), np.array([0]), np.zeros(len(x)), 0.5, 10, seed=1)
    assert picks.filled == 10 and len(np.unique(picks.indices)) == 10 and 0 not in picks.indices


def test_dcom_select_records_a_consistent_coverage_and_competence():
    x = unit_rows(400, 8, seed=8)
    labels = np.arange(len(x)) % 4
    predictions = np.where(np.random.default_rng(8).random(len(x)) < 0.7, labels, (labels + 1) % 4)
    labelled = np.array([0, 1, 2, 3, 40, 41])
    margins = np.random.default_rng(9).random(len(x))
    selection = strategies.dcom_select(x, labelled, 30, labels=labels, predictions=predictions, margins=margins,
                                       neighbours=cover.nearest_neighbours(x, 16))
    p = selection.params
    assert len(np.unique(selection.indices)) == 30 and not np.intersect1d(selection.indices, labelled).size
    assert p["competence"] == pytest.approx(dcom.competence(p["coverage"]))
    assert p["purity_threshold"] <= dcom.purity_threshold(p["coverage"])
    assert p["radius_min"] <= p["delta"] <= p["radius_max"]
    with pytest.raises(ValueError, match="labelled pool"):
        strategies.dcom_select(x, np.zeros(0, np.int64), 5, labels=labels, predictions=predictions, margins=margins,
                               neighbours=cover.nearest_neighbours(x, 16))


def test_uncovered_kmeans_takes_the_largest_clusters_without_a_labelled_point():
    x = unit_rows(600, 8, seed=10)
    assert np.array_equal(strategies.uncovered_kmeans_select(x, np.zeros(0, np.int64), 12, seed=3).indices,
                          strategies.kmeans_select(x, 12, seed=3).indices)
    labelled = strategies.kmeans_select(x, 10, seed=3).indices
    picks = strategies.uncovered_kmeans_select(x, labelled, 15, seed=3)
    assert len(np.unique(picks.indices)) == 15 and not np.intersect1d(picks.indices, labelled).size
    _, assign, dist = faiss_ops.kmeans(x, 25, 3)  # the same run: 25 clusters, the same seed and settings
    covered = set(assign[labelled].tolist())
    free = sorted([c for c in np.argsort(-np.bincount(assign, minlength=25), kind="stable") if c not in covered][:15])
    expected = [np.flatnonzero(assign == c)[np.argmin(dist[assign == c])] for c in free]
    assert picks.indices.tolist() == expected and picks.filled == 0 and picks.params["clusters"] == 25
    # multi-batch k-means from a k-means pool of the same seed clusters where the pool did: it takes the
    # points next to the pool's own, which this does not
    again = strategies.accu_kmeans_select(x, labelled, 10, seed=3).indices
    nearest = [np.linalg.norm(x[labelled] - x[i], axis=1).min() for i in again]
    assert np.median(nearest) < np.median([np.linalg.norm(x[labelled] - x[i], axis=1).min()
                                           for i in picks.indices])


def test_auto_method_follows_labels_per_class():
    assert strategies.auto_method(np.zeros(0, np.int64), 10)[0] == "kmeans"
    assert strategies.auto_method(np.repeat(np.arange(4), 9), 10)[0] == "kmeans"
    method, reason = strategies.auto_method(np.repeat(np.arange(4), 10), 10)
    assert method == "dropquery" and "10.0 labels per class" in reason
    assert strategies.auto_method(np.array([0] * 12 + [1] * 8), 10)[0] == "dropquery"  # 10 per class on average


def test_auto_starts_from_no_labels_with_kmeans_and_switches_to_the_model(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    args = args_for(tmp_path, train, val, "--name", "auto", "--splits", "8,4,12", "--auto-ready", "3")
    status, out, err = call_main(active_sampler.main, args, capsys)
    assert status == 0, err
    meta = [json.loads((tmp_path / "idx" / f"auto_cifar10_{n}.json").read_text()) for n in (8, 12, 24)]
    assert [m["params"]["method"] for m in meta] == ["kmeans", "kmeans", "dropquery"]
    assert meta[0]["params"]["reason"] == "no labels yet" and meta[0]["initial_pool"]["size"] == 0
    assert meta[1]["params"]["clusters"] == 12
    assert "labels per class" in meta[2]["params"]["reason"] and "candidates" in meta[2]["params"]
    assert "Final accuracy of 8 labeled data" in out and "Final accuracy of 0" not in out
    # the cold start picks what sampler.py's k-means picks
    kmeans = ["--feats", train, "--dataset", "cifar10", "--name", "kmeans", "--splits", "8",
              "--indices", tmp_path / "km", "--save", tmp_path / "out"]
    assert call_main(sampler.main, kmeans, capsys)[0] == 0
    assert np.array_equal(np.load(tmp_path / "idx" / "auto_cifar10_8.npy"),
                          np.load(tmp_path / "km" / "kmeans_cifar10_8.npy"))
    pools = [np.load(tmp_path / "idx" / f"auto_cifar10_{n}.npy") for n in (8, 12, 24)]
    assert np.array_equal(pools[1][:8], pools[0]) and np.array_equal(pools[2][:12], pools[1])
    assert len(np.unique(pools[2])) == 24


def test_dcom_rounds_on_cached_features(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    args = args_for(tmp_path, train, val, "--name", "dcom", "--init-random", "12", "--splits", "6,6")
    status, out, err = call_main(active_sampler.main, args, capsys)
    assert status == 0, err
    assert "=> dcom: the labelled balls" in out
    meta = json.loads((tmp_path / "idx" / "dcom_cifar10_24.json").read_text())
    assert {"coverage", "competence", "purity_threshold", "delta", "neighbours"} <= set(meta["params"])
    pool = np.load(tmp_path / "idx" / "dcom_cifar10_24.npy")
    assert np.array_equal(pool[:12], np.load(tmp_path / "idx" / "random_cifar10_12.npy"))
    assert len(np.unique(pool)) == 24


def test_strategies_without_a_cold_start_still_need_an_initial_pool(tmp_path, capsys):
    train, val = write_feats(tmp_path)
    status, _, err = call_main(active_sampler.main, args_for(tmp_path, train, val, "--name", "dcom", "--splits", "5"),
                               capsys)
    assert status == 2 and "needs an initial pool" in err
