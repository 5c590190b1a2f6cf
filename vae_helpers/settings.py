"""A cell's settings: the course's protocol, the options added since, and cell_settings, which
fills in and checks every setting of one trained model."""

import numpy as np

from .data import TRAIN_IMAGES, dataset_class
from .model import check_dims

# The course's protocol (COURSE.md): Adam 1e-3, mini-batch 100, 30 epochs, all images.
PROTOCOL = dict(
    dataset="fashion-mnist",
    recon="mse",
    lr=1e-3,
    batch_size=100,
    epochs=30,
    train_size=60_000,
    weight_decay=0.0,
    seed=0,
)

# Settings added after the first results: left out of a cell's settings at their default,
# so the records trained before them keep their names. bfloat16 runs the training step's
# matrix products in bfloat16 (weights, Adam and the test VFE stay float32). eval_every: the
# VFEs are measured after every k-th epoch and the last. hh_lr_scale multiplies the learning
# rate of the two h x h weight matrices (Yang et al.'s width scaling for Adam is 500 / h).
# train_offset: the training set is images train_offset .. train_offset + train_size - 1.
# val_size: the VFE is also measured on the last val_size training images (held out from every
# training set). recon_images: the posterior-mean reconstructions of the first that many test
# images are kept at the final and the best-validation epoch (stored beside the record).
# device pins the cell to "cpu" or "cuda": it is not a setting of the model, so it is left out of
# the record's settings and name; it chooses which of two twins is read (store.cell_path).
OPTIONS = dict(
    precision="float32",
    eval_every=1,
    hh_lr_scale=1.0,
    train_offset=0,
    val_size=0,
    recon_images=0,
    device=None,
)
DEVICES = ("cpu", "cuda")


def cell_settings(hidden, latent, **overrides):
    """The full settings of one grid cell: the course's protocol with overrides."""
    unknown = set(overrides) - set(PROTOCOL) - set(OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown settings {sorted(unknown)}; known: {sorted(PROTOCOL) + sorted(OPTIONS)}"
        )
    check_dims(hidden, latent)
    s = dict(PROTOCOL, **OPTIONS)
    s.update(hidden=int(hidden), latent=int(latent), **overrides)
    dataset_class(s["dataset"])
    if s["recon"] not in ("mse", "bernoulli"):
        raise ValueError(f"unknown reconstruction {s['recon']!r}; choose 'mse' or 'bernoulli'")
    if s["device"] not in (None, *DEVICES):
        raise ValueError(
            f"unknown device {s['device']!r}; choose 'cpu' or 'cuda' (or leave it out)"
        )
    if s["precision"] not in ("float32", "bfloat16"):
        raise ValueError(f"unknown precision {s['precision']!r}; choose 'float32' or 'bfloat16'")
    for key in ("epochs", "batch_size", "train_size", "eval_every"):
        s[key] = checked_number(key, s[key], int, low=1)
    if s["train_size"] > TRAIN_IMAGES:
        raise ValueError(
            f"train_size must be at most the {TRAIN_IMAGES:,} training images, "
            f"got {s['train_size']:,}"
        )
    for key, high in (
        ("train_offset", TRAIN_IMAGES - 1),
        ("val_size", TRAIN_IMAGES - 1),
        ("recon_images", 10_000),
    ):
        s[key] = checked_number(key, s[key], int, low=0, high=high)
    if s["train_offset"] + s["train_size"] > TRAIN_IMAGES - s["val_size"]:
        what = "the validation images" if s["val_size"] else "the end of the training images"
        raise ValueError(
            f"train_offset {s['train_offset']:,} + train_size {s['train_size']:,} runs into {what} "
            f"(image {TRAIN_IMAGES - s['val_size']:,} on, val_size {s['val_size']:,})"
        )
    if s["recon_images"] and s["val_size"] == 0:
        raise ValueError(
            "recon_images needs val_size > 0: reconstructions are kept at the best-validation epoch"
        )
    s["seed"] = checked_number("seed", s["seed"], int, low=0, high=2**31 - 1)
    s["lr"] = checked_number("lr", s["lr"], float, low=0, strict=True)
    s["hh_lr_scale"] = checked_number("hh_lr_scale", s["hh_lr_scale"], float, low=0, strict=True)
    s["weight_decay"] = checked_number("weight_decay", s["weight_decay"], float, low=0)
    for key, default in OPTIONS.items():
        if s[key] == default:
            del s[key]
    return s


def recorded_settings(s):
    """The settings a record stores and its name hashes: all but the device it was pinned to."""
    return {k: v for k, v in s.items() if k != "device"}


def checked_number(name, value, kind, low, high=None, strict=False):
    """`value` as a finite int or float, refused with its setting's name if it is not one."""
    ok_types = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not np.isfinite(value):
        raise ValueError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        )
    if value < low or (strict and value == low) or (high is not None and value > high):
        bound = (
            f"above {low}"
            if strict
            else f"at least {low}" + (f" and at most {high}" if high else "")
        )
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return kind(value)
