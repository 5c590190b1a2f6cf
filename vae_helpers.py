"""Variational autoencoders on Fashion-MNIST for COMP61021 Coursework 2.

Sections, top to bottom: data, model, objective, training, experiments, plots,
command line. `python -m vae_helpers q4` runs (or resumes) one question's grid.
"""
import argparse
import gzip
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
RESULTS_DIR = ROOT / "results"
X_DIM = 28 * 28
TRAIN_IMAGES = 60_000  # in Fashion-MNIST and MNIST alike
TRAIN_VALUES = TRAIN_IMAGES * X_DIM  # Q7's vertical line: 47,040,000 training values
TRAIN_EVAL_IMAGES = 10_000  # the training images whose VFE is measured like the test VFE

# The course's protocol (COURSE.md): Adam 1e-3, mini-batch 100, 30 epochs, all images.
PROTOCOL = dict(dataset="fashion-mnist", recon="mse", lr=1e-3, batch_size=100,
                epochs=30, train_size=60_000, weight_decay=0.0, seed=0)
# Settings added after the first results: left out of a cell's settings at their default,
# so the records trained before them keep their names. bfloat16 runs the training step's
# matrix products in bfloat16 (weights, Adam and the test VFE stay float32). eval_every: the
# VFEs are measured after every k-th epoch and the last. hh_lr_scale multiplies the learning
# rate of the two h x h weight matrices (Yang et al.'s width scaling for Adam is 500 / h).
# train_offset: the training set is images train_offset .. train_offset + train_size - 1.
# val_size: the VFE is also measured on the last val_size training images (held out from every
# training set). recon_images: the posterior-mean reconstructions of the first that many test
# images are kept at the final and the best-validation epoch (stored beside the record).
OPTIONS = dict(precision="float32", eval_every=1, hh_lr_scale=1.0, train_offset=0, val_size=0,
               recon_images=0)
# A group's checkpoint is written after an epoch when this long has passed since the last one:
# every epoch of a slow group, without writing hundreds of MB per second on a fast GPU.
CHECKPOINT_SECONDS = float(os.environ.get("VAE_CHECKPOINT_SECONDS", 60))


class ResultsError(RuntimeError):
    """A stored result that cannot be trusted (corrupt, or not what its name says)."""


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

# Where Debian's packages put the original IDX files (`apt-get install dataset-fashion-mnist`).
DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
               "mnist": Path("/usr/share/datasets/mnist")}
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


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
        with (gzip.open(gz) if gz.exists() else open(src / name, "rb")) as fin, \
                open(raw / f"{name}.part", "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(raw / f"{name}.part", raw / name)
    return True


@lru_cache(maxsize=4)
def load_data(dataset="fashion-mnist", root=str(DATA_DIR)):
    """Train and test images as float tensors in [0, 1], shapes (60000, 784) and (10000, 784)."""
    cls = dataset_class(dataset)
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
                    f"so that torchvision downloads it.") from None
        train, test = cls(root, train=True), cls(root, train=False)
    # Same values as the course's transforms.ToTensor(): uint8 / 255, then flattened.
    to_float = lambda ds: ds.data.reshape(len(ds.data), X_DIM).float().div_(255)
    return to_float(train), to_float(test)


def cell_data(s, device):
    """A cell's training images, its validation images (None without val_size) and the test images."""
    train_x, test_x = (t.to(device) for t in load_data(s["dataset"]))
    off, val = s.get("train_offset", 0), s.get("val_size", 0)
    return train_x[off: off + s["train_size"]], (train_x[TRAIN_IMAGES - val:] if val else None), test_x


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def check_dims(hidden, latent):
    for name, value in (("hidden", hidden), ("latent", latent)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} dimension must be a positive integer, got {value!r}")


class VAE(nn.Module):
    """The course's VAE: two LeakyReLU(0.2) layers each side, Gaussian encoder heads."""

    def __init__(self, hidden, latent, x_dim=X_DIM):
        super().__init__()
        check_dims(hidden, latent)
        act = lambda: nn.LeakyReLU(0.2)
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), act(), nn.Linear(hidden, hidden), act())
        self.mean = nn.Linear(hidden, latent)
        self.log_var = nn.Linear(hidden, latent)
        # The decoder ends in logits; the course's sigmoid is applied in vfe_terms and decode.
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), act(), nn.Linear(hidden, hidden), act(),
                                     nn.Linear(hidden, x_dim))

    def forward(self, x, eps):
        h = self.encoder(x)
        mean, log_var = self.mean(h), self.log_var(h)
        z = mean + torch.exp(0.5 * log_var) * eps  # reparameterisation: noise outside the graph
        return self.decoder(z), mean, log_var

    def decode(self, z):
        return torch.sigmoid(self.decoder(z))


def n_params_formula(hidden, latent, x_dim=X_DIM):
    """Closed-form trainable parameters of encoder + decoder (weights and biases)."""
    encoder = (x_dim * hidden + hidden) + (hidden * hidden + hidden) + 2 * (hidden * latent + latent)
    decoder = (latent * hidden + hidden) + (hidden * hidden + hidden) + (hidden * x_dim + x_dim)
    return encoder + decoder


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------

def vfe_terms(logits, x, mean, log_var, recon="mse"):
    """Reconstruction and KL per image (nats), summed over the last axis; VFE = recon + kl.

    "mse": the course's summed squared error, a Gaussian log-likelihood with variance 1/2
    up to the constant 392 log(pi). "bernoulli": binary cross-entropy on the logits.
    """
    if recon == "mse":
        rec = (torch.sigmoid(logits) - x).pow(2).sum(-1)
    elif recon == "bernoulli":
        rec = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    else:
        raise ValueError(f"unknown reconstruction {recon!r}; choose 'mse' or 'bernoulli'")
    kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(-1)
    return rec, kl


def active_units(means, threshold=0.01):
    """Burda et al. (2016): latent units whose posterior mean varies across inputs (Var > 0.01)."""
    return int((means.var(dim=0) > threshold).sum())


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def pick_device():
    """CUDA when there is one, else the CPU, tuned for large tensors."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    keep_freed_memory()
    return torch.device("cpu")


def keep_freed_memory(keep=True):
    """glibc hands large freed blocks back to the OS and faults them in again on every step;
    keeping them makes a big group's step faster (benchmarks/grid_speed.py measures it)."""
    if sys.platform.startswith("linux"):
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        size = 1 << 30 if keep else 128 * 1024  # 128 KiB: glibc's default
        libc.mallopt(-3, size), libc.mallopt(-1, size)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def versions(device=None):
    """What a record's numbers depend on besides its settings: library versions and the chip."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "adam": "torch.optim.Adam(fused=True)"}
    if device is not None and torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def cell_settings(hidden, latent, **overrides):
    """The full settings of one grid cell: the course's protocol with overrides."""
    unknown = set(overrides) - set(PROTOCOL) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(PROTOCOL) + sorted(OPTIONS)}")
    check_dims(hidden, latent)
    s = dict(PROTOCOL, **OPTIONS)
    s.update(hidden=int(hidden), latent=int(latent), **overrides)
    dataset_class(s["dataset"])
    if s["recon"] not in ("mse", "bernoulli"):
        raise ValueError(f"unknown reconstruction {s['recon']!r}; choose 'mse' or 'bernoulli'")
    if s["precision"] not in ("float32", "bfloat16"):
        raise ValueError(f"unknown precision {s['precision']!r}; choose 'float32' or 'bfloat16'")
    for key in ("epochs", "batch_size", "train_size", "eval_every"):
        s[key] = checked_number(key, s[key], int, low=1)
    if s["train_size"] > TRAIN_IMAGES:
        raise ValueError(f"train_size must be at most the {TRAIN_IMAGES:,} training images, got {s['train_size']:,}")
    for key, high in (("train_offset", TRAIN_IMAGES - 1), ("val_size", TRAIN_IMAGES - 1), ("recon_images", 10_000)):
        s[key] = checked_number(key, s[key], int, low=0, high=high)
    if s["train_offset"] + s["train_size"] > TRAIN_IMAGES - s["val_size"]:
        what = "the validation images" if s["val_size"] else "the end of the training images"
        raise ValueError(f"train_offset {s['train_offset']:,} + train_size {s['train_size']:,} runs into {what} "
                         f"(image {TRAIN_IMAGES - s['val_size']:,} on, val_size {s['val_size']:,})")
    if s["recon_images"] and s["val_size"] == 0:
        raise ValueError("recon_images needs val_size > 0: reconstructions are kept at the best-validation epoch")
    s["seed"] = checked_number("seed", s["seed"], int, low=0, high=2 ** 31 - 1)
    s["lr"] = checked_number("lr", s["lr"], float, low=0, strict=True)
    s["hh_lr_scale"] = checked_number("hh_lr_scale", s["hh_lr_scale"], float, low=0, strict=True)
    s["weight_decay"] = checked_number("weight_decay", s["weight_decay"], float, low=0)
    for key, default in OPTIONS.items():
        if s[key] == default:
            del s[key]
    return s


def checked_number(name, value, kind, low, high=None, strict=False):
    """`value` as a finite int or float, refused with its setting's name if it is not one."""
    ok_types = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not np.isfinite(value):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < low or (strict and value == low) or (high is not None and value > high):
        bound = f"above {low}" if strict else f"at least {low}" + (f" and at most {high}" if high else "")
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return kind(value)


def autocast(s, device):
    """The training step's precision: float32, or bfloat16 matrix products if the cell asks."""
    return torch.autocast(device.type, torch.bfloat16, enabled=s.get("precision") == "bfloat16")


def noise(seed, epoch, latent, device, sizes=None):
    """Reparameterisation noise, seeded by (seed, epoch) alone so a resumed or grouped run agrees:
    a function of the rows wanted. Given the draws' sizes, a GPU gets the same numbers drawn at
    once on the CPU and copied once, so that no step waits for a copy."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if sizes is None or torch.device(device).type == "cpu":
        return lambda rows: torch.randn(rows, latent, generator=g).to(device)
    ahead = iter(torch.cat([torch.randn(n, latent, generator=g) for n in sizes]).to(device).split(list(sizes)))
    return lambda rows: next(ahead)


def epoch_order(seed, epoch, n, device="cpu"):
    """The data order of one epoch, a function of (seed, epoch) alone, copied to the device once."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)


