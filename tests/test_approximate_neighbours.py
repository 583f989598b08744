"""Approximate nearest neighbours for ProbCover: the IVF index, its measured recall against a brute-force
reference, ProbCover with it against exact search, the auto threshold, and sampler.py's --neighbours."""
import json

import faiss
import numpy as np
import pytest

import sampler
from lowbudget import faiss_ops
from lowbudget import strategies as S
from tests.conftest import call_main

EMPTY = np.zeros(0, dtype=np.int64)


def mixture(rows, dim, centres=200, noise=0.05, seed=0):
    """Unit rows of a seeded Gaussian mixture, and each row's component."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    component = rng.integers(0, centres, rows)
    x = means[component] + noise * rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), component


def ivf(x, lists, probes):
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(x.shape[1]), x.shape[1], lists)
    index.train(x)
    index.add(x)
    index.nprobe = probes
    return index


# ---------------------------------------------------------------- recall and the index

@pytest.mark.parametrize("probes", [1, 2, 16])
def test_recall_equals_brute_force_share_of_true_neighbours(probes):
    x = np.random.default_rng(1).standard_normal((1500, 8)).astype(np.float32)  # no ties
    index, k = ivf(x, 16, probes), 10
    queries = faiss_ops.recall_sample(len(x), seed=3)
    assert len(queries) == 1000 and len(np.unique(queries)) == 1000
    found = index.search(x[queries], k)[1]
    sq = ((x[queries, None].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    true = np.argsort(sq, axis=1)[:, :k]
    expected = np.mean([len(np.intersect1d(f[f >= 0], t)) / k for f, t in zip(found, true, strict=True)])
    assert faiss_ops.index_recall(index, x, k, seed=3) == pytest.approx(expected, abs=1e-9)
    exact = faiss_ops.sample_search(x, x[queries], k, block=400)  # blocks of rows, merged
    assert np.allclose(exact, np.sort(sq, axis=1)[:, :k], rtol=1e-4, atol=1e-5)
    assert (expected == 1.0) == (probes == 16)


def test_recall_counts_ties_and_missing_rows():
    base = np.array([[0.0], [1.0], [1.0], [5.0]], dtype=np.float32)  # rows 1 and 2 tie for query 0
    queries = base[:1]
    exact_sq = np.array([[0.0, 1.0]], dtype=np.float32)
    assert faiss_ops.found_share(np.array([[0, 2]]), base, queries, exact_sq) == 1.0
    assert faiss_ops.found_share(np.array([[0, 3]]), base, queries, exact_sq) == 0.5
    assert faiss_ops.found_share(np.array([[0, -1]]), base, queries, exact_sq) == 0.5


def test_ivf_lists_and_the_auto_choice():
    assert faiss_ops.ivf_lists(1_281_167) == 4528 and faiss_ops.ivf_lists(20_000) == 566
    big = faiss_ops.APPROXIMATE_FROM_ROWS
    assert faiss_ops.uses_ivf("auto", big, gpu=False) and not faiss_ops.uses_ivf("auto", big - 1, gpu=False)
    assert not faiss_ops.uses_ivf("auto", big, gpu=True)  # exact search is fast on a GPU
    assert faiss_ops.uses_ivf("ivf", 10, gpu=True) and not faiss_ops.uses_ivf("exact", 10 * big, gpu=False)
    with pytest.raises(ValueError, match="unknown neighbour search 'hnsw'"):
        faiss_ops.uses_ivf("hnsw", 10, gpu=False)


@pytest.fixture(scope="module")
def clustered():
    return mixture(20_000, 32)[0]


@pytest.fixture(scope="module")
def tuned(clustered):
    return S.probcover_index(clustered, "ivf", seed=0)


@pytest.mark.slow
def test_tuned_ivf_reaches_the_target_recall_on_clustered_data(clustered, tuned):
    assert tuned.index.nlist == 566 and tuned.k == S.PROBCOVER_KNN
    assert faiss_ops.FIRST_PROBES <= tuned.index.nprobe <= faiss_ops.MAX_PROBES
    assert tuned.recall >= faiss_ops.TARGET_RECALL
    held_out = faiss_ops.index_recall(tuned.index, clustered, S.PROBCOVER_KNN, seed=7)  # another sample
    assert held_out >= faiss_ops.TARGET_RECALL - 0.02
    again = S.probcover_index(clustered, "ivf", seed=0)
    assert (again.index.nprobe, again.recall) == (tuned.index.nprobe, tuned.recall)


# ---------------------------------------------------------------- the searches ProbCover makes

def test_short_lists_pad_the_neighbours_with_the_row_itself_at_infinity():
    x = np.concatenate([np.zeros((10, 2)), np.full((10, 2), 10.0)]).astype(np.float32)
    x += np.random.default_rng(0).normal(0, 0.01, x.shape).astype(np.float32)
    near = S.nearest_neighbours(x, 15, approximate=faiss_ops.TunedIndex(ivf(x, 2, 1), 15, 0.0))
    exact = S.nearest_neighbours(x, 10)
    assert np.array_equal(np.sort(near.index[:, :10], 1), np.sort(exact.index, 1))  # each list holds its cluster
    assert np.array_equal(near.index[:, 10:], np.repeat(np.arange(20)[:, None], 5, 1))
    assert np.isinf(near.sq_dist[:, 10:]).all() and np.isfinite(near.sq_dist[:, :10]).all()


def test_nearest_other_label_through_the_index_equals_exact_and_falls_back_when_none_is_probed():
    x, component = mixture(600, 8, centres=6, noise=0.1, seed=2)
    labels = component % 3
    rows = np.arange(0, 600, 7)
    exact = S.nearest_other_label(x, labels, rows)
    everything = faiss_ops.TunedIndex(ivf(x, 6, 6), 1, 1.0)
    assert np.allclose(S.nearest_other_label(x, labels, rows, approximate=everything), exact, rtol=1e-5)
    far = np.concatenate([np.zeros((10, 2)), np.full((10, 2), 10.0)]).astype(np.float32)
    far += np.random.default_rng(0).normal(0, 0.01, far.shape).astype(np.float32)
    halves = np.repeat([0, 1], 10)
    one_list = faiss_ops.TunedIndex(ivf(far, 2, 1), 1, 0.0)  # a row's own list holds no other label
    assert np.allclose(S.nearest_other_label(far, halves, np.arange(20), approximate=one_list),
                       S.nearest_other_label(far, halves, np.arange(20)), rtol=1e-5)


@pytest.mark.slow
def test_probcover_with_ivf_shares_picks_and_delta_with_exact(clustered, tuned):
    pool = np.arange(0, 20_000, 400, dtype=np.int64)  # 50 labelled rows
    exact_graph, exact_delta = S.probcover_graph(clustered, None, pseudo_classes=10)
    ivf_graph, ivf_delta = S.probcover_graph(clustered, None, pseudo_classes=10, approximate=tuned)
    assert ivf_delta == pytest.approx(exact_delta, rel=0.03)
    exact_picks = S.probcover_select(exact_graph, pool, 100)[0].indices
    selection, covered = S.probcover_select(ivf_graph, pool, 100)
    picks = selection.indices
    assert len(picks) == 100 and len(np.unique(picks)) == 100 and picks.min() >= 0 and picks.max() < 20_000
    assert not np.isin(picks, pool).any() and 0 < covered <= 1
    assert len(np.intersect1d(picks, exact_picks)) >= 95
    assert np.array_equal(S.probcover_select(ivf_graph, pool, 100)[0].indices, picks)  # deterministic


def test_auto_below_the_threshold_is_exact_search():
    x = mixture(2_000, 16)[0]
    assert S.probcover_index(x, "auto") is None and S.probcover_index(x, "exact") is None
    auto = S.probcover_graph(x, None, pseudo_classes=5, approximate=S.probcover_index(x, "auto"))
    exact = S.probcover_graph(x, None, pseudo_classes=5)
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
    assert params["neighbours"] == "ivf" and params["recall"] >= faiss_ops.TARGET_RECALL
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
