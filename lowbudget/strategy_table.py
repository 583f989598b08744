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
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

import strategies
from lowbudget import cli, cover, datasets, faiss_ops, ivf, vaal
from lowbudget.cli import UsageError
from lowbudget.selection import Selection, most_uncertain

Step = Callable[[np.ndarray, int], Selection]
Options = Mapping[str, Any]
# The model-in-the-loop strategies see the linear head that the program trains on the labelled pool
# through one hook, Inputs.model_scores. `Head`: the head's inputs for a batch of rows (cached features, or
# the backbone's embedding of the images) -> logits. `HeadScore`: what a strategy computes from the head on
# a batch: (head, its inputs for the batch, the batch's row indices) -> one value, or one row of values,
# per row.
Head = Callable[[torch.Tensor], torch.Tensor]
HeadScore = Callable[[Head, torch.Tensor, np.ndarray], torch.Tensor]


class ModelScores(Protocol):
    """model_scores(rows, score) -> `score` of every row of `rows`, in their order, under the head trained on
    the labelled pool; with `trained_on`, under a fresh head trained the same way on those rows alone (e.g.
    UHerding's calibration probe). The program streams the rows batch by batch, so memory stays
    O(rows x values), never rows x features, and under torchrun each process scores a block of them."""

    def __call__(self, rows: np.ndarray, score: HeadScore, *, trained_on: np.ndarray | None = None
                 ) -> np.ndarray: ...


def no_model(rows: np.ndarray, score: HeadScore, *, trained_on: np.ndarray | None = None) -> np.ndarray:
    """The hook where no model exists (no labelled pool, or a strategy that needs none)."""
    raise TypeError("this strategy needs a model trained on the pool: give Inputs(model_scores=...)")


@dataclass(frozen=True)
class Inputs:
    """What a strategy may read: the selectable rows' features and labels, and the run's settings."""

    feats: np.ndarray  # N x D, L2-normalised (model strategies too); N x 0 for the strategies that need no features
    labels: np.ndarray | None  # N labels, or None when the images are unlabelled
    seed: int = 0
    device: torch.device = torch.device("cpu")
    gpu: bool = False  # faiss on GPU
    verbose: bool = False  # faiss' own progress lines
    log: Callable[[str], None] = print
    model_scores: ModelScores = no_model
    pixels: datasets.Images | None = None  # the training images, for strategies that learn from them (VAAL)
    dataset: str = ""  # the dataset `pixels` belong to (how to decode them)
    workers: int = 0  # data-loading processes for `pixels`
    checkpoints: str = ""  # folder for a strategy's resumable state within a round; '' for none

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
    choices: tuple[Any, ...] | None = None
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
    needs_model: bool = False  # a round strategy with a model trained on the pool: runs in active_sampler.py
    # learns from the training images themselves (Inputs.pixels) when the program reads images, from the
    # features with --cached: the program then embeds nothing for it
    learns_from_images: bool = False
    randomised: bool = False  # the seed changes the selection (beyond ties)
    cold_start: bool = False  # a round strategy whose first round needs no labels: it may start from an empty pool
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

KMEANS_RESTARTS = Option("--kmeans-restarts", 5, "kmeans, accu_kmeans, auto: faiss k-means runs, the best kept (the "
                         "original's 5; each costs a whole k-means)", cli.int_at_least(1), metavar="N")
KMEANS_SAMPLE = Option("--kmeans-sample", None, "kmeans, accu_kmeans, auto: train k-means on a seeded sample of N "
                       "points per cluster (faiss' subsampling), then assign every point exactly (default: all points, "
                       "the original's)", cli.int_at_least(1), metavar="N")
KMEANS_OPTIONS = (KMEANS_RESTARTS, KMEANS_SAMPLE)
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
NEIGHBOURS = Option("--neighbours", "auto", "probcover, dcom: nearest-neighbour search: exact (faiss flat, N^2 "
                    "distances), ivf (approximate: an inverted file of 2 sqrt(N) cells searched by matrix products, "
                    f"its probed cells raised until recall@64 on 1,000 sampled rows reaches {ivf.TARGET_RECALL}; "
                    f"printed and recorded), or auto: ivf from {ivf.APPROXIMATE_FROM_ROWS:,} rows on a CPU, exact "
                    "below and on a GPU",
                    choices=ivf.NEIGHBOUR_SEARCHES)
