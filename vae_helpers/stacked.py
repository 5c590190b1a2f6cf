"""The grid trainer: the cells of one hidden size trained as one stacked model (GridVAE), one
Adam over the stacked weights, with checkpoints to resume from; and how cells are grouped."""

import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .model import VAE, n_params, n_params_formula, vfe_terms
from .store import atomic_save, load_pt, write_json
from .train import (
    EVAL_CHUNK,
    NONFINITE,
    adam,
    append_epoch,
    autocast,
    cell_data,
    chunk_sizes,
    epoch_order,
    eval_terms,
    evaluated,
    finish_record,
    measure,
    new_record,
    noise,
    note_divergence,
    training_device,
)


def seconds_from(variable, default):
    """A number of seconds (at least 0) from an environment variable, or `default` if unset."""
    text = os.environ.get(variable)
    try:
        value = default if text is None else float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ValueError(
            f"the environment variable {variable}={text!r} is not a number of seconds (0 or "
            f"more); unset it for the default, {default}"
        )
    return value


# A group's checkpoint is written after an epoch when this long has passed since the last one:
# every epoch of a slow group, without writing hundreds of MB per second on a fast GPU.
CHECKPOINT_SECONDS = seconds_from("VAE_CHECKPOINT_SECONDS", 60)
PROGRESS_ROW = 0  # a worker process draws its progress bars below the others' rows
# Progress written to a file or pipe rather than a terminal: a line a minute at most per bar, and
# no bar within an epoch.
TTY = sys.stderr.isatty()
BAR = {} if TTY else dict(mininterval=60, maxinterval=600)


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

        def pad(w):  # zero rows up to L latent units
            return F.pad(w, (0, 0, 0, L - len(w)))

        def stack(weights):
            return nn.Parameter(torch.stack([w.detach() for w in weights]))

        enc, dec = [m.encoder for m in models], [m.decoder for m in models]
        # The first layer is one wide product for all cells: x @ (784, C*h).
        self.w1 = nn.Parameter(torch.cat([e[0].weight.T.detach() for e in enc], 1))
        self.b1 = nn.Parameter(torch.cat([e[0].bias.detach() for e in enc]))
        self.w2, self.b2 = stack(e[2].weight.T for e in enc), stack(e[2].bias[None] for e in enc)
        # the two heads side by side: columns :L the mean, L: the log-variance
        self.wh = stack(torch.cat([pad(m.mean.weight), pad(m.log_var.weight)]).T for m in models)
        self.bh = stack(
            torch.cat([pad(m.mean.bias[:, None]), pad(m.log_var.bias[:, None])]).T for m in models
        )
        self.d1, self.c1 = (
            stack(pad(d[0].weight.T) for d in dec),
            stack(d[0].bias[None] for d in dec),
        )
        self.d2, self.c2 = stack(d[2].weight.T for d in dec), stack(d[2].bias[None] for d in dec)
        self.d3, self.c3 = stack(d[4].weight.T for d in dec), stack(d[4].bias[None] for d in dec)
        mask = torch.zeros(len(models), 1, L)
        for c, l in enumerate(self.latents):
            mask[c, :, :l] = 1
        self.register_buffer("mask", mask)

    def forward(self, x, eps):
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
        sq = (
            norm(self.w1.grad.view(-1, C, self.hidden), dim=(0, 2)) ** 2
            + norm(self.b1.grad.view(C, -1), dim=1) ** 2
        )
        for name, p in self.named_parameters():
            if name not in ("w1", "b1"):
                sq = sq + norm(p.grad.flatten(1), dim=1) ** 2
        return sq.sqrt()

    def cell(self, c):
        """Cell c as a stand-alone VAE with the current weights."""
        h, l, L = self.hidden, self.latents[c], max(self.latents)
        m = VAE(h, l)
        pairs = [
            (m.encoder[0].weight, self.w1[:, c * h : (c + 1) * h].T),
            (m.encoder[0].bias, self.b1[c * h : (c + 1) * h]),
            (m.encoder[2].weight, self.w2[c].T),
            (m.encoder[2].bias, self.b2[c, 0]),
            (m.mean.weight, self.wh[c, :, :l].T),
            (m.mean.bias, self.bh[c, 0, :l]),
            (m.log_var.weight, self.wh[c, :, L : L + l].T),
            (m.log_var.bias, self.bh[c, 0, L : L + l]),
            (m.decoder[0].weight, self.d1[c, :l].T),
            (m.decoder[0].bias, self.c1[c, 0]),
        ] + [
            pair
            for i, w, b in ((2, self.d2, self.c2), (4, self.d3, self.c3))
            for pair in ((m.decoder[i].weight, w[c].T), (m.decoder[i].bias, b[c, 0]))
        ]
        with torch.no_grad():
            for mine, stacked in pairs:
                mine.copy_(stacked)
        return m


