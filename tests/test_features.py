"""Feature extraction and the cache: equal to a direct forward pass, reused only when it matches."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

import eval_knn
import sampler
from lowbudget import datasets, features
from lowbudget.cli import UsageError
from lowbudget.feature_files import Features, read_feats_file, require_labels, rows_of
from models.checkpoints import build_backbone
from tests.helpers import call_main, compress_checkpoint, resnet_backbone_state, write_cifar, write_photo_folder


@pytest.fixture
def compress_weights(tmp_path):
    path = tmp_path / "compress18.pth"
    torch.save(compress_checkpoint(resnet_backbone_state("resnet18", seed=3), head_dim=2048), path)
    return path


@pytest.fixture
def cifar10_root(tmp_path):
    """40 CIFAR-10 training images: three extraction batches of 16 (the last one short)."""
    return write_cifar(tmp_path / "cifar", n_train=40, n_test=10)


def run_kmeans(tmp_path, cifar10_root, capsys, *extra):
    return call_main(sampler.main, [cifar10_root, "--dataset", "cifar10", "--arch", "resnet18",
                                    "--save", tmp_path / "out", "--indices", tmp_path / "idx",
                                    "--splits", "5", "--name", "kmeans", "-j", "0", "-b", "16", *extra], capsys)


def cache_file(tmp_path):
    files = sorted((tmp_path / "out").glob("feats_*.npz"))
    assert len(files) == 1
    return files[0]


def test_cli_features_equal_a_direct_forward_pass(tmp_path, cifar10_root, compress_weights, capsys):
    status, out, err = run_kmeans(tmp_path, cifar10_root, capsys, "--weights", compress_weights)
    assert status == 0, err
    path = cache_file(tmp_path)
    assert path.name.startswith("feats_cifar10_train_resnet18_compress_")
    with np.load(path) as data:
        feats, labels, meta = data["feats"], data["labels"], json.loads(str(data["meta"]))
    images = datasets.load_images("cifar10", str(cifar10_root), "train")
    assert np.array_equal(labels, images.labels)
    assert meta["dataset"] == "cifar10" and meta["split"] == "train" and meta["arch"] == "resnet18"

    model, _ = build_backbone("resnet18", "compress", str(compress_weights))
    info = datasets.DATASET_INFO["cifar10"]
    x = torch.from_numpy(images.images).float() / 255
    x = (x - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = F.normalize(model(x), dim=1).numpy()
    np.testing.assert_allclose(feats, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)


def test_cache_reused_only_with_load_cache_and_a_match(tmp_path, cifar10_root, compress_weights, capsys):
    assert run_kmeans(tmp_path, cifar10_root, capsys, "--weights", compress_weights)[0] == 0
    status, out, _ = run_kmeans(tmp_path, cifar10_root, capsys, "--weights", compress_weights, "--load_cache")
    assert status == 0 and "from cache" in out
    status, out, _ = run_kmeans(tmp_path, cifar10_root, capsys, "--weights", compress_weights)
    assert "from cache" not in out and "get inference feats" in out

    path = cache_file(tmp_path)
    with np.load(path) as data:
        arrays = dict(data)
    meta = json.loads(str(arrays["meta"]))
    meta["transform"] = "something else"
    np.savez(path, feats=arrays["feats"], labels=arrays["labels"], meta=np.array(json.dumps(meta)))
    status, out, _ = run_kmeans(tmp_path, cifar10_root, capsys, "--weights", compress_weights, "--load_cache")
    assert status == 0 and "does not match this run (transform)" in out and "from cache" not in out

    path.write_bytes(path.read_bytes()[:100])  # truncated
    status, out, _ = run_kmeans(tmp_path, cifar10_root, capsys, "--weights", compress_weights, "--load_cache")
    assert status == 0 and "unreadable" in out
    status, out, _ = run_kmeans(tmp_path, cifar10_root, capsys, "--weights", compress_weights, "--load_cache")
    assert "from cache" in out  # rewritten whole


def test_other_weights_get_another_cache(tmp_path, cifar10_root, compress_weights, capsys):
    assert run_kmeans(tmp_path, cifar10_root, capsys, "--weights", compress_weights)[0] == 0
    other = tmp_path / "other.pth"
    torch.save(compress_checkpoint(resnet_backbone_state("resnet18", seed=4), head_dim=None), other)
    status, out, _ = run_kmeans(tmp_path, cifar10_root, capsys, "--weights", other, "--load_cache")
    assert status == 0 and "from cache" not in out
    assert len(list((tmp_path / "out").glob("feats_*.npz"))) == 2


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pth.tar"])
def test_feats_file_formats(tmp_path, suffix):
    rng = np.random.default_rng(0)
    feats, labels = rng.standard_normal((30, 6)).astype(np.float32), rng.integers(0, 3, 30)
    path = tmp_path / f"feats{suffix}"
    if suffix == ".npy":
        np.save(path, feats)
    elif suffix == ".npz":
        np.savez(path, feats=feats, labels=labels)
    else:
        torch.save((torch.from_numpy(feats), torch.from_numpy(labels)), path)
    pool = read_feats_file(str(path), "cifar10")
    np.testing.assert_allclose(pool.feats, feats / np.linalg.norm(feats, axis=1, keepdims=True), atol=1e-6)
    if suffix == ".npy":
        assert pool.labels is None
    else:
        assert pool.labels.tolist() == labels.tolist()


def test_random_backbone_depends_on_the_seed_alone(tmp_path, cifar10_root, capsys):
    args = ["--backbone", "random", "--seed", "4"]
    assert run_kmeans(tmp_path, cifar10_root, capsys, *args)[0] == 0
    with np.load(cache_file(tmp_path)) as data:
        cached = data["feats"]
    features._backbone.cache_clear()
    torch.rand(1000)  # whatever ran before must not change the random weights
    parsed = sampler.build_parser().parse_args([str(cifar10_root), "--arch", "resnet18", *args])
    model, _, _ = features.loaded_backbone(parsed)
    images = datasets.load_images("cifar10", str(cifar10_root), "train")
    with torch.no_grad():
        direct = F.normalize(model(next(datasets.inference_batches(images, "cifar10", 16))), dim=1).numpy()
    np.testing.assert_allclose(direct, cached[:16], atol=1e-5)


def test_selectable_rows_skip_unreadable_images_without_copying_otherwise():
    feats = np.arange(10, dtype=np.float32).reshape(5, 2)
    keep, rows = Features(feats, None, "x", skipped=np.array([1, 3])).selectable()
    assert keep.tolist() == [0, 2, 4] and rows.tolist() == feats[[0, 2, 4]].tolist()
    assert rows_of(keep, np.array([4, 0]), "--resume-indices").tolist() == [2, 0]
    with pytest.raises(UsageError, match="--resume-indices: index 3 is an image file that could not be read"):
        rows_of(keep, np.array([0, 3]), "--resume-indices")
    keep, rows = Features(feats, None, "x").selectable()
    assert keep.tolist() == [0, 1, 2, 3, 4] and rows is feats


def test_require_labels_names_the_unlabelled_source():
    feats = np.zeros((3, 2), np.float32)
    with pytest.raises(UsageError, match="data: labels are required, and '/photos' is an unlabelled image folder"):
        require_labels(Features(feats, None, "x", data_root="/photos"), "--feats")
    with pytest.raises(UsageError, match="--val-feats: the features have no labels"):
        require_labels(Features(feats, None, "x"), "--val-feats")


def folder_kmeans(tmp_path, root, capsys, *extra):
    return call_main(sampler.main, [root, "--dataset", "folder", "--arch", "resnet18", "--backbone", "random",
                                    "--image-size", "32", "--save", tmp_path / "out", "--indices", tmp_path / "idx",
                                    "--splits", "3", "--name", "kmeans", "-j", "0", "-b", "8", *extra], capsys)


def test_folder_cache_is_not_reused_when_its_files_change(tmp_path, capsys):
    root = tmp_path / "photos"
    names = write_photo_folder(root)
    assert folder_kmeans(tmp_path, root, capsys)[0] == 0
    with np.load(cache_file(tmp_path)) as data:
        assert data["skipped"].tolist() == [names.index("broken.jpg")] and "labels" not in data.files
    (root / "img_03.png").rename(root / "img_03_renamed.png")  # same count, another listing
    status, out, _ = folder_kmeans(tmp_path, root, capsys, "--load_cache")
    assert status == 0 and "does not match this run (listing)" in out
    status, out, _ = folder_kmeans(tmp_path, root, capsys, "--load_cache", "--unlabeled")
    assert status == 0 and "from cache" in out


def test_unreadable_evaluation_images_are_left_out(tmp_path, folder_root, capsys):
    (folder_root / "val" / "bee" / "img_009.png").write_bytes(b"truncated")
    args = eval_knn.build_parser().parse_args([str(folder_root), "--dataset", "folder", "--backbone", "random",
                                               "--image-size", "32", "--save", str(tmp_path / "out"), "-j", "0"])
    val = features.backbone_features(args, "val", torch.device("cpu"))
    assert len(val.feats) == 6 and val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert "1 unreadable image file(s) skipped: they are left out of the evaluation" in capsys.readouterr().out


@pytest.mark.parametrize("interpolation,workers", [("bilinear", 0), ("bicubic", 0), ("nearest", 0),
                                                   pytest.param("bilinear", 1, marks=pytest.mark.slow)])
def test_file_batches_equal_the_per_image_float_transform(tmp_path, interpolation, workers):
    """Image files decoded into uint8 in the loader and normalised by batch give exactly what ToTensor and
    Normalize give image by image (PNG, JPEG and BMP files of varied sizes; an unreadable file's row is zero)."""
    write_photo_folder(tmp_path)
    images = datasets.load_images("folder", str(tmp_path), "train")
    preprocess = datasets.Preprocess(24, 27, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), interpolation)
    batches = list(datasets.decoded_batches(images, "folder", 8, workers, preprocess=preprocess))
    x = torch.cat([batch for batch, _ in batches])
    per_image = T.Compose([T.Resize(27, interpolation=T.InterpolationMode(interpolation)), T.CenterCrop(24),
                           T.ToTensor(), T.Normalize(preprocess.mean, preprocess.std)])
    assert x.shape == (len(images), 3, 24, 24) and x.dtype == torch.float32
    for row, path in zip(x, images.paths, strict=True):
        if path.endswith("broken.jpg"):
            assert not row.any()
        else:
            assert torch.equal(row, per_image(datasets.open_rgb(path))), path


def test_batches_are_made_on_the_backbones_device(tmp_path):
    """Batches of files and of arrays come out on the device asked for (the meta device stands in for CUDA:
    no data, but every operation is placed on it)."""
    write_photo_folder(tmp_path / "photos")
    files = datasets.load_images("folder", str(tmp_path / "photos"), "train")
    arrays = datasets.load_images("cifar10", str(write_cifar(tmp_path / "cifar", n_train=10, n_test=2)), "train")
    meta = torch.device("meta")
    for images, name in ((files, "folder"), (arrays, "cifar10")):
        batch, _ = next(datasets.decoded_batches(images, name, 8, image_size=48, device=meta))
        assert batch.device == meta and batch.dtype == torch.float32 and batch.shape == (8, 3, 48, 48)
