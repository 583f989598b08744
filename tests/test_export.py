"""From a folder of unlabelled images to what an annotator works from: extraction with unreadable files
skipped, selection, and tools/export.py (CSV, Label Studio tasks, contact sheet)."""
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

import eval_knn
import sampler
import trainer_DP
from lowbudget import datasets, fileio
from tests.helpers import call_main, write_photo_folder
from tools import export


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    return root, write_photo_folder(root)


def sample(tmp_path, root, name, splits, capsys, *extra):
    return call_main(sampler.main, [root, "--dataset", "folder", "--arch", "resnet18", "--backbone", "random",
                                    "--image-size", "32", "--save", tmp_path / "out", "--indices", tmp_path / "idx",
                                    "--splits", splits, "--name", name, "-j", "0", "-b", "8", *extra], capsys)


def export_selection(tmp_path, root, index_file, capsys, *extra):
    return call_main(export.main, [index_file, "--data", root, "--out", tmp_path / "export", "--thumb", "24",
                                   "--columns", "4", *extra], capsys)


def read_csv(path):
    return list(csv.DictReader(path.read_text().splitlines()))


def sheet_size(n, panels, thumb=24, columns=4):
    """The contact sheet's documented geometry."""
    cols = min(columns, n)
    return panels * (cols * (thumb + 4) + 4), 20 + math.ceil(n / cols) * (thumb + 4) + 4


def test_folder_to_csv_label_studio_and_contact_sheet(tmp_path, photos, capsys):
    root, names = photos
    corrupt = names.index("broken.jpg")
    status, out, err = sample(tmp_path, root, "kmeans", "6", capsys)
    assert status == 0, err
    assert f"skipped unreadable image {str(root / 'broken.jpg')!r}" in out
    assert "1 unreadable image file(s) skipped" in out
    assert "labels unknown" in out and "% of all categories is seen" not in out
    pool = np.load(tmp_path / "idx" / "kmeans_folder_6.npy")
    assert len(pool) == 6 and corrupt not in pool
    assert not (tmp_path / "out" / "results.jsonl").exists()  # no coverage without labels

    status, out, err = export_selection(tmp_path, root, tmp_path / "idx" / "kmeans_folder_6.npy", capsys)
    assert status == 0, err
    rows = read_csv(tmp_path / "export" / "kmeans_folder_6.csv")
    assert [int(r["index"]) for r in rows] == pool.tolist()
    assert [r["path"] for r in rows] == [names[i] for i in pool]
    assert all((root / r["path"]).is_file() and r["label"] == "" for r in rows)

    tasks = json.loads((tmp_path / "export" / "kmeans_folder_6_label_studio.json").read_text())
    assert [t["meta"]["index"] for t in tasks] == pool.tolist()
    assert [t["data"]["image"] for t in tasks] == ["/data/local-files/?d=" + names[i] for i in pool]

    with Image.open(tmp_path / "export" / "kmeans_folder_6_contact_sheet.png") as sheet:
        assert sheet.size == sheet_size(6, panels=1) == (4 * 28 + 4, 20 + 2 * 28 + 4)


def test_compare_puts_random_beside_kmeans(tmp_path, photos, capsys):
    root, _ = photos
    assert sample(tmp_path, root, "kmeans", "5", capsys)[0] == 0
    assert sample(tmp_path, root, "random", "9", capsys)[0] == 0
    status, _, err = export_selection(tmp_path, root, tmp_path / "idx" / "kmeans_folder_5.npy", capsys,
                                      "--compare", tmp_path / "idx" / "random_folder_9.npy",
                                      "--url-prefix", "/data/local-files/?d=photos/")
    assert status == 0, err
    with Image.open(tmp_path / "export" / "kmeans_folder_5_contact_sheet.png") as sheet:
        assert sheet.size == sheet_size(9, panels=2)
    tasks = json.loads((tmp_path / "export" / "kmeans_folder_5_label_studio.json").read_text())
    assert len(tasks) == 5 and all(t["data"]["image"].startswith("/data/local-files/?d=photos/") for t in tasks)


def test_strict_stops_at_the_corrupt_file_and_writes_nothing(tmp_path, photos, capsys):
    root, _ = photos
    status, _, err = sample(tmp_path, root, "kmeans", "6", capsys, "--strict")
    assert status == 2 and "broken.jpg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "idx").exists() and not list((tmp_path / "out").glob("feats_*"))


def test_load_cache_reads_no_image_and_still_reports_the_skipped_file(tmp_path, photos, capsys, monkeypatch):
    root, names = photos
    assert sample(tmp_path, root, "coreset", "4", capsys)[0] == 0
    opened = []
    monkeypatch.setattr(datasets, "open_rgb", lambda path: opened.append(path))
    status, out, err = sample(tmp_path, root, "coreset", "4", capsys, "--load_cache")
    assert status == 0, err
    assert "from cache" in out and opened == []
    assert "broken.jpg' (found when the cache was written)" in out and "1 unreadable image file(s) skipped" in out
    assert names.index("broken.jpg") not in np.load(tmp_path / "idx" / "coreset_folder_4.npy")
    status, _, err = sample(tmp_path, root, "coreset", "4", capsys, "--load_cache", "--strict")
    assert status == 2 and "broken.jpg" in err


