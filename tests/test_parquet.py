"""--feats TABLE.parquet: embeddings people already have, with an id or path column that the export names."""
from __future__ import annotations

import csv

import numpy as np
import pytest

import sampler
from lowbudget import parquet, select
from tests.helpers import call_main, unit_rows
from tools import export

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_table(path, feats, *, labels=None, ids=None, id_column="path"):
    columns = {"embedding": pa.array([row.tolist() for row in feats], type=pa.list_(pa.float32()))}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    if ids is not None:
        columns[id_column] = pa.array(ids)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def table(tmp_path):
    feats = unit_rows(120, 12, seed=5)
    ids = [f"s3://bucket/shots/{i:04d}.jpg" for i in range(120)]
    return write_table(tmp_path / "emb.parquet", feats, labels=np.arange(120) % 4, ids=ids), feats, ids


def test_sampler_reads_the_table_as_it_reads_an_array_and_the_export_names_the_rows(tmp_path, capsys, table):
    path, feats, ids = table
    status, _, err = call_main(sampler.main, ["--feats", path, "--dataset", "folder", "--indices", tmp_path / "idx",
                                              "--save", tmp_path / "save", "--name", "kmeans", "--splits", 15], capsys)
    assert status == 0, err
    picks = np.load(tmp_path / "idx" / "kmeans_folder_15.npy")
    assert picks.tolist() == select(feats, 15).tolist() == select(path, 15).tolist()
    status, _, err = call_main(export.main, [tmp_path / "idx" / "kmeans_folder_15.npy", "--feats", path, "--out",
                                             tmp_path / "out"], capsys)
    assert status == 0, err
    rows = list(csv.DictReader((tmp_path / "out" / "kmeans_folder_15.csv").open()))
    assert [int(r["index"]) for r in rows] == picks.tolist()
    assert [r["path"] for r in rows] == [ids[i] for i in picks] and {r["label"] for r in rows} <= set("0123")
    other = write_table(tmp_path / "other.parquet", feats[::-1], ids=ids)
    status, _, err = call_main(export.main, [tmp_path / "idx" / "kmeans_folder_15.npy", "--feats", other, "--out",
                                             tmp_path / "out2"], capsys)
    assert status == 2 and "is not the table" in err and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: pq.write_table(pa.table({"vector": [[1.0, 2.0]]}), p), "has no 'embedding' column"),
    (lambda p: pq.write_table(pa.table({"embedding": [[1.0, 2.0], [1.0]]}), p), "row 1: every embedding"),
    (lambda p: pq.write_table(pa.table({"embedding": pa.array([[1.0, 2.0], None])}), p), "row 1 has no embedding"),
    (lambda p: pq.write_table(pa.table({"embedding": [["a", "b"]]}), p), "must hold lists of floats"),
    (lambda p: pq.write_table(pa.table({"embedding": [[1.0, 2.0]], "label": [0.5]}), p), "'label' must hold"),
    (lambda p: p.write_bytes(b"PAR1 not really"), "cannot read"),
])
def test_a_bad_table_is_one_line_naming_the_file(tmp_path, capsys, make, message):
    path = tmp_path / "bad.parquet"
    make(path)
    status, _, err = call_main(sampler.main, ["--feats", path, "--dataset", "folder", "--indices", tmp_path / "idx",
                                              "--save", tmp_path / "save", "--name", "random", "--splits", 1], capsys)
    assert status == 2 and message in err and "--feats" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "idx").exists()


def test_without_pyarrow_the_error_says_how_to_get_it(tmp_path, capsys, table, monkeypatch):
    path, _, _ = table

    def no_pyarrow(name):
        raise ImportError(name)
    monkeypatch.setattr(parquet.importlib, "import_module", no_pyarrow)
    status, _, err = call_main(sampler.main, ["--feats", path, "--dataset", "folder", "--indices", tmp_path / "idx",
                                              "--save", tmp_path / "save", "--name", "random", "--splits", 1], capsys)
    assert status == 2 and "needs pyarrow (pip install pyarrow" in err
