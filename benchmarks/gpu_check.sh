#!/usr/bin/env bash
# On a CUDA machine: trains Q4 for two epochs on the GPU and compares its test VFE with the CPU's
# stored records (same data order and noise, so only float summation order differs), then times
# one grid-epoch of Q4 and of Q5 and one epoch of h = 4500 against the CPU's stored epoch times.
# Usage, from the repository root: bash benchmarks/gpu_check.sh [python]   (about a minute on an H100)
set -euo pipefail
cd "$(dirname "$0")/.."
"${1:-python3}" - <<'PY'
import os
import time

import numpy as np
import torch

import vae_helpers as v

device = v.training_device()
assert device.type == "cuda" or os.environ.get("GPU_CHECK_ON_CPU"), "no CUDA GPU here"
quick = int(os.environ.get("GPU_CHECK_BATCHES", "0")) or None  # a few batches only: a dry run
print("device:", torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "| torch", torch.__version__)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

# 1. Q4 for two epochs on this device against the CPU's stored first two epochs.
cpu = {v.cell_path(r["settings"]).name: r for r in v.stored_records("q4")[0]}
diffs = []
for group in v.groups(v.experiment_cells("q4")):
    short = [v.cell_settings(**dict(s, epochs=2)) for s in group]
    if quick:
        break
    records, _ = v.train_group(short, progress=False)
    for s, rec in zip(group, records):
        diffs.append(np.abs(np.array(rec["test_vfe"]) - cpu[v.cell_path(s).name]["test_vfe"][:2]).max())
        print(f"  h={s['hidden']:<4} l={s['latent']:<4} test VFE epochs 1-2 here {np.round(rec['test_vfe'], 3)}"
              f"  CPU {np.round(cpu[v.cell_path(s).name]['test_vfe'][:2], 3)}")
if diffs:
    print(f"Q4, 2 epochs: largest |this device - CPU| test VFE {max(diffs):.4f} nats, median {np.median(diffs):.4f}")


# 2. Training time of one epoch (no evaluation), against the CPU's stored epoch times.
def epoch_seconds(cells):
    train_x = v.load_data()[0].to(device)
    total = 0.0
    for group in v.groups(cells):
        grid, opt, _ = v.new_group(group, device)
        v.train_epoch(grid, opt, train_x, group, epoch=1, batches=3)  # warm-up
        sync()
        t0 = time.perf_counter()
        v.train_epoch(grid, opt, train_x, group, epoch=2, batches=quick)
        sync()
        total += time.perf_counter() - t0
    return total


for name, cells in [("Q4 grid", v.experiment_cells("q4")), ("Q5 grid", v.experiment_cells("q5")),
                    ("h=4500", [v.cell_settings(4500, 10)])]:
    stored = v.stored_and_missing(cells)[0]
    cpu_s = sum(np.mean(r["epoch_seconds"]) for r in stored)  # the CPU's mean epoch, evaluation included
    here = epoch_seconds(cells)
    print(f"{name}: one epoch here {here:.1f} s; CPU (stored, 2 cores, with evaluation) {cpu_s:.0f} s;"
          f" {cpu_s / here:.0f}x")
PY
