"""Dataset readers: index = position as in the original code, labels without decoding, batch transforms."""
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from lowbudget import datasets
from lowbudget.cli import UsageError
from tests.conftest import write_cifar, write_image_tree, write_photo_folder


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
        assert torch.allclose(batch[i], reference(pil), atol=1e-6)


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


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
