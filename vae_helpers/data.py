"""Fashion-MNIST (or MNIST): from Debian's package when installed, else torchvision; class names."""

import gzip
import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

from .model import X_DIM

ROOT = Path(__file__).resolve().parent.parent  # the repository: data/ and results/ live there

DATA_DIR = ROOT / "data"

TRAIN_IMAGES = 60_000  # in Fashion-MNIST and MNIST alike

TRAIN_VALUES = TRAIN_IMAGES * X_DIM  # Q7's vertical line: 47,040,000 training values

# Where Debian's packages put the original IDX files (`apt-get install dataset-fashion-mnist`).
DEBIAN_DIRS = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}

IDX_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def dataset_class(dataset):
    """The torchvision class for a dataset name."""
    from torchvision import datasets

    classes = {"fashion-mnist": datasets.FashionMNIST, "mnist": datasets.MNIST}
    if dataset not in classes:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(classes)}")
    return classes[dataset]


def copy_debian_files(dataset, root):
    """Unpack the Debian package's IDX files into torchvision's raw folder; True if done."""
    src = DEBIAN_DIRS[dataset]
    raw = Path(root) / dataset_class(dataset).__name__ / "raw"
    if not all((src / f"{name}.gz").exists() or (src / name).exists() for name in IDX_FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        if (raw / name).exists():
            continue
        gz = src / f"{name}.gz"
        with (
            gzip.open(gz) if gz.exists() else open(src / name, "rb") as fin,
            open(raw / f"{name}.part", "wb") as fout,
        ):
            shutil.copyfileobj(fin, fout)
        os.replace(raw / f"{name}.part", raw / name)
    return True


# SHA-256 of the four original Fashion-MNIST files, uncompressed (computed from Debian's
# dataset-fashion-mnist; torchvision downloads the same bytes).
SHA256 = {
    "fashion-mnist": dict(
        zip(
            IDX_FILES,
            [
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ],
        )
    )
}
SIZES = {"train": 60_000, "t10k": 10_000}


def check_files(dataset, root):
    """Refuse raw files that are not the originals: the known checksums where there are any,
    else the sizes of the IDX files. One line names the file and how to get a good copy."""
    raw = Path(root) / dataset_class(dataset).__name__ / "raw"
    for name in IDX_FILES:
        path = raw / name
        if not path.exists():
            continue  # torchvision says what is missing
        known = SHA256.get(dataset, {}).get(name)
        n = SIZES[name.split("-")[0]]
        size = 16 + n * X_DIM if "images" in name else 8 + n
        if known is not None:
            bad = hashlib.sha256(path.read_bytes()).hexdigest() != known
        else:
            bad = path.stat().st_size != size
        if bad:
            raise ValueError(
                f"{path} is not the original {dataset} file "
                f"({'its checksum differs' if known else 'its size is wrong'}); "
                f"delete {raw} and run again: the files are copied again from "
                f"{DEBIAN_DIRS[dataset]} or downloaded by torchvision"
            )


@lru_cache(maxsize=4)
def load_data(dataset="fashion-mnist", root=str(DATA_DIR)):
    """Train and test images as float tensors in [0, 1], shapes (60000, 784) and (10000, 784)."""
    cls = dataset_class(dataset)
    check_files(dataset, root)
    try:
        train, test = cls(root, train=True), cls(root, train=False)
    except RuntimeError:  # torchvision: "Dataset not found"
        if not copy_debian_files(dataset, root):
            try:
                cls(root, train=True, download=True)
            except Exception as err:
                raise FileNotFoundError(
                    f"{dataset} not found in {root} or {DEBIAN_DIRS[dataset]}, and torchvision "
                    f"could not download it ({err}). Either install the Debian package "
                    f"(`sudo apt-get install dataset-{dataset}`) or run once with internet access "
                    f"so that torchvision downloads it."
                ) from None
        check_files(dataset, root)
        train, test = cls(root, train=True), cls(root, train=False)
    # Same values as the course's transforms.ToTensor(): uint8 / 255, then flattened.
    return tuple(ds.data.reshape(len(ds.data), X_DIM).float().div_(255) for ds in (train, test))


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def image_labels(dataset="fashion-mnist", root=str(DATA_DIR), train=False):
    """The class of each test image (or training image), in load_data's order."""
    return dataset_class(dataset)(root, train=train).targets