def chunk_sizes(n, size):
    return [min(size, n - i) for i in range(0, n, size)]


def new_record(s, n_par, device):
    """An empty record. train_vfe is measured after an epoch like test_vfe (eval mode, fixed noise,
    the first TRAIN_EVAL_IMAGES training images); running_train_vfe is the mean of the epoch's
    mini-batch VFEs, taken while the weights moved. max_log_var and max_grad_norm: each epoch's peaks."""
    rec = dict(settings=s, n_params=n_par, device=str(device), versions=versions(device), eval_epochs=[],
               test_vfe=[], test_recon=[], test_kl=[], train_vfe=[], running_train_vfe=[],
               max_log_var=[], max_grad_norm=[], epoch_seconds=[])
    rec.update({"val_vfe": []} if s.get("val_size") else {}, **{"recons": {}} if s.get("recon_images") else {})
    return rec


def append_epoch(rec, running, seconds, peaks, measured=None):
    """Add one epoch: its running training VFE, time and peaks (largest log-variance, gradient norm),
    and after an evaluated epoch `measured` = (test recon, test KL, training VFE[, validation VFE]). A value that is not
    finite instead marks the epoch the cell diverged in; the cell keeps the epochs it finished."""
    if "diverged_epoch" in rec:
        return
    epoch = len(rec["running_train_vfe"]) + 1
    if not np.isfinite([running, *(measured or [])]).all():
        rec["diverged_epoch"] = epoch
        return
    rec["running_train_vfe"].append(running)
    rec["epoch_seconds"].append(seconds)
    rec["max_log_var"].append(peaks[0])
    rec["max_grad_norm"].append(peaks[1])
    if measured is not None:
        test_rec, test_kl, train_vfe, *val = measured
        if val:
            rec["val_vfe"].append(val[0])
        rec["eval_epochs"].append(epoch)
        rec["test_recon"].append(test_rec)
        rec["test_kl"].append(test_kl)
        rec["test_vfe"].append(test_rec + test_kl)
        rec["train_vfe"].append(train_vfe)


EVAL_CHUNK = 1000  # images per forward pass when measuring a VFE

# What train_epoch checks at every step, in the order a step computes them.
NONFINITE = ("exp(log-variance)", "reconstruction", "KL", "gradient")


def note_divergence(rec, first_bad, peaks):
    """Say in a diverged record what became non-finite first (at which step of its last epoch),
    beside the peaks of the epoch before and of the steps of that epoch that were still finite."""
    steps = [(step, i) for i, step in enumerate(first_bad) if step >= 0]
    step, first = min(steps) if steps else (None, None)
    rec["divergence"] = dict(
        first_nonfinite=NONFINITE[first] if steps else "test or training VFE only", step=step,
        all_nonfinite=[NONFINITE[i] for i, b in enumerate(first_bad) if b >= 0],
        max_log_var_epoch_before=rec["max_log_var"][-1] if rec["max_log_var"] else None,
        max_grad_norm_epoch_before=rec["max_grad_norm"][-1] if rec["max_grad_norm"] else None,
        max_log_var_this_epoch=peaks[0], max_grad_norm_this_epoch=peaks[1])


def finish_record(rec, means):
    if not rec["test_vfe"]:
        raise FloatingPointError(f"h={rec['settings']['hidden']} l={rec['settings']['latent']} diverged before "
                                 "its first evaluation, so this cell is not stored")
    test = np.array(rec["test_vfe"])
    rec["best_epoch"] = rec["eval_epochs"][int(test.argmin())]
    rec["best_test_vfe"] = float(test.min())
    rec["final_test_vfe"] = float(test[-1])
    if rec.get("val_vfe"):  # early stopping on held-out training images, not on the test set
        i = int(np.argmin(rec["val_vfe"]))
        rec["best_val_epoch"], rec["test_vfe_at_best_val"] = rec["eval_epochs"][i], float(test[i])
    rec["active_units"] = None if "diverged_epoch" in rec else active_units(means)  # no finite code left
    rec["wall_seconds"] = float(sum(rec["epoch_seconds"]))
    return rec


def evaluated(s, epoch):
    """Whether the VFEs are measured after this epoch: every eval_every-th and the last."""
    return epoch % s.get("eval_every", 1) == 0 or epoch == s["epochs"]


@torch.no_grad()
def test_terms(forward, test_x, draw, recon, chunk=EVAL_CHUNK):
    """Mean test reconstruction and KL per image, and the posterior means, under fixed noise."""
    recs, kls, means = 0.0, 0.0, []
    for x in test_x.split(chunk):
        logits, mean, log_var = forward(x, draw(len(x)))
        rec, kl = vfe_terms(logits, x, mean, log_var, recon)
        recs, kls = recs + rec.sum(-1), kls + kl.sum(-1)
        means.append(mean)
    return recs / len(test_x), kls / len(test_x), torch.cat(means, -2)


def adam(s, params, hh_weights):
    """The cell's Adam; the h x h weight matrices' learning rate scaled by hh_lr_scale."""
    hh = {id(p) for p in hh_weights}
    scale = s.get("hh_lr_scale", 1.0)
    groups_ = [{"params": [p for p in params if id(p) not in hh]},
               {"params": list(hh_weights), "lr": s["lr"] * scale}] if scale != 1.0 else params
    return torch.optim.Adam(groups_, lr=s["lr"], weight_decay=s["weight_decay"], fused=True)


def train_cell(s, progress=True):
    """Reference trainer: one model, as the course trains it. Returns (record, model)."""
    device = pick_device()
    train_x, val_x, test_x = cell_data(s, device)
    torch.manual_seed(s["seed"])
    model = VAE(s["hidden"], s["latent"]).to(device)
    opt = adam(s, list(model.parameters()), [model.encoder[2].weight, model.decoder[2].weight])
    rec = new_record(s, n_params(model), device)
    for epoch in tqdm(range(1, s["epochs"] + 1), desc=f"h={s['hidden']} l={s['latent']}",
                      disable=not progress, leave=False):
        t0, total, peaks = time.perf_counter(), 0.0, torch.full((2,), -float("inf"), device=device)
        batches = epoch_order(s["seed"], epoch, len(train_x), device).split(s["batch_size"])
        draw = noise(s["seed"], epoch, s["latent"], device, [len(b) for b in batches])
        model.train()
        for idx in batches:
            x = train_x[idx]
            with autocast(s, device):
                logits, mean, log_var = model(x, draw(len(x)))
            r, k = vfe_terms(logits.float(), x, mean.float(), log_var.float(), s["recon"])
            loss = (r + k).sum()  # the course sums the VFE over the mini-batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            peaks = torch.fmax(peaks, torch.stack([log_var.detach().float().max(), grad]))
            opt.step()
            total += loss.detach()  # kept on the device: no wait for the GPU at every step
        model.eval()
        measured = None
        if evaluated(s, epoch):
            fixed = lambda x: noise(s["seed"], 0, s["latent"], device, chunk_sizes(len(x), EVAL_CHUNK))
            r, k, means = test_terms(model, test_x, fixed(test_x), s["recon"])
            train_eval_x = train_x[:TRAIN_EVAL_IMAGES]
            tr, tk, _ = test_terms(model, train_eval_x, fixed(train_eval_x), s["recon"])
            measured = (float(r), float(k), float(tr + tk))
            if val_x is not None:
                vr, vk, _ = test_terms(model, val_x, fixed(val_x), s["recon"])
                measured += (float(vr + vk),)
        append_epoch(rec, float(total) / len(train_x), time.perf_counter() - t0, peaks.tolist(), measured)
        if "diverged_epoch" in rec:
            break
    rec.pop("recons", None)  # kept by the group trainer only
    return finish_record(rec, means), model


class GridVAE(nn.Module):
    """Several VAEs of one hidden size as one model: stacked weights, batched matrix products.

    Latent sizes may differ: units are padded to the largest and masked. A padded unit has
    mean 0, log-variance 0 and noise 0, so it adds nothing to z, the KL or any gradient.
    """

    def __init__(self, models):
        super().__init__()
        self.latents = [m.mean.out_features for m in models]
        self.hidden = models[0].mean.in_features
        L = max(self.latents)
        pad = lambda w, rows: F.pad(w, (0, 0, 0, rows - len(w)))  # zero rows up to `rows`
        stack = lambda f: nn.Parameter(torch.stack([f(m).detach() for m in models]))
        enc = [m.encoder for m in models]
        # The first layer is one wide product for all cells: x @ (784, C*h).
        self.w1 = nn.Parameter(torch.cat([e[0].weight.T.detach() for e in enc], 1))
        self.b1 = nn.Parameter(torch.cat([e[0].bias.detach() for e in enc]))
        self.w2, self.b2 = stack(lambda m: m.encoder[2].weight.T), stack(lambda m: m.encoder[2].bias[None])
        self.wh = stack(lambda m: torch.cat([pad(m.mean.weight, L), pad(m.log_var.weight, L)]).T)
        self.bh = stack(lambda m: torch.cat([pad(m.mean.bias[:, None], L), pad(m.log_var.bias[:, None], L)]).T)
        self.d1, self.c1 = stack(lambda m: pad(m.decoder[0].weight.T, L)), stack(lambda m: m.decoder[0].bias[None])
        self.d2, self.c2 = stack(lambda m: m.decoder[2].weight.T), stack(lambda m: m.decoder[2].bias[None])
        self.d3, self.c3 = stack(lambda m: m.decoder[4].weight.T), stack(lambda m: m.decoder[4].bias[None])
        mask = torch.zeros(len(models), 1, L)
        for c, l in enumerate(self.latents):
            mask[c, :, :l] = 1
        self.register_buffer("mask", mask)

    def forward(self, x, eps):
        act = lambda t: F.leaky_relu(t, 0.2)
        C, L = len(self.latents), max(self.latents)
        a = act(torch.addmm(self.b1, x, self.w1)).view(len(x), C, self.hidden).transpose(0, 1)
        a = act(torch.baddbmm(self.b2, a, self.w2))
        heads = torch.baddbmm(self.bh, a, self.wh)
        mean, log_var = heads[..., :L] * self.mask, heads[..., L:] * self.mask
        z = mean + torch.exp(0.5 * log_var) * eps
        d = act(torch.baddbmm(self.c1, z, self.d1))
        d = act(torch.baddbmm(self.c2, d, self.d2))
        return torch.baddbmm(self.c3, d, self.d3), mean, log_var

    def grad_norms(self):
        """Each cell's gradient norm over all its weights, shape (cells,)."""
        C, norm = len(self.latents), torch.linalg.vector_norm
        sq = norm(self.w1.grad.view(-1, C, self.hidden), dim=(0, 2)) ** 2 + norm(self.b1.grad.view(C, -1), dim=1) ** 2
        for name, p in self.named_parameters():
            if name not in ("w1", "b1"):
                sq = sq + norm(p.grad.flatten(1), dim=1) ** 2
        return sq.sqrt()

    def cell(self, c):
        """Cell c as a stand-alone VAE with the current weights."""
        h, l = self.hidden, self.latents[c]
        L = max(self.latents)
        m = VAE(h, l)
        with torch.no_grad():
            m.encoder[0].weight.copy_(self.w1[:, c * h:(c + 1) * h].T)
            m.encoder[0].bias.copy_(self.b1[c * h:(c + 1) * h])
            m.encoder[2].weight.copy_(self.w2[c].T), m.encoder[2].bias.copy_(self.b2[c, 0])
            m.mean.weight.copy_(self.wh[c, :, :l].T), m.mean.bias.copy_(self.bh[c, 0, :l])
            m.log_var.weight.copy_(self.wh[c, :, L:L + l].T), m.log_var.bias.copy_(self.bh[c, 0, L:L + l])
            m.decoder[0].weight.copy_(self.d1[c, :l].T), m.decoder[0].bias.copy_(self.c1[c, 0])
            m.decoder[2].weight.copy_(self.d2[c].T), m.decoder[2].bias.copy_(self.c2[c, 0])
            m.decoder[4].weight.copy_(self.d3[c].T), m.decoder[4].bias.copy_(self.c3[c, 0])
        return m