def test_every_readable_image_and_no_more_can_be_selected(tmp_path, photos, capsys):
    root, names = photos
    status, _, err = sample(tmp_path, root, "kmeans", str(len(names)), capsys)
    assert status == 2 and f"only {len(names) - 1} can be selected" in err
    assert sample(tmp_path, root, "kmeans", str(len(names) - 1), capsys, "--load_cache")[0] == 0
    pool = np.load(tmp_path / "idx" / f"kmeans_folder_{len(names) - 1}.npy")
    assert sorted(pool.tolist()) == [i for i, name in enumerate(names) if name != "broken.jpg"]


@pytest.mark.parametrize("name, extra", [("accu_kmeans", ()), ("typiclust", ("--min-cluster-size", "1")),
                                         ("probcover", ("--pseudo-classes", "3")), ("maxherding", ())])
def test_samplers_that_need_no_labels_run_and_skip_the_corrupt_file(tmp_path, photos, capsys, name, extra):
    root, names = photos
    status, _, err = sample(tmp_path, root, name, "3,3", capsys, *extra)
    assert status == 0, err
    pool = np.load(tmp_path / "idx" / f"{name}_folder_6.npy")
    assert len(np.unique(pool)) == 6 and names.index("broken.jpg") not in pool


def test_labels_are_required_by_uniform_and_the_evaluators(tmp_path, photos, capsys):
    root, _ = photos
    status, _, err = sample(tmp_path, root, "uniform", "4", capsys)
    assert status == 2 and "labels" in err and len(err.strip().splitlines()) == 1
    assert sample(tmp_path, root, "random", "4", capsys)[0] == 0
    status, out, err = call_main(eval_knn.main, [root, "--dataset", "folder", "--backbone", "random", "--image-size",
                                                 "32", "--save", tmp_path / "fresh", "--indices", tmp_path / "idx",
                                                 "--splits", "4", "--name", "random", "-j", "0"], capsys)
    assert status == 2 and "labels are required" in err and str(root) in err
    assert len(err.strip().splitlines()) == 1 and "feats =>" not in out  # stopped before any extraction


def test_training_scripts_honour_unlabeled_and_need_labels(tmp_path, folder_root, capsys):
    assert sample(tmp_path, folder_root, "random", "4", capsys)[0] == 0
    status, _, err = call_main(trainer_DP.main, [folder_root, "--dataset", "folder", "--arch", "resnet18",
                                                 "--unlabeled",
                                                 "--indices", tmp_path / "idx", "--save", tmp_path / "out",
                                                 "--splits", "4", "--name", "random", "-j", "0"], capsys)
    assert status == 2 and "labels are required" in err and len(err.strip().splitlines()) == 1


def test_unlabeled_flag_reads_nested_folders_that_are_not_classes(tmp_path, capsys):
    root = tmp_path / "shoot"
    write_photo_folder(root / "train")
    status, out, _ = sample(tmp_path, root, "random", "3", capsys)  # train/ has sub-folders: read as classes
    assert status == 0 and "% of all categories is seen" in out
    status, out, _ = sample(tmp_path, root, "random", "3", capsys, "--unlabeled")
    assert status == 0 and "30 image files, labels unknown" in out
    status, _, err = export_selection(tmp_path, root, tmp_path / "idx" / "random_folder_3.npy", capsys, "--unlabeled")
    assert status == 0, err
    rows = read_csv(tmp_path / "export" / "random_folder_3.csv")
    assert all(r["path"].startswith("train/") and (root / r["path"]).is_file() for r in rows)


def test_labelled_folder_exports_class_names(tmp_path, folder_root, capsys):
    assert sample(tmp_path, folder_root, "uniform", "3", capsys)[0] == 0
    status, _, err = export_selection(tmp_path, folder_root, tmp_path / "idx" / "uniform_folder_3.npy", capsys)
    assert status == 0, err
    rows = read_csv(tmp_path / "export" / "uniform_folder_3.csv")
    assert sorted(r["label"] for r in rows) == ["ant", "bee", "cat"]
    assert all(r["path"].startswith(f"train/{r['label']}/") for r in rows)


def test_array_dataset_gets_csv_and_contact_sheet(tmp_path, cifar10_root, capsys):
    np.save(tmp_path / "pick.npy", np.array([5, 0, 7], dtype=np.int64))
    status, _, err = call_main(export.main, [tmp_path / "pick.npy", "--data", cifar10_root, "--dataset", "cifar10",
                                             "--out", tmp_path / "export", "--thumb", "24"], capsys)
    assert status == 0, err
    rows = read_csv(tmp_path / "export" / "pick.csv")
    assert [(r["index"], r["path"]) for r in rows] == [("5", ""), ("0", ""), ("7", "")]
    assert not (tmp_path / "export" / "pick_label_studio.json").exists()
    with Image.open(tmp_path / "export" / "pick_contact_sheet.png") as sheet:
        assert sheet.size == sheet_size(3, panels=1, columns=10)


