"""tools/import_labels.py: annotations in Label Studio's export format, a CSV or a class-folder tree come back as a
labels file; bad annotations are refused by file and row with nothing written."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

import active_sampler
import eval_knn
import eval_lincls
import finetune
import sampler
from lowbudget.labels import read_labels
from tests.helpers import call_main, write_photo_folder
from tools import export, import_labels

CLASSES = ("cat", "dog", "bird")


@pytest.fixture
def exported(tmp_path, capsys):
    """An unlabelled folder, a random selection of 8 of its images, and its export: (root, index file, out)."""
    root = tmp_path / "photos"
    paths = write_photo_folder(root)
    indices = tmp_path / "indices"
    status, _, err = call_main(sampler.main, [root, "--dataset", "folder", "--indices", indices, "--save",
                                              tmp_path / "save", "--splits", 8, "--name", "random"], capsys)
    assert status == 0, err
    index_file = indices / "random_folder_8.npy"
    status, _, err = call_main(export.main, [index_file, "--data", root, "--out", tmp_path / "export"], capsys)
    assert status == 0, err
    return root, index_file, tmp_path / "export", paths


def truth(index: int) -> str:
    """The simulated annotator's answer for an image."""
    return CLASSES[index % 3]


def label_studio_export(tasks_file, answer=truth, skip=()):
    """What Label Studio's JSON export holds for the tasks tools/export.py wrote, each annotated with `answer`."""
    tasks = json.loads(tasks_file.read_text())
    out = []
    for number, task in enumerate(tasks, 1):
        index = task["data"]["index"]
        annotations = [] if index in skip else [
            {"id": number, "was_cancelled": False, "result": [
                {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [answer(index)]}}]}]
        out.append({"id": number, "data": task["data"], "annotations": annotations, "predictions": []})
    return out


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


def import_args(root, index_file, annotations, *extra):
    return [index_file, annotations, "--data", root, *extra]


def read_back(root, index_file, path=None):
    from lowbudget import datasets
    images = datasets.load_images("folder", str(root), "train")
    return read_labels(str(path or str(index_file).removesuffix(".npy") + "_labels.json"), dataset="folder",
                       listing=datasets.listing_record(images, str(root)), num_images=len(images))


def test_label_studio_export_comes_back_as_labels_with_class_names(exported, tmp_path, capsys):
    root, index_file, out, paths = exported
    selection = np.load(index_file)
    skipped = int(selection[0])
    annotations = write_json(tmp_path / "ls.json", label_studio_export(out / "random_folder_8_label_studio.json",
                                                                     skip={skipped}))
    status, stdout, err = call_main(import_labels.main, import_args(root, index_file, annotations,
                                                                    "--classes", ",".join(CLASSES)), capsys)
    assert status == 0, err
    assert "7 labels imported" in stdout and "(1 rows without a label skipped)" in stdout
    labels = read_back(root, index_file)
    assert labels.classes == CLASSES
    assert labels.indices.tolist() == sorted(set(selection.tolist()) - {skipped})
    assert [labels.classes[c] for c in labels.labels] == [truth(i) for i in labels.indices]
    assert list(labels.paths) == [paths[i] for i in labels.indices]
    record = json.loads((tmp_path / "indices" / "random_folder_8_labels.json").read_text())
    assert record["images"][0] == {"index": int(labels.indices[0]), "path": paths[labels.indices[0]],
                                   "label": truth(int(labels.indices[0]))}


def test_the_exported_csv_with_its_label_column_filled_in(exported, tmp_path, capsys):
    root, index_file, out, _ = exported
    rows = list(csv.DictReader((out / "random_folder_8.csv").open()))
    for row in rows:
        row["label"] = truth(int(row["index"]))
    filled = tmp_path / "filled.csv"
    with filled.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["index", "path", "label", "priority", "score"])
        writer.writeheader()
        writer.writerows(rows)
    status, _, err = call_main(import_labels.main, import_args(root, index_file, filled), capsys)
    assert status == 0, err
    labels = read_back(root, index_file)
    assert labels.classes == tuple(sorted(set(CLASSES) & {truth(int(r["index"])) for r in rows}))
    assert labels.indices.tolist() == sorted(np.load(index_file).tolist())