def grid_noise(cells, epoch, device, L, sizes=None):
    """Each cell's own noise stream, zero-padded to L latent units and stacked."""
    draws = [noise(s["seed"], epoch, s["latent"], device, sizes) for s in cells]
    return lambda rows: torch.stack([F.pad(d(rows), (0, L - s["latent"])) for d, s in zip(draws, cells)])


def train_epoch(grid, opt, train_x, cells, epoch, batches=None, bar=None):
    """One pass over the training images (or its first `batches`). Per cell: the summed VFE, the
    peaks (largest log-variance, gradient norm) and the first step at which each of NONFINITE was
    not finite (-1: never). All stay on the device until the epoch ends."""
    s0, L, C, device = cells[0], max(grid.latents), len(cells), train_x.device
    batches = epoch_order(s0["seed"], epoch, len(train_x), device).split(s0["batch_size"])[:batches]
    draw = grid_noise(cells, epoch, device, L, [len(b) for b in batches])
    totals = torch.zeros(C, device=device)
    peaks = torch.full((C, 2), -float("inf"), device=device)
    first_bad = torch.full((C, len(NONFINITE)), -1, dtype=torch.long, device=device)
    for step, idx in enumerate(batches):
        x = train_x[idx]
        with autocast(s0, device):
            logits, mean, log_var = grid(x, draw(len(x)))
        r, k = vfe_terms(logits.float(), x, mean.float(), log_var.float(), s0["recon"])
        per_cell = (r + k).sum(-1)  # each cell's VFE summed over the mini-batch
        opt.zero_grad(set_to_none=True)
        per_cell.sum().backward()
        with torch.no_grad():
            max_lv, grad = log_var.float().amax((1, 2)), grid.grad_norms()
            checks = torch.stack([max_lv.exp(), r.sum(-1), k.sum(-1), grad], 1)
            first_bad = torch.where((first_bad < 0) & ~checks.isfinite(), step, first_bad)
            peaks = torch.fmax(peaks, torch.stack([max_lv, grad], 1))  # fmax: a NaN step leaves the peak
        opt.step()
        totals += per_cell.detach()
        if bar is not None:
            bar.update()
    return totals, peaks, first_bad


def new_group(cells, device):
    """A group's stacked model (each cell with its seeded initial weights), its Adam, its sizes."""
    rest = lambda s: {k: v for k, v in s.items() if k != "latent"}
    if any(rest(s) != rest(cells[0]) for s in cells):
        raise ValueError("a group's cells must differ only in their latent size")
    models = []
    for s in cells:
        torch.manual_seed(s["seed"])  # the same initial weights as when trained alone
        models.append(VAE(s["hidden"], s["latent"]))
    grid = GridVAE(models).to(device)
    return grid, adam(cells[0], list(grid.parameters()), [grid.w2, grid.d2]), [n_params(m) for m in models]


