"""UHerding and DropQuery: brute-force references, hand-made heads with known answers, the calibration
and candidate rules, exact budgets and determinism, through the functions and the strategy table."""
import numpy as np
import pytest
import torch

import strategies as S
from lowbudget import herding as H
from lowbudget.cli import UsageError
from lowbudget.selection import Selection
from lowbudget.strategy_table import STRATEGIES, Inputs
from tests.helpers import assert_herding_greedy, assert_valid, herding, small_blocks, unit_rows

EMPTY = np.zeros(0, dtype=np.int64)


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---------------------------------------------------------------- UHerding

@pytest.mark.parametrize("bandwidth", [1.0, 0.35])
def test_uherding_without_labels_is_maxherding(bandwidth):
    kernel = small_blocks(H.herding_kernel(unit_rows(250, 6, seed=1), bandwidth))
    ones = np.ones(250)
    assert herding(kernel, EMPTY, 30, ones).indices.tolist() == \
        herding(kernel, EMPTY, 30).indices.tolist()


@pytest.mark.parametrize("bandwidth, labeled", [(1.0, [4, 90, 200]), (0.4, list(range(0, 300, 30)))])
def test_uherding_is_the_dense_greedy(bandwidth, labeled):
    x = unit_rows(300, 5, seed=3)
    labeled = np.asarray(labeled, dtype=np.int64)
    weights = np.random.default_rng(4).random(300)
    selection = herding(small_blocks(H.herding_kernel(x, bandwidth)), labeled, 35, weights)
    assert_herding_greedy(x, bandwidth, labeled, selection, weights)
    assert_valid(selection.indices, 35, 300, exclude=labeled)
    assert weights.min() > 0  # the caller's weights are not changed (labelled rows weigh 0 inside only)


def test_uherding_ignores_points_the_model_is_sure_about():
    """Two clusters; the model is certain on the left one: every pick goes to the right one."""
    rng = np.random.default_rng(0)
    x = (np.array([[[1, 0]], [[-1, 0]]]) + 0.05 * rng.standard_normal((2, 40, 2))).reshape(80, 2)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    weights = np.r_[np.zeros(40), np.ones(40)]
    picks = herding(H.herding_kernel(x, 0.3), np.array([0]), 5, weights).indices
    assert (picks >= 40).all()


def brute_force_ece(probs, labels, bins=15):
    confidence, predicted = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        inside = (confidence > b / bins) & (confidence <= (b + 1) / bins)
        if inside.any():
            total += inside.mean() * abs((predicted[inside] == labels[inside]).mean() - confidence[inside].mean())
    return total


def test_ece_and_temperature_equal_brute_force():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    logits = rng.standard_normal((300, 5)) * 3
    logits[np.arange(300), labels] += 4  # mostly right and over-confident: a temperature above 1 calibrates
    assert S.expected_calibration_error(torch.from_numpy(logits), labels) == \
        pytest.approx(brute_force_ece(softmax(logits), labels), abs=1e-12)
    errors = [brute_force_ece(softmax(logits / t), labels) for t in S.TEMPERATURES]
    temperature = S.calibrated_temperature(torch.from_numpy(logits), labels)
    assert temperature == pytest.approx(S.TEMPERATURES[int(np.argmin(errors))]) and temperature > 1
    assert S.TEMPERATURES[0] == 1.0 and S.TEMPERATURES[-1] == 20.0 and len(S.TEMPERATURES) == 191


def test_margin_uncertainty_of_the_tempered_softmax():
    logits = np.random.default_rng(2).standard_normal((50, 4)) * 5
    top = -np.sort(-softmax(logits / 2.5), axis=1)
    np.testing.assert_allclose(S.margin_uncertainty(torch.from_numpy(logits), 2.5).numpy(),
                               1 - (top[:, 0] - top[:, 1]), atol=1e-12)


def test_holdout_split_is_seeded_and_disjoint():
    labeled = np.arange(100, 120)
    train, held = S.holdout_split(labeled, 0.3, seed=1)
    assert len(held) == 6 and len(train) == 14 and sorted(np.r_[train, held].tolist()) == labeled.tolist()
    again = S.holdout_split(labeled, 0.3, seed=1)
    assert np.array_equal(again[1], held) and not np.array_equal(S.holdout_split(labeled, 0.3, seed=2)[1], held)
    assert S.holdout_split(np.array([3]), 0.3) is None and S.holdout_split(labeled, 1.0) is None


