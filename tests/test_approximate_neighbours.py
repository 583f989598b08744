"""Approximate nearest neighbours for ProbCover: the inverted file searched by matrix products, its measured
recall against a brute-force reference, ProbCover with it against exact search, the auto threshold, and
sampler.py's --neighbours."""
import json
from dataclasses import replace

import numpy as np
import pytest

import sampler
import strategies as S
from lowbudget import cover as C
from lowbudget import ivf
from tests.helpers import call_main

EMPTY = np.zeros(0, dtype=np.int64)


def mixture(rows, dim, centres=200, noise=0.05, seed=0):
    """Unit rows of a seeded Gaussian mixture, and each row's component."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    component = rng.integers(0, centres, rows)
    x = means[component] + noise * rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), component


def brute_sq(queries, base):
    return ((queries[:, None].astype(np.float64) - base[None].astype(np.float64)) ** 2).sum(-1)


def clear_radius(x, sq, near):
    """A squared radius near `near` that no squared distance in `sq` (between rows of `x`) lies within float32
    rounding of, so that float32 searches and this float64 reference put the same pairs inside: the middle
    of the widest gap among the 200 distinct values around `near`. The rounding: a few float32 steps of the
    terms |a|^2, |b|^2, 2 a.b, and the sqrt(D) of their sums, on either side."""
    ordered = np.unique(sq)
    at = int(np.searchsorted(ordered, near))
    window = ordered[max(at - 100, 0):at + 100]
    widest = int(np.argmax(np.diff(window)))
    rounding = (8 + 2 * np.sqrt(x.shape[1])) * np.finfo(np.float32).eps * (x.astype(np.float64) ** 2).sum(1).max()
    assert window[widest + 1] - window[widest] > 2 * rounding
    return float(window[widest] + window[widest + 1]) / 2


def cells(x, count, probes):
    return replace(ivf.cell_index(x, cells=count), probes=probes)


def two_far_clusters():
    x = np.concatenate([np.zeros((10, 2)), np.full((10, 2), 10.0)]).astype(np.float32)
    return x + np.random.default_rng(0).normal(0, 0.01, x.shape).astype(np.float32)


# ---------------------------------------------------------------- the inverted file

def test_every_row_sits_in_its_nearest_cell_and_each_cell_probes_itself_first():
    x = np.random.default_rng(5).standard_normal((900, 6)).astype(np.float32)
    index = ivf.cell_index(x, seed=1, cells=12)
    assert index.cells == 12 and np.array_equal(np.sort(index.order), np.arange(900))
    for c in range(12):
        assert (index.cell[index.members(np.array([c]))] == c).all()
    centroids = np.stack([x[index.cell == c].mean(0) for c in range(12)])  # k-means: centroids are cell means
    assert (np.argmin(brute_sq(x, centroids), 1) == index.cell).mean() > 0.97  # up to k-means' last iteration
    assert np.array_equal(index.near_cells[:, 0], np.arange(12)) and index.near_cells.shape == (12, 12)
    rows = np.arange(0, 900, 7)
    seen = np.zeros(len(rows), dtype=int)
    for positions, candidates in replace(index, probes=3).groups(rows):
        own = index.cell[rows[positions]]
        assert (own == own[0]).all()
        assert np.array_equal(np.sort(candidates), np.sort(index.members(index.near_cells[own[0], :3])))
        seen[positions] += 1
    assert (seen == 1).all()


def test_searches_probing_every_cell_equal_brute_force():
    x = np.random.default_rng(1).standard_normal((700, 8)).astype(np.float32)  # no ties
    index, rows = cells(x, 9, 9), np.arange(0, 700, 3)
    sq = brute_sq(x[rows], x)
    dist, found = ivf.search(x, index, rows, 10)
    assert found.dtype == np.int32 and np.array_equal(found, np.argsort(sq, 1)[:, :10])
    assert np.allclose(dist, np.sort(sq, 1)[:, :10], rtol=1e-4, atol=1e-5)
    radius = clear_radius(x, sq, np.quantile(sq, 0.05))
    pairs = np.concatenate([np.stack(p, 1) for p in ivf.range_pairs(x, index, rows, radius)])
    expected = np.stack([rows[np.nonzero(sq < radius)[0]], np.nonzero(sq < radius)[1]], 1)
    assert {tuple(p) for p in pairs} == {tuple(p) for p in expected}
    allowed = np.arange(700) % 3 == 1
    near_sq, near = ivf.nearest_allowed(x, index, rows, allowed)
    assert np.array_equal(near, np.flatnonzero(allowed)[np.argmin(sq[:, allowed], 1)])
    assert np.allclose(near_sq, sq[:, allowed].min(1), rtol=1e-4, atol=1e-5)


def test_exact_search_over_blocks_equals_brute_force_and_respects_allowed(monkeypatch):
    monkeypatch.setattr(ivf, "_ROW_BLOCK", 128)  # several blocks, merged
    x = np.random.default_rng(2).standard_normal((1000, 5)).astype(np.float32)
    queries = x[:40] + 0.01
    sq = brute_sq(queries, x)
    dist, found = ivf.exact_search(x.astype(np.float16), queries, 7)  # float16 storage widened per block
    assert np.array_equal(found, np.argsort(brute_sq(queries, x.astype(np.float16)), 1)[:, :7])
    allowed = np.zeros(1000, dtype=bool)
    allowed[[3, 500, 999]] = True
    dist, found = ivf.exact_search(x, queries, 4, allowed)
    assert np.array_equal(np.sort(found[:, :3], 1), np.tile([3, 500, 999], (40, 1))) and (found[:, 3] == -1).all()
    assert np.isinf(dist[:, 3]).all()
    assert np.allclose(dist[:, :3], np.sort(sq[:, [3, 500, 999]], 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("probes", [1, 2, 16])
def test_recall_equals_brute_force_share_of_true_neighbours(probes):
    x = np.random.default_rng(1).standard_normal((1500, 8)).astype(np.float32)  # no ties
    index, k = cells(x, 16, probes), 10
    queries = ivf.recall_sample(len(x), seed=3)
    assert len(queries) == 1000 and len(np.unique(queries)) == 1000
    found = ivf.search(x, index, queries, k)[1]
    true = np.argsort(brute_sq(x[queries], x), axis=1)[:, :k]
    expected = np.mean([len(np.intersect1d(f[f >= 0], t)) / k for f, t in zip(found, true, strict=True)])
    assert ivf.RecallProbe.sample(x, k, seed=3).recall(x, index) == pytest.approx(expected, abs=1e-9)
    assert (expected == 1.0) == (probes == 16)


def test_recall_counts_ties_and_missing_rows():
    base = np.array([[0.0], [1.0], [1.0], [5.0]], dtype=np.float32)  # rows 1 and 2 tie for query 0
    queries = base[:1]
    exact_sq = np.array([[0.0, 1.0]], dtype=np.float32)
    assert ivf.found_share(np.array([[0, 2]]), base, queries, exact_sq) == 1.0
    assert ivf.found_share(np.array([[0, 3]]), base, queries, exact_sq) == 0.5
    assert ivf.found_share(np.array([[0, -1]]), base, queries, exact_sq) == 0.5


def test_cell_count_and_the_auto_choice():
    assert ivf.cell_count(1_281_167) == 2264 and ivf.cell_count(20_000) == 283
    big = ivf.APPROXIMATE_FROM_ROWS
    assert ivf.uses_ivf("auto", big, gpu=False) and not ivf.uses_ivf("auto", big - 1, gpu=False)
    assert not ivf.uses_ivf("auto", big, gpu=True)  # exact search is fast on a GPU
    assert ivf.uses_ivf("ivf", 10, gpu=True) and not ivf.uses_ivf("exact", 10 * big, gpu=False)
    with pytest.raises(ValueError, match="unknown neighbour search 'hnsw'"):
        ivf.uses_ivf("hnsw", 10, gpu=False)


@pytest.fixture(scope="module")
def clustered():
    return mixture(20_000, 32)[0]


@pytest.fixture(scope="module")
def tuned(clustered):
    return C.probcover_index(clustered, "ivf", seed=0)


@pytest.mark.slow
def test_tuned_index_reaches_the_target_recall_on_clustered_data(clustered, tuned):
    assert tuned.cells == 283 and tuned.k == C.PROBCOVER_KNN
    assert ivf.FIRST_PROBES <= tuned.probes <= ivf.MAX_PROBES
    assert tuned.recall >= ivf.TARGET_RECALL
    held_out = ivf.RecallProbe.sample(clustered, C.PROBCOVER_KNN, seed=7).recall(clustered, tuned)  # another sample
    assert held_out >= ivf.TARGET_RECALL - 0.02
    fewer = replace(tuned, probes=tuned.probes // 2)
    assert tuned.probes == ivf.FIRST_PROBES or ivf.RecallProbe.sample(
        clustered, C.PROBCOVER_KNN, seed=0).recall(clustered, fewer) < ivf.TARGET_RECALL  # the fewest that reach it
    again = C.probcover_index(clustered, "ivf", seed=0)
    assert (again.probes, again.recall) == (tuned.probes, tuned.recall)
    assert np.array_equal(again.cell, tuned.cell)


# ---------------------------------------------------------------- the searches ProbCover makes

def test_short_lists_pad_the_neighbours_with_the_row_itself_at_infinity():
    x = two_far_clusters()
    near = C.nearest_neighbours(x, 15, approximate=cells(x, 2, 1))
    exact = C.nearest_neighbours(x, 10)
    assert np.array_equal(np.sort(near.index[:, :10], 1), np.sort(exact.index, 1))  # each list holds its cluster
    assert np.array_equal(near.index[:, 10:], np.repeat(np.arange(20)[:, None], 5, 1))
    assert np.isinf(near.sq_dist[:, 10:]).all() and np.isfinite(near.sq_dist[:, :10]).all()


def test_nearest_other_label_through_the_index_equals_exact_and_falls_back_when_none_is_probed():
    x, component = mixture(600, 8, centres=6, noise=0.1, seed=2)
    labels = component % 3
    rows = np.arange(0, 600, 7)
    exact = C.nearest_other_label(x, labels, rows)
    assert np.allclose(C.nearest_other_label(x, labels, rows, approximate=cells(x, 6, 6)), exact, rtol=1e-5)
    far, halves = two_far_clusters(), np.repeat([0, 1], 10)
    one_cell = cells(far, 2, 1)  # a row's own cell holds no other label
    assert np.allclose(C.nearest_other_label(far, halves, np.arange(20), approximate=one_cell),
                       C.nearest_other_label(far, halves, np.arange(20)), rtol=1e-5)


@pytest.mark.slow
def test_probcover_with_ivf_shares_picks_and_delta_with_exact(clustered, tuned):
    pool = np.arange(0, 20_000, 400, dtype=np.int64)  # 50 labelled rows
    exact_graph, exact_delta = C.probcover_graph(clustered, None, pseudo_classes=10)
    ivf_graph, ivf_delta = C.probcover_graph(clustered, None, pseudo_classes=10, approximate=tuned)
    assert ivf_delta == pytest.approx(exact_delta, rel=0.03)
    exact_picks = S.probcover_select(exact_graph, pool, 100)[0].indices
    selection, covered = S.probcover_select(ivf_graph, pool, 100)
    picks = selection.indices
    assert len(picks) == 100 and len(np.unique(picks)) == 100 and picks.min() >= 0 and picks.max() < 20_000
    assert not np.isin(picks, pool).any() and 0 < covered <= 1
    assert len(np.intersect1d(picks, exact_picks)) >= 95
    assert np.array_equal(S.probcover_select(ivf_graph, pool, 100)[0].indices, picks)  # deterministic


def test_probcover_graph_probing_every_cell_equals_the_exact_graph():
    x = mixture(1500, 8, centres=20, noise=0.1, seed=3)[0]
    index = cells(x, 10, 10)
    exact_graph, exact_delta = C.probcover_graph(x, None, pseudo_classes=5, neighbours=8)
    assert C.probcover_graph(x, None, pseudo_classes=5, neighbours=8, approximate=index)[1] == pytest.approx(
        exact_delta, rel=1e-5)
    delta = np.sqrt(clear_radius(x, brute_sq(x, x), 0.3 ** 2))
    exact_graph, _ = C.probcover_graph(x, delta, neighbours=8)  # balls past 8 neighbours: range searches
    graph, _ = C.probcover_graph(x, delta, neighbours=8, approximate=index)
    assert np.diff(exact_graph.indptr).max() > 8
    assert np.array_equal(graph.indptr, exact_graph.indptr) and np.array_equal(graph.indices, exact_graph.indices)


def test_auto_below_the_threshold_is_exact_search():
    x = mixture(2_000, 16)[0]
    assert C.probcover_index(x, "auto") is None and C.probcover_index(x, "exact") is None
    auto = C.probcover_graph(x, None, pseudo_classes=5, approximate=C.probcover_index(x, "auto"))
    exact = C.probcover_graph(x, None, pseudo_classes=5)
    assert auto[1] == exact[1] and np.array_equal(auto[0].indices, exact[0].indices)


# ---------------------------------------------------------------- sampler.py --neighbours

@pytest.fixture
def feats_file(tmp_path):
    x, component = mixture(3_000, 16, centres=30, noise=0.1, seed=4)
    np.savez(tmp_path / "f.npz", feats=x, labels=component % 10)
    return tmp_path / "f.npz"


def run_sampler(tmp_path, feats, *extra, capsys):
    return call_main(sampler.main, ["--feats", feats, "--dataset", "cifar10", "--name", "probcover", "--splits",
                                    "20", "--indices", tmp_path / "idx", "--save", tmp_path / "out", *extra], capsys)


def sidecar(folder):
    return json.loads((folder / "idx" / "probcover_cifar10_20.json").read_text())["params"]


def test_sampler_neighbours_ivf_prints_and_records_the_recall(tmp_path, feats_file, capsys):
    status, out, err = run_sampler(tmp_path / "ivf", feats_file, "--neighbours", "ivf", capsys=capsys)
    assert status == 0, err
    params = sidecar(tmp_path / "ivf")
    assert params["neighbours"] == "ivf" and params["recall"] >= ivf.TARGET_RECALL
    lines = [line for line in out.splitlines() if "approximate neighbours (IVF" in line]
    assert len(lines) == 1 and f"recall@64 {params['recall']:.3f} on 1000 sampled rows (target 0.95)" in lines[0]
    picks = np.load(tmp_path / "ivf" / "idx" / "probcover_cifar10_20.npy")
    assert picks.dtype == np.int64 and len(np.unique(picks)) == 20 and 0 <= picks.min() and picks.max() < 3_000


def test_sampler_neighbours_auto_below_the_threshold_is_the_exact_run(tmp_path, feats_file, capsys):
    files = {}
    for mode in ("auto", "exact"):
        extra = () if mode == "auto" else ("--neighbours", "exact")
        status, out, err = run_sampler(tmp_path / mode, feats_file, *extra, capsys=capsys)
        assert status == 0, err
        assert "approximate neighbours" not in out
        assert sidecar(tmp_path / mode)["neighbours"] == "exact" and sidecar(tmp_path / mode)["recall"] is None
        files[mode] = (tmp_path / mode / "idx" / "probcover_cifar10_20.npy").read_bytes()
    assert files["auto"] == files["exact"]


def test_sampler_rejects_an_unknown_neighbour_search(tmp_path, feats_file, capsys):
    status, _, err = run_sampler(tmp_path, feats_file, "--neighbours", "hnsw", capsys=capsys)
    assert status == 2 and "--neighbours" in err and "hnsw" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "idx").exists()