def train_group(cells, progress=True, checkpoint=None):
    """Train cells that differ only in latent size together; returns (records, models).

    Adam is elementwise, so one optimiser over the stacked weights is each cell's own Adam.
    With `checkpoint` (a path) the state is saved after an epoch (see CHECKPOINT_SECONDS) and
    resumed from it.
    """
    s0, device = cells[0], pick_device()
    train_x, val_x, test_x = cell_data(s0, device)
    grid, opt, records, start = resumed_group(cells, device, checkpoint)
    L, C, means, saved = max(grid.latents), len(cells), None, time.monotonic()
    fixed = lambda x: grid_noise(cells, 0, device, L, chunk_sizes(len(x), EVAL_CHUNK))
    train_eval_x = train_x[:TRAIN_EVAL_IMAGES]
    name = f"h={s0['hidden']} l={','.join(str(s['latent']) for s in cells)}"
    steps = -(-len(train_x) // s0["batch_size"])
    for epoch in tqdm(range(start, s0["epochs"] + 1), desc=name, initial=start - 1, unit="epoch",
                      total=s0["epochs"], disable=not progress, leave=False, position=PROGRESS_ROW):
        t0 = time.perf_counter()
        # A long epoch gets a bar of its own, with the time it has left.
        with tqdm(total=steps, desc=f"{name} epoch {epoch}", unit="batch", leave=False,
                  disable=not progress or steps < 100, position=PROGRESS_ROW + 1) as bar:
            totals, peaks, first_bad = train_epoch(grid, opt, train_x, cells, epoch, bar=bar)
        measured = [None] * C
        if evaluated(s0, epoch):
            r, k, means = test_terms(grid, test_x, fixed(test_x), s0["recon"])
            tr, tk, _ = test_terms(grid, train_eval_x, fixed(train_eval_x), s0["recon"])
            cols = [r, k, tr + tk]
            if val_x is not None:
                vr, vk, _ = test_terms(grid, val_x, fixed(val_x), s0["recon"])
                cols.append(vr + vk)
            measured = torch.stack(cols, 1).tolist()
        seconds = (time.perf_counter() - t0) / C  # each cell's share of the group's time
        totals, peaks, first_bad = totals.tolist(), peaks.tolist(), first_bad.tolist()
        for c in range(C):
            was_going = "diverged_epoch" not in records[c]
            append_epoch(records[c], totals[c] / len(train_x), seconds, peaks[c], measured[c])
            if was_going and "diverged_epoch" in records[c]:
                note_divergence(records[c], first_bad[c], peaks[c])
        if s0.get("recon_images") and measured[0] is not None:
            keep_reconstructions(grid, test_x[: s0["recon_images"]], records)
        if all("diverged_epoch" in rec for rec in records):
            break
        if checkpoint is not None and (time.monotonic() - saved >= CHECKPOINT_SECONDS or epoch == s0["epochs"]):
            atomic_save({"grid": grid.state_dict(), "opt": opt.state_dict(), "records": records,
                         "epoch": epoch}, checkpoint, torch.save)
            atomic_save({"cells": cells}, Path(checkpoint).with_suffix(".json"), write_json)  # who can resume it
            saved = time.monotonic()
            hold_for_tests()
    if means is None:  # resumed after the last epoch's checkpoint
        means = test_terms(grid, test_x, fixed(test_x), s0["recon"])[2]
    finished = []
    for c, l in enumerate(grid.latents):
        try:
            finished.append(finish_record(records[c], means[c, :, :l]))
        except FloatingPointError as err:  # the group's other cells are still good
            warnings.warn(str(err))
            finished.append(None)
    return finished, [grid.cell(c).cpu() for c in range(C)]


@torch.no_grad()
def keep_reconstructions(grid, x, records):
    """Each going cell's posterior-mean reconstructions of x (decoded from z = mean), kept as the
    final ones and, when its validation VFE is the lowest so far, as the best-validation ones:
    quantised to bytes (k / 255), beside the exact mean squared error of the float images."""
    zeros = torch.zeros(len(grid.latents), len(x), max(grid.latents), device=x.device)
    images = torch.sigmoid(grid(x, zeros)[0])
    for c, rec in enumerate(records):
        if "diverged_epoch" in rec:
            continue
        kept = dict(images=images[c].mul(255).round().to(torch.uint8).cpu(),
                    mse=float((images[c] - x).pow(2).sum(-1).mean()))
        rec["recons"]["final"] = kept
        if int(np.argmin(rec["val_vfe"])) == len(rec["val_vfe"]) - 1:
            rec["recons"]["best_val"] = kept


def hold_for_tests():
    """After a checkpoint, wait while the file named by VAE_HOLD_FILE exists: a test stops a job at
    this known point instead of racing a time limit. Unset (always, outside tests) it does nothing."""
    hold = os.environ.get("VAE_HOLD_FILE")
    while hold and Path(hold).exists():
        time.sleep(0.05)


def resumed_group(cells, device, checkpoint=None):
    """(model, Adam, records, first epoch) of a group: fresh, or resumed from its checkpoint. A
    checkpoint that cannot be read or is another group's is set aside (renamed) with a warning."""
    grid, opt, sizes = new_group(cells, device)
    records = [dict(new_record(s, n, device), group=[c["latent"] for c in cells]) for s, n in zip(cells, sizes)]
    if checkpoint is None or not Path(checkpoint).exists():
        return grid, opt, records, 1
    checkpoint = Path(checkpoint)
    try:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if [r["settings"] for r in state["records"]] != cells:
            raise ValueError("it holds another group's cells")
        grid.load_state_dict(state["grid"]), opt.load_state_dict(state["opt"])
        print(f"resuming {checkpoint.name} after epoch {state['epoch']}", file=sys.stderr)
        return grid, opt, state["records"], state["epoch"] + 1
    except Exception as err:  # torch raises many kinds for a damaged file
        aside = checkpoint.with_name(f"{checkpoint.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(checkpoint, aside)
        warnings.warn(f"checkpoint {checkpoint} could not be used ({err!r:.200}); it was set aside as "
                      f"{aside.name} and the group trains from its first epoch")
        grid, opt, _ = new_group(cells, device)
        return grid, opt, records, 1


def groups(cells, max_params=40_000_000, max_waste=0.1, free_padding=4_000_000):
    """Split cells into groups that train together: same settings but latent size, padding
    waste at most `max_waste` of the real work, and at most `max_params` weights in all.
    Below `free_padding` weights a step costs its overhead more than its arithmetic, so
    padding is free there."""
    by_rest = {}
    for s in sorted(cells, key=lambda s: s["latent"]):
        by_rest.setdefault(json.dumps({k: v for k, v in s.items() if k != "latent"}, sort_keys=True), []).append(s)
    out = []
    for same in by_rest.values():
        group = []
        for s in same:
            trial = group + [s]
            real = sum(n_params_formula(t["hidden"], t["latent"]) for t in trial)
            padded = len(trial) * n_params_formula(s["hidden"], s["latent"])
            wasteful = padded > (1 + max_waste) * real and padded > free_padding
            if group and (wasteful or padded > max_params):
                out.append(group)
                trial = [s]
            group = trial
        out.append(group)
    return out


# ---------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------

HOST = platform.node()
PROGRESS_ROW = 0  # a worker process draws its progress bars below the others' rows
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
WAIT_SECONDS = 5  # how often a worker looks again for groups that others are training


def atomic_save(obj, path, save):
    """Write to a temporary file of this process's own, then rename: a crash never leaves half a
    file, and two writers of one path never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}~{HOST}~{os.getpid()}~{os.urandom(4).hex()}.tmp")
    try:
        save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path):
    Path(path).write_text(json.dumps(obj, indent=1))


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_leftovers(results_dir, max_age=86_400):
    """Delete the temporary files of writers that died: this machine's dead processes', any older
    than a day (another machine's), and those of the fixed-name writer before them."""
    for tmp in Path(results_dir).glob("**/*.tmp"):
        parts = tmp.name[:-len(".tmp")].split("~")
        mine = len(parts) == 4 and parts[1] == HOST
        try:
            dead = (mine and not alive(int(parts[2]))) or len(parts) != 4 or \
                time.time() - tmp.stat().st_mtime > max_age
        except (ValueError, FileNotFoundError):
            continue
        if dead:
            tmp.unlink(missing_ok=True)


def writable_results(results_dir):
    """The results folder, made and checked to take files before any training starts."""
    if not str(results_dir).strip():
        raise ValueError("the results folder is named by an empty string; name a folder (default: results/)")
    path = Path(results_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"the results folder {path} is a file, not a folder; name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe~{HOST}~{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write to the results folder {path} ({err.strerror}); "
                              "name one you can write to with --results") from None
    return path


def cell_path(s, results_dir=RESULTS_DIR):
    """Where a cell's record lives: a readable name plus a hash of every setting."""
    digest = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
    slug = f"{s['dataset']}-h{s['hidden']}-l{s['latent']}-wd{s['weight_decay']:g}-e{s['epochs']}-s{s['seed']}"
    slug += "-bf16" if s.get("precision") == "bfloat16" else ""
    slug += f"-o{s['train_offset']}" if s.get("train_offset") else ""
    return Path(results_dir) / "cells" / f"{slug}-{digest}.json"


def recons_path(s, results_dir=RESULTS_DIR):
    """Where a cell's kept test reconstructions live (uint8 arrays `final` and `best_val`)."""
    return Path(results_dir) / "recons" / cell_path(s).with_suffix(".npz").name


def save_npz(arrays, path):
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def weights_path(s, results_dir=RESULTS_DIR):
    return Path(results_dir) / "weights" / cell_path(s).with_suffix(".pt").name


def checkpoint_path(group, results_dir=RESULTS_DIR):
    key = hashlib.sha1(json.dumps(group, sort_keys=True).encode()).hexdigest()[:16]
    return Path(results_dir) / "checkpoints" / f"{key}.pt"


# The fields a stored record must have, with their types (checked when it is read).
RECORD_FIELDS = dict(settings=dict, n_params=int, test_vfe=list, best_test_vfe=float, best_epoch=int,
                     final_test_vfe=float, epoch_seconds=list, wall_seconds=float)


def upgrade_record(rec):
    """Records from before the end-of-epoch training VFE: their `train_vfe` was the running mean
    of the mini-batch VFEs, and every epoch was evaluated. Renamed, so a name means one measure."""
    if "eval_epochs" not in rec and "test_vfe" in rec:
        rec["running_train_vfe"] = rec.pop("train_vfe", [])
        rec["eval_epochs"] = list(range(1, len(rec["test_vfe"]) + 1))
    return rec


def load_cell(path, s):
    """A stored record, checked to be the cell asked for."""
    try:
        rec = upgrade_record(json.loads(Path(path).read_text()))
        stored = rec["settings"]
        for field, kind in RECORD_FIELDS.items():
            if not isinstance(rec[field], kind) or isinstance(rec[field], bool):
                raise TypeError(f"{field} is {type(rec[field]).__name__}, not {kind.__name__}")
    except (ValueError, KeyError, TypeError, IsADirectoryError) as err:
        raise ResultsError(f"{path} is corrupt ({err!r}); it was left as it is. "
                           f"Delete it to retrain that cell.") from None
    if stored != s:
        raise ResultsError(f"{path} holds a cell trained with {stored}, not {s}; "
                           f"it was left as it is. Delete it to retrain that cell.")
    return rec


def stored_and_missing(cells, results_dir=RESULTS_DIR):
    """The stored records among `cells` (each checked), and the settings of those not stored (each
    once, though asked for twice)."""
    have = [s for s in cells if cell_path(s, results_dir).exists()]
    missing = [s for s in cells if s not in have]
    return ([load_cell(cell_path(s, results_dir), s) for s in have],
            [s for i, s in enumerate(missing) if s not in missing[:i]])


@contextmanager
def group_lock(checkpoint):
    """An exclusive lock on a group (flock on <checkpoint>.lock), or None if another process holds
    it. The kernel drops the lock of a process that dies, so its successor can take the group."""
    import fcntl
    path = Path(checkpoint).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def planned_groups(pending, results_dir):
    """The groups to train for the pending cells: first each checkpointed group that still lacks a
    cell (resumed as it was), then new groups of the rest. A checkpoint that no pending cell needs
    is removed when its group is not being trained."""
    plans, covered = [], []
    for side in sorted((Path(results_dir) / "checkpoints").glob("*.json")):
        try:
            group = json.loads(side.read_text())["cells"]
        except (ValueError, KeyError, TypeError, OSError):
            continue
        still = [s for s in group if s in pending and s not in covered]
        if still:
            plans.append(group)
            covered += still
        elif not any(s in pending for s in group):
            with group_lock(side.with_suffix(".pt")) as lock:
                if lock is not None and all(cell_path(s, results_dir).exists() for s in group):
                    side.with_suffix(".pt").unlink(missing_ok=True)
                    side.unlink(missing_ok=True)
    return plans + groups([s for s in pending if s not in covered])


def store_group(group, results_dir, progress):
    """Train one group (resuming its checkpoint) and store the cells it still lacks; returns the
    cells that diverged before their first evaluation (not stored)."""
    checkpoint = checkpoint_path(group, results_dir)
    todo = [s for s in group if not cell_path(s, results_dir).exists()]
    if todo:
        records, models = train_group(group, progress, checkpoint)
        for s, rec, model in zip(group, records, models):
            if s in todo and rec is not None:
                atomic_save(model.state_dict(), weights_path(s, results_dir), torch.save)
                recons = rec.pop("recons", None)
                if recons:  # before the record: a stored record means everything of its cell is stored
                    rec.update({f"recon_mse_{k}": v["mse"] for k, v in recons.items()})
                    arrays = {k: v["images"].numpy() for k, v in recons.items()}
                    atomic_save(arrays, recons_path(s, results_dir), save_npz)
                atomic_save(rec, cell_path(s, results_dir), write_json)
    checkpoint.unlink(missing_ok=True)
    checkpoint.with_suffix(".json").unlink(missing_ok=True)
    return [s for s in todo if not cell_path(s, results_dir).exists()]


def run_cells(cells, results_dir=RESULTS_DIR, progress=True, jobs=1):
    """Records for every cell: stored ones reused, the rest trained in groups and stored at once.
    Safe with other processes on the same folder: each group is trained by the one that locks it.
    With `jobs` > 1, that many single-threaded worker processes share the groups."""
    results_dir = writable_results(results_dir)
    remove_leftovers(results_dir)
    _, pending = stored_and_missing(cells, results_dir)
    jobs = min(jobs, len(planned_groups(pending, results_dir))) if pending else 1
    if jobs > 1:  # more workers than groups would idle, and take threads from the others
        run_workers(cells, results_dir, jobs, progress)
    failed = []
    while pending:
        busy = False
        for group in tqdm(planned_groups(pending, results_dir), desc="groups", disable=not progress or PROGRESS_ROW > 0):
            with group_lock(checkpoint_path(group, results_dir)) as lock:
                if lock is None:
                    busy = True  # another process is training it
                    continue
                failed += store_group(group, results_dir, progress)
        pending = [s for s in pending if not cell_path(s, results_dir).exists() and s not in failed]
        if pending and busy:
            time.sleep(WAIT_SECONDS)
    if failed:
        names = ", ".join(f"h={s['hidden']} l={s['latent']} seed {s['seed']}" for s in failed)
        raise FloatingPointError(f"{names} diverged before the first evaluation and was not stored; "
                                 "the other cells of its group were")
    return [load_cell(cell_path(s, results_dir), s) for s in cells]


def worker(cells, results_dir, threads, row=0, progress=False):
    """One of run_cells' worker processes: single-threaded, claiming groups through their locks."""
    global PROGRESS_ROW
    PROGRESS_ROW = row
    torch.set_num_threads(threads)
    run_cells(cells, results_dir, progress=progress)


def run_workers(cells, results_dir, jobs, progress):
    """Train the missing cells in `jobs` processes, the machine's cores shared among them."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(cells, str(results_dir), max(1, CORES // jobs), 1 + 2 * i, progress))
             for i in range(jobs)]
    for p in procs:
        p.start()
    unique = {cell_path(s, results_dir) for s in cells}
    with tqdm(total=len(unique), desc=f"cells stored ({jobs} workers)", disable=not progress) as bar:
        while any(p.is_alive() for p in procs):
            bar.update(sum(p.exists() for p in unique) - bar.n)
            time.sleep(1)
        bar.update(sum(p.exists() for p in unique) - bar.n)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {jobs} workers failed (exit codes {bad}); their errors are above")


class GroupJob:
    """A Slurm job of submit_slurm: train and store one group. On preemption or time-out submitit
    calls `checkpoint`, requeues the same call, and it resumes from the group's last checkpoint."""

    def __call__(self, group, results_dir):
        return run_cells(group, results_dir, progress=False)

    def checkpoint(self, group, results_dir):
        import submitit
        return submitit.helpers.DelayedSubmission(self, group, results_dir)


def submit_slurm(cells, results_dir=RESULTS_DIR, partition=None, hours=4.0, gpus=0, executor=None):
    """Submit the groups that `cells` still lack as one Slurm job array (submitit); returns the jobs.
    `executor` replaces the Slurm one (tests pass submitit's local executor)."""
    import submitit
    results_dir = writable_results(results_dir)
    plan = planned_groups(stored_and_missing(cells, results_dir)[1], results_dir)
    if executor is None:
        executor = submitit.AutoExecutor(folder=results_dir / "slurm")
        executor.update_parameters(slurm_partition=partition, gpus_per_node=gpus, cpus_per_task=2,
                                   timeout_min=max(1, round(hours * 60)), slurm_array_parallelism=len(plan) or 1)
    with executor.batch():
        jobs = [executor.submit(GroupJob(), group, str(results_dir)) for group in plan]
    return jobs


def grid(hiddens, latents, **overrides):
    return [cell_settings(h, l, **overrides) for h in hiddens for l in latents]


Q4_HIDDEN, Q4_LATENT = [5, 50, 200, 500], [5, 10, 100, 300]
Q5_HIDDEN, Q5_LATENT = [2 ** k for k in range(7, 11)], [2 ** k for k in range(1, 9)]
# Chosen by the q6_sweep: the smallest of 0.01, 0.1, 1, 10 whose effect (1 to 2 nats) is
# well above the seed-to-seed spread without swamping the model, as 10 does.
Q6_WEIGHT_DECAY = 1.0
SEED_CELLS = [(50, 10), (200, 10), (500, 10), (1024, 8)]
# Q7's wide models, at the latent size Q4 found best, pass 60,000 x 784 values: two below
# (P(3200, 10) = 25.6M is within a factor 2) and two above (P(4500, 10) = 47.7M, P(5000, 10) = 58.0M).
# On a 2-core CPU each costs 1.5 to 2 minutes per million weights at 30 epochs. h = 5000 diverges
# (NaN) in its 21st epoch at this learning rate; it is stored with the 20 epochs it finished.
# Seeds 1 and 2 ask whether that is the width or the seed, and h = 4750 (52.6M) whether a model
# between 4500 and 5000 finishes. These three ran on a GPU (their records say which).
Q7_LATENT = 10
Q7_WIDE = [cell_settings(h, Q7_LATENT) for h in (2000, 3200, 4500, 4750, 5000)] + \
          [cell_settings(5000, Q7_LATENT, seed=seed) for seed in (1, 2)]
# Q7 with the line moved down: the first N training images, so the line N x 784 falls where
# models are cheap and over-fitting shows. P(h, 10) passes 784,000 at h = 343 and 7,840,000 at
# h = 1,619; each size reaches 10 times past its line. {N: (epochs, eval_every, seeds)}.
Q7_DATA_HIDDEN = [10, 50, 150, 300, 500, 1000, 2000, 4000, 6000]
Q7_DATA = {1_000: (400, 10, (0, 1, 2)), 10_000: (100, 2, (0,))}
# At 10,000 images h = 50 and 300 are left out: four models below the line are enough.
# Bias and variance over training sets (Geman et al. 1992; Neal et al. 2018): K disjoint sets of
# 1,000 images (set k: images 1,000k on, trained with seed k), and seeds 1 and 2 on set 0 for the
# part of the variance that comes from the seed (initial weights, data order, noise). As q7_data
# at N = 1,000, plus a validation VFE on the last 5,000 training images and the reconstructions
# of the first 1,000 test images.
Q7_BV_HIDDEN = [10, 50, 150, 300, 500, 1000, 2000]
Q7_BV_SETS = 5
Q7_BV = dict(train_size=1_000, epochs=400, eval_every=10, val_size=5_000, recon_images=1_000)


def q7_bias_variance_cells():
    sets = [dict(train_offset=1_000 * k, seed=k) for k in range(Q7_BV_SETS)]
    runs = sets + [dict(train_offset=0, seed=seed) for seed in (1, 2)]
    return [cell_settings(h, Q7_LATENT, **Q7_BV, **run) for h in Q7_BV_HIDDEN for run in runs]


EXPERIMENTS = {
    "q4": lambda: grid(Q4_HIDDEN, Q4_LATENT),
    "q5": lambda: grid(Q5_HIDDEN, Q5_LATENT),
    "q6": lambda: grid(Q4_HIDDEN, Q4_LATENT, weight_decay=Q6_WEIGHT_DECAY),
    "q7": lambda: grid(Q4_HIDDEN, Q4_LATENT) + Q7_WIDE,
    "q7_data": lambda: [cell_settings(h, Q7_LATENT, train_size=n, epochs=e, eval_every=k, seed=seed)
                        for n, (e, k, seeds) in Q7_DATA.items() for seed in seeds for h in Q7_DATA_HIDDEN
                        if n == 1_000 or h not in (50, 300)],
    "q7_bias_variance": q7_bias_variance_cells,
    # Is the wide models' deficit Adam's step size? Their h x h layers' rate scaled by 500 / h.
    "q7_lr_scale": lambda: [cell_settings(h, Q7_LATENT, hh_lr_scale=500 / h) for h in (2000, 4500)],
    # Is the rise past the line at 10,000 images the optimiser too? Its h = 2000 cell, width-scaled.
    "q7_data_lr_scale": lambda: [cell_settings(2000, Q7_LATENT, train_size=10_000, epochs=100, eval_every=2,
                                               hh_lr_scale=0.25)],
    # Choosing Q6's weight decay on a small and a large Q4 cell.
    "q6_sweep": lambda: [cell_settings(h, 10, weight_decay=wd)
                         for h in (50, 500) for wd in (0.0, 0.01, 0.1, 1.0, 10.0)],
    # Seed-to-seed spread: a small, two middle and the largest well-performing cell, seeds 0-2.
    "seeds": lambda: [cell_settings(h, l, seed=seed) for h, l in SEED_CELLS for seed in (0, 1, 2)],
    # Does bfloat16 training reach the float32 VFE (within 0.1 nats) on Q5's best cell?
    "bf16_check": lambda: [cell_settings(1024, 8, precision=p) for p in ("float32", "bfloat16")],
    # What the course's Gaussian (squared-error) decoder does against a Bernoulli one.
    "recon": lambda: [cell_settings(200, 100, recon=r, epochs=5) for r in ("mse", "bernoulli")],
}


def experiment_cells(name, epochs=None, max_params=None, min_params=0):
    """An experiment's cells, each trained `epochs` long if given, those of the size asked for."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)} or 'all'")
    cells = EXPERIMENTS[name]()
    if epochs is not None:
        cells = [cell_settings(**dict(s, epochs=epochs)) for s in cells]
    fits = lambda s: min_params <= n_params_formula(s["hidden"], s["latent"]) <= (max_params or float("inf"))
    return [s for s in cells if fits(s)]


def end_of_epoch(rec, epoch):
    """The end-of-epoch training VFE after `epoch` (-1: the last evaluated); NaN for older records."""
    if not rec.get("train_vfe"):
        return float("nan")
    i = -1 if epoch == -1 else rec["eval_epochs"].index(epoch)
    return round(rec["train_vfe"][i], 3)


def summary_table(records):
    """One row per cell: the columns of results/<name>.csv."""
    import pandas as pd
    rows = [dict(hidden_dim=r["settings"]["hidden"], latent_dim=r["settings"]["latent"],
                 weight_decay=r["settings"]["weight_decay"], recon=r["settings"]["recon"],
                 train_size=r["settings"]["train_size"], epochs=r["settings"]["epochs"],
                 hh_lr_scale=round(r["settings"].get("hh_lr_scale", 1.0), 4),
                 seed=r["settings"]["seed"], precision=r["settings"].get("precision", OPTIONS["precision"]),
                 n_params=r["n_params"],
                 best_test_vfe=round(r["best_test_vfe"], 3), best_epoch=r["best_epoch"],
                 final_test_vfe=round(r["final_test_vfe"], 3),
                 final_train_vfe=end_of_epoch(r, -1), best_epoch_train_vfe=end_of_epoch(r, r["best_epoch"]),
                 final_running_train_vfe=round(r["running_train_vfe"][-1], 3), active_units=r["active_units"],
                 wall_seconds=round(r["wall_seconds"], 1), device=r["device"]) for r in records]
    table = pd.DataFrame(rows)
    if any("diverged_epoch" in r for r in records):  # only then, so other tables keep their columns
        table["diverged_epoch"] = pd.array([r.get("diverged_epoch") for r in records], dtype="Int64")
    return table


def table_name(name, epochs=None):
    """The summary table's name: the experiment's, with _e<N> when its epochs are overridden."""
    return name if epochs is None else f"{name}_e{epochs}"


def run_experiment(name, results_dir=RESULTS_DIR, progress=True, epochs=None, max_params=None, min_params=0,
                   jobs=1):
    """Run or resume one question's grid, write results/<name>.csv, return (table, records).
    With `epochs`, every cell trains that long instead, and the table is <name>_e<epochs>.csv.
    With `max_params` or `min_params`, only the cells of that size train (a laptop takes the
    small ones, a GPU the large); the table holds every stored cell. `jobs`: worker processes."""
    run_cells(experiment_cells(name, epochs, max_params, min_params), results_dir, progress, jobs)
    cells = experiment_cells(name, epochs)
    records = stored_and_missing(cells, results_dir)[0]
    table = summary_table(records)
    atomic_save(table, Path(results_dir) / f"{table_name(name, epochs)}.csv", lambda t, p: t.to_csv(p, index=False))
    return table, records


def stored_records(name, results_dir=RESULTS_DIR):
    """The stored records of an experiment's cells (training nothing), and the settings it still lacks."""
    return stored_and_missing(experiment_cells(name), results_dir)


def best_model(records, results_dir=RESULTS_DIR):
    """(record, VAE) of the cell with the lowest best test VFE, its final weights kept in
    results/sample_vae.pt (a few MB, committed) so the samples need no training."""
    best = min(records, key=lambda r: r["best_test_vfe"])
    path = Path(results_dir) / "sample_vae.pt"
    if not path.exists() or torch.load(path)["settings"] != best["settings"]:
        state = torch.load(weights_path(best["settings"], results_dir), map_location="cpu")
        atomic_save({"settings": best["settings"], "state": state}, path, torch.save)
    model = VAE(best["settings"]["hidden"], best["settings"]["latent"])
    model.load_state_dict(torch.load(path, map_location="cpu")["state"])
    return best, model.double().eval()  # float64, as kept_models


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

VFE_LABEL = "test VFE (nats per image)"


def heatmap(table, title, value="best_test_vfe", label=VFE_LABEL, ax=None, fmt=".2f", cmap="viridis", center=None,
            vmax=None):
    """Rows: hidden size; columns: latent size; every cell annotated with its value. With `vmax`, the
    colours stop there (cells above it drawn in the top colour, marked ">"), so that the range the
    text argues about gets the whole scale."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    grid_ = table.pivot(index="hidden_dim", columns="latent_dim", values=value)
    ax = ax or plt.subplots(figsize=(1.2 * grid_.shape[1] + 2.5, 0.8 * grid_.shape[0] + 1.5))[1]
    text = grid_.map(lambda x: format(x, fmt) + (" >" if vmax is not None and x > vmax else ""))
    label += f"; colours clipped at {vmax:g} (cells marked >)" if vmax is not None and (grid_ > vmax).any().any() else ""
    sns.heatmap(grid_, annot=text, fmt="", cmap=cmap, center=center, vmax=vmax, ax=ax, cbar_kws={"label": label})
    ax.set_xlabel("latent dimension l (units)")
    ax.set_ylabel("hidden dimension h (units)")
    ax.set_title(title)
    return ax


def vfe_vs_params(table, title, ax=None):
    """Best test VFE against total trainable parameters, with the training-data line."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(8, 5))[1]
    gone = table["diverged_epoch"].notna().to_numpy() if "diverged_epoch" in table else np.zeros(len(table), bool)
    for l, rows in table[~gone].groupby("latent_dim"):
        ax.plot(rows["n_params"], rows["best_test_vfe"], "o", label=f"latent l = {l}")
    if gone.any():
        ax.plot(table.n_params[gone], table.best_test_vfe[gone], "kx", ms=9, zorder=3,
                label="diverged (best of the epochs before it)")
    wide = table[table.hidden_dim > 500].sort_values("best_test_vfe") if "hidden_dim" in table else table[:0]
    for i, (_, r) in enumerate(wide.iterrows()):  # the wide models, named; the crosses' labels fanned out
        out = gone[table.index.get_loc(r.name)]
        ax.annotate(f"h={r.hidden_dim}" + (f", seed {r.seed}" if r.seed else ""), (r.n_params, r.best_test_vfe),
                    textcoords="offset points", xytext=(10, 12 * i - 40) if out else (-6, 6), fontsize=7,
                    ha="left" if out else "right", arrowprops=dict(arrowstyle="-", lw=0.5) if out else None)
    ax.axvline(TRAIN_VALUES, color="k", ls="--", label=f"training data: 60,000 x 784 = {TRAIN_VALUES:,} values")
    ax.axvline(60_000, color="grey", ls=":", label="training data: 60,000 images")
    ax.set_xscale("log")
    ax.set_xlabel("total trainable parameters (count, log scale)")
    ax.set_ylabel("best " + VFE_LABEL)
    ax.set_title(title)
    ax.margins(x=0.12)  # room for the names of the outermost models
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: no point hidden
    return ax


def by_size(table, running=False):
    """Per training-set size and hidden size: the mean and seed-to-seed sd (missing for one seed) of
    each VFE column over the finished runs; `diverged` counts the runs left out because they diverged.
    With `running`, older records' running mean stands in for the end-of-epoch training VFE."""
    import pandas as pd
    table = table.copy()
    if running:
        table["final_train_vfe"] = table.final_running_train_vfe
    gone = table.diverged_epoch.notna() if "diverged_epoch" in table else pd.Series(False, index=table.index)
    keys = ["train_size", "hidden_dim", "n_params"]
    cols = ["best_test_vfe", "final_test_vfe", "final_train_vfe", "best_epoch_train_vfe", "best_epoch"]
    g = table[~gone].groupby(keys)[cols]
    out = g.mean().join(g.std().add_suffix("_sd")).join(g.size().rename("seeds"))
    out = out.join(table[gone].groupby(keys).size().rename("diverged"), how="outer")
    if "device" in table:
        out = out.join(table.groupby(keys).device.agg(lambda d: ", ".join(sorted(set(d)))).rename("devices"))
    out = out.reset_index()
    out[["seeds", "diverged"]] = out[["seeds", "diverged"]].fillna(0).astype(int)
    out["running"] = running
    out["of_line"] = out.n_params / (out.train_size * X_DIM)
    out["gap"] = out.final_test_vfe - out.final_train_vfe  # both measured after the last epoch, alike
    return out


def capacity_curves(summary, axes, diverged=None):
    """Left: best and final test VFE and the end-of-epoch training VFE against parameters, one colour
    per training-set size, its line N x 784 in that colour; `diverged` (summary_table rows) drawn as
    crosses at the best test VFE of the epochs before. Right: the final test-minus-training gap
    against parameters over the line. Curves join finished runs only."""
    import matplotlib.pyplot as plt
    left, right = axes
    colours = dict(zip(sorted(summary.train_size.unique()), plt.cm.tab10.colors))
    for n, rows in (diverged.groupby("train_size") if diverged is not None else []):
        left.plot(rows.n_params, rows.best_test_vfe, "X", ms=10, mec="k", color=colours.get(n, "k"), zorder=4,
                  label=f"N = {n:,}: diverged (in epoch {', '.join(map(str, rows.diverged_epoch))})")
    for n, rows in summary[summary.seeds > 0].groupby("train_size"):
        colour = colours[n]
        kw, running = dict(color=colour, capsize=3), bool(rows.running.all())
        train = ("x:", "final training (running mean)") if running else ("^:", "final training")
        for col, style, what in [("best_test_vfe", "o-", "best test"), ("final_test_vfe", "s--", "final test"),
                                 ("final_train_vfe", *train)]:
            left.errorbar(rows.n_params, rows[col], rows[col + "_sd"], fmt=style, label=f"N = {n:,}: {what}", **kw)
        left.axvline(n * X_DIM, color=colour, lw=1, alpha=0.6)
        seeds = int(rows.seeds.max())
        right.errorbar(rows.of_line, rows.gap, np.hypot(rows.final_test_vfe_sd, rows.final_train_vfe_sd),
                       fmt="x--" if running else "o-", label=f"N = {n:,} ({seeds} seed{'s' * (seeds > 1)})"
                       + (", against the running mean" if running else ""), **kw)
    right.axvline(1, color="k", ls="--", lw=1, label="the line: parameters = N x 784")
    left.set(xscale="log", xlabel="total trainable parameters (count, log scale)", ylabel="VFE (nats per image)",
             title="Q7: VFE against model size for N training images\n(vertical line: N x 784 in the curve's colour)")
    right.set(xscale="log", xlabel="parameters / (N x 784) (ratio, log scale)",
              ylabel="final test minus training VFE (nats per image)",
              title="Generalisation gap after the last epoch\n(test minus end-of-epoch training VFE, unless marked)")
    left.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))  # below: no data hidden
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return axes


def bias_variance_curves(table, axes, n=1_000):
    """Three panels against parameters, final epoch solid and best-validation epoch dashed, error bars
    the jackknife standard errors over the training sets: bias^2 and their sum; the variance and the
    seed's part of it; the test VFE across training sets (sd)."""
    errs = dict(capsize=3, ms=5)
    for which, ls in (("final", "-"), ("best_val", "--")):
        t = table[table.epoch == which].sort_values("n_params")
        when = "final epoch" if which == "final" else "best-validation epoch"
        axes[0].errorbar(t.n_params, t.total, t.total_jse, fmt="o" + ls, color="C0", label=f"bias² + variance, {when}",
                         **errs)
        axes[0].errorbar(t.n_params, t.bias2, t.bias2_jse, fmt="s" + ls, color="C1", label=f"bias², {when}", **errs)
        axes[1].errorbar(t.n_params, t.variance, t.variance_jse, fmt="o" + ls, color="C2",
                         label=f"variance over {t.sets.max()} training sets, {when}", **errs)
        axes[1].plot(t.n_params, t.variance_seed, "^" + ls, color="C4",
                     label=f"variance over {t.seeds.max()} seeds on one set, {when}")
        axes[2].errorbar(t.n_params, t.test_vfe, t.test_vfe_sd, fmt="o" + ls, color="C3",
                         label=f"test VFE at the {when}", **errs)
    t = table[table.epoch == "final"].sort_values("n_params")
    axes[2].plot(t.n_params, t.best_on_test, "k:", marker="x", label="best test VFE (epoch chosen on the test set)")
    titles = ["Squared error of 1,000 test reconstructions", "Its variance part (own scale)",
              "Test VFE, mean and sd over the training sets"]
    ylabels = ["squared error (nats per image)", "variance (nats per image)", VFE_LABEL]
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.axvline(n * X_DIM, color="k", ls="--", lw=1, label=f"N x 784 = {n * X_DIM:,}")
        ax.set(xscale="log", xlabel="total trainable parameters (count, log scale)", ylabel=ylabel, title=title)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    return axes


def learning_curves(records, title, ax=None):
    """Test (solid) and training (dashed) VFE per epoch for each record."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(8, 5))[1]
    for r in records:
        s = r["settings"]
        gone = f", diverged in epoch {r['diverged_epoch']}" if "diverged_epoch" in r else ""
        seed = f", seed {s['seed']}" if s["seed"] else ""
        line, = ax.plot(r["eval_epochs"], r["test_vfe"], label=f"h={s['hidden']}{seed}{gone}")
        if r.get("train_vfe"):  # measured like the test VFE
            ax.plot(r["eval_epochs"], r["train_vfe"], ls="--", color=line.get_color())
        else:  # older records: the running mean of the epoch's mini-batch VFEs
            ax.plot(range(1, len(r["running_train_vfe"]) + 1), r["running_train_vfe"], ls=":", color=line.get_color())
    from matplotlib.lines import Line2D
    styles = [Line2D([], [], color="grey", ls=ls, label=what) for ls, what in
              [("-", "test VFE"), ("--", "training VFE (end of epoch)"), (":", "training VFE (running mean)")]]
    ax.set_xlabel("epoch (passes over the training images)")
    ax.set_ylabel("VFE (nats per image)")
    ax.set_title(title)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + styles, fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1))  # beside the axes: the curves stay visible
    return ax


def image_grid(images, title, path=None, nrow=8, ax=None):
    """Show (and optionally save) images of shape (n, 784) as one grid."""
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid, save_image
    images = images.detach().reshape(-1, 1, 28, 28).cpu()
    if path is not None:
        save_image(images, path, nrow=nrow)
    ax = ax or plt.subplots(figsize=(6, 6 * ((len(images) + nrow - 1) // nrow) / nrow))[1]
    ax.imshow(make_grid(images, nrow=nrow, pad_value=1).permute(1, 2, 0))
    ax.set_title(title)
    ax.axis("off")
    return ax


def show(alt, fig=None):
    """Display a figure as an image/png output with alternative text in its metadata (read by
    nbconvert's templates and nbsphinx) and as text/plain; then close it."""
    import base64
    import io
    import matplotlib.pyplot as plt
    from IPython.display import display
    fig = fig or plt.gcf()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=fig.dpi, metadata={"Software": None})
    plt.close(fig)
    display({"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": f"<figure: {alt}>"},
            metadata={"image/png": {"alt": alt}}, raw=True)


def like(model, x):
    """x in the model's float type: the kept models run in float64 (see kept_models)."""
    return x.to(next(model.parameters()).dtype)


@torch.no_grad()
def generate(model, n=64, seed=0):
    """Decoder outputs for n draws of z ~ N(0, I) from a seeded generator, as (n, 784)."""
    z = torch.randn(n, model.mean.out_features, generator=torch.Generator().manual_seed(seed))
    return model.decode(like(model, z))


# ---------------------------------------------------------------------------
# Beyond the questions: the bound's tightness, the latent space
# ---------------------------------------------------------------------------

GAUSS_CONST = 0.5 * X_DIM * np.log(np.pi)  # 392 log(pi): what the course's VFE leaves out


@torch.no_grad()
def log_weights(model, x, k, seed=0, chunk=100):
    """log p(x, z_i) - log q(z_i | x) for k draws z_i from the encoder, shape (k, images), under the
    course's Gaussian decoder with variance 1/2, its constant included."""
    x = like(model, x)
    h = model.encoder(x)
    mean, std = model.mean(h), torch.exp(0.5 * model.log_var(h))
    g, out = torch.Generator().manual_seed(seed), []
    for n in chunk_sizes(k, chunk):
        eps = like(model, torch.randn(n, *mean.shape, generator=g))
        z = mean + std * eps
        recon = -(torch.sigmoid(model.decoder(z)) - x).pow(2).sum(-1) - GAUSS_CONST
        prior = -0.5 * (z.pow(2) + np.log(2 * np.pi)).sum(-1)
        post = -0.5 * (eps.pow(2) + np.log(2 * np.pi)).sum(-1) - std.log().sum(-1)
        out.append(recon + prior - post)
    return torch.cat(out)


def iwae_nll(model, x, ks=(1, 10, 100, 1000, 5000), seed=0):
    """Burda et al.'s importance-weighted estimate of -log p(x) for each k (the first k draws of one
    set), on the course's VFE scale (the constant 392 log(pi) removed): mean, its standard error
    over images, and the standard error of its distance below the k = 1 estimate."""
    w = log_weights(model, x, max(ks), seed)
    one = -w[0] - GAUSS_CONST  # k = 1: a one-sample VFE of each image
    rows = []
    for k in ks:
        nll = -(torch.logsumexp(w[:k], 0) - np.log(k)) - GAUSS_CONST
        rows.append(dict(k=k, nll=float(nll.mean()), se=float(nll.std() / np.sqrt(len(nll))),
                         below_k1_se=float((one - nll).std() / np.sqrt(len(nll)))))  # paired: image by image
    return rows


@torch.no_grad()
def unit_kl(model, x):
    """Each latent unit's KL to the prior, averaged over images (nats per unit), largest first."""
    h = model.encoder(like(model, x))
    mean, log_var = model.mean(h), model.log_var(h)
    kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).mean(0)
    return kl.sort(descending=True).values.numpy()


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def test_labels(dataset="fashion-mnist", root=str(DATA_DIR)):
    return dataset_class(dataset)(root, train=False).targets


