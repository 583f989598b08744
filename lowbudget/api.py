"""The selection of sampler.py as one Python call, for notebooks and pipelines that hold their embeddings.

    from lowbudget import select

    picks = select(embeddings, 100)                                   # k-means: 100 dataset indices
    more = select(embeddings, 50, "typiclust", labelled=picks)         # 50 new ones on top of a pool
    select(embeddings, 100, "probcover", index_dir="indices", dataset="folder", labels=y)  # and the index file

The features go through what sampler.py does to a --feats file (rows L2-normalised in float32; NaN or
infinity refused) and the strategy through the strategy table, with the same checks and messages (a
UsageError, as the command line's one-line errors), so the picks equal sampler.py's for the same
features, strategy, options and seed.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

import lowbudget
from lowbudget.cli import UsageError
from lowbudget.feature_files import normalized_rows, read_feats_file
from lowbudget.fileio import bytes_digest
from lowbudget.indices import checked_indices, index_path, read_indices, write_indices
from lowbudget.runtime import faiss_uses_gpu, resolve_device, seed_everything
from lowbudget.strategy_table import Inputs, Strategy, check_budgets, lookup, select_pools


def _features(features: np.ndarray | str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(unit rows, labels the file holds or None, fingerprint) of an array or of a --feats file."""
    if isinstance(features, (str, os.PathLike)):
        read = read_feats_file(os.fspath(features), "folder", flag="features")
        return read.feats, read.labels, read.fingerprint
    rows = np.array(features, dtype=np.float32, order="C", copy=True)
    if rows.ndim != 2 or 0 in rows.shape:
        raise UsageError(f"features: expected a non-empty 2-D array (rows x feature columns), got shape {rows.shape}")
    rows = normalized_rows(rows, "float32", "features", "the array")
    return rows, None, bytes_digest(rows.tobytes(), 10)


def _options(strategy: Strategy, given: Mapping[str, Any]) -> dict[str, Any]:
    """The strategy's options at their defaults, updated with `given` (by dest, e.g. kmeans_restarts), each
    value checked by the same parser as its command-line flag."""
    known = {option.dest: option for option in strategy.options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise UsageError(f"{unknown[0]}: not an option of {strategy.name} (its options: {names})")
    options = strategy.defaults()
    for dest, value in given.items():
        option = known[dest]
        try:
            parsed = value if value is None else option.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise UsageError(f"{option.flag}: {err}") from None
        if option.choices is not None and parsed not in option.choices:
            raise UsageError(f"{option.flag}: {value!r} is not one of {', '.join(map(str, option.choices))}")
        options[dest] = parsed
    return options


def select(features: np.ndarray | str, budget: int, strategy: str = "kmeans", labelled: np.ndarray | str | None = None,
           labels: np.ndarray | None = None, seed: int = 0, *, device: str = "cpu", index_dir: str | None = None,
           dataset: str = "folder", **options: Any) -> np.ndarray:
    """`budget` dataset indices (rows of `features`) to label next, picked by a sampler.py strategy.

    features: N x D array, or a --feats file (.npy, .npz, .pth); labels: N class ids where the strategy needs
    them (uniform; ProbCover's automatic δ counts their classes), else taken from the file when it has them;
    labelled: the current pool (dataset indices, or an index file), which the incremental strategies add to
    and the absolute ones (uniform, random, kmeans) ignore, as sampler.py does. options: the strategy's
    options by name (kmeans_restarts=1, delta=0.3, bandwidth=None for auto …). Returns the new picks; with
    `index_dir` also writes `{index_dir}/{strategy}_{dataset}_{N}.npy` and its sidecar, N the pool's size
    after the picks, as sampler.py writes it."""
    row = lookup(strategy, model=False)
    feats, file_labels, fingerprint = _features(features)
    labels = file_labels if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels is not None and len(labels) != len(feats):
        raise UsageError(f"labels: {len(labels)} labels for {len(feats)} feature rows")
    if row.needs_labels and labels is None:
        raise UsageError(f"--name {strategy} needs labels, and the features have none")
    initial = np.zeros(0, np.int64)
    if isinstance(labelled, (str, os.PathLike)):
        initial = read_indices(os.fspath(labelled), len(feats), flag="labelled")
    elif labelled is not None:
        pool = np.asarray(labelled)
        initial = checked_indices(pool if len(pool) else pool.astype(np.int64), len(feats), "labelled")
    pool_start = initial if row.incremental else np.zeros(0, np.int64)
    check_budgets(row, [budget], len(feats), len(pool_start))
    settings = _options(row, options)
    seed_everything(seed)
    on = resolve_device(device)
    inputs = Inputs(feats if row.needs_features else np.zeros((len(feats), 0), np.float32), labels, seed=seed,
                    device=on, gpu=faiss_uses_gpu(on), log=lambda line: None)
    pool, params = next(select_pools(row, row.build(inputs, settings), [budget], pool_start))
    if index_dir is not None:
        write_indices(index_path(index_dir, strategy, dataset, len(pool)), pool, {
            "strategy": strategy, "dataset": dataset, "params": params, "seed": seed,
            "initial_pool": {"path": None, "size": len(pool_start)} if len(pool_start) else None,
            "features": fingerprint, "listing": None, "arch": None, "backbone": None,
            "version": lowbudget.__version__})
    return pool[len(pool_start):]
