"""Training one model as the course does: seeded data order and noise, Adam, the record of each
epoch, evaluation. train_cell is the reference that the stacked trainer (stacked.py) is tested
against, so it is kept independent of it on purpose."""

import platform
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from .data import TRAIN_IMAGES, load_data
from .model import VAE, active_units, label, n_params, vfe_terms
from .settings import recorded_settings

TRAIN_EVAL_IMAGES = 10_000  # the training images whose VFE is measured like the test VFE


def cell_data(s, device):
    """A cell's training images, its validation images (None without val_size) and the test
    images."""
    train_x, test_x = (t.to(device) for t in load_data(s["dataset"]))
    off, val = s.get("train_offset", 0), s.get("val_size", 0)
    return (
        train_x[off : off + s["train_size"]],
        (train_x[TRAIN_IMAGES - val :] if val else None),
        test_x,
    )


def training_device(pinned=None):
    """The cell's pinned device, else CUDA when there is one, else the CPU. Training on the CPU
    keeps freed memory for the process (keep_freed_memory): an allocator change made to train."""
    if pinned == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this cell is pinned to CUDA (device='cuda') and no GPU is visible")
    if pinned != "cpu" and torch.cuda.is_available():
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
    out = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "adam": "torch.optim.Adam(fused=True)",
    }
    if device is not None and torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


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
    ahead = iter(
        torch.cat([torch.randn(n, latent, generator=g) for n in sizes])
        .to(device)
        .split(list(sizes))
    )
    return lambda rows: next(ahead)


