"""One DCoM round against one ProbCover round on the same pool, timed in the same run.

Run from the repository root:

    .venv/bin/python benchmarks/bench_dcom.py [--feats FILE.npz] [--rows 60000] [--dim 1280] [--quick]

Features: `--feats` (an .npz of `feats` and `labels`, e.g. the demo's cached Fashion-MNIST features), or
unit rows of a seeded Gaussian mixture (benchmarks/bench_strategies.py's) whose component modulo 10 is the
class. Both rounds run as the programs run them, through the strategy table, from the same labelled pool
(--labelled rows of a seeded random draw) adding --budget rows:

- ProbCover: the k-NN pass, k-means pseudo-labels and δ by the purity heuristic, the ball graph, the greedy
  (what sampler.py does for a run of rounds, here for one).
- DCoM: the k-NN pass, the model's margins and predictions of every row (a nearest-class-mean head of the
  labelled pool: logits = rows x class means, one matrix product, as cheap as active_sampler.py's linear
  head), the radii, the graph, the greedy.

Prints each round's seconds and DCoM / ProbCover. Target: at most 2 at 60,000 x 1,280.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_strategies import synthetic_mixture  # this folder: the script's own

from lowbudget.strategy_table import STRATEGIES, HeadScore, Inputs, ModelScores


def features(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows, labels): --feats, or the seeded mixture with 10 classes."""
    if args.feats:
        with np.load(args.feats) as data:
            feats, labels = data["feats"][:args.rows], data["labels"][:args.rows]
        return np.ascontiguousarray(feats / np.linalg.norm(feats, axis=1, keepdims=True), dtype=np.float32), labels
    feats, components = synthetic_mixture(args.rows, args.seed, args.dim)
    return feats, components % 10


def class_mean_head(feats: np.ndarray, labels: np.ndarray, labelled: np.ndarray) -> ModelScores:
    """The model hook of a head whose logits are a row's products with the labelled pool's class means."""
    classes = int(labels.max()) + 1
    means = np.zeros((classes, feats.shape[1]), np.float32)
    np.add.at(means, labels[labelled], feats[labelled])
    weights = torch.from_numpy(means.T)

    def scores(rows: np.ndarray, score: HeadScore, *, trained_on: np.ndarray | None = None) -> np.ndarray:
        parts = [score(lambda x: 10 * x @ weights, torch.from_numpy(feats[rows[start:start + 8192]]),
                       rows[start:start + 8192]) for start in range(0, len(rows), 8192)]
        return torch.cat(parts).numpy()
    return scores


def round_seconds(name: str, inputs: Inputs, labelled: np.ndarray, budget: int, options: dict) -> float:
    """Seconds of building the strategy and taking one round."""
    start = time.perf_counter()
    row = STRATEGIES[name]
    selection = row.build(inputs, {**row.defaults(), **options})(labelled, budget)
    seconds = time.perf_counter() - start
    shown = {key: round(value, 4) if isinstance(value, float) else value for key, value in selection.params.items()}
    print(f"{name:>9}: {seconds:7.1f} s  {shown}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feats", default="", help=".npz of feats and labels (default: a synthetic mixture)")
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=1280, help="width of the synthetic rows")
    parser.add_argument("--labelled", type=int, default=500, help="size of the labelled pool")
    parser.add_argument("--budget", type=int, default=500, help="rows the round adds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20,000 x 512, a pool of 100 adding 100")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dim, args.labelled, args.budget = 20_000, 512, 100, 100
    feats, labels = features(args)
    labelled = np.random.default_rng(args.seed).choice(len(feats), args.labelled, replace=False)
    print(f"{len(feats):,} x {feats.shape[1]} rows, {len(np.unique(labels))} classes, {torch.get_num_threads()} "
          f"threads; a pool of {args.labelled} adding {args.budget}")
    quiet = {"log": lambda line: None, "seed": args.seed}
    probcover = round_seconds("probcover", Inputs(feats, labels, **quiet), labelled, args.budget,
                              {"pseudo_classes": 10})
    dcom = round_seconds("dcom", Inputs(feats, labels, model_scores=class_mean_head(feats, labels, labelled),
                                        **quiet), labelled, args.budget, {})
    print(f"DCoM / ProbCover: {dcom / probcover:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
