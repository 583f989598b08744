"""TypiClust, ProbCover and MaxHerding: hand-made point sets with known answers, brute-force greedy
references, exact budgets, and sampler.py end to end."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import sampler
import strategies as S
from lowbudget import cover as C
from lowbudget import herding as H
from lowbudget.selection import Selection
from tests.helpers import (
    assert_herding_greedy,
    assert_valid,
    call_main,
    herding,
    herding_margins,
    small_blocks,
    unit_rows,
)

EMPTY = np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------- hand-made point sets

def rings(centre, counts_and_radii):
    """A point at `centre` and, around it, rings of `count` points at `radius` (2-D)."""
    points = [np.asarray(centre, dtype=np.float64)]
    for count, radius in counts_and_radii:
        angles = 2 * np.pi * np.arange(count) / count + radius  # ring-dependent phase: no aligned points
        points.extend(np.asarray(centre) + radius * np.stack([np.cos(angles), np.sin(angles)], 1))
    return np.asarray(points)


def star_points():
    """Two stars: a centre with 5 spokes at 0.1, a centre with 3 spokes at 0.1; three loners.
    With δ = 0.11 a spoke's ball holds itself and its centre only."""
    loners = np.array([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    big, small = rings([0, 0], [(5, 0.1)]), rings([2, 2], [(3, 0.1)])
    # order: loner, small star's spokes, loner, big star (centre at 7), loner, small star's centre
    points = np.concatenate([loners[:1], small[1:], loners[1:2], big[1:3], big[:1], big[3:], loners[2:], small[:1]])
    return points.astype(np.float32)


STAR_BIG_CENTRE, STAR_SMALL_CENTRE = 7, 12  # loners at 0, 4 and 11


def test_probcover_takes_the_centre_of_the_densest_ball_first():
    x = star_points()
    graph = C.cover_graph(x, 0.11, C.nearest_neighbours(x, 3))
    assert np.diff(graph.indptr)[[STAR_BIG_CENTRE, STAR_SMALL_CENTRE, 0]].tolist() == [6, 4, 1]
    selection, covered = S.probcover_select(graph, EMPTY, 5)
    assert selection.indices.tolist() == [STAR_BIG_CENTRE, STAR_SMALL_CENTRE, 0, 4, 11]
    assert selection.filled == 0 and covered == 1.0


def test_probcover_counts_the_initial_pool_as_covered_and_fills_when_all_is_covered():
    x = star_points()
    graph = C.cover_graph(x, 0.11, C.nearest_neighbours(x, 13))
    selection, covered = S.probcover_select(graph, np.array([STAR_BIG_CENTRE]), 4, seed=3)
    assert selection.indices[:3].tolist() == [STAR_SMALL_CENTRE, 0, 4] and selection.filled == 0
    assert S.probcover_select(graph, EMPTY, 1)[1] == pytest.approx(6 / 13)
    all_covered, covered = S.probcover_select(graph, EMPTY, 9, seed=3)
    assert all_covered.filled == 4 and covered == 1.0
    assert_valid(all_covered.indices, 9, len(x))
    assert np.array_equal(all_covered.indices, S.probcover_select(graph, EMPTY, 9, seed=3)[0].indices)


def brute_force_probcover(x, delta, labeled, budget):
    dist = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    ball = (dist < delta) | np.eye(len(x), dtype=bool)
    covered = ball[labeled].any(0) if len(labeled) else np.zeros(len(x), dtype=bool)
    picks = []
    for _ in range(budget):
        gain = (ball & ~covered).sum(1)
        if gain.max() == 0:
            break
        pick = int(np.argmax(gain))
        picks.append(pick)
        covered |= ball[pick]
    return picks


@pytest.mark.parametrize("k", [2, 8, 120])  # small k: most balls are range-searched in full
def test_probcover_equals_brute_force_greedy(k):
    x = unit_rows(120, 3, seed=1)
    labeled = np.array([5, 17])
    selection, _ = S.probcover_select(C.cover_graph(x, 0.5, C.nearest_neighbours(x, k)), labeled, 10)
    expected = brute_force_probcover(x, 0.5, labeled, 10)
    assert selection.indices[:len(expected)].tolist() == expected
    assert_valid(selection.indices, 10, 120, exclude=labeled)


def brute_force_purity(x, labels, delta):
    dist = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    return np.mean([(labels[dist[i] < delta] == labels[i]).all() for i in range(len(x))])


@pytest.mark.parametrize("k", [2, 6, 150])
def test_purity_delta_is_the_largest_radius_meeting_the_target(k):
    x = unit_rows(150, 3, seed=2)
    labels = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0.3)
    delta = C.purity_delta(x, labels, 0.9, C.nearest_neighbours(x, k))
    assert brute_force_purity(x, labels, delta - 1e-6) >= 0.9  # at δ itself: float32 vs float64 distances
    assert brute_force_purity(x, labels, delta + 1e-4) < 0.9


def test_purity_delta_needs_two_pseudo_labels():
    x = unit_rows(20, 3)
    with pytest.raises(ValueError, match="at least two clusters"):
        C.purity_delta(x, np.zeros(20, dtype=int), 0.95, C.nearest_neighbours(x, 5))


def test_cover_graph_refuses_too_many_edges():
    x = unit_rows(50, 3)
    with pytest.raises(ValueError, match="choose a smaller δ"):
        C.cover_graph(x, 3.0, C.nearest_neighbours(x, 5), max_edges=100)


# ---------------------------------------------------------------- TypiClust

def densest(points, members):
    """Brute-force TypiClust density: the member with the smallest mean squared distance to its
    min(20, n // 2) nearest other members."""
    sq = ((points[members, None, :] - points[None, members, :]) ** 2).sum(-1)
    k = min(20, len(members) // 2)
    return int(members[np.argmin(np.sort(sq, axis=1)[:, 1:k + 1].mean(1))])


def three_blobs():
    """Gaussian blobs of 33, 17 and 9 points far apart, shuffled; their densest points."""
    rng = np.random.default_rng(0)
    blob = np.repeat([0, 1, 2], [33, 17, 9])[rng.permutation(59)]
    points = (np.array([[0, 0], [60, 0], [0, 60]])[blob] + rng.standard_normal((59, 2))).astype(np.float32)
    return points, [densest(points, np.flatnonzero(blob == b)) for b in range(3)], blob


def test_typiclust_takes_the_densest_point_of_the_largest_uncovered_cluster():
    x, (big, middle, small), blob = three_blobs()
    assert S.typiclust_select(x, EMPTY, 3).indices.tolist() == [big, middle, small]
    labeled = np.flatnonzero(blob == 0)[:1]
    selection = S.typiclust_select(x, labeled, 2)
    assert selection.indices.tolist() == [middle, small] and selection.filled == 0


def test_typiclust_round_robins_past_the_cluster_count_and_skips_small_clusters_first():
    x, (big, middle, _), blob = three_blobs()
    selection = S.typiclust_select(x, EMPTY, 20, max_clusters=3, min_cluster_size=10)
    assert_valid(selection.indices, 20, len(x))
    assert selection.indices[:2].tolist() == [big, middle]
    assert np.bincount(blob[selection.indices], minlength=3).tolist() == [10, 10, 0]  # alternating
    small_blob = blob == 2
    assert small_blob[selection.indices].sum() == selection.filled == 0  # 33 + 17 candidates left to take first
    everything = S.typiclust_select(x, EMPTY, len(x) - 1, max_clusters=3, min_cluster_size=10)
    assert everything.filled == small_blob[everything.indices].sum() == 8  # the small blob comes last


def test_typicality_squared_and_plain_distances():
    x = np.array([[0, 0], [1, 0], [3, 0], [10, 0]], dtype=np.float32)
    squared = S.typicality(x, 1, squared=True)
    plain = S.typicality(x, 1, squared=False)
    assert squared == pytest.approx(1 / (np.array([1, 1, 4, 49]) + 1e-5))
    assert plain == pytest.approx(1 / (np.array([1, 1, 2, 7]) + 1e-5))


# ---------------------------------------------------------------- MaxHerding


@pytest.mark.parametrize("dim, bandwidth", [(4, 0.3), (4, 1.0), (512, 0.3), (512, 1.0)])
def test_herding_kernel_entries_are_within_their_rounding_whatever_the_block_shape(dim, bandwidth):
    x = unit_rows(300, dim, seed=6)
    x[150:] = x[:150] + 0.01 * unit_rows(150, dim, seed=7)  # near pairs: small distances, kernel entries near 1
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x64 = x.astype(np.float64)
    exact = np.exp(-np.maximum(2 - 2 * x64 @ x64.T, 0) / bandwidth ** 2)  # unit rows in float64
    kernel = H.herding_kernel(x, bandwidth)
    for rows in (1, 7, 300):
        computed = torch.cat([kernel.rows(block) for block in torch.arange(300).split(rows)]).double().numpy()
        assert (np.abs(computed - exact) <= kernel.rounding * exact).all(), rows


@pytest.mark.parametrize("bandwidth, labeled", [(1.0, []), (1.0, [3, 50, 120]), (0.3, []), (0.3, [7, 8])])
def test_maxherding_is_the_dense_greedy(bandwidth, labeled):
    x = unit_rows(200, 4, seed=5)
    labeled = np.asarray(labeled, dtype=np.int64)
    selection = herding(small_blocks(H.herding_kernel(x, bandwidth)), labeled, 40)
    assert_herding_greedy(x, bandwidth, labeled, selection)
    assert selection.params == {"bandwidth": bandwidth} and selection.filled == 0
    assert_valid(selection.indices, 40, 200, exclude=labeled)


def test_maxherding_blocks_do_not_change_the_picks():
    x = unit_rows(300, 8, seed=2)
    kernel = H.herding_kernel(x, 0.5)
    picks = [herding(dataclasses.replace(kernel, block_elements=rows * 300), EMPTY, 25).indices
             for rows in (1, 13, 300)]
    assert (herding_margins(x, 0.5, EMPTY, picks[0]) > 3).all()  # no near-tie that rounding could swap
    assert picks[0].tolist() == picks[1].tolist() == picks[2].tolist()


class CountingKernel(S.HerdingKernel):
    """The herding kernel, recording how many kernel rows each call computes."""

    def rows(self, rows):
        self.counts.append(len(rows))
        return super().rows(rows)


class TabulatedKernel(CountingKernel):
    """The herding kernel read from one table: each entry the same float32 value whatever block asks for it."""

    def rows(self, rows):
        self.counts.append(len(rows))
        return self.table[rows]


@pytest.mark.parametrize("kind", [TabulatedKernel, CountingKernel])
def test_herding_gains_from_a_row_equal_the_blocked_gains_and_read_that_row_alone(kind):
    """A gain recomputed from the candidate's own kernel row and the blocked gains read its kernel entries
    from blocks of other shapes: from a table they agree up to the order of float64 sums; computed, within
    the gains' slack (the entries' float32 rounding)."""
    x = unit_rows(300, 6, seed=3)
    plain = H.herding_kernel(x, 0.4)
    kernel = kind(plain.feats, plain.sq_norms, 0.4, block_elements=11 * 300)
    object.__setattr__(kernel, "counts", [])
    object.__setattr__(kernel, "table", plain.rows(torch.arange(300)))
    weights = torch.from_numpy(np.random.default_rng(1).uniform(0.1, 1, 300)).float()
    state = H.HerdingState(kernel, weights, np.array([4, 90]), progress=False)
    for pick in (17, 250, 5, 133):
        state.cover_with(plain.rows(torch.tensor([pick]))[0])
        gains, slack = state.gains(torch.arange(300))
        tolerance = slack * (1e-12 / kernel.rounding if kind is TabulatedKernel else 1)
        kernel.counts.clear()
        row = torch.tensor([pick + 1])
        assert (state.block_gains(kernel.rows(row))[0] - gains[row]).abs() <= tolerance[row]
        assert kernel.counts == [1]


def test_maxherding_rounds_continue_one_greedy_with_the_picks_of_rounds_started_again():
    x = unit_rows(250, 6, seed=8)
    plain = H.herding_kernel(x, 0.5)
    continued_reads, restarted_reads = [], []
    kernels = []
    for counts in (continued_reads, restarted_reads):
        kernels.append(CountingKernel(plain.feats, plain.sq_norms, 0.5, block_elements=7 * 250))
        object.__setattr__(kernels[-1], "counts", counts)
    greedy, pool, restarted, continued = H.HerdingGreedy(kernels[0], np.array([9, 40])), np.array([9, 40]), [], []
    round_reads = []
    for increment in (3, 7, 20):
        assert greedy.continues(0.5, pool)
        continued_reads.clear(), restarted_reads.clear()
        continued.append(greedy.take(increment).indices)
        restarted.append(herding(kernels[1], pool, increment).indices)
        round_reads.append((sum(continued_reads), sum(restarted_reads)))
        pool = np.concatenate([pool, restarted[-1]])
    continued_picks = np.concatenate(continued)
    assert (herding_margins(x, 0.5, np.array([9, 40]), continued_picks) > 3).all()  # no near-tie to swap
    assert [c.tolist() for c in continued] == [r.tolist() for r in restarted]
    assert_herding_greedy(x, 0.5, np.array([9, 40]), Selection(continued_picks, 0, {}))
    # a round started again reads every row once more (the labelled rows' cover, the candidates' gains); a
    # continued round only the kernel rows of the gains it recomputes and of its picks
    assert all(continued < restarted and restarted > 250 for continued, restarted in round_reads[1:])
    assert not greedy.continues(0.4, pool) and not greedy.continues(0.5, pool[:-1])


def test_maxherding_does_not_continue_past_a_fill():
    x = np.repeat(unit_rows(3, 4), 4, axis=0)
    greedy = H.HerdingGreedy(H.herding_kernel(x, 1.0), EMPTY)
    first = greedy.take(5, seed=1)
    assert first.filled == 2 and not greedy.continues(1.0, first.indices)


@pytest.mark.parametrize("rows", [1, 7, 200])
def test_maxherding_takes_the_first_copy_of_each_point_then_fills(rows):
    """Copies of a point gain the same but for the float32 rounding of their kernel rows, which changes with
    the block shape: a tie, going to the lowest index. Once a copy of every point is chosen, the copies left
    gain nothing beyond rounding: a seeded fill takes over."""
    x = np.repeat(unit_rows(50, 8, seed=1), 4, axis=0)[np.random.default_rng(0).permutation(200)]
    first_copies = np.unique(x, axis=0, return_index=True)[1]
    selection = herding(small_blocks(H.herding_kernel(x, 0.5), rows), EMPTY, 199, seed=1)
    assert_valid(selection.indices, 199, 200)
    assert sorted(selection.indices[:50]) == sorted(first_copies) and selection.filled == 149


def test_labelled_bandwidth_is_the_smallest_distance_between_labelled_points():
    x = np.array([[0, 0], [3, 0], [3, 4], [0.5, 0], [3, 0]], dtype=np.float32)
    assert S.labelled_bandwidth(x, np.array([0, 1, 2])) == pytest.approx(3.0)
    assert S.labelled_bandwidth(x, np.array([1, 2, 4])) == pytest.approx(4.0)  # the duplicate pair is left out
    assert S.labelled_bandwidth(x, np.array([0, 3])) == pytest.approx(0.5)
    assert S.labelled_bandwidth(x, np.array([2])) is None and S.labelled_bandwidth(x, np.array([1, 4])) is None


@pytest.mark.parametrize("select", [
    lambda x, pool, b: S.typiclust_select(x, pool, b),
    lambda x, pool, b: S.probcover_select(C.cover_graph(x, 0.3, C.nearest_neighbours(x, 8)), pool, b)[0],
    lambda x, pool, b: herding(H.herding_kernel(x, 0.5), pool, b),
])
def test_exact_budget_unique_disjoint_and_budget_checked(select):
    x = unit_rows(300, 8, seed=4)
    pool = np.arange(0, 300, 7)
    for budget in (1, 17, 300 - len(pool)):
        assert_valid(select(x, pool, budget).indices, budget, 300, exclude=pool)
    with pytest.raises(ValueError, match="budget"):
        select(x, pool, 300 - len(pool) + 1)


# ---------------------------------------------------------------- sampler.py

@pytest.fixture
def feats_file(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 16))
    labels = rng.integers(0, 10, 400)
    np.savez(tmp_path / "f.npz", feats=(centres[labels] + 0.6 * rng.standard_normal((400, 16))).astype(np.float32),
             labels=labels)
    return tmp_path / "f.npz"


def run_sampler(tmp_path, feats, name, splits, *extra, capsys):
    return call_main(sampler.main, ["--feats", feats, "--dataset", "cifar10", "--name", name, "--splits", splits,
                                    "--indices", tmp_path / "idx", "--save", tmp_path / "out", *extra], capsys)


@pytest.mark.parametrize("name", ["typiclust", "probcover", "maxherding"])
def test_sampler_rounds_on_top_of_a_pool_are_seeded(tmp_path, feats_file, capsys, name):
    np.save(tmp_path / "pool.npy", np.arange(0, 400, 40, dtype=np.int64))
    files = []
    for run in ("a", "b"):
        status, out, err = run_sampler(tmp_path / run, feats_file, name, "10,20", "--resume-indices",
                                       tmp_path / "pool.npy", capsys=capsys)
        assert status == 0, err
        first, second = (np.load(tmp_path / run / "idx" / f"{name}_cifar10_{n}.npy") for n in (20, 40))
        assert np.array_equal(first[:10], np.arange(0, 400, 40)) and np.array_equal(second[:20], first)
        assert len(np.unique(second)) == 40
        files.append([(tmp_path / run / "idx" / f"{name}_cifar10_{n}.npy").read_bytes() for n in (20, 40)])
    assert files[0] == files[1]
    meta = json.loads((tmp_path / "a" / "idx" / f"{name}_cifar10_40.json").read_text())
    assert meta["strategy"] == name and meta["params"]["increment"] == 20


def test_sampler_maxherding_bandwidth_auto_is_the_smallest_pool_distance(tmp_path, feats_file, capsys):
    np.save(tmp_path / "pool.npy", np.arange(0, 400, 40, dtype=np.int64))
    status, out, err = run_sampler(tmp_path, feats_file, "maxherding", "5,5", "--bandwidth", "auto",
                                   "--resume-indices", tmp_path / "pool.npy", capsys=capsys)
    assert status == 0, err
    feats = np.load(feats_file)["feats"]
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    first = json.loads((tmp_path / "idx" / "maxherding_cifar10_15.json").read_text())["params"]
    second = json.loads((tmp_path / "idx" / "maxherding_cifar10_20.json").read_text())["params"]
    assert first["bandwidth"] == pytest.approx(S.labelled_bandwidth(unit, np.arange(0, 400, 40)), rel=1e-5)
    pool = np.load(tmp_path / "idx" / "maxherding_cifar10_15.npy")
    assert second["bandwidth"] == pytest.approx(S.labelled_bandwidth(unit, pool), rel=1e-5)
    assert f"h = {first['bandwidth']:.4f}" in out
    status, out, err = run_sampler(tmp_path / "default", feats_file, "maxherding", "5", capsys=capsys)
    assert status == 0 and "h = 0.5000" in out


def test_sampler_probcover_prints_delta_and_coverage(tmp_path, feats_file, capsys):
    status, out, err = run_sampler(tmp_path, feats_file, "probcover", "5", capsys=capsys)
    assert status == 0, err
    assert "=> probcover: delta " in out and "95% pure balls under 10 k-means pseudo-labels" in out
    assert "of the points lie within delta of the pool" in out
    meta = json.loads((tmp_path / "idx" / "probcover_cifar10_5.json").read_text())
    assert meta["params"]["purity"] == 0.95 and 0 < meta["params"]["delta"] < 2
    status, out, _ = run_sampler(tmp_path / "fixed", feats_file, "probcover", "5", "--delta", "0.5", capsys=capsys)
    assert status == 0 and "delta 0.5" not in out
    assert json.loads((tmp_path / "fixed" / "idx" / "probcover_cifar10_5.json").read_text())["params"]["delta"] == 0.5


@pytest.mark.parametrize("extra, pattern", [
    (["--delta", "-1"], "--delta: must be auto or in (0, 1e+06], got -1"),
    (["--purity", "1.5"], "--purity: must be in (0, 1]"),
    (["--pseudo-classes", "1"], "--pseudo-classes: must be at least 2"),
])
def test_sampler_probcover_bad_options(tmp_path, feats_file, capsys, extra, pattern):
    status, _, err = run_sampler(tmp_path, feats_file, "probcover", "5", *extra, capsys=capsys)
    assert status == 2 and pattern in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "idx").exists()


def test_sampler_probcover_auto_delta_without_labels_needs_the_class_count(tmp_path, capsys):
    np.save(tmp_path / "f.npy", unit_rows(100, 8))
    status, _, err = run_sampler(tmp_path, tmp_path / "f.npy", "probcover", "5", capsys=capsys)
    assert status == 2 and "--pseudo-classes: --delta auto needs the class count" in err
    status, out, err = run_sampler(tmp_path, tmp_path / "f.npy", "probcover", "5", "--pseudo-classes", "4",
                                   capsys=capsys)
    assert status == 0, err
    assert "under 4 k-means pseudo-labels" in out and "categories is seen" not in out


def test_sampler_checks_the_options_before_extracting_features(tmp_path, cifar10_root, capsys):
    status, out, err = call_main(sampler.main, [cifar10_root, "--dataset", "cifar10", "--arch", "resnet18",
                                                "--backbone", "random", "--name", "typiclust", "--splits", "5",
                                                "--knn", "0", "--save", tmp_path / "out",
                                                "--indices", tmp_path / "idx"],
                                 capsys)
    assert status == 2 and "--knn: must be at least 1, got 0" in err and "feats =>" not in out