BANDWIDTH_HELP = ("h of the Gaussian kernel exp(-|x-y|^2 / h^2) on the L2-normalised features, exact over all "
                  "points (up to --herding-sample); auto: the smallest distance between two labelled points "
                  f"({strategies.HERDING_BANDWIDTH} while fewer than two)")
BANDWIDTH = Option("--bandwidth", strategies.HERDING_BANDWIDTH,
                   f"maxherding: {BANDWIDTH_HELP} (default {strategies.HERDING_BANDWIDTH})",
                   cli.auto_or_positive, metavar="auto|H")
UHERDING_BANDWIDTH = Option("--bandwidth", None, f"uherding: {BANDWIDTH_HELP} (default auto)", cli.auto_or_positive,
                            metavar="auto|H")
HERDING_SAMPLE = Option("--herding-sample", 60_000, "maxherding, uherding: from a pool of more rows, cover and pick "
                        "from a seeded random sample of N rows (and the labelled pool), drawn once per run: the "
                        "kernel objective is a mean over the rows, which the sample estimates; 0: every row",
                        cli.int_at_least(0), metavar="N")
CALIBRATION_HOLDOUT = Option("--calibration-holdout", 0.3, "uherding: share of the labelled pool held out to choose "
                             "the softmax temperature (1.0 to 20 by 0.1, smallest 15-bin ECE) of a head trained on "
                             "the rest", cli.share)
DROPOUT = Option("--dropout", 0.75, "dropquery, auto: probability of dropping each input feature of the head",
                 cli.Number(0, 0.99, low_open=True))
DROPOUT_PASSES = Option("--dropout-passes", 3, "dropquery, auto: predictions with dropout compared with the one "
                        "without; candidates differ in more than half of them", cli.int_at_least(1))
AUTO_READY = Option("--auto-ready", strategies.AUTO_READY, "auto: labels per class (the pool's size over the "
                    "classes it holds) from which a round uses the model trained on the pool (dropquery); before, "
                    "label-free k-means with pool + increment clusters, the uncovered ones sending a point each",
                    cli.Number(0, 1e6, low_open=True), metavar="N")
VAAL_EPOCHS = Option("--vaal-epochs", vaal.VaalSettings.epochs, "vaal: epochs of VAE and discriminator training "
                     "per round (an epoch: every training image once, labelled and unlabelled)", cli.EPOCHS)
VAAL_IMAGE_SIZE = Option("--vaal-image-size", vaal.VaalSettings.image_size, "vaal: the image VAE's input size "
                         "(images are resized to it; not used with --cached)", cli.int_at_least(32, 64),
                         choices=vaal.IMAGE_SIZES)
VAAL_WIDTH = Option("--vaal-width", vaal.VaalSettings.conv_width, "vaal: channels of the image VAE's first "
                    "convolution, doubling to 8x (the authors' 128; 16-32 make it affordable on a CPU)",
                    cli.int_at_least(1, 1024))


# ---------------------------------------------------------------- builders

def _build_uniform(inputs: Inputs, options: Options) -> Step:
    labels = inputs.labels
    if labels is None:
        raise ValueError("uniform needs labels")
    return lambda labelled, budget: Selection(strategies.uniform_pools(labels, [budget], inputs.seed)[budget])


def _build_random(inputs: Inputs, options: Options) -> Step:
    return lambda labelled, budget: Selection(strategies.random_pools(inputs.num_rows, [budget], inputs.seed)[budget])


def _kmeans_settings(options: Options) -> faiss_ops.KmeansSettings:
    """The k-means baseline's faiss settings: the original's iterations, --kmeans-restarts and --kmeans-sample."""
    return faiss_ops.KmeansSettings(nredo=options["kmeans_restarts"], sample=options["kmeans_sample"])