def test_a_path_only_csv_and_a_class_folder_tree(exported, tmp_path, capsys):
    root, index_file, _, paths = exported
    selection = np.load(index_file).tolist()
    by_path = tmp_path / "by_path.csv"
    by_path.write_text("path,label\n" + "".join(f"{paths[i]},{truth(i)}\n" for i in selection))
    status, _, err = call_main(import_labels.main, import_args(root, index_file, by_path, "--out",
                                                               tmp_path / "a.json"), capsys)
    assert status == 0, err
    tree = tmp_path / "sorted"
    for k, i in enumerate(selection):  # dragged into its class folder: flat by file name, or keeping its path
        target = tree / truth(i) / (paths[i] if k % 2 else paths[i].rsplit("/", 1)[-1])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / paths[i], target)
    status, _, err = call_main(import_labels.main, import_args(root, index_file, tree, "--out", tmp_path / "b.json"),
                               capsys)
    assert status == 0, err
    first, second = read_back(root, index_file, tmp_path / "a.json"), read_back(root, index_file, tmp_path / "b.json")
    assert first.indices.tolist() == second.indices.tolist() == sorted(selection)
    assert first.labels.tolist() == second.labels.tolist()
    assert [first.classes[c] for c in first.labels] == [truth(i) for i in first.indices]


def test_merge_keeps_the_earlier_round_and_refuses_a_changed_label(exported, tmp_path, capsys):
    root, index_file, out, _ = exported
    selection = np.load(index_file).tolist()
    first_half = write_json(tmp_path / "r1.json", label_studio_export(out / "random_folder_8_label_studio.json",
                                                                      skip=set(selection[4:])))
    second_half = write_json(tmp_path / "r2.json", label_studio_export(out / "random_folder_8_label_studio.json",
                                                                       skip=set(selection[:4])))
    status, _, err = call_main(import_labels.main, import_args(root, index_file, first_half, "--classes",
                                                               ",".join(CLASSES), "--out", tmp_path / "r1_labels.json"),
                               capsys)
    assert status == 0, err
    status, _, err = call_main(import_labels.main, import_args(root, index_file, second_half, "--merge",
                                                               tmp_path / "r1_labels.json"), capsys)
    assert status == 0, err
    assert read_back(root, index_file).indices.tolist() == sorted(selection)
    flipped = write_json(tmp_path / "flip.json", label_studio_export(
        out / "random_folder_8_label_studio.json", answer=lambda i: CLASSES[(i + 1) % 3], skip=set(selection[1:])))
    status, _, err = call_main(import_labels.main, import_args(root, index_file, flipped, "--merge",
                                                               tmp_path / "r1_labels.json", "--out",
                                                               tmp_path / "never.json"), capsys)
    assert status == 2 and "in --merge" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never.json").exists()


def test_bad_annotations_are_one_line_naming_file_and_row_and_write_nothing(exported, tmp_path, capsys):
    root, index_file, out, paths = exported
    tasks = label_studio_export(out / "random_folder_8_label_studio.json")
    outside = int(np.setdiff1d(np.arange(len(paths)), np.load(index_file))[0])
    two_choices = json.loads(json.dumps(tasks))
    two_choices[2]["annotations"][0]["result"][0]["value"]["choices"] = ["cat", "dog"]
    not_listed = json.loads(json.dumps(tasks))
    not_listed[1]["data"] = {"image": "/data/local-files/?d=gone.png", "path": "gone.png"}
    not_selected = json.loads(json.dumps(tasks))
    not_selected[3]["data"] = {"index": outside, "path": paths[outside]}
    other_folder = json.loads(json.dumps(tasks))
    other_folder[0]["data"]["index"] = (other_folder[0]["data"]["index"] + 1) % len(paths)
    cases = {
        "label not a class": (tasks, ["--classes", "cat,dog"], "task", "is not a class name"),
        "two choices": (two_choices, [], "task 3", "two labels for one image"),
        "not in the listing": (not_listed, [], "task 2", "'gone.png' is not an image of the listing"),
        "not in the selection": (not_selected, [], "task 4", "is not in the selection"),
        "another folder's export": (other_folder, [], "task 1", "an export of another folder"),
    }
    for name, (content, extra, row, message) in cases.items():
        annotations = write_json(tmp_path / f"{name}.json", content)
        target = tmp_path / f"{name}_labels.json"
        status, _, err = call_main(import_labels.main, import_args(root, index_file, annotations, "--out", target,
                                                                   *extra), capsys)
        assert status == 2 and row in err and message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not target.exists(), name
    duplicate = tmp_path / "dup.csv"
    first = int(np.load(index_file)[0])
    duplicate.write_text(f"index,label\n{first},cat\n{first},dog\n")
    status, _, err = call_main(import_labels.main, import_args(root, index_file, duplicate), capsys)
    assert status == 2 and f"{duplicate}:3" in err and "a second label" in err