class RecordingModel:
    """A fixed linear head; records what each call asked for."""

    def __init__(self, feats, classes=4):
        self.feats, self.calls = feats, []
        self.weights = torch.from_numpy(np.random.default_rng(7).standard_normal((feats.shape[1], classes)) * 3)

    def __call__(self, rows, score, *, trained_on=None):
        self.calls.append((rows.copy(), None if trained_on is None else trained_on.copy()))
        return score(lambda x: x @ self.weights, torch.from_numpy(self.feats[rows]).double(), rows).numpy()


def table_step(name, feats, labels, model, seed=0, **options):
    row = STRATEGIES[name]
    inputs = Inputs(feats, labels, seed=seed, log=lambda line: None, model_scores=model)
    return row.build(inputs, {**row.defaults(), **options})


def test_uherding_row_calibrates_on_a_held_out_part_and_weights_by_margin():
    x = unit_rows(200, 6, seed=8)
    labels = np.random.default_rng(0).integers(0, 4, 200)
    pool = np.arange(0, 200, 10)
    model = RecordingModel(x)
    selection = table_step("uherding", x, labels, model, seed=3)(pool, 12)
    (held, trained_on), (candidates, none) = model.calls
    train, expected_held = S.holdout_split(pool, 0.3, seed=3)
    assert np.array_equal(held, expected_held) and np.array_equal(trained_on, train) and none is None
    assert np.array_equal(candidates, np.setdiff1d(np.arange(200), pool))
    logits = torch.from_numpy(x[held]).double() @ model.weights
    temperature = S.calibrated_temperature(logits, labels[held])
    weights = np.ones(200)
    weights[candidates] = S.margin_uncertainty(torch.from_numpy(x[candidates]).double() @ model.weights,
                                               temperature).numpy()
    assert selection.params["temperature"] == temperature
    assert STRATEGIES["uherding"].defaults()["bandwidth"] is None  # auto: the smallest labelled distance
    bandwidth = S.labelled_bandwidth(x, pool)
    assert selection.params["bandwidth"] == pytest.approx(bandwidth)
    assert_herding_greedy(x, bandwidth, pool, selection, weights)


def test_uherding_row_without_labels_needs_no_model_and_is_maxherding():
    """Both at their defaults: UHerding's auto bandwidth falls back to MaxHerding's h without labels."""
    x = unit_rows(120, 5, seed=9)
    labels = np.zeros(120, dtype=np.int64)
    uherding = table_step("uherding", x, labels, model=None)(EMPTY, 10)  # a model would be called: None fails
    row = STRATEGIES["maxherding"]
    maxherding = row.build(Inputs(x, None, log=lambda line: None), row.defaults())(EMPTY, 10)
    assert uherding.indices.tolist() == maxherding.indices.tolist()
    assert uherding.params["bandwidth"] == maxherding.params["bandwidth"] == row.defaults()["bandwidth"]


def test_a_fixed_bandwidth_reaches_uherding():
    x = unit_rows(150, 5, seed=4)
    labels = np.random.default_rng(0).integers(0, 4, 150)
    pool = np.arange(0, 150, 15)
    selection = table_step("uherding", x, labels, RecordingModel(x), bandwidth=0.8)(pool, 5)
    assert selection.params["bandwidth"] == 0.8


def seeded_sample_rows(num_rows, size, seed, pool):
    """The rows the herding strategies run on above --herding-sample: a seeded sample and the labelled pool."""
    return np.union1d(np.random.default_rng(seed).choice(num_rows, size, replace=False), pool)


