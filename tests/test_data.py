"""Loading Fashion-MNIST (vae_helpers/data.py)."""

import os
import shutil

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


def damaged(path):
    """Ways a data file gets damaged, each a function of its bytes."""
    head = 16 if "images" in path.name else 8
    return {
        "random bytes": lambda b: b[:head] + os.urandom(20_000 * 784) + b[head + 20_000 * 784 :],
        "all zero": lambda b: b[:head] + bytes(len(b) - head),
        "fewer images, consistent": lambda b: (
            b[:4]
            + (50_000).to_bytes(4, "big")
            + b[8:][: head - 8 + 50_000 * (784 if "images" in path.name else 1)]
        ),
        "truncated": lambda b: b[: len(b) // 2],
        "wrong magic": lambda b: b"\0\0\0\0" + b[4:],
        "empty": lambda b: b"",
    }


DAMAGES = [
    "random bytes",
    "all zero",
    "fewer images, consistent",
    "truncated",
    "wrong magic",
    "empty",
]


@pytest.mark.parametrize(
    "name, damage",
    [("train-images-idx3-ubyte", d) for d in DAMAGES]
    + [("t10k-labels-idx1-ubyte", d) for d in DAMAGES if d != "random bytes"],
)
def test_a_damaged_data_file_is_refused_in_one_line_that_names_it(tmp_path, name, damage):
    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(v.DATA_DIR / "FashionMNIST" / "raw", raw)
    path = raw / name
    path.write_bytes(damaged(path)[damage](path.read_bytes()))
    with pytest.raises(ValueError, match=f"{path} is not the original fashion-mnist file") as err:
        v.load_data.__wrapped__("fashion-mnist", str(tmp_path))
    assert len(str(err.value).splitlines()) == 1 and "delete" in str(err.value)