def test_a_folder_changed_since_the_selection_is_refused(exported, tmp_path, capsys):
    root, index_file, out, _ = exported
    annotations = write_json(tmp_path / "ls.json", label_studio_export(out / "random_folder_8_label_studio.json"))
    (root / "img_00.png").rename(root / "img_00_renamed.png")
    status, _, err = call_main(import_labels.main, import_args(root, index_file, annotations), capsys)
    assert status == 2 and "lists other image files" in err


def test_the_export_queues_by_score_and_leaves_out_labelled_images(exported, tmp_path, capsys):
    """A round's index file: its pool first, then the new picks with the strategy's scores in the sidecar."""
    root, index_file, out, paths = exported
    from lowbudget.indices import read_sidecar, write_indices
    pool = np.load(index_file)
    sidecar = read_sidecar(str(index_file), "INDEX_FILE")
    round_file = tmp_path / "indices" / "entropy_folder_8.npy"
    write_indices(str(round_file), pool, {**{k: sidecar[k] for k in ("dataset", "listing")}, "strategy": "entropy",
                                          "scores": [0.2, 0.9, 0.5]})
    first = write_json(tmp_path / "ls.json", label_studio_export(out / "random_folder_8_label_studio.json",
                                                                 skip=set(pool[5:].tolist())))
    status, _, err = call_main(import_labels.main, import_args(root, index_file, first, "--out",
                                                               tmp_path / "round1.json"), capsys)
    assert status == 0, err
    status, stdout, err = call_main(export.main, [round_file, "--data", root, "--out", tmp_path / "round2",
                                                  "--labels", tmp_path / "round1.json"], capsys)
    assert status == 0, err
    assert "5 images labelled in" in stdout and "3 to label" in stdout
    queue = [int(pool[i]) for i in (6, 7, 5)]  # by score, highest first
    rows = list(csv.DictReader((tmp_path / "round2" / "entropy_folder_8.csv").open()))
    assert [int(r["index"]) for r in rows] == queue
    assert [r["priority"] for r in rows] == ["1", "2", "3"] and [r["score"] for r in rows] == ["0.9", "0.5", "0.2"]
    tasks = json.loads((tmp_path / "round2" / "entropy_folder_8_label_studio.json").read_text())
    assert [(t["data"]["index"], t["data"]["priority"], t["data"]["score"]) for t in tasks] == \
        [(queue[0], 1, 0.9), (queue[1], 2, 0.5), (queue[2], 3, 0.2)]
    plain = list(csv.DictReader((out / "random_folder_8.csv").open()))  # no scores: selection order, no score
    assert [int(r["index"]) for r in plain] == pool.tolist() and {r["score"] for r in plain} == {""}


