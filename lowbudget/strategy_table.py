"""The strategy table: every query strategy by name, what it needs, its options, and how it is built.

Every strategy has one call shape. `STRATEGIES[name].build(inputs, options)` does once what does not
depend on the labelled pool (ProbCover's ball graph, MaxHerding's kernel) and returns a `Step`;
`step(labelled, budget)` returns a `Selection` of `budget` new row indices that are not in `labelled`
(for the absolute strategies, the whole pool of that budget). sampler.py, active_sampler.py, the demo,
the report and the contract test all read this table: a new strategy is its function in strategies.py,
one row here, its options and a README line.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lowbudget import cli, strategies
from lowbudget.cli import UsageError
from lowbudget.strategies import Selection

Step = Callable[[np.ndarray, int], Selection]
Options = Mapping[str, Any]
# A model trained on the labelled pool, as the model-in-the-loop strategies see it: (labelled rows,
# candidate rows, score of a batch of logits) -> one score per candidate, in candidate order. The program
# streams the logits batch by batch, so memory stays O(candidates), never candidates x classes.
ModelScores = Callable[[np.ndarray, np.ndarray, Callable[[torch.Tensor], torch.Tensor]], np.ndarray]


def _no_model(labelled: np.ndarray, candidates: np.ndarray, score: Callable[[torch.Tensor], torch.Tensor]
              ) -> np.ndarray:
    raise TypeError("this strategy needs a model trained on the pool: give Inputs(model_scores=...)")


@dataclass(frozen=True)
class Inputs:
    """What a strategy may read: the selectable rows' features and labels, and the run's settings."""

    feats: np.ndarray  # N x D, L2-normalised; N x 0 for the strategies that need no features
    labels: np.ndarray | None  # N labels, or None when the images are unlabelled
    seed: int = 0
    device: torch.device = torch.device("cpu")
    gpu: bool = False  # faiss on GPU
    verbose: bool = False  # faiss' own progress lines
    log: Callable[[str], None] = print
    model_scores: ModelScores = _no_model

    @property
    def num_rows(self) -> int:
        return len(self.feats)


@dataclass(frozen=True)
class Option:
    """One command-line option of a strategy; its value reaches `build` under `dest`."""

    flag: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Strategy:
    """One row of the table."""

    name: str
    build: Callable[[Inputs, Options], Step]
    incremental: bool  # --splits are increments on top of the pool (else absolute budgets)
    needs_features: bool = True
    needs_labels: bool = False  # the selectable rows must have labels
    needs_model: bool = False  # reads Inputs.model_scores: runs in active_sampler.py
    randomised: bool = False  # the seed changes the selection (beyond ties)
    nested: bool = False  # the pool of a larger absolute budget contains the smaller one's
    options: tuple[Option, ...] = field(default=())
    label: str = ""  # its name in tables and plots (the paper's, e.g. Max-Entropy); the name itself when empty

    @property
    def title(self) -> str:
        return self.label or self.name

    def defaults(self) -> dict[str, Any]:
        """Its options at their defaults."""
        return {option.dest: option.default for option in self.options}


# ---------------------------------------------------------------- options

MAX_CLUSTERS = Option("--max-clusters", 500, "typiclust: at most this many k-means clusters (|pool| + increment "
                      "otherwise)", cli.int_at_least(1))
MIN_CLUSTER_SIZE = Option("--min-cluster-size", 5, "typiclust: clusters of this many points or fewer are used only "
                          "when the larger ones have no candidates left", cli.int_at_least(0))
KNN = Option("--knn", 20, "typiclust: neighbours (inside the cluster) that typicality averages over",
             cli.int_at_least(1))
TYPICALITY = Option("--typicality", "squared", "typiclust: average squared L2 distances (the authors' code) or "
                    "plain distances (the paper's formula)", choices=("squared", "euclidean"))
DELTA = Option("--delta", None, "probcover: ball radius (L2 on unit features); auto (default) takes the largest "
               "radius whose balls are pure for a --purity share of points under k-means pseudo-labels",
               cli.auto_or_positive, metavar="auto|D")
PURITY = Option("--purity", 0.95, "probcover: purity target of --delta auto", cli.share)
PSEUDO_CLASSES = Option("--pseudo-classes", None, "probcover: clusters of the pseudo-labels of --delta auto "
                        "(default: the number of classes in the labels; required without labels)",
                        cli.int_at_least(2), metavar="K")
BANDWIDTH = Option("--bandwidth", None, "maxherding: sigma of the Gaussian kernel exp(-|x-y|^2 / 2 sigma^2); auto "
                   "(default) is the median mean distance of a point to its --kernel-knn neighbours",
                   cli.auto_or_positive, metavar="auto|S")
KERNEL_KNN = Option("--kernel-knn", 100, "maxherding: the kernel is truncated to each point's k nearest "
                    "neighbours (itself included) and is 0 beyond them, so memory is O(N k), not N x N",
                    cli.int_at_least(1))


# ---------------------------------------------------------------- builders

def _build_uniform(inputs: Inputs, options: Options) -> Step:
    labels = inputs.labels
    if labels is None:
        raise ValueError("uniform needs labels")
    return lambda labelled, budget: Selection(strategies.uniform_pools(labels, [budget], inputs.seed)[budget])


def _build_random(inputs: Inputs, options: Options) -> Step:
    return lambda labelled, budget: Selection(strategies.random_pools(inputs.num_rows, [budget], inputs.seed)[budget])


def _build_kmeans(inputs: Inputs, options: Options) -> Step:
    return lambda labelled, budget: strategies.kmeans_select(inputs.feats, budget, seed=inputs.seed, gpu=inputs.gpu,
                                                             verbose=inputs.verbose)


def _build_accu_kmeans(inputs: Inputs, options: Options) -> Step:
    return lambda labelled, budget: strategies.accu_kmeans_select(inputs.feats, labelled, budget, seed=inputs.seed,
                                                                  gpu=inputs.gpu, verbose=inputs.verbose)


def _build_coreset(inputs: Inputs, options: Options) -> Step:
    return lambda labelled, budget: strategies.coreset_select(inputs.feats, labelled, budget, device=inputs.device,
                                                              gpu_faiss=inputs.gpu, progress=inputs.verbose)


def _build_typiclust(inputs: Inputs, options: Options) -> Step:
    settings = {"knn": options["knn"], "max_clusters": options["max_clusters"],
                "min_cluster_size": options["min_cluster_size"]}
    squared = options["typicality"] == "squared"

    def step(labelled: np.ndarray, budget: int) -> Selection:
        selection = strategies.typiclust_select(inputs.feats, labelled, budget, squared=squared, seed=inputs.seed,
                                                gpu=inputs.gpu, verbose=inputs.verbose, **settings)
        return Selection(selection.indices, selection.filled,
                         {**settings, "squared": squared, "typicality": options["typicality"]})
    return step


def _pseudo_class_count(inputs: Inputs, options: Options) -> int | None:
    """--pseudo-classes, or the number of classes in the labels (None when neither is known)."""
    if options["pseudo_classes"] is not None:
        return int(options["pseudo_classes"])
    return None if inputs.labels is None else len(np.unique(inputs.labels))


def _build_probcover(inputs: Inputs, options: Options) -> Step:
    """Choose δ (given, or the purity heuristic), build the ball graph once, report the coverage of each round."""
    delta, purity = options["delta"], options["purity"]
    classes = _pseudo_class_count(inputs, options)
    if delta is None and classes is None:
        raise UsageError("--pseudo-classes: --delta auto needs the class count, and the features have no labels")
    if delta is None and classes is not None and classes > inputs.num_rows:
        raise UsageError(f"--pseudo-classes: {classes} clusters for {inputs.num_rows} points")
    try:
        graph, delta = strategies.probcover_graph(inputs.feats, delta, purity, classes, seed=inputs.seed,
                                                  gpu=inputs.gpu)
    except ValueError as err:
        raise UsageError(f"--delta: {err}") from None
    if options["delta"] is None:
        inputs.log(f"=> probcover: delta {delta:.4f}, the largest radius with {purity:.0%} pure balls "
                   f"under {classes} k-means pseudo-labels")
    inputs.log(f"=> probcover: {len(graph.indices)} edges, {len(graph.indices) / inputs.num_rows:.1f} points per "
               "ball on average")
    params = {"delta": delta, "purity": purity if options["delta"] is None else None}

    def step(labelled: np.ndarray, budget: int) -> Selection:
        selection, covered = strategies.probcover_select(graph, labelled, budget, seed=inputs.seed)
        inputs.log(f"=> probcover: {covered:.2%} of the points lie within delta of the pool")
        return Selection(selection.indices, selection.filled, {**params, "ball_coverage": covered})
    return step


def _build_maxherding(inputs: Inputs, options: Options) -> Step:
    knn = options["kernel_knn"]
    kernel = strategies.herding_kernel(strategies.nearest_neighbours(inputs.feats, knn, inputs.gpu),
                                       options["bandwidth"])
    inputs.log(f"=> maxherding: Gaussian kernel bandwidth {kernel.bandwidth:.4f}, truncated to {knn} neighbours")
    params = {"bandwidth": kernel.bandwidth, "kernel_knn": knn}

    def step(labelled: np.ndarray, budget: int) -> Selection:
        selection = strategies.maxherding_select(kernel, labelled, budget, seed=inputs.seed)
        return Selection(selection.indices, selection.filled, params)
    return step


def _uncertainty_builder(name: str) -> Callable[[Inputs, Options], Step]:
    """Steps that score every unlabelled row with the model trained on the pool and take the most uncertain."""
    def build(inputs: Inputs, options: Options) -> Step:
        def step(labelled: np.ndarray, budget: int) -> Selection:
            candidates = np.setdiff1d(np.arange(inputs.num_rows), labelled)
            inputs.log(f"Current unlabeled indices is {len(candidates)}.")
            scores = inputs.model_scores(labelled, candidates, lambda logits: strategies.uncertainty(logits, name))
            return Selection(strategies.most_uncertain(scores, candidates, budget))
        return step
    return build


# ---------------------------------------------------------------- the table

STRATEGIES: dict[str, Strategy] = {row.name: row for row in (
    Strategy("uniform", _build_uniform, incremental=False, needs_features=False, needs_labels=True,
             randomised=True, nested=True, label="Uniform"),
    Strategy("random", _build_random, incremental=False, needs_features=False, randomised=True, nested=True,
             label="Random"),
    Strategy("kmeans", _build_kmeans, incremental=False, randomised=True, label="K-means"),
    Strategy("accu_kmeans", _build_accu_kmeans, incremental=True, randomised=True, label="Multi k-means"),
    Strategy("coreset", _build_coreset, incremental=True, label="Core-set"),
    Strategy("typiclust", _build_typiclust, incremental=True, randomised=True,
             options=(MAX_CLUSTERS, MIN_CLUSTER_SIZE, KNN, TYPICALITY), label="TypiClust"),
    Strategy("probcover", _build_probcover, incremental=True, randomised=True,  # δ auto: seeded pseudo-labels
             options=(DELTA, PURITY, PSEUDO_CLASSES), label="ProbCover"),
    Strategy("maxherding", _build_maxherding, incremental=True, options=(BANDWIDTH, KERNEL_KNN), label="MaxHerding"),
    *(Strategy(name, _uncertainty_builder(name), incremental=True, needs_features=False, needs_labels=True,
               needs_model=True, label=label)
      for name, label in (("entropy", "Max-Entropy"), ("margin", "Margin"), ("least_confidence", "Least confidence"))),
)}


def names(*, model: bool) -> tuple[str, ...]:
    """The strategies of active_sampler.py (`model`, a model trained on the pool) or of sampler.py, in table order."""
    return tuple(name for name, row in STRATEGIES.items() if row.needs_model == model)


def lookup(name: str, *, model: bool) -> Strategy:
    """The row of --name, or a one-line error listing the names this program runs."""
    row = STRATEGIES.get(name)
    if row is None or row.needs_model != model:
        program = "active_sampler.py" if row is not None and row.needs_model else "sampler.py"
        hint = "" if row is None else f" here ({name} runs in {program})"
        raise UsageError(f"--name: unknown strategy {name!r}{hint}; choose one of {', '.join(names(model=model))}")
    return row


def add_options(parser: argparse.ArgumentParser, rows: Sequence[Strategy]) -> None:
    """Every option of `rows`, once, in one group titled with the strategies that have options."""
    with_options = [row for row in rows if row.options]
    if not with_options:
        return
    group = parser.add_argument_group(", ".join(row.name for row in with_options))
    added: set[str] = set()
    for option in (option for row in with_options for option in row.options):
        if option.flag not in added:
            added.add(option.flag)
            group.add_argument(option.flag, default=option.default, type=option.type, choices=option.choices,
                               metavar=option.metavar, help=option.help)