def test_export_errors_name_the_input_and_write_nothing(tmp_path, photos, capsys):
    root, names = photos
    np.save(tmp_path / "bad.npy", np.array([0, len(names)], dtype=np.int64))
    status, _, err = export_selection(tmp_path, root, tmp_path / "bad.npy", capsys)
    assert status == 2 and "bad.npy" in err and "outside" in err
    status, _, err = call_main(export.main, [tmp_path / "bad.npy", "--data", root, "--out", root / "export"], capsys)
    assert status == 2 and "--out" in err
    np.save(tmp_path / "ok.npy", np.array([1, 2], dtype=np.int64))
    status, _, err = export_selection(tmp_path, root, tmp_path / "ok.npy", capsys, "--compare", tmp_path / "none.npy")
    assert status == 2 and "--compare" in err
    status, _, err = export_selection(tmp_path, root, tmp_path / "ok.npy", capsys, "--dataset", "cifar10")
    assert status == 2
    assert not (tmp_path / "export").exists() and not (root / "export").exists()


def test_export_runs_as_a_script_and_crosses_out_an_unreadable_pick(tmp_path, photos, script_run):
    root, names = photos
    np.save(tmp_path / "pick.npy", np.array([names.index("broken.jpg"), 3], dtype=np.int64))
    status, out, err = script_run("tools/export.py", tmp_path / "pick.npy", "--data", root, "--out",
                                  tmp_path / "export")
    assert status == 0, err
    assert "cannot read image" in out and "broken.jpg" in out
    with Image.open(tmp_path / "export" / "pick_contact_sheet.png") as sheet:
        assert sheet.size == sheet_size(2, panels=1, thumb=96, columns=10)


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path, capsys):
    root = tmp_path / "photos"
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM(1).png", "plain.png"]
    root.mkdir()
    for name in names:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / name)
    listed = sorted(names)
    np.save(tmp_path / "pick.npy", np.arange(len(names), dtype=np.int64))
    status, out, err = export_selection(tmp_path, root, tmp_path / "pick.npy", capsys)
    assert status == 0, err
    assert "records no image listing" in out  # no sidecar: said, and exported unchecked
    rows = read_csv(tmp_path / "export" / "pick.csv")
    assert [r["path"] for r in rows] == [name if name == "plain.png" else "'" + name for name in listed]
    tasks = json.loads((tmp_path / "export" / "pick_label_studio.json").read_text())
    assert [t["data"]["path"] for t in tasks] == listed  # the import file keeps the real names


def test_sidecar_records_the_listing_and_unrelated_files_do_not_matter(tmp_path, photos, capsys):
    root, names = photos
    assert sample(tmp_path, root, "random", "4", capsys)[0] == 0
    listing = json.loads((tmp_path / "idx" / "random_folder_4.json").read_text())["listing"]
    assert listing["count"] == len(names) == datasets.listing_record(
        datasets.load_images("folder", str(root), "train"), str(root))["count"]
    (root / "more_notes.txt").write_text("not an image\n")
    status, out, err = export_selection(tmp_path, root, tmp_path / "idx" / "random_folder_4.npy", capsys)
    assert status == 0 and "records no image listing" not in out, err


def test_a_full_disk_writes_no_export_file(tmp_path, photos, capsys, monkeypatch):
    root, _ = photos
    np.save(tmp_path / "pick.npy", np.array([1, 2], dtype=np.int64))
    real = fileio._write_temporary

    def full_at_the_sheet(path, write):
        if path.endswith(".png"):
            raise OSError(28, "No space left on device")
        return real(path, write)
    monkeypatch.setattr(fileio, "_write_temporary", full_at_the_sheet)
    status, _, err = export_selection(tmp_path, root, tmp_path / "pick.npy", capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--out: cannot write into" in err and "No space left on device" in err
    assert list((tmp_path / "export").iterdir()) == []


@pytest.mark.parametrize("out", ["link-to-data", "link-to-data/export"])
def test_an_out_that_leads_into_data_through_a_symbolic_link_is_refused(tmp_path, photos, capsys, out):
    root, names = photos
    status, _, err = sample(tmp_path, root, "random", "6", capsys)
    assert status == 0, err
    (tmp_path / "link-to-data").symlink_to(root, target_is_directory=True)
    status, out_text, err = export_selection(tmp_path, root, tmp_path / "idx" / "random_folder_6.npy", capsys,
                                             "--out", tmp_path / out)
    assert (status, out_text) == (2, "")
    assert f"error: --out: {str(tmp_path / out)!r} is inside --data" in err
    assert not list(root.rglob("random_folder_6*"))  # nothing joined the images
