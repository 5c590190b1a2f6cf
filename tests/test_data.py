"""Loading Fashion-MNIST (vae_helpers/data.py)."""

import pytest
import torch

import vae_helpers as v


def test_data_are_all_images_scaled_to_the_unit_interval():
    train, test = v.load_data()
    assert train.shape == (60_000, 784) and test.shape == (10_000, 784)
    assert train.min() == 0 and train.max() == 1 and train.dtype == torch.float32


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown dataset"):
        v.load_data("cifar")


def test_missing_data_says_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(v.DEBIAN_DIRS, "mnist", tmp_path / "nowhere")
    monkeypatch.setattr(
        "torchvision.datasets.MNIST.download",
        lambda self: (_ for _ in ()).throw(OSError("offline")),
    )
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-mnist.*internet"):
        v.load_data("mnist", str(tmp_path))