def _build_kmeans(inputs: Inputs, options: Options) -> Step:
    return lambda labelled, budget: strategies.kmeans_select(inputs.feats, budget, seed=inputs.seed, gpu=inputs.gpu,
                                                             verbose=inputs.verbose, settings=_kmeans_settings(options))


def _build_accu_kmeans(inputs: Inputs, options: Options) -> Step:
    return lambda labelled, budget: strategies.accu_kmeans_select(inputs.feats, labelled, budget, seed=inputs.seed,
                                                                  gpu=inputs.gpu, verbose=inputs.verbose,
                                                                  settings=_kmeans_settings(options))


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
                         {**selection.params, **settings, "squared": squared, "typicality": options["typicality"]})
    return step


def _pseudo_class_count(inputs: Inputs, options: Options) -> int | None:
    """--pseudo-classes, or the number of classes in the labels (None when neither is known)."""
    if options["pseudo_classes"] is not None:
        return int(options["pseudo_classes"])
    return None if inputs.labels is None else len(np.unique(inputs.labels))


def _neighbour_index(inputs: Inputs, options: Options, name: str) -> ivf.CellIndex | None:
    """--neighbours' inverted file (None: exact search), its recall logged."""
    approximate = cover.probcover_index(inputs.feats, options["neighbours"], seed=inputs.seed, gpu=inputs.gpu)
    if approximate is not None:
        inputs.log(f"=> {name}: approximate neighbours (IVF, {approximate.cells} cells, "
                   f"{approximate.probes} probed): recall@{approximate.k} {approximate.recall:.3f} on "
                   f"{min(ivf.RECALL_QUERIES, inputs.num_rows)} sampled rows (target {ivf.TARGET_RECALL})")
    return approximate


def _neighbour_params(approximate: ivf.CellIndex | None) -> dict[str, Any]:
    """What the sidecar records of --neighbours."""
    return {"neighbours": "exact" if approximate is None else "ivf",
            "recall": None if approximate is None else approximate.recall}


def _build_probcover(inputs: Inputs, options: Options) -> Step:
    """Choose δ (given, or the purity heuristic), build the ball graph once, report the coverage of each round."""
    delta, purity = options["delta"], options["purity"]
    classes = _pseudo_class_count(inputs, options)
    if delta is None and classes is None:
        raise UsageError("--pseudo-classes: --delta auto needs the class count, and the features have no labels")
    if delta is None and classes is not None and classes > inputs.num_rows:
        raise UsageError(f"--pseudo-classes: {classes} clusters for {inputs.num_rows} points")
    approximate = _neighbour_index(inputs, options, "probcover")
    try:
        graph, delta = cover.probcover_graph(inputs.feats, delta, purity, classes, seed=inputs.seed,
                                                  gpu=inputs.gpu, approximate=approximate)
    except ValueError as err:
        raise UsageError(f"--delta: {err}") from None
    if options["delta"] is None:
        inputs.log(f"=> probcover: delta {delta:.4f}, the largest radius with {purity:.0%} pure balls "
                   f"under {classes} k-means pseudo-labels")
    inputs.log(f"=> probcover: {len(graph.indices)} edges, {len(graph.indices) / inputs.num_rows:.1f} points per "
               "ball on average")
    params = {"delta": delta, "purity": purity if options["delta"] is None else None, **_neighbour_params(approximate)}

    def step(labelled: np.ndarray, budget: int) -> Selection:
        selection, covered = strategies.probcover_select(graph, labelled, budget, seed=inputs.seed)
        inputs.log(f"=> probcover: {covered:.2%} of the points lie within delta of the pool")
        return Selection(selection.indices, selection.filled, {**params, "ball_coverage": covered})
    return step


def _log_sample(inputs: Inputs, sample: np.ndarray | None, name: str) -> None:
    """Say when --herding-sample's rows stand for the pool."""
    if sample is not None:
        inputs.log(f"=> {name}: a seeded sample of {len(sample):,} of the {inputs.num_rows:,} rows, and the "
                   "labelled pool (--herding-sample)")