def epoch_order(seed, epoch, n, device="cpu"):
    """The data order of one epoch, a function of (seed, epoch) alone, copied to the device once."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(
        device
    )


def chunk_sizes(n, size):
    return [min(size, n - i) for i in range(0, n, size)]


def new_record(s, n_par, device):
    """An empty record. train_vfe is measured after an epoch like test_vfe (eval mode, fixed noise,
    the first TRAIN_EVAL_IMAGES training images); running_train_vfe is the mean of the epoch's
    mini-batch VFEs, taken while the weights moved. max_log_var and max_grad_norm: each epoch's
    peaks."""
    rec = dict(
        settings=recorded_settings(s),
        n_params=n_par,
        device=str(device),
        versions=versions(device),
        eval_epochs=[],
        test_vfe=[],
        test_recon=[],
        test_kl=[],
        train_vfe=[],
        running_train_vfe=[],
        max_log_var=[],
        max_grad_norm=[],
        epoch_seconds=[],
    )
    rec.update(
        {"val_vfe": []} if s.get("val_size") else {},
        **{"recons": {}} if s.get("recon_images") else {},
    )
    return rec


def append_epoch(rec, running, seconds, peaks, measured=None):
    """Add one epoch: its running training VFE, time and peaks (largest log-variance, gradient
    norm), and after an evaluated epoch `measured` = (test recon, test KL, training VFE[, validation
    VFE]). A value that is not finite instead marks the epoch the cell diverged in; the cell keeps
    the epochs it finished."""
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
        first_nonfinite=NONFINITE[first] if steps else "test or training VFE only",
        step=step,
        all_nonfinite=[NONFINITE[i] for i, b in enumerate(first_bad) if b >= 0],
        max_log_var_epoch_before=rec["max_log_var"][-1] if rec["max_log_var"] else None,
        max_grad_norm_epoch_before=rec["max_grad_norm"][-1] if rec["max_grad_norm"] else None,
        max_log_var_this_epoch=peaks[0],
        max_grad_norm_this_epoch=peaks[1],
    )


def finish_record(rec, means):
    if not rec["test_vfe"]:
        raise FloatingPointError(
            f"{label(rec['settings'])} diverged before "
            "its first evaluation, so this cell is not stored"
        )
    test = np.array(rec["test_vfe"])
    rec["best_epoch"] = rec["eval_epochs"][int(test.argmin())]
    rec["best_test_vfe"] = float(test.min())
    rec["final_test_vfe"] = float(test[-1])
    if rec.get("val_vfe"):  # early stopping on held-out training images, not on the test set
        i = int(np.argmin(rec["val_vfe"]))
        rec["best_val_epoch"], rec["test_vfe_at_best_val"] = rec["eval_epochs"][i], float(test[i])
    rec["active_units"] = (
        None if "diverged_epoch" in rec else active_units(means)
    )  # no finite code left
    rec["wall_seconds"] = float(sum(rec["epoch_seconds"]))
    return rec


def evaluated(s, epoch):
    """Whether the VFEs are measured after this epoch: every eval_every-th and the last."""
    return epoch % s.get("eval_every", 1) == 0 or epoch == s["epochs"]


@torch.no_grad()
def eval_terms(forward, test_x, draw, recon, chunk=EVAL_CHUNK):
    """Mean test reconstruction and KL per image, and the posterior means, under fixed noise."""
    recs, kls, means = 0.0, 0.0, []
    for x in test_x.split(chunk):
        logits, mean, log_var = forward(x, draw(len(x)))
        rec, kl = vfe_terms(logits, x, mean, log_var, recon)
        recs, kls = recs + rec.sum(-1), kls + kl.sum(-1)
        means.append(mean)
    return recs / len(test_x), kls / len(test_x), torch.cat(means, -2)


def measure(forward, draw, images, recon):
    """After an evaluated epoch: the test reconstruction and KL, the training VFE on the first
    TRAIN_EVAL_IMAGES training images [and the validation VFE], each a mean per image under the
    fixed noise draw(x); and the test posterior means. images: (test, training, validation or
    None)."""
    test_x, train_x, val_x = images
    r, k, means = eval_terms(forward, test_x, draw(test_x), recon)
    train_x = train_x[:TRAIN_EVAL_IMAGES]
    tr, tk, _ = eval_terms(forward, train_x, draw(train_x), recon)
    cols = [r, k, tr + tk]
    if val_x is not None:
        vr, vk, _ = eval_terms(forward, val_x, draw(val_x), recon)
        cols.append(vr + vk)
    return cols, means


def adam(s, params, hh_weights):
    """The cell's Adam; the h x h weight matrices' learning rate scaled by hh_lr_scale."""
    hh = {id(p) for p in hh_weights}
    scale = s.get("hh_lr_scale", 1.0)
    groups_ = (
        [
            {"params": [p for p in params if id(p) not in hh]},
            {"params": list(hh_weights), "lr": s["lr"] * scale},
        ]
        if scale != 1.0
        else params
    )
    return torch.optim.Adam(groups_, lr=s["lr"], weight_decay=s["weight_decay"], fused=True)


def train_cell(s, progress=True):
    """Reference trainer: one model, as the course trains it. Returns (record, model)."""
    device = training_device(s.get("device"))
    train_x, val_x, test_x = cell_data(s, device)
    torch.manual_seed(s["seed"])
    model = VAE(s["hidden"], s["latent"]).to(device)
    opt = adam(s, list(model.parameters()), [model.encoder[2].weight, model.decoder[2].weight])
    rec = new_record(s, n_params(model), device)

    def fixed_noise(x):  # the evaluation's noise: the same after every epoch
        return noise(s["seed"], 0, s["latent"], device, chunk_sizes(len(x), EVAL_CHUNK))

    epochs = range(1, s["epochs"] + 1)
    for epoch in tqdm(epochs, desc=label(s), disable=not progress, leave=False):
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
            grad = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])
            )
            peaks = torch.fmax(peaks, torch.stack([log_var.detach().float().max(), grad]))
            opt.step()
            total += loss.detach()  # kept on the device: no wait for the GPU at every step
        model.eval()
        measured = None
        if evaluated(s, epoch):
            cols, means = measure(model, fixed_noise, (test_x, train_x, val_x), s["recon"])
            measured = tuple(float(c) for c in cols)
        append_epoch(
            rec, float(total) / len(train_x), time.perf_counter() - t0, peaks.tolist(), measured
        )
        if "diverged_epoch" in rec:
            break
    rec.pop("recons", None)  # kept by the group trainer only
    return finish_record(rec, means), model
