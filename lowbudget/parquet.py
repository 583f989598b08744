"""Embeddings people already have as a Parquet table (read with pyarrow, the `parquet` extra):

    embedding   list of floats, the same length in every row (required)
    label       integer class id (optional)
    id | path   what names each row (optional): tools/export.py writes it beside the row's index

A row's dataset index is its position in the table, as for every --feats file.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from lowbudget.cli import UsageError

ID_COLUMNS = ("id", "path")  # the first present names the rows


class ParquetFeatures(NamedTuple):
    feats: np.ndarray  # N x D float32
    labels: np.ndarray | None  # N int64
    ids: list[str] | None  # N row names
    id_column: str | None


def pyarrow_parquet(flag: str) -> ModuleType:
    """pyarrow.parquet, or a one-line hint naming `flag` when pyarrow is not installed."""
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise UsageError(f"{flag}: reading .parquet needs pyarrow (pip install pyarrow, or the project's "
                         "'parquet' extra)") from None


def _embedding_matrix(column: Any, path: str, flag: str) -> np.ndarray:
    """The `embedding` list column (a pyarrow ChunkedArray) as an N x D float32 array; a UsageError naming the
    first bad row."""
    import pyarrow as pa
    array = column.combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)) or not pa.types.is_floating(array.type.value_type):
        raise UsageError(f"{flag}: {path!r} column 'embedding' must hold lists of floats, got {array.type}")
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise UsageError(f"{flag}: {path!r} row {row} has no embedding")
    lengths = array.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) == 0 or lengths[0] == 0 or (lengths != lengths[0]).any():
        bad = 0 if len(lengths) == 0 or lengths[0] == 0 else int(np.flatnonzero(lengths != lengths[0])[0])
        raise UsageError(f"{flag}: {path!r} row {bad}: every embedding must have the same, non-zero length")
    values = array.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(len(lengths), int(lengths[0]))


def read_parquet_features(path: str, flag: str) -> ParquetFeatures:
    """The table's embeddings, labels and row names, checked."""
    parquet = pyarrow_parquet(flag)
    try:
        table = parquet.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for a damaged or foreign file
        raise UsageError(f"{flag}: cannot read {path!r} as Parquet ({err})".splitlines()[0]) from None
    if "embedding" not in table.column_names:
        raise UsageError(f"{flag}: {path!r} has no 'embedding' column (columns: {', '.join(table.column_names)})")
    feats = _embedding_matrix(table.column("embedding"), path, flag)
    labels = None
    if "label" in table.column_names:
        values = table.column("label").to_numpy()
        if not np.issubdtype(values.dtype, np.integer):
            raise UsageError(f"{flag}: {path!r} column 'label' must hold integers, got {values.dtype}")
        labels = values.astype(np.int64)
    id_column = next((name for name in ID_COLUMNS if name in table.column_names), None)
    ids = None if id_column is None else [str(value) for value in table.column(id_column).to_pylist()]
    return ParquetFeatures(feats, labels, ids, id_column)
