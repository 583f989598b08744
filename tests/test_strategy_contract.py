"""One contract, every row of the strategy table: what a strategy promises whatever its algorithm.

Each row is built with exactly what it declares it needs (no features, no labels or no model when it
says so), so a row that reads more than it declares fails here too.
"""
import json

import numpy as np
import pytest
import torch

import active_sampler
import sampler
from lowbudget.strategy_table import STRATEGIES, Inputs, Strategy
from tests.helpers import call_main, unit_rows, write_feats

N, CLASSES, BUDGET = 150, 6, 12
ROWS = list(STRATEGIES.values())
# What a row may need beyond its defaults when it is given no labels (ProbCover's pseudo-class count), and
# VAAL's training cut from 100 epochs to 3: the contract does not depend on how long it trains.
EXTRA_OPTIONS = {"pseudo_classes": CLASSES, "vaal_epochs": 3}


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N unit rows in CLASSES tight clusters, and their cluster labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % CLASSES
    centres = unit_rows(CLASSES, 8, seed=seed)
    feats = centres[labels] + 0.15 * rng.standard_normal((N, 8)).astype(np.float32)
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32), labels


def linear_model_scores(feats: np.ndarray):
    """A linear head's scores, streamed in batches of 32 as the programs stream them: the head of the pool,
    or with `trained_on` one that depends on those rows alone (a fresh head trained on them)."""
    def head_of(rows):
        seed = 5 if rows is None else int(np.sort(rows) @ np.arange(1, len(rows) + 1))
        weights = torch.from_numpy(np.random.default_rng(seed).standard_normal((feats.shape[1], CLASSES)) * 4)
        return lambda x: x @ weights

    def scores(rows, score, *, trained_on=None):
        head = head_of(trained_on)
        return torch.cat([score(head, torch.from_numpy(feats[rows[i:i + 32]]).double(), rows[i:i + 32])
                          for i in range(0, len(rows), 32)]).numpy()
    return scores


def step_of(row: Strategy, seed: int = 0):
    """The row's step, built from exactly what it declares it needs."""
    feats, labels = blobs()
    inputs = Inputs(feats if row.needs_features else np.zeros((N, 0), np.float32),
                    labels if row.needs_labels else None, seed=seed, log=lambda line: None,
                    **({"model_scores": linear_model_scores(feats)} if row.needs_model else {}))
    return row.build(inputs, {**row.defaults(), **EXTRA_OPTIONS})


INITIAL = np.random.default_rng(9).choice(N, 10, replace=False).astype(np.int64)


def start_pool(row: Strategy) -> np.ndarray:
    return INITIAL if row.incremental else np.zeros(0, np.int64)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_exact_budget_unique_in_range_and_disjoint_from_the_pool(row):
    selection = step_of(row)(start_pool(row), BUDGET)
    picks = selection.indices
    assert picks.dtype == np.int64 and picks.ndim == 1 and len(picks) == BUDGET
    assert len(np.unique(picks)) == BUDGET and picks.min() >= 0 and picks.max() < N
    assert not np.intersect1d(picks, start_pool(row)).size
    assert 0 <= selection.filled <= BUDGET
    json.dumps({"filled": selection.filled, **selection.params})  # what the sidecar writes


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_same_seed_gives_the_same_bytes_and_another_seed_differs_only_where_random(row):
    first = step_of(row, seed=1)(start_pool(row), BUDGET).indices
    again = step_of(row, seed=1)(start_pool(row), BUDGET).indices
    assert first.tobytes() == again.tobytes()
    others = [step_of(row, seed=seed)(start_pool(row), BUDGET).indices for seed in (2, 3, 4)]
    changed = [not np.array_equal(first, other) for other in others]
    assert any(changed) if row.randomised else not any(changed)


@pytest.mark.parametrize("row", [row for row in ROWS if not row.incremental], ids=lambda row: row.name)
def test_absolute_budgets_ignore_the_pool_and_nest_where_promised(row):
    step = step_of(row)
    small, large = step(np.zeros(0, np.int64), 5).indices, step(np.zeros(0, np.int64), BUDGET).indices
    assert np.array_equal(step(INITIAL, BUDGET).indices, large)
    if row.nested:
        assert set(small) <= set(large)


@pytest.mark.parametrize("row", [row for row in ROWS if row.incremental], ids=lambda row: row.name)
def test_rounds_grow_the_pool_without_repeating_it(row):
    step = step_of(row)
    pool = INITIAL
    for increment in (4, 7):
        picks = step(pool, increment).indices
        assert len(picks) == increment and not np.intersect1d(picks, pool).size
        pool = np.concatenate([pool, picks])
    assert len(np.unique(pool)) == len(INITIAL) + 11


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_a_budget_beyond_the_selectable_rows_is_refused(row):
    available = N - len(start_pool(row))
    with pytest.raises(ValueError, match="budget"):
        step_of(row)(start_pool(row), available + 1)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_the_program_gives_a_one_line_error_for_a_budget_too_large(tmp_path, capsys, row):
    train, val = write_feats(tmp_path, n_train=60, n_val=20)
    common = ["--feats", train, "--dataset", "cifar10", "--name", row.name, "--indices", tmp_path / "idx",
              "--save", tmp_path / "out"]
    if row.needs_model:
        status, _, err = call_main(active_sampler.main, [*common, "--val-feats", val, "--cached", "--init-random", 10,
                                                         "--splits", 51], capsys)
    else:
        status, _, err = call_main(sampler.main, [*common, "--splits", 61], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--splits" in err, err
    assert not (tmp_path / "idx").exists()