def test_maxherding_above_herding_sample_is_herding_on_a_seeded_sample_and_the_pool():
    x = unit_rows(300, 6, seed=9)
    pool = np.array([5, 77, 299])
    selection = table_step("maxherding", x, None, None, seed=3, herding_sample=120)(pool, 15)
    rows = seeded_sample_rows(300, 120, 3, pool)
    assert np.isin(selection.indices, rows).all()
    local = Selection(np.searchsorted(rows, selection.indices), selection.filled, {})
    assert_herding_greedy(x[rows], 0.5, np.searchsorted(rows, pool), local)
    assert selection.params["herding_sample"] == len(rows) == 123
    step = table_step("maxherding", x, None, None, seed=3, herding_sample=120)  # rounds: the same sample, continued
    first = step(pool, 6)
    assert np.r_[first.indices, step(np.r_[pool, first.indices], 9).indices].tolist() == selection.indices.tolist()
    assert not np.array_equal(table_step("maxherding", x, None, None, seed=4, herding_sample=120)(pool, 15).indices,
                              selection.indices)
    with pytest.raises(UsageError, match="--herding-sample: 121 picks asked of a sample with 120 unlabelled"):
        table_step("maxherding", x, None, None, seed=3, herding_sample=120)(pool, 121)
    for every_row in (300, 0):  # at most --herding-sample rows, or 0: every row, the exact greedy
        exact = table_step("maxherding", x, None, None, herding_sample=every_row)(pool, 15)
        assert_herding_greedy(x, 0.5, pool, exact)
        assert "herding_sample" not in exact.params


def test_uherding_above_herding_sample_scores_and_picks_only_sampled_rows():
    x = unit_rows(200, 6, seed=8)
    labels = np.random.default_rng(0).integers(0, 4, 200)
    pool = np.arange(0, 200, 10)
    model = RecordingModel(x)
    selection = table_step("uherding", x, labels, model, seed=3, herding_sample=90)(pool, 12)
    rows = seeded_sample_rows(200, 90, 3, pool)
    (held, _), (candidates, _) = model.calls
    assert np.array_equal(candidates, np.setdiff1d(rows, pool))
    temperature = S.calibrated_temperature(torch.from_numpy(x[held]).double() @ model.weights, labels[held])
    weights = np.ones(len(rows))
    weights[np.searchsorted(rows, candidates)] = S.margin_uncertainty(
        torch.from_numpy(x[candidates]).double() @ model.weights, temperature).numpy()
    assert np.isin(selection.indices, rows).all() and selection.params["herding_sample"] == len(rows)
    local = Selection(np.searchsorted(rows, selection.indices), selection.filled, {})
    assert_herding_greedy(x[rows], S.labelled_bandwidth(x, pool), np.searchsorted(rows, pool), local, weights)


# ---------------------------------------------------------------- DropQuery

def all_features_head(x):
    """Class 1 when every input feature is non-zero, else class 0: a row with a zero feature never changes
    its prediction under dropout; a row without one changes it unless all of its features survive."""
    every = (x != 0).all(1)
    return torch.stack([(~every).double(), every.double()], 1)


def test_dropout_candidates_are_exactly_the_rows_whose_prediction_flips():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1, (300, 16))
    fragile = rng.random(300) < 0.2
    x[~fragile, rng.integers(0, 16, (~fragile).sum())] = 0  # every robust row has a zero feature
    flips = S.dropout_disagreements(all_features_head, torch.from_numpy(x), np.arange(300), p=0.75, passes=3, seed=1)
    assert flips[torch.from_numpy(fragile)].eq(3).all() and flips[torch.from_numpy(~fragile)].eq(0).all()
    positions, threshold = S.dropquery_candidates(flips.numpy(), 3, 10)
    assert positions.tolist() == np.flatnonzero(fragile).tolist() and threshold == 1


def test_dropout_masks_do_not_depend_on_the_batch():
    rows = np.arange(5000, 5600)
    whole = S.dropout_keep(rows, 32, 0.75, seed=3, draw=1)
    parts = np.concatenate([S.dropout_keep(rows[:250], 32, 0.75, 3, 1), S.dropout_keep(rows[250:], 32, 0.75, 3, 1)])
    assert np.array_equal(whole, parts)
    assert abs(whole.mean() - 0.25) < 0.01  # 19,200 draws
    assert not np.array_equal(whole, S.dropout_keep(rows, 32, 0.75, seed=4, draw=1))
    assert not np.array_equal(whole, S.dropout_keep(rows, 32, 0.75, seed=3, draw=2))


