"""The lazy herding greedy against a plain one that recomputes every gain in float64 before each pick: the
same picks wherever the runner-up lies beyond float32 rounding of the best, with and without UHerding's
weights, from an empty and a labelled pool, over continued take() calls, and up to the same fill."""
import dataclasses

import numpy as np
import pytest
import torch

from lowbudget import herding as H
from tests.helpers import herding_margins, unit_rows

EMPTY = np.zeros(0, dtype=np.int64)


def plain_greedy(x, bandwidth, labeled, budget, weights=None):
    """Every gain recomputed in float64 from the dense kernel before each pick; a gain within the largest
    one's slack (the float32 rounding lowbudget.herding allows) ties, lowest index first; stops (the fill)
    once the largest gain is within its slack of zero. The picks, then how many the fill takes."""
    x64 = x.astype(np.float64)
    kernel = np.exp(-np.maximum(2 - 2 * x64 @ x64.T, 0) / bandwidth ** 2)  # unit rows
    u = np.ones(len(x)) if weights is None else np.array(weights, dtype=np.float64)
    u[labeled] = 0
    slack = H.herding_kernel(x, bandwidth).rounding * (kernel @ u)
    cover = kernel[:, labeled].max(1) if len(labeled) else np.zeros(len(x))
    eligible = np.ones(len(x), dtype=bool)
    eligible[labeled] = False
    picks = []
    while len(picks) < budget:
        gains = np.where(eligible, (np.maximum(kernel - cover, 0) * u).sum(1), -np.inf)
        top = int(np.argmax(gains))
        if gains[top] <= slack[top]:
            break
        picks.append(int(np.flatnonzero(gains >= gains[top] - slack[top])[0]))
        eligible[picks[-1]] = False
        cover = np.maximum(cover, kernel[picks[-1]])
    return picks, budget - len(picks)


def clusters(n, dim, centres, seed):
    """n unit rows around `centres` random unit centres (cosine about 0.9 to their centre)."""
    rng = np.random.default_rng(seed)
    x = unit_rows(centres, dim, seed)[rng.integers(0, centres, n)] + 0.3 / np.sqrt(dim) * unit_rows(n, dim, seed + 1)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def weights_for(n, seed):
    """UHerding-like weights: a margin uncertainty in (0, 1] per row."""
    return 1 - np.random.default_rng(seed).uniform(0, 1, n)


def counting(kernel):
    """`kernel` recording how many kernel rows each call computes (in `counts`)."""
    class Counting(H.HerdingKernel):
        def rows(self, rows):
            self.counts.append(len(rows))
            return super().rows(rows)

    counted = Counting(kernel.feats, kernel.sq_norms, kernel.bandwidth, kernel.block_elements)
    object.__setattr__(counted, "counts", [])
    return counted


@pytest.mark.parametrize("weighted", [False, True], ids=["maxherding", "uherding"])
@pytest.mark.parametrize("labeled", [[], [3, 50, 120, 121]], ids=["empty", "labelled"])
@pytest.mark.parametrize("block_rows", [1, 7, 300])
def test_lazy_greedy_picks_what_recomputing_every_gain_picks(weighted, labeled, block_rows):
    x = unit_rows(300, 8, seed=1)
    labeled = np.asarray(labeled, dtype=np.int64)
    weights = weights_for(300, 5) if weighted else None
    expected, filled = plain_greedy(x, 0.5, labeled, 30, weights)
    assert filled == 0 and (herding_margins(x, 0.5, labeled, expected, weights) > 3).all()  # no near-tie
    kernel = dataclasses.replace(H.herding_kernel(x, 0.5), block_elements=block_rows * 300)
    selection = H.HerdingGreedy(kernel, labeled, weights).take(30)
    assert selection.indices.tolist() == expected and selection.filled == 0


@pytest.mark.parametrize("weighted", [False, True], ids=["maxherding", "uherding"])
def test_continued_takes_pick_what_one_take_picks(weighted):
    x = unit_rows(250, 8, seed=1)
    labeled = np.array([0, 1], dtype=np.int64)
    weights = weights_for(250, 7) if weighted else None
    expected, _ = plain_greedy(x, 0.6, labeled, 35, weights)
    assert (herding_margins(x, 0.6, labeled, expected, weights) > 3).all()
    greedy = H.HerdingGreedy(H.herding_kernel(x, 0.6), labeled, weights)
    picks = [greedy.take(budget).indices for budget in (5, 10, 20)]
    assert np.concatenate(picks).tolist() == expected
    assert greedy.continues(0.6, np.concatenate([labeled, *picks]))


@pytest.mark.parametrize("weighted", [False, True], ids=["maxherding", "uherding"])
def test_lazy_greedy_fills_where_recomputing_every_gain_stops(weighted):
    """Four copies of 30 points: the copies of a point tie (lowest index first); once a copy of each is
    chosen, no gain exceeds its rounding and the seeded fill takes the rest of the budget."""
    unique = clusters(30, 8, 6, seed=2)
    x = np.repeat(unique, 4, axis=0)[np.random.default_rng(0).permutation(120)]
    weights = np.repeat(weights_for(30, 3), 4) if weighted else None  # a copy weighs what its point does
    expected, filled = plain_greedy(x, 0.5, EMPTY, 50, weights)
    assert len(expected) == 30 and filled == 20
    selection = H.HerdingGreedy(H.herding_kernel(x, 0.5), EMPTY, weights).take(50, seed=1)
    assert selection.indices[:30].tolist() == expected and selection.filled == 20
    assert len(set(selection.indices.tolist())) == 50


def test_picks_read_fewer_kernel_rows_than_updating_every_gain():
    """Stale gains stay upper bounds: after the first pass a pick recomputes the few gains that could still be
    the largest, where updating every gain reads the kernel row of each row the pick covers better."""
    x = unit_rows(1000, 32, seed=3)
    kernel = counting(H.herding_kernel(x, 0.5))
    greedy = H.HerdingGreedy(kernel, np.arange(5), weights_for(1000, 1))
    assert sum(kernel.counts) == 1000  # the labelled rows' cover, then the candidates' gains
    picks = greedy.take(30).indices
    table = H.herding_kernel(x, 0.5).rows(torch.arange(1000))
    cover, updates = table[:5].amax(0), 0
    for pick in picks:
        updates += 1 + int((table[pick] > cover).sum())  # the pick's row, then every row it covers better
        cover = torch.maximum(cover, table[pick])
    assert sum(kernel.counts) - 1000 < updates / 2


def test_gains_are_computed_in_float64_from_float32_kernel_blocks():
    x = clusters(200, 8, 5, seed=1)
    kernel = H.herding_kernel(x, 0.5)
    state = H.HerdingState(kernel, torch.from_numpy(weights_for(200, 2)), np.array([7]), progress=False)
    k = kernel.rows(torch.arange(200))
    before = k.clone()
    gains, masses = state.block_gains(k)
    assert gains.dtype == masses.dtype == torch.float64 and torch.equal(k, before)  # the block is left as it is
    k64, cover, u = before.double(), state.cover.double(), state.weights
    assert torch.allclose(masses, k64 @ u, rtol=1e-12, atol=0)
    assert torch.allclose(gains, (k64 - cover).clamp(min=0) @ u, rtol=1e-12, atol=0)