def _herding_round(name: str, inputs: Inputs, select: Callable[[], Selection]) -> Selection:
    """One MaxHerding or UHerding round: --herding-sample's refusal as a UsageError, the kernel's h logged."""
    try:
        selection = select()
    except strategies.SampleTooSmall as err:
        raise UsageError(f"--herding-sample: {err}; raise it, or 0 for every image") from None
    inputs.log(f"=> {name}: Gaussian kernel exp(-|x-y|^2 / h^2), h = {selection.params['bandwidth']:.4f}")
    return selection


def _build_maxherding(inputs: Inputs, options: Options) -> Step:
    rounds = strategies.MaxHerding(inputs.feats, bandwidth=options["bandwidth"], sample=options["herding_sample"],
                                   seed=inputs.seed, device=inputs.device, gpu=inputs.gpu, progress=inputs.verbose)
    _log_sample(inputs, rounds.sample, "maxherding")
    return lambda labelled, budget: _herding_round("maxherding", inputs, lambda: rounds(labelled, budget))


def _uncertainty_builder(name: str) -> Callable[[Inputs, Options], Step]:
    """Steps that score every unlabelled row with the model trained on the pool and take the most uncertain."""
    def build(inputs: Inputs, options: Options) -> Step:
        def step(labelled: np.ndarray, budget: int) -> Selection:
            candidates = np.setdiff1d(np.arange(inputs.num_rows), labelled)
            inputs.log(f"Current unlabeled indices is {len(candidates)}.")
            scores = inputs.model_scores(candidates, lambda head, x, rows: strategies.uncertainty(head(x), name))
            return most_uncertain(scores, candidates, budget)
        return step
    return build


def _unlabelled(inputs: Inputs, labelled: np.ndarray) -> np.ndarray:
    candidates = np.setdiff1d(np.arange(inputs.num_rows), labelled)
    inputs.log(f"Current unlabeled indices is {len(candidates)}.")
    return candidates


def _build_uherding(inputs: Inputs, options: Options) -> Step:
    labels = inputs.labels
    if labels is None:
        raise ValueError("uherding needs labels")
    sample = strategies.herding_sample(inputs.num_rows, options["herding_sample"], inputs.seed)
    _log_sample(inputs, sample, "uherding")

    def margins(rows: np.ndarray, temperature: float) -> np.ndarray:
        return inputs.model_scores(rows, lambda head, x, batch: strategies.margin_uncertainty(head(x), temperature))

    def probe_logits(train: np.ndarray, held: np.ndarray) -> np.ndarray:
        inputs.log(f"=> uherding: calibrating on {len(held)} held-out labelled images of a head trained on the "
                   f"other {len(train)}")
        return inputs.model_scores(held, lambda head, x, batch: head(x), trained_on=train)

    def step(labelled: np.ndarray, budget: int) -> Selection:
        _unlabelled(inputs, labelled)
        selection = _herding_round("uherding", inputs, lambda: strategies.uherding_select(
            inputs.feats, labelled, budget, labels=labels, margins=margins, probe_logits=probe_logits,
            bandwidth=options["bandwidth"], holdout=options["calibration_holdout"], sample=sample, seed=inputs.seed,
            device=inputs.device, gpu=inputs.gpu, progress=inputs.verbose))
        inputs.log(f"=> uherding: temperature {selection.params['temperature']:.1f}, the smallest ECE")
        return selection
    return step


def _build_dropquery(inputs: Inputs, options: Options) -> Step:
    """Candidates whose prediction flips under input dropout, then k-means over them."""
    dropout, passes = options["dropout"], options["dropout_passes"]
    flips = functools.partial(strategies.dropout_disagreements, p=dropout, passes=passes, seed=inputs.seed)

    def step(labelled: np.ndarray, budget: int) -> Selection:
        candidates = _unlabelled(inputs, labelled)
        selection = strategies.dropquery_select(inputs.feats, candidates, inputs.model_scores(candidates, flips),
                                                budget, passes=passes, seed=inputs.seed, gpu=inputs.gpu,
                                                verbose=inputs.verbose)
        inputs.log(f"=> dropquery: {selection.params['candidates']} candidates, predictions changed in more than "
                   f"{selection.params['threshold']} of {passes} dropout passes")
        return Selection(selection.indices, selection.filled,
                         {**selection.params, "dropout": dropout, "dropout_passes": passes})
    return step


