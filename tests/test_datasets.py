"""Dataset readers: index = position as in the original code, labels without decoding, batch transforms."""
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lowbudget import datasets
from lowbudget.cli import UsageError
from tests.helpers import write_cifar, write_idx, write_image_tree, write_photo_folder


def test_cifar10_reader_keeps_torchvision_order(cifar10_root):
    images = datasets.load_images("cifar10", str(cifar10_root), "train")
    batches = [pickle.loads((cifar10_root / "cifar-10-batches-py" / f"data_batch_{i}").read_bytes())
               for i in range(1, 6)]
    expected = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert np.array_equal(images.images, expected)
    assert images.labels.tolist() == sum((b[b"labels"] for b in batches), [])
    assert len(datasets.load_images("cifar10", str(cifar10_root), "val")) == 50


def test_cifar100_fine_labels(tmp_path):
    root = write_cifar(tmp_path, "cifar100", n_train=30, n_test=10)
    batch = pickle.loads((root / "cifar-100-python" / "train").read_bytes())
    images = datasets.load_images("cifar100", str(root), "train")
    assert images.labels.tolist() == batch[b"fine_labels"]


def test_missing_cifar_names_the_folder(tmp_path):
    with pytest.raises(UsageError, match="data: no cifar10 batches .*--download"):
        datasets.load_images("cifar10", str(tmp_path), "train")


def test_array_batches_equal_torchvision_pil_transform(cifar10_root):
    images = datasets.load_images("cifar10", str(cifar10_root), "train")
    info = datasets.DATASET_INFO["cifar10"]
    batch = next(datasets.inference_batches(images, "cifar10", batch_size=8))
    reference = T.Compose([T.ToTensor(), T.Normalize(info.mean, info.std)])
    for i in range(8):
        pil = Image.fromarray(images.images[i].transpose(1, 2, 0))
        # a few float32 roundings of values below 1, then divided by a std of about 1/4
        assert torch.allclose(batch[i], reference(pil), rtol=0, atol=4 * torch.finfo(torch.float32).eps / min(info.std))


def test_fashion_mnist_idx_gz_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    write_idx(raw / "train-images-idx3-ubyte.gz", pixels, 2051)
    write_idx(raw / "train-labels-idx1-ubyte.gz", labels, 2049)
    images = datasets.load_images("fashion_mnist", str(tmp_path), "train")
    assert images.labels.tolist() == labels.tolist()
    assert np.array_equal(images.images[:, 0], pixels)
    batch = next(datasets.inference_batches(images, "fashion_mnist", batch_size=5, image_size=56))
    assert batch.shape == (5, 3, 56, 56)
    assert torch.equal(batch[:, 0], batch[:, 1])  # grey repeated to 3 channels


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_DIR", str(tmp_path / "none"))
    with pytest.raises(UsageError, match="dataset-fashion-mnist"):
        datasets.load_images("fashion_mnist", str(tmp_path), "train")


def test_folder_order_is_image_folder_order(folder_root):
    images = datasets.load_images("folder", str(folder_root), "train")
    assert len(images) == 15
    assert images.labels.tolist() == [0] * 6 + [1] * 4 + [2] * 5
    assert images.paths[0].endswith("train/ant/img_000.png")
    batch = next(datasets.inference_batches(images, "folder", batch_size=4, image_size=32))
    assert batch.shape == (4, 3, 32, 32)


def test_imagenet_lt_index_is_line_number_and_labels_need_no_decoding(tmp_path):
    lt = tmp_path / "ImageNet_LT_train.txt"
    lt.write_text("train/n01/a.JPEG 3\ntrain/n02/b.JPEG 0\n\ntrain/n01/c.JPEG 3\n")
    for name in ("n01/a.JPEG", "n02/b.JPEG", "n01/c.JPEG"):  # not images: listing them decodes nothing
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / name).write_bytes(b"not an image")
    images = datasets.load_images("imagenet_lt", str(tmp_path), "train", lt_list=str(lt))
    assert images.labels.tolist() == [3, 0, 3]
    assert images.paths[1] == str(tmp_path / "train/n02/b.JPEG")