def act(t):
    return F.leaky_relu(t, 0.2)


def grid_noise(cells, epoch, device, L, sizes=None):
    """Each cell's own noise stream, zero-padded to L latent units and stacked."""
    draws = [noise(s["seed"], epoch, s["latent"], device, sizes) for s in cells]
    return lambda rows: torch.stack(
        [F.pad(d(rows), (0, L - s["latent"])) for d, s in zip(draws, cells)]
    )


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
            # fmax: a NaN step leaves the peak
            peaks = torch.fmax(peaks, torch.stack([max_lv, grad], 1))
        opt.step()
        totals += per_cell.detach()
        if bar is not None:
            bar.update()
    return totals, peaks, first_bad


def without_latent(s):
    """A cell's settings but its latent size: what the cells of one group share."""
    return {k: v for k, v in s.items() if k != "latent"}


def new_group(cells, device):
    """A group's stacked model (each cell with its seeded initial weights), its Adam, its sizes."""
    if any(without_latent(s) != without_latent(cells[0]) for s in cells):
        raise ValueError("a group's cells must differ only in their latent size")
    models = []
    for s in cells:
        torch.manual_seed(s["seed"])  # the same initial weights as when trained alone
        models.append(VAE(s["hidden"], s["latent"]))
    grid = GridVAE(models).to(device)
    opt = adam(cells[0], list(grid.parameters()), [grid.w2, grid.d2])
    return grid, opt, [n_params(m) for m in models]