def _margins_and_predictions(logits: torch.Tensor) -> torch.Tensor:
    """Per row: the margin uncertainty 1 - (p1 - p2) of softmax(logits), and the predicted class."""
    return torch.stack([strategies.margin_uncertainty(logits), logits.argmax(1).double()], 1)


def _build_dcom(inputs: Inputs, options: Options) -> Step:
    """The k-NN pass once; each round, the model's margins and predictions of every row, then DCoM."""
    labels = inputs.labels
    if labels is None:
        raise ValueError("dcom needs labels")
    approximate = _neighbour_index(inputs, options, "dcom")
    near = cover.nearest_neighbours(inputs.feats, cover.PROBCOVER_KNN, inputs.gpu, approximate)

    def step(labelled: np.ndarray, budget: int) -> Selection:
        _unlabelled(inputs, labelled)
        view = inputs.model_scores(np.arange(inputs.num_rows), lambda head, x, rows: _margins_and_predictions(head(x)))
        selection = strategies.dcom_select(inputs.feats, labelled, budget, labels=labels,
                                           predictions=view[:, 1].astype(np.int64), margins=view[:, 0],
                                           neighbours=near, seed=inputs.seed, device=inputs.device)
        p = selection.params
        inputs.log(f"=> dcom: the labelled balls (purity {p['purity_threshold']:.3f}, radii {p['radius_min']:.3f} to "
                   f"{p['radius_max']:.3f}) cover {p['coverage']:.2%}: competence {p['competence']:.3f}; "
                   f"density on balls of radius {p['delta']:.4f} ({p['edges']} edges)")
        return Selection(selection.indices, selection.filled, {**p, **_neighbour_params(approximate)})
    return step


def _build_auto(inputs: Inputs, options: Options) -> Step:
    """k-means rounds that see the pool until it holds --auto-ready labels per class, then DropQuery's."""
    labels = inputs.labels
    if labels is None:
        raise ValueError("auto needs labels")
    settings = _kmeans_settings(options)

    def kmeans(labelled: np.ndarray, budget: int) -> Selection:
        return strategies.uncovered_kmeans_select(inputs.feats, labelled, budget, seed=inputs.seed, gpu=inputs.gpu,
                                                  verbose=inputs.verbose, settings=settings)
    steps = {"kmeans": kmeans, "dropquery": _build_dropquery(inputs, options)}

    def step(labelled: np.ndarray, budget: int) -> Selection:
        method, reason = strategies.auto_method(labels[labelled], options["auto_ready"])
        inputs.log(f"=> auto: {method}, {reason}")
        selection = steps[method](labelled, budget)
        return Selection(selection.indices, selection.filled, {**selection.params, "method": method, "reason": reason},
                         selection.scores)
    return step


def _build_vaal(inputs: Inputs, options: Options) -> Step:
    """A β-VAE and a discriminator trained each round on the images (or, without them, the features); the
    picks are the unlabelled rows the discriminator rates least likely to be labelled."""
    settings = vaal.VaalSettings(epochs=options["vaal_epochs"], image_size=options["vaal_image_size"],
                                 conv_width=options["vaal_width"])
    source: vaal.Source = (vaal.FeatureSource(inputs.feats) if inputs.pixels is None
                           else vaal.ImageSource(inputs.pixels, inputs.dataset, workers=inputs.workers))

    def step(labelled: np.ndarray, budget: int) -> Selection:
        checkpoint = (os.path.join(inputs.checkpoints, f"vaal_{source.mode}_{len(labelled)}_seed{inputs.seed}.pth")
                      if inputs.checkpoints else None)
        selection = vaal.vaal_select(source, labelled, budget, settings, seed=inputs.seed, device=inputs.device,
                                     checkpoint=checkpoint, progress=inputs.verbose, log=inputs.log)
        return Selection(selection.indices, selection.filled, {"vaal": selection.params})  # apart from the head's
    return step