def scalar_splitmix64(x: int) -> int:
    """SplitMix64's finaliser in plain Python integers, the reference the vectorised masks must match."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.75])
def test_dropout_masks_follow_the_documented_hash(p):
    rows, dim, seed, draw = np.array([0, 7, 300, 5000, 123_456]), 300, 11, 2
    rows = np.concatenate([rows, np.arange(1000, 1300)])  # 305 rows: two blocks of KEEP_BLOCK_ROWS
    keep = S.dropout_keep(rows, dim, p, seed, draw)
    key = scalar_splitmix64((seed * 1_000_003 + draw) & ((1 << 64) - 1))
    for i in (0, 1, 2, 3, 4, 200, 304):
        for feature in (0, 1, 150, dim - 1):
            uniform = (scalar_splitmix64((int(rows[i]) * dim + feature) ^ key) >> 11) / 2.0 ** 53
            assert keep[i, feature] == (uniform >= p)


def test_dropout_scales_the_kept_features_as_torch_dropout():
    seen = []

    def head(x):
        seen.append(x.clone())
        return torch.zeros(len(x), 2)
    x = torch.ones(10, 8)
    S.dropout_disagreements(head, x, np.arange(10), p=0.75, passes=1, seed=0)
    assert set(seen[1].unique().tolist()) <= {0.0, 4.0} and torch.equal(seen[0], x)


def test_candidate_threshold_is_lowered_until_enough_rows_qualify():
    flips = np.array([3, 2, 2, 1, 1, 1, 0, 0, 0, 0])
    positions, threshold = S.dropquery_candidates(flips, 3, 3)
    assert positions.tolist() == [0, 1, 2] and threshold == 1
    positions, threshold = S.dropquery_candidates(flips, 3, 5)
    assert positions.tolist() == [0, 1, 2, 3, 4, 5] and threshold == 0
    positions, threshold = S.dropquery_candidates(flips, 3, 9)  # the lowest threshold, even if still too few
    assert positions.tolist() == [0, 1, 2, 3, 4, 5] and threshold == 0
    positions, threshold = S.dropquery_candidates(np.array([5, 4, 3, 2]), 5, 2)
    assert positions.tolist() == [0, 1, 2] and threshold == 2  # more than half of 5 passes: 3 or more


def test_dropquery_fills_with_seeded_random_unlabelled_rows():
    x = unit_rows(100, 4, seed=0)
    unlabelled = np.arange(20, 100)
    flips = np.zeros(80, dtype=np.int64)
    flips[[3, 7]] = 2
    selection = S.dropquery_select(x, unlabelled, flips, 6, passes=3, seed=5)
    assert_valid(selection.indices, 6, 100, exclude=np.arange(20))
    assert selection.indices[:2].tolist() == [23, 27] and selection.filled == 4
    again = S.dropquery_select(x, unlabelled, flips, 6, passes=3, seed=5)
    assert np.array_equal(again.indices, selection.indices)


def test_dropquery_clusters_the_candidates():
    x = unit_rows(3000, 8, seed=1)
    unlabelled = np.arange(100, 3000)
    flips = np.random.default_rng(0).integers(0, 4, len(unlabelled))
    selection = S.dropquery_select(x, unlabelled, flips, 10, passes=3, seed=2)
    candidates = unlabelled[flips > 1]
    assert len(candidates) >= 250 and selection.params["candidates"] == len(candidates)
    assert_valid(selection.indices, 10, 3000, exclude=np.arange(100))
    assert np.isin(selection.indices, candidates).all()
    assert np.array_equal(selection.indices, S.dropquery_select(x, unlabelled, flips, 10, passes=3, seed=2).indices)
    with pytest.raises(ValueError, match="budget"):
        S.dropquery_select(x, unlabelled, flips, 2901, passes=3)


def test_dropquery_row_scores_the_unlabelled_rows_with_dropout():
    rng = np.random.default_rng(3)
    x = rng.uniform(0.5, 1, (400, 16))
    fragile = rng.random(400) < 0.8
    x[~fragile, 0] = 0

    def model(rows, score, *, trained_on=None):
        assert trained_on is None
        return score(all_features_head, torch.from_numpy(x[rows]), rows).numpy()
    pool = np.flatnonzero(fragile)[:20]
    selection = table_step("dropquery", x.astype(np.float32), np.zeros(400, np.int64), model, seed=1)(pool, 4)
    assert_valid(selection.indices, 4, 400, exclude=pool)
    assert fragile[selection.indices].all() and selection.params["candidates"] == fragile.sum() - 20