def write_class_images(root, per_class: int = 8, seed: int = 0) -> dict[str, str]:
    """An unlabelled folder of loose images of three kinds (a dominant colour each): {relative path: kind}."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    kinds = {}
    for k in range(3 * per_class):
        kind = CLASSES[k % 3]
        pixels = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
        pixels[..., k % 3] += 180
        name = f"shot_{k:02d}.png"
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
        kinds[name] = kind
    return kinds


def kmeans_on_class_images(tmp_path, capsys, budget: int):
    """write_class_images, embedded by a random ResNet-18 and a k-means pick of `budget`: (folder, kinds, the
    backbone and output flags, the index file)."""
    root = tmp_path / "photos"
    kinds = write_class_images(root)
    backbone = ["--dataset", "folder", "--arch", "resnet18", "--backbone", "random", "--image-size", 32, "-j", 0,
                "--save", tmp_path / "save", "--indices", tmp_path / "indices"]
    status, _, err = call_main(sampler.main, [root, *backbone, "--splits", budget, "--name", "kmeans"], capsys)
    assert status == 0, err
    return root, kinds, backbone, tmp_path / "indices" / f"kmeans_folder_{budget}.npy"


@pytest.mark.parametrize("name, mode", [("dropquery", ["--cached"]), ("entropy", ["--cached"]), ("dropquery", [])])
def test_the_labelling_loop_from_the_command_line(tmp_path, capsys, name, mode):
    """Select, export, annotate (Label Studio's export format), import, a model-in-the-loop round on the labels,
    export the round's new picks: no file edited by hand."""
    root, kinds, backbone, round1 = kmeans_on_class_images(tmp_path, capsys, 6)
    paths = sorted(kinds)
    status, _, err = call_main(export.main, [round1, "--data", root, "--out", tmp_path / "export1"], capsys)
    assert status == 0, err
    annotated = write_json(tmp_path / "project-1.json", label_studio_export(
        tmp_path / "export1" / "kmeans_folder_6_label_studio.json", answer=lambda i: kinds[paths[i]]))
    status, _, err = call_main(import_labels.main, [round1, annotated, "--data", root, "--classes", ",".join(CLASSES)],
                               capsys)
    assert status == 0, err
    labels_file = tmp_path / "indices" / "kmeans_folder_6_labels.json"
    status, out, err = call_main(active_sampler.main, [root, *backbone, *mode, "--load_cache", "--labels",
                                                       labels_file, "--resume-indices", round1, "--splits", 4,
                                                       "--name", name, "--epochs", 3], capsys)
    assert status == 0, err
    assert "=> no evaluation set: the head trained on 6 labelled images is not validated" in out
    round2 = tmp_path / "indices" / f"{name}_folder_10.npy"
    pool = np.load(round2)
    assert pool[:6].tolist() == np.load(round1).tolist() and len(set(pool.tolist())) == 10
    status, out, err = call_main(export.main, [round2, "--data", root, "--out", tmp_path / "export2",
                                               "--labels", labels_file], capsys)
    assert status == 0, err
    rows = list(csv.DictReader((tmp_path / "export2" / f"{name}_folder_10.csv").open()))
    assert sorted(int(r["index"]) for r in rows) == sorted(pool[6:].tolist())
    assert [r["path"] for r in rows] == [paths[int(r["index"])] for r in rows]
    if name == "entropy":  # the uncertainty scores order the queue
        scores = [float(r["score"]) for r in rows]
        assert scores == sorted(scores, reverse=True) and len(scores) == 4
    unlabelled_round = [round2, "--labels", labels_file]
    status, _, err = call_main(active_sampler.main, [root, *backbone, *mode, "--load_cache",
                                                     "--resume-indices", *unlabelled_round, "--splits", 2, "--name",
                                                     name, "--epochs", 3], capsys)
    first_new = int(pool[6])  # the round's new picks are not annotated yet
    assert status == 2 and f"--labels: image {first_new} ({paths[first_new]}) of the labelled pool has no label " \
        "(4 of 10 have none)" in err, err


def test_evaluators_and_finetune_train_on_the_labels_of_an_unlabelled_folder(tmp_path, capsys):
    """eval_knn and eval_lincls need an evaluation set, which an unlabelled folder has not: --val-feats gives it;
    finetune trains on the labelled pool and, with nothing to validate on, says so."""
    root, kinds, backbone, pool_file = kmeans_on_class_images(tmp_path, capsys, 9)
    paths = sorted(kinds)
    pool = np.load(pool_file)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("index,label\n" + "".join(f"{i},{kinds[paths[i]]}\n" for i in pool.tolist()))
    status, _, err = call_main(import_labels.main, [pool_file, csv_file, "--data", root], capsys)
    assert status == 0, err
    labels = ["--labels", tmp_path / "indices" / "kmeans_folder_9_labels.json", "--splits", 9, "--name", "kmeans"]
    status, _, err = call_main(eval_knn.main, [root, *backbone, "--load_cache", *labels], capsys)
    assert status == 2 and "--val-feats:" in err and "has no evaluation set" in err
    rng = np.random.default_rng(1)
    val = tmp_path / "val.npz"
    np.savez(val, feats=rng.standard_normal((12, 512)).astype(np.float32), labels=np.arange(12) % 3)
    for program in (eval_knn, eval_lincls):
        extra = ["--cached", "--epochs", 2] if program is eval_lincls else []
        status, out, err = call_main(program.main, [root, *backbone, "--load_cache", "--val-feats", val, *labels,
                                                    *extra], capsys)
        assert status == 0, err
        assert "current indices size: 9" in out or "with 9 indices" in out
    # 9 images in batches of 4: a last batch of one, which BatchNorm cannot train on, is left out
    status, out, err = call_main(finetune.main, [root, *backbone, *labels, "--epochs", 1, "-b", 4], capsys)
    assert status == 0, err
    assert "=> no evaluation set: the model trained on 9 labelled images is in" in out
    records = [json.loads(line) for line in (tmp_path / "save" / "results.jsonl").read_text().splitlines()]
    assert {r["script"] for r in records if r["metric"].endswith("top1")} == {"eval_knn", "eval_lincls"}
    assert not [r for r in records if r["script"] == "finetune"]