def latent_plane(model, x, labels, axes, n=15, span=3.0):
    """A 2-unit model: the test images' posterior means coloured by class, and the decoder's
    images over an n x n grid of the plane (Kingma and Welling 2014, figure 4)."""
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    with torch.no_grad():
        means = model.mean(model.encoder(like(model, x))).numpy()
    left, right = axes
    colours = plt.cm.tab10.colors
    for c, name in enumerate(FASHION_CLASSES):
        at = labels.numpy() == c
        left.scatter(means[at, 0], means[at, 1], s=2, color=colours[c], label=name)
    left.set(xlabel="latent unit 1 (posterior mean)", ylabel="latent unit 2 (posterior mean)",
             title="Test images' codes, coloured by class", xlim=(-span, span), ylim=(-span, span))
    left.legend(markerscale=5, fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # off the points
    u = torch.linspace(-span, span, n)
    z = torch.stack(torch.meshgrid(u, u.flip(0), indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        images = model.decode(like(model, z)).reshape(-1, 1, 28, 28)
    right.imshow(make_grid(images, nrow=n, padding=0).permute(1, 2, 0).numpy(), extent=(-span, span, -span, span))
    right.set(xlabel="latent unit 1", ylabel="latent unit 2", title=f"Decoder over a {n} x {n} grid of the plane")
    return axes


@torch.no_grad()
def interpolations(model, x_pairs, steps=9, ends=False):
    """Decoder images along straight lines between the posterior means of pairs of images; with
    `ends`, each row starts and ends with the two images themselves."""
    rows = []
    for a, b in x_pairs:
        za, zb = (model.mean(model.encoder(like(model, v[None]))) for v in (a, b))
        t = like(model, torch.linspace(0, 1, steps)[:, None])
        line = model.decode((1 - t) * za + t * zb)
        rows.append(torch.cat([like(model, a[None]), line, like(model, b[None])]) if ends else line)
    return torch.cat(rows)


MODELS_DIR = RESULTS_DIR / "models"


def keep_model(s, results_dir=RESULTS_DIR, models_dir=MODELS_DIR):
    """Copy a trained cell's record and final weights into results/models/ (a few MB, committed)."""
    rec = load_cell(cell_path(s, results_dir), s)
    state = torch.load(weights_path(s, results_dir), map_location="cpu")
    path = Path(models_dir) / cell_path(s).with_suffix(".pt").name
    atomic_save({"record": rec, "state": state}, path, torch.save)
    return path


def kept_models(models_dir=MODELS_DIR):
    """Every kept model as (record, VAE in eval mode), smallest first."""
    out = []
    for path in sorted(Path(models_dir).glob("*.pt")):
        kept = torch.load(path, map_location="cpu")
        s = kept["record"]["settings"]
        model = VAE(s["hidden"], s["latent"])
        model.load_state_dict(kept["state"])
        # float64: a figure drawn from these models is the same bytes on any CPU (float32 sums
        # in another order move a few pixels by one grey level).
        out.append((kept["record"], model.double().eval()))
    return sorted(out, key=lambda rm: rm[0]["n_params"])


@torch.no_grad()
def test_vfe(model, s, test_x):
    """A model's test VFE measured as training measured it (fixed noise of its seed, epoch 0)."""
    r, k, _ = test_terms(model, like(model, test_x), noise(s["seed"], 0, s["latent"], "cpu"), s["recon"])
    return float(r + k)


def bound_table(models, images=1000, ks=(1, 10, 100, 1000, 5000), seed=0, path=RESULTS_DIR / "bound.csv"):
    """Per model and k: test VFE, the importance-weighted NLL estimate on the first `images` test
    images with its standard error, and the gap; stored in results/bound.csv and read from it."""
    import pandas as pd
    key = dict(images=images, ks=list(ks), seed=seed, models=[r["settings"] for r, _ in models])
    side = Path(path).with_suffix(".json")
    if Path(path).exists() and side.exists() and json.loads(side.read_text()) == key:
        return pd.read_csv(path)
    x = load_data()[1][:images]
    rows = []
    for rec, model in models:
        s = rec["settings"]
        vfe = test_vfe(model, s, x)
        for row in iwae_nll(model, x, ks, seed):
            rows.append(dict(hidden_dim=s["hidden"], latent_dim=s["latent"], active_units=rec["active_units"],
                             test_vfe=vfe, **row, gap=vfe - row["nll"]))
    table = pd.DataFrame(rows)
    atomic_save(table, path, lambda t, p: t.to_csv(p, index=False))
    atomic_save(key, side, write_json)
    return table


def bias_variance(x, recons):
    """Geman et al. (1992): K models' squared reconstruction errors of images x (n, 784), from their
    reconstructions (K, n, 784), split image by image into bias^2 = |x - mean_k r_k|^2 and
    variance = mean_k |r_k - mean_k r_k|^2; mse = bias2 + variance exactly (float64)."""
    r, x = np.asarray(recons, np.float64), np.asarray(x, np.float64)
    mean = r.mean(0)
    return dict(mse=((r - x) ** 2).sum(-1).mean(0), bias2=((mean - x) ** 2).sum(-1),
                variance=((r - mean) ** 2).sum(-1).mean(0))


def bias_variance_runs(records):
    """{hidden: (the disjoint training sets' records, set 0's seeds' records)} of q7_bias_variance."""
    out = {}
    for r in sorted(records, key=lambda r: (r["settings"].get("train_offset", 0), r["settings"]["seed"])):
        s = r["settings"]
        sets, seeds = out.setdefault(s["hidden"], ([], []))
        if s["seed"] == s.get("train_offset", 0) // s["train_size"]:
            sets.append(r)
        if s.get("train_offset", 0) == 0:
            seeds.append(r)
    return out


def at_epoch(rec, field, which):
    """A record's list `field` at its final evaluation or at its best-validation epoch."""
    i = -1 if which == "final" else rec["eval_epochs"].index(rec["best_val_epoch"])
    return rec[field][i]


def unbiased(split, k):
    """The split with the k-model mean's own noise moved out of bias^2: variance * k / (k - 1) and
    bias^2 - variance / (k - 1) estimate an infinite ensemble's; their sum is unchanged."""
    return dict(mse=split["mse"], bias2=split["bias2"] - split["variance"] / (k - 1),
                variance=split["variance"] * k / (k - 1))


def jackknife_se(estimates):
    """The jackknife standard error from the leave-one-out estimates of a statistic."""
    e = np.asarray(estimates, np.float64)
    return float(np.sqrt((len(e) - 1) / len(e) * ((e - e.mean()) ** 2).sum()))


def bias_variance_table(records, results_dir=RESULTS_DIR, path=RESULTS_DIR / "bias_variance.csv"):
    """Per width and epoch (final, best validation): bias^2 and variance over the disjoint training
    sets (unbiased for an infinite ensemble; `_raw`: the exact split of the K models), the seed's
    part (set 0's seeds), jackknife standard errors over the training sets (`_jse`), and the test
    VFE, reconstruction and KL across sets. Computed from the stored reconstructions and kept in
    `path`, with per-image values beside it for paired differences (bias_variance_step)."""
    import pandas as pd
    runs = bias_variance_runs(records)
    key = {str(h): sorted(json.dumps(r["settings"], sort_keys=True) for r in a + b) for h, (a, b) in runs.items()}
    side, per_image = Path(path).with_suffix(".json"), Path(path).with_suffix(".npz")
    old, old_rows, old_images = {}, None, {}
    if all(p.exists() for p in (Path(path), side, per_image)):  # a width whose cells are unchanged is kept
        old, old_rows, old_images = json.loads(side.read_text()).get("widths", {}), pd.read_csv(path), np.load(per_image)
    if old == key:
        return old_rows
    rows, images = [], {}
    for h, (sets, seeds) in sorted(runs.items()):
        if old.get(str(h)) == key[str(h)]:  # its reconstructions need not be here any more
            rows += old_rows[old_rows.hidden_dim == h].to_dict("records")
            images.update({k: old_images[k] for k in old_images.files if k.startswith(f"h{h}_")})
            continue
        s0, K, S = sets[0]["settings"], len(sets), len(seeds)
        x = load_data(s0["dataset"])[1][: s0["recon_images"]].numpy()
        for which in ("final", "best_val"):
            load = lambda rs: np.stack([np.load(recons_path(r["settings"], results_dir))[which] for r in rs]) / 255
            r_sets = load(sets)
            raw = bias_variance(x, r_sets)
            d, seed = unbiased(raw, K), unbiased(bias_variance(x, load(seeds)), S)
            drops = [unbiased(bias_variance(x, np.delete(r_sets, i, 0)), K - 1) for i in range(K)]
            for k in d:
                images[f"h{h}_{which}_{k}"] = d[k]
                images[f"h{h}_{which}_{k}_drop"] = np.stack([dr[k] for dr in drops])
            at = lambda field: float(np.mean([at_epoch(r, field, which) for r in sets]))
            vfe = np.array([at_epoch(r, "test_vfe", which) for r in sets])
            rows.append(dict(
                hidden_dim=h, n_params=sets[0]["n_params"], of_line=sets[0]["n_params"] / (s0["train_size"] * X_DIM),
                epoch=which, sets=K, seeds=S,
                **{k: d[k].mean() for k in ("bias2", "variance")}, total=d["mse"].mean(),
                **{f"{k.replace('mse', 'total')}_jse": jackknife_se([dr[k].mean() for dr in drops])
                   for k in ("bias2", "variance", "mse")},
                variance_seed=seed["variance"].mean(), bias2_raw=raw["bias2"].mean(), variance_raw=raw["variance"].mean(),
                identity_error=float(np.abs(raw["mse"] - raw["bias2"] - raw["variance"]).max()),
                mse_unquantised=float(np.mean([r[f"recon_mse_{which}"] for r in sets])),
                test_vfe=vfe.mean(), test_vfe_sd=vfe.std(ddof=1), test_recon=at("test_recon"), test_kl=at("test_kl"),
                val_epoch=float(np.mean([r["best_val_epoch"] for r in sets])),
                best_on_test=float(np.mean([r["best_test_vfe"] for r in sets])),
                diverged=sum("diverged_epoch" in r for r in sets + seeds)))
    table = pd.DataFrame(rows)
    atomic_save(images, per_image, save_npz)
    atomic_save(table, path, lambda t, p: t.to_csv(p, index=False))
    atomic_save(dict(widths=key), side, write_json)
    return table


def bias_variance_step(a, b, which="final", path=RESULTS_DIR / "bias_variance.npz"):
    """Width b minus width a in mse, bias2 and variance (unbiased): (mean, jackknife standard error over
    the training sets, standard error over the test images, paired image by image)."""
    images = np.load(path)
    out = {}
    for k in ("mse", "bias2", "variance"):
        d = images[f"h{b}_{which}_{k}"] - images[f"h{a}_{which}_{k}"]
        drops = (images[f"h{b}_{which}_{k}_drop"] - images[f"h{a}_{which}_{k}_drop"]).mean(1)
        out[k] = (float(d.mean()), jackknife_se(drops), float(d.std(ddof=1) / np.sqrt(len(d))))
    return out


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Run or resume a question's experiments, then print its table.")
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS) + ["all"])
    parser.add_argument("--results", default=str(RESULTS_DIR),
                        help="results folder (default: results/; name a new one to re-run from scratch)")
    parser.add_argument("--epochs", type=int, help="train every cell this many epochs instead of the "
                        "experiment's own protocol; the table goes to results/<name>_e<N>.csv")
    parser.add_argument("--max-params", type=int, help="train only the cells of at most this many parameters")
    parser.add_argument("--min-params", type=int, default=0, help="train only the cells of at least this many")
    parser.add_argument("--jobs", type=int, default=CORES, help="worker processes, single-threaded "
                        f"when there are enough groups (default: one per core, {CORES} here)")
    parser.add_argument("--slurm", action="store_true", help="submit the missing groups to Slurm as one "
                        "job array (submitit) instead of training here; run again without it for the table")
    parser.add_argument("--partition", help="Slurm partition (with --slurm)")
    parser.add_argument("--hours", type=float, default=4.0, help="Slurm time limit per job (default 4); "
                        "a job stopped by it is requeued and resumes from its checkpoint")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per Slurm job (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    names = sorted(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    try:
        run_command(args, names)
    except (ValueError, OSError, ResultsError) as err:  # bad input or a bad results folder: say it plainly
        sys.exit(f"error: {err}")


def run_command(args, names):
    if args.slurm:
        cells = [s for n in names for s in experiment_cells(n, args.epochs, args.max_params, args.min_params)]
        jobs = submit_slurm(cells, args.results, args.partition, args.hours, args.gpus)
        print(f"submitted {len(jobs)} groups as Slurm jobs {', '.join(j.job_id for j in jobs) or '(none missing)'}; "
              f"logs in {Path(args.results) / 'slurm'}. When they finish, run this command without --slurm.")
        return
    for name in names:
        table, _ = run_experiment(name, args.results, not args.no_progress, args.epochs,
                                  args.max_params, args.min_params, args.jobs)
        name = table_name(name, args.epochs)
        print(f"\n{name} ({len(table)} cells), written to {Path(args.results) / (name + '.csv')} "
              "with every column; here the settings that vary and the results:")
        print(readable(table).to_string(index=False))


def readable(table):
    """The table as printed: settings that are the same in every row left out."""
    results = {"n_params", "best_test_vfe", "best_epoch", "final_test_vfe", "final_train_vfe",
               "final_running_train_vfe", "active_units", "diverged_epoch"}
    keep = [c for c in table if c in results or (c != "wall_seconds" and table[c].nunique(dropna=False) > 1)]
    return table[keep]


if __name__ == "__main__":
    main()