# ---------------------------------------------------------------- the table

STRATEGIES: dict[str, Strategy] = {row.name: row for row in (
    Strategy("uniform", _build_uniform, incremental=False, needs_features=False, needs_labels=True,
             randomised=True, nested=True, label="Uniform"),
    Strategy("random", _build_random, incremental=False, needs_features=False, randomised=True, nested=True,
             label="Random"),
    Strategy("kmeans", _build_kmeans, incremental=False, randomised=True, options=KMEANS_OPTIONS, label="K-means"),
    Strategy("accu_kmeans", _build_accu_kmeans, incremental=True, randomised=True, options=KMEANS_OPTIONS,
             label="Multi k-means"),
    Strategy("coreset", _build_coreset, incremental=True, label="Core-set"),
    Strategy("typiclust", _build_typiclust, incremental=True, randomised=True,
             options=(MAX_CLUSTERS, MIN_CLUSTER_SIZE, KNN, TYPICALITY), label="TypiClust"),
    Strategy("probcover", _build_probcover, incremental=True, randomised=True,  # δ auto: seeded pseudo-labels
             options=(DELTA, PURITY, PSEUDO_CLASSES, NEIGHBOURS), label="ProbCover"),
    Strategy("maxherding", _build_maxherding, incremental=True, options=(BANDWIDTH, HERDING_SAMPLE),
             label="MaxHerding"),  # not randomised up to --herding-sample rows; above, its sample is seeded
    *(Strategy(name, _uncertainty_builder(name), incremental=True, needs_features=False, needs_labels=True,
               needs_model=True, label=label)
      for name, label in (("entropy", "Max-Entropy"), ("margin", "Margin"), ("least_confidence", "Least confidence"))),
    Strategy("vaal", _build_vaal, incremental=True, needs_model=True, learns_from_images=True, randomised=True,
             options=(VAAL_EPOCHS, VAAL_IMAGE_SIZE, VAAL_WIDTH), label="VAAL"),
    Strategy("uherding", _build_uherding, incremental=True, needs_labels=True, needs_model=True, randomised=True,
             options=(UHERDING_BANDWIDTH, CALIBRATION_HOLDOUT, HERDING_SAMPLE), label="UHerding"),
    Strategy("dropquery", _build_dropquery, incremental=True, needs_labels=True, needs_model=True, randomised=True,
             options=(DROPOUT, DROPOUT_PASSES), label="DropQuery"),
    Strategy("dcom", _build_dcom, incremental=True, needs_labels=True, needs_model=True, options=(NEIGHBOURS,),
             label="DCoM"),
    Strategy("auto", _build_auto, incremental=True, needs_labels=True, needs_model=True, randomised=True,
             cold_start=True, options=(*KMEANS_OPTIONS, DROPOUT, DROPOUT_PASSES, AUTO_READY), label="Auto"),
)}


def check_budgets(strategy: Strategy, splits: Sequence[int], pool_size: int, initial: int) -> None:
    """Every budget must be reachable: absolute budgets from the pool, increments from what is left."""
    if strategy.incremental:
        needed, available = sum(splits), pool_size - initial
    else:
        needed, available = max(splits), pool_size
    if needed > available:
        raise UsageError(f"--splits: {strategy.name} needs {needed} images but only {available} can be selected")


def select_pools(strategy: Strategy, step: Step, splits: Sequence[int], initial: np.ndarray
                 ) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (pool rows, sidecar parameters) for every split, in order: absolute budgets make a pool each,
    increments add to the pool so far."""
    pool = initial
    for split in splits:
        selection = step(pool, split)
        pool = np.concatenate([pool, selection.indices]) if strategy.incremental else selection.indices
        size_key = "increment" if strategy.incremental else "budget"
        yield pool, {size_key: split, "filled": selection.filled, **selection.params}


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
