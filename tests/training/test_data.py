"""Datasets: the real IDX files parse to what their README states; synthetic data reproduces."""

import gzip

import pytest
import torch

from training.data import load_dataset, load_idx, random_shift, synthetic


def test_mnist_test_split_matches_the_published_class_counts(mnist_dir):
    ds = load_dataset("mnist", "test", mnist_dir)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.images.dtype == torch.uint8  # pixels stay bytes until a batch is drawn
    batch = ds.batch(slice(0, 256))
    assert batch.dtype == torch.float32 and batch.shape == (256, 1, 28, 28)
    assert float(batch.min()) >= 0.0 and float(batch.max()) == 1.0
    torch.testing.assert_close(batch, ds.images[:256].float() / 255)
    counts = torch.bincount(ds.labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_load_idx_rejects_a_file_that_is_not_idx(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x03\x04garbage"))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        load_idx(bad)


def test_load_idx_rejects_a_truncated_file(tmp_path, mnist_dir):
    raw = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match="header says"):
        load_idx(cut)


def test_missing_data_dir_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_dataset("mnist", "test", tmp_path)


def test_unknown_dataset_lists_the_available_ones():
    with pytest.raises(ValueError, match="available"):
        load_dataset("imagenet", "test", "/nowhere")


def test_synthetic_is_reproducible_and_shares_prototypes_between_splits():
    a, b = synthetic("train"), synthetic("train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    test = synthetic("test")
    assert not torch.equal(a.images[: len(test)], test.images)


def test_random_shift_moves_pixels_without_changing_them():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 4, 4] = 1.0
    shifted = random_shift(image.repeat(50, 1, 1, 1), 2, torch.Generator().manual_seed(0))
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1.0)  # the bright pixel stays inside
    positions = {tuple(torch.nonzero(s[0])[0].tolist()) for s in shifted}
    assert len(positions) > 5 and all(2 <= r <= 6 and 2 <= c <= 6 for r, c in positions)


def test_the_training_split_is_held_as_bytes(mnist_dir):
    """60,000 MNIST images are 47 MB as uint8 (188 MB as float32); batches are converted alone."""
    ds = load_dataset("mnist", "train", mnist_dir)
    assert ds.images.dtype == torch.uint8
    assert ds.images.nelement() * ds.images.element_size() == 60000 * 28 * 28
    rows = torch.tensor([3, 59999, 0])
    torch.testing.assert_close(ds.batch(rows), ds.images[rows].float() / 255)
    assert torch.mean(ds.batch(slice(None)).double()).item() == pytest.approx(0.1307, abs=1e-4)