def test_imagenet_lt_bad_list(tmp_path):
    with pytest.raises(UsageError, match="--lt-list: no ImageNet-LT list"):
        datasets.load_images("imagenet_lt", str(tmp_path), "train", lt_list=str(tmp_path / "none.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("train/a.JPEG three\n")
    with pytest.raises(UsageError, match="line 1"):
        datasets.load_images("imagenet_lt", str(tmp_path), "train", lt_list=str(bad))


def test_imagenet_val_and_missing_root(tmp_path):
    write_image_tree(tmp_path / "val", {"n01": 2, "n02": 1}, size=16)
    assert datasets.load_images("imagenet", str(tmp_path), "val").labels.tolist() == [0, 0, 1]
    with pytest.raises(UsageError, match="data: no image folder"):
        datasets.load_images("imagenet", str(tmp_path), "train")
    with pytest.raises(UsageError, match="data: no dataset folder"):
        datasets.load_images("imagenet", str(tmp_path / "missing"), "train")
    with pytest.raises(UsageError, match="data: dataset 'imagenet' needs its root"):
        datasets.load_images("imagenet", None, "train")


def test_unlabelled_folder_index_is_sorted_relative_path(tmp_path):
    names = write_photo_folder(tmp_path)
    images = datasets.load_images("folder", str(tmp_path), "train")
    assert images.labels is None
    assert [str(Path(p).relative_to(tmp_path).as_posix()) for p in images.paths] == names
    assert "trip/day2/SHOT_UPPER.JPG" in names and "notes.txt" not in names and ".hidden.png" not in names
    with pytest.raises(UsageError, match="data: labels are required.*unlabelled image folder"):
        datasets.load_images("folder", str(tmp_path), "val")
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(UsageError, match="data: no image files under"):
        datasets.load_images("folder", str(tmp_path / "empty"), "train")


def test_unlabeled_flag_reads_a_class_tree_without_labels(folder_root):
    images = datasets.load_images("folder", str(folder_root), "train", unlabeled=True)
    assert len(images) == 15 and images.labels is None
    assert images.paths == sorted(images.paths) and images.paths[0].endswith("train/ant/img_000.png")
    with pytest.raises(UsageError, match="labels are required"):
        datasets.load_images("folder", str(folder_root), "val", unlabeled=True)
    assert datasets.load_images("folder", str(folder_root), "train").classes == ["ant", "bee", "cat"]


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # 1: a loader process
def test_unreadable_files_are_reported_by_index_not_raised(tmp_path, workers):
    names = write_photo_folder(tmp_path)
    images = datasets.load_images("folder", str(tmp_path), "train")
    batches = list(datasets.decoded_batches(images, "folder", batch_size=7, workers=workers, image_size=16))
    failures = {i: why for _, unreadable in batches for i, why in unreadable.items()}
    assert list(failures) == [names.index("broken.jpg")] and "UnidentifiedImageError" in failures[0]
    assert sum(len(x) for x, _ in batches) == len(names) and not batches[0][0][0].any()
    with pytest.raises(UsageError, match="data: cannot read image .*broken.jpg"):
        next(datasets.inference_batches(images, "folder", batch_size=7, image_size=16))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_reader_admits_arrays_of_every_pickle_protocol_and_str_keys(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    data, labels = rng.integers(0, 256, (6, 3072), dtype=np.uint8), [3, 1, 4, 1, 5, 9]
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": data, "labels": np.array(labels), "filenames": [b"a.png"] * 6,
                                   "batch_label": "training batch 1 of 5", "extra": (1.5, None, True)},
                                  protocol=protocol))
    images, read_labels = datasets.cifar_batch(str(path), "labels", 10)
    assert np.array_equal(images.reshape(6, -1), data) and read_labels.tolist() == labels


def test_cifar_reader_reads_numpy_1_module_names_without_a_warning(tmp_path):
    """The batches as downloaded were pickled under NumPy 1, whose array globals live in numpy.core."""
    data = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    content = pickle.dumps({b"data": data, b"labels": [7, 2]}, protocol=2)
    assert b"cnumpy._core.multiarray\n" in content  # protocol 2 names globals as text lines
    (tmp_path / "batch").write_bytes(content.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, labels = datasets.cifar_batch(str(tmp_path / "batch"), "labels", 10)
    assert np.array_equal(images.reshape(2, -1), data) and labels.tolist() == [7, 2]


class Exploit:
    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.witness}",)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_cifar_reader_refuses_a_pickle_that_would_run_code(tmp_path, protocol):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [Exploit(tmp_path / "ran")]},
                                  protocol=protocol))
    with pytest.raises(UsageError, match=r"data: CIFAR batch .*data_batch_1' refers to posix\.system.*refused"):
        datasets.cifar_batch(str(path), "labels", 10)
    assert not (tmp_path / "ran").exists()
    path.write_bytes(pickle.dumps({b"data": Exploit(tmp_path / "ran")}, protocol=protocol))
    pickle.loads(path.read_bytes())  # what pickle.load did: the command runs
    assert (tmp_path / "ran").exists()


def test_read_idx_checks_header_and_length(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes((0x0801).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 8, 9]))
    assert datasets.read_idx(str(path), (-1,)).tolist() == [7, 8, 9]
    with pytest.raises(UsageError, match="not an IDX file of 3-D"):
        datasets.read_idx(str(path), (-1, 28, 28))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(UsageError, match="holds 4 bytes after its header, which says 3"):
        datasets.read_idx(str(path), (-1,))


def test_two_links_to_one_folder_are_refused_and_one_link_is_followed(tmp_path):
    write_image_tree(tmp_path / "shared", {"x": 2}, size=8)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "a").symlink_to(tmp_path / "shared")
    assert datasets.image_files(str(tmp_path / "root")) == ["a/x/img_000.png", "a/x/img_001.png"]
    (tmp_path / "root" / "b").symlink_to(tmp_path / "shared")
    with pytest.raises(UsageError, match="root/[ab]' is the folder .*root/[ab]' again"):
        datasets.image_files(str(tmp_path / "root"))


def test_listing_record_identifies_the_files_in_index_order(tmp_path, cifar10_root):
    write_image_tree(tmp_path / "photos", {"a": 2, "b": 1}, size=8)
    images = datasets.load_images("folder", str(tmp_path / "photos"), "train")
    record = datasets.listing_record(images, str(tmp_path / "photos"))
    assert record["count"] == 3
    assert datasets.listing_record(images, str(tmp_path / "photos") + "/") == record  # spelling of the root
    (tmp_path / "photos" / "a" / "img_001.png").rename(tmp_path / "photos" / "a" / "img_009.png")
    renamed = datasets.load_images("folder", str(tmp_path / "photos"), "train")
    assert datasets.listing_record(renamed, str(tmp_path / "photos"))["digest"] != record["digest"]
    assert datasets.listing_record(datasets.load_images("cifar10", str(cifar10_root), "train"), "x") is None


def test_missing_files_reads_each_folder_once(tmp_path, monkeypatch):
    write_image_tree(tmp_path, {"a": 3, "b": 2}, size=8)
    paths = [str(tmp_path / "a" / f"img_{i:03d}.png") for i in range(4)] + [str(tmp_path / "c" / "x.png")]
    listed = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda d: listed.append(d) or real(d))
    assert datasets.missing_files(paths) == [3, 4]
    assert listed == [str(tmp_path / "a"), str(tmp_path / "c")]