def train_group(cells, progress=True, checkpoint=None):
    """Train cells that differ only in latent size together; returns (records, models).

    Adam is elementwise, so one optimiser over the stacked weights is each cell's own Adam.
    With `checkpoint` (a path) the state is saved after an epoch (see CHECKPOINT_SECONDS) and
    resumed from it.
    """
    s0 = cells[0]
    device = training_device(s0.get("device"))
    train_x, val_x, test_x = cell_data(s0, device)
    grid, opt, records, start = resumed_group(cells, device, checkpoint)
    L, C, means, saved = max(grid.latents), len(cells), None, time.monotonic()

    def fixed_noise(x):  # the evaluation's noise: the same after every epoch
        return grid_noise(cells, 0, device, L, chunk_sizes(len(x), EVAL_CHUNK))

    name = f"h={s0['hidden']} l={','.join(str(s['latent']) for s in cells)}"
    steps = -(-len(train_x) // s0["batch_size"])
    epochs = range(start, s0["epochs"] + 1)
    bars = dict(disable=not progress, leave=False, **BAR)
    for epoch in tqdm(
        epochs, name, s0["epochs"], initial=start - 1, unit="epoch", **bars, position=PROGRESS_ROW
    ):
        t0 = time.perf_counter()
        # A long epoch gets a bar of its own, with the time it has left.
        with tqdm(
            total=steps,
            desc=f"{name} epoch {epoch}",
            unit="batch",
            leave=False,
            disable=not progress or steps < 100 or not TTY,
            position=PROGRESS_ROW + 1,
        ) as bar:
            totals, peaks, first_bad = train_epoch(grid, opt, train_x, cells, epoch, bar=bar)
        measured = [None] * C
        if evaluated(s0, epoch):
            cols, means = measure(grid, fixed_noise, (test_x, train_x, val_x), s0["recon"])
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
        due = time.monotonic() - saved >= CHECKPOINT_SECONDS or epoch == s0["epochs"]
        if checkpoint is not None and due:
            state = dict(grid=grid.state_dict(), opt=opt.state_dict(), records=records, epoch=epoch)
            atomic_save(state, checkpoint, torch.save)
            # the sidecar says who can resume it
            atomic_save({"cells": cells}, Path(checkpoint).with_suffix(".json"), write_json)
            saved = time.monotonic()
            hold_for_tests()
    if means is None:  # resumed after the last epoch's checkpoint
        means = eval_terms(grid, test_x, fixed_noise(test_x), s0["recon"])[2]
    finished = []
    for c, l in enumerate(grid.latents):
        try:
            finished.append(finish_record(records[c], means[c, :, :l]))
        except FloatingPointError as err:  # the group's other cells are still good
            warnings.warn(str(err), stacklevel=2)
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
        kept = dict(
            images=images[c].mul(255).round().to(torch.uint8).cpu(),
            mse=float((images[c] - x).pow(2).sum(-1).mean()),
        )
        rec["recons"]["final"] = kept
        if int(np.argmin(rec["val_vfe"])) == len(rec["val_vfe"]) - 1:
            rec["recons"]["best_val"] = kept


def hold_for_tests():
    """After a checkpoint, wait while the file named by VAE_HOLD_FILE exists: a test stops a job
    at this known point instead of racing a time limit. Unset (always, outside tests) it does
    nothing."""
    hold = os.environ.get("VAE_HOLD_FILE")
    while hold and Path(hold).exists():
        time.sleep(0.05)


def resumed_group(cells, device, checkpoint=None):
    """(model, Adam, records, first epoch) of a group: fresh, or resumed from its checkpoint. A
    checkpoint that cannot be read or is another group's is set aside (renamed) with a warning."""
    grid, opt, sizes = new_group(cells, device)
    records = [
        dict(new_record(s, n, device), group=[c["latent"] for c in cells])
        for s, n in zip(cells, sizes)
    ]
    if checkpoint is None or not Path(checkpoint).exists():
        return grid, opt, records, 1
    checkpoint = Path(checkpoint)
    try:
        if not checkpoint.is_file():  # a FIFO would hang the read
            raise ValueError("it is not a plain file")
        state = load_pt(checkpoint, device)  # tensors and plain data only: no code runs
        if [r["settings"] for r in state["records"]] != cells:
            raise ValueError("it holds another group's cells")
        grid.load_state_dict(state["grid"]), opt.load_state_dict(state["opt"])
        name = f"h={cells[0]['hidden']} l={','.join(str(s['latent']) for s in cells)}"
        print(f"resuming {name} after epoch {state['epoch']}", file=sys.stderr)
        return grid, opt, state["records"], state["epoch"] + 1
    except Exception as err:  # torch raises many kinds for a damaged file
        aside = checkpoint.with_name(f"{checkpoint.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(checkpoint, aside)
        warnings.warn(
            f"checkpoint {checkpoint} could not be used ({err!r:.200}); it was set aside as "
            f"{aside.name} and the group trains from its first epoch",
            stacklevel=2,
        )
        grid, opt, _ = new_group(cells, device)
        return grid, opt, records, 1


def groups(cells, max_params=40_000_000, max_waste=0.1, free_padding=4_000_000):
    """Split cells into groups that train together: same settings but latent size, padding
    waste at most `max_waste` of the real work, and at most `max_params` weights in all.
    Below `free_padding` weights a step costs its overhead more than its arithmetic, so
    padding is free there."""
    by_rest = {}
    for s in sorted(cells, key=lambda s: s["latent"]):
        by_rest.setdefault(json.dumps(without_latent(s), sort_keys=True), []).append(s)
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
