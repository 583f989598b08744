"""VAAL (lowbudget.vaal): the query, its determinism, its checkpoint, its streamed scoring."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbudget import datasets, vaal
from lowbudget.cli import UsageError
from lowbudget.vaal import FeatureSource, ImageSource, VaalSettings, vaal_select

CPU = torch.device("cpu")
# Toy weights for the two-cluster tests. With the authors' β 1 (the KL summed over the batch) and λ 1, a VAE
# trained for a few dozen iterations on a hundred points hides the two kinds from the discriminator (the
# discriminator's loss stays at 2 ln 2), and the picks say nothing; with these weights the latent keeps
# the kinds apart, which is what the tests are about: a discriminator on it rates the kind that the
# labelled pool lacks least likely to be labelled.
TOY = VaalSettings(beta=0.01, adversary_weight=0.1, lr=2e-3, batch_size=16, epochs=10, conv_width=8)
TINY = VaalSettings(batch_size=8, epochs=2, conv_width=4)  # the cheapest run: contracts, not quality
N_A, N_B, POOL = 60, 50, 10


def kinds(seed: int = 0) -> np.ndarray:
    """0 (kind A) or 1 (kind B) for each of N_A + N_B rows, the two kinds interleaved."""
    return np.random.default_rng(seed).permutation(np.r_[np.zeros(N_A, int), np.ones(N_B, int)])


def pool_of_kind_a(kind: np.ndarray) -> np.ndarray:
    return np.flatnonzero(kind == 0)[:POOL]


def two_blobs(kind: np.ndarray, dim: int = 16, noise: float = 0.05) -> np.ndarray:
    """Unit rows around e0 (kind A) or e1 (kind B)."""
    rng = np.random.default_rng(1)
    centres = np.eye(2, dim, dtype=np.float32)
    x = centres[kind] + noise * rng.standard_normal((len(kind), dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stripes(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 grey image: horizontal stripes (kind A) or vertical stripes (kind B), slightly noisy."""
    yy, xx = np.mgrid[:28, :28]
    pattern = (yy // 4) % 2 if kind == 0 else (xx // 4) % 2
    return np.clip(pattern * 180 + 30 + rng.normal(0, 2, (28, 28)), 0, 255).astype(np.uint8)


def write_stripe_folder(root: Path, kind: np.ndarray) -> datasets.Images:
    """An unlabelled image folder of RGB PNGs in `kind` order, read as the programs read it."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    for i, k in enumerate(kind):
        Image.fromarray(stripes(k, rng)).convert("RGB").save(root / f"img_{i:03d}.png")
    return datasets.load_images("folder", str(root), "train", unlabeled=True)


def features_source(n: int = 40, dim: int = 8) -> FeatureSource:
    x = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)
    return FeatureSource(x / np.linalg.norm(x, axis=1, keepdims=True))


def quiet(line: str) -> None:
    pass


def check_selection(indices: np.ndarray, labelled: np.ndarray, budget: int, n: int) -> None:
    assert indices.dtype == np.int64 and len(indices) == budget == len(np.unique(indices))
    assert indices.min() >= 0 and indices.max() < n
    assert not np.isin(indices, labelled).any()


# ---------------------------------------------------------------- what it picks

@pytest.mark.slow
def test_features_pick_the_cluster_the_pool_lacks():
    kind = kinds()
    labelled = pool_of_kind_a(kind)
    picks = vaal_select(FeatureSource(two_blobs(kind)), labelled, 10, TOY, seed=0, device=CPU, log=quiet).indices
    check_selection(picks, labelled, 10, len(kind))
    assert (kind[picks] == 1).mean() >= 0.8


@pytest.mark.slow
def test_images_pick_the_kind_the_pool_lacks(tmp_path):
    kind = kinds()
    labelled = pool_of_kind_a(kind)
    source = ImageSource(write_stripe_folder(tmp_path / "stripes", kind), "folder")
    picks = vaal_select(source, labelled, 10, TOY, seed=0, device=CPU, log=quiet).indices
    check_selection(picks, labelled, 10, len(kind))
    assert (kind[picks] == 1).mean() >= 0.8


def test_exact_budget_disjoint_and_byte_identical_for_a_seed():
    source, labelled = features_source(), np.array([3, 17, 5, 30])
    first = vaal_select(source, labelled, 7, TINY, seed=4, device=CPU, log=quiet)
    again = vaal_select(source, labelled, 7, TINY, seed=4, device=CPU, log=quiet)
    check_selection(first.indices, labelled, 7, 40)
    assert first.indices.tobytes() == again.indices.tobytes()
    assert first.params["iterations"] == TINY.epochs * (40 // TINY.batch_size)
    assert first.params["mode"] == "features" and first.filled == 0


def test_images_of_every_format_become_three_channels_in_minus_one_to_one():
    grey = datasets.ArrayImages(np.stack([np.full((1, 28, 28), v, np.uint8) for v in (0, 255)]), np.zeros(2))
    for size in vaal.IMAGE_SIZES:
        (batch,) = ImageSource(grey, "fashion_mnist").batches([np.array([1, 0])], replace(TINY, image_size=size))
        assert batch.shape == (2, 3, size, size)
        assert torch.equal(batch[0], torch.ones_like(batch[0])) and torch.equal(batch[1], -torch.ones_like(batch[1]))


def test_budget_beyond_the_unlabelled_rows_is_refused_before_training(tmp_path):
    checkpoint = tmp_path / "vaal.pth"
    with pytest.raises(ValueError, match="budget 37 is not within 1..36"):
        vaal_select(features_source(), np.arange(4), 37, TINY, seed=0, device=CPU, checkpoint=str(checkpoint))
    assert not checkpoint.exists()
    with pytest.raises(ValueError, match="labelled pool"):
        vaal_select(features_source(), np.zeros(0, np.int64), 3, TINY, seed=0, device=CPU)


# ---------------------------------------------------------------- checkpoint

class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, steps: int) -> None:
    """Make the discriminator step number `steps` + 1 raise, as a killed run stops."""
    real, calls = vaal.discriminator_step, [0]

    def step(*args):
        calls[0] += 1
        if calls[0] > steps:
            raise Interrupted
        return real(*args)
    monkeypatch.setattr(vaal, "discriminator_step", step)


def test_a_resumed_round_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    source, labelled, checkpoint = features_source(), np.array([1, 2, 8]), str(tmp_path / "vaal.pth")
    settings = replace(TINY, epochs=3)
    per_epoch = settings.iterations_per_epoch(len(source))
    uninterrupted = vaal_select(source, labelled, 5, settings, seed=2, device=CPU, log=quiet).indices
    with monkeypatch.context() as patch:
        interrupt_after(patch, per_epoch + 2)  # killed in the second epoch
        with pytest.raises(Interrupted):
            vaal_select(source, labelled, 5, settings, seed=2, device=CPU, checkpoint=checkpoint, log=quiet)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    lines: list[str] = []
    resumed = vaal_select(source, labelled, 5, settings, seed=2, device=CPU, checkpoint=checkpoint,
                          log=lines.append).indices
    assert resumed.tobytes() == uninterrupted.tobytes()
    assert lines == [f"=> vaal: resumed from {checkpoint} at epoch 1 of 3"]
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 3 and set(saved) == {"key", "epoch", "vae", "discriminator"}  # finished: weights only
    monkeypatch.setattr(vaal, "train_epoch", lambda *args, **kwargs: pytest.fail("trained again"))
    again = vaal_select(source, labelled, 5, settings, seed=2, device=CPU, checkpoint=checkpoint, log=quiet)
    assert again.indices.tobytes() == uninterrupted.tobytes()  # a finished round only scores


def test_a_checkpoint_of_other_inputs_is_ignored_and_replaced(tmp_path):
    source, checkpoint = features_source(), str(tmp_path / "vaal.pth")
    vaal_select(source, np.array([1, 2, 8]), 5, TINY, seed=0, device=CPU, checkpoint=checkpoint, log=quiet)
    fresh = vaal_select(source, np.array([1, 2, 9]), 5, TINY, seed=0, device=CPU, log=quiet).indices
    lines: list[str] = []
    other = vaal_select(source, np.array([1, 2, 9]), 5, TINY, seed=0, device=CPU, checkpoint=checkpoint,
                        log=lines.append).indices
    assert other.tobytes() == fresh.tobytes()
    assert lines == [f"=> vaal: {checkpoint} holds another round (other pool, settings or seed); training from the "
                     "start"]
    key = vaal.inputs_key(source, np.array([1, 2, 9]), TINY, 0)
    assert torch.load(checkpoint, weights_only=True)["key"] == key


def test_an_unreadable_checkpoint_is_a_one_line_error(tmp_path):
    checkpoint = tmp_path / "vaal.pth"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match=f"{checkpoint}: not a readable VAAL checkpoint"):
        vaal_select(features_source(), np.array([0]), 2, TINY, seed=0, device=CPU, checkpoint=str(checkpoint))


# ---------------------------------------------------------------- streamed scoring

class RecordingSource(FeatureSource):
    """Feature rows that record every batch of rows they are asked for."""

    def __init__(self, source: FeatureSource):
        super().__init__(source.feats)
        self.requests: list[list[np.ndarray]] = []

    def batches(self, row_batches, settings):
        self.requests.append(list(row_batches))
        return super().batches(row_batches, settings)


def test_scoring_reads_the_unlabelled_rows_once_in_batches():
    source, labelled = RecordingSource(features_source()), np.array([0, 5, 6])
    vaal_select(source, labelled, 4, TINY, seed=0, device=CPU, log=quiet)
    *training, scoring = source.requests
    assert len(training) == TINY.epochs
    assert all(len(rows) == TINY.batch_size for epoch in training for rows in epoch)
    assert all(len(rows) <= TINY.batch_size for rows in scoring)
    np.testing.assert_array_equal(np.concatenate(scoring), np.setdiff1d(np.arange(40), labelled))


def test_image_batches_decode_only_the_batch_asked_for(tmp_path, monkeypatch):
    kind = kinds()[:30]
    images = write_stripe_folder(tmp_path / "stripes", kind)
    opened: list[str] = []
    real_open = datasets.open_rgb
    monkeypatch.setattr(datasets, "open_rgb", lambda path: opened.append(path) or real_open(path))
    batches = iter(ImageSource(images, "folder").batches([np.arange(i, i + 8) for i in range(0, 24, 8)], TINY))
    first = next(batches)
    assert first.shape == (8, 3, 32, 32)
    assert opened == images.paths[:8]


# ---------------------------------------------------------------- networks and settings

@pytest.mark.parametrize("size", vaal.IMAGE_SIZES)
def test_conv_vae_is_the_authors_at_32_and_64_px(size):
    vae = vaal.conv_vae(size, latent_dim=32, width=128)
    convs = [m for m in vae.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (3, 128, (4, 4), (2, 2)), (128, 256, (4, 4), (2, 2)), (256, 512, (4, 4), (2, 2)), (512, 1024, (4, 4), (2, 2))]
    assert vae.fc_mu.in_features == 1024 * (size // 16) ** 2 and vae.fc_mu.out_features == 32
    assert vae.decoder[0].out_features == 1024 * (size // 8) ** 2
    small = vaal.conv_vae(size, latent_dim=5, width=4)
    recon, mu, logvar = small(torch.zeros(2, 3, size, size), torch.Generator().manual_seed(0))
    assert recon.shape == (2, 3, size, size) and mu.shape == logvar.shape == (2, 5)
    assert vaal.discriminator(5)(mu).shape == (2,)


def test_settings_and_iterations_per_epoch():
    assert VaalSettings().iterations_per_epoch(10_000) == 78
    assert VaalSettings().iterations_per_epoch(10) == 1
    with pytest.raises(ValueError, match="image size 48"):
        VaalSettings(image_size=48)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        VaalSettings(epochs=0)


def test_cycled_batches_visit_every_row_once_per_pass():
    rows = np.array([4, 9, 2])
    batches = vaal.cycled_batches(rows, 2, 6, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [6, 6]
    stream = np.concatenate(batches)
    for start in range(0, 12, 3):
        assert sorted(stream[start:start + 3]) == [2, 4, 9]
