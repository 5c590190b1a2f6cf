"""Seconds per training epoch of a whole grid: the course notebook's way against the grid trainer.

Run: .venv/bin/python benchmarks/grid_speed.py [--batches N] [--grids q4 q5] [--wide H ...]
     [--profile H ...] [--compile H ...] [--workers] [--train-size N]
--workers times Q4 from scratch for one epoch in a fresh process: one process with PyTorch's two
threads (`--jobs 1`, the old way) against two single-threaded workers (`--jobs 2`, the default), on
an idle machine and with one core kept busy by another process.
Both ways, and the machine's float32 matrix-multiply rate, are measured in this one process.
A subset of N mini-batches is timed and scaled to the 600 of a full epoch.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vae_helpers as v  # noqa: E402

BATCHES_PER_EPOCH = 60_000 // 100


def matmul_rate(n=2048, repeats=20, dtype=torch.float32):
    """The machine's matrix-multiply rate (FLOP/s), from a large torch.mm."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def course_way(cells, batches):
    """One model at a time through a DataLoader with ToTensor, as the course's notebook trains."""
    data = datasets.FashionMNIST(str(v.DATA_DIR), train=True, transform=transforms.ToTensor())
    seconds = 0.0
    for s in cells:
        torch.manual_seed(0)
        model = v.VAE(s["hidden"], s["latent"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # the default (foreach) Adam
        loader = DataLoader(data, batch_size=100, shuffle=True)
        t0 = time.perf_counter()
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            x = x.view(-1, 784)
            logits, mean, log_var = model(x, torch.randn(len(x), s["latent"]))
            r, k = v.vfe_terms(logits, x, mean, log_var)
            loss = (r + k).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - t0
    return seconds * BATCHES_PER_EPOCH / batches


def group_epoch(group, batches, compile=False):
    """Seconds per epoch of one group under the grid trainer (optionally with its model under
    torch.compile), timed after a warm-up that holds first-touch memory, kernels and compilation;
    also the group's optimiser and weights per cell."""
    train_x, _ = v.load_data()
    grid, opt, sizes = v.new_group(group, torch.device("cpu"))
    model = torch.compile(grid) if compile else grid
    v.train_epoch(model, opt, train_x, group, epoch=0, batches=2)
    t0 = time.perf_counter()
    v.train_epoch(model, opt, train_x, group, epoch=1, batches=batches)
    return (time.perf_counter() - t0) * BATCHES_PER_EPOCH / batches, opt, sizes


def grid_way(cells, batches, breakdown=None):
    """The project's grid trainer over the same cells. With `breakdown` (a list), one row per
    group is appended: its weights, its seconds, and the seconds of Adam's steps alone."""
    seconds = 0.0
    for group in v.groups(cells):
        took, opt, sizes = group_epoch(group, batches)
        seconds += took
        if (
            breakdown is not None
        ):  # Adam reads and writes 4 numbers per weight: memory-bound, not in the FLOP count
            t0 = time.perf_counter()
            for _ in range(batches):
                opt.step()
            breakdown.append(
                dict(
                    hidden=group[0]["hidden"],
                    cells=len(group),
                    weights=sum(sizes),
                    seconds=took,
                    adam=(time.perf_counter() - t0) * BATCHES_PER_EPOCH / batches,
                )
            )
    return seconds


def q4_group(h):
    """The first training group of Q4's row at hidden size h."""
    return v.groups(v.grid([h], v.Q4_LATENT))[0]


def profile_table(cells, batches, rows=12):
    """torch.profiler's table of the ops that take a group's training steps' time."""
    train_x, _ = v.load_data()
    grid, opt, _ = v.new_group(cells, torch.device("cpu"))
    v.train_epoch(grid, opt, train_x, cells, epoch=0, batches=2)
    with torch.profiler.profile() as prof:
        v.train_epoch(grid, opt, train_x, cells, epoch=1, batches=batches)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def study_limit(rate):
    """Hours the whole study (every distinct cell of every experiment) needs at `rate` FLOP/s."""
    cells = {
        json.dumps(s, sort_keys=True): s for name in v.EXPERIMENTS for s in v.experiment_cells(name)
    }
    flop = sum(
        6 * s["train_size"] * s["epochs"] * v.n_params_formula(s["hidden"], s["latent"])
        for s in cells.values()
    )
    return len(cells), flop / rate / 3600


def q4_epoch_seconds(jobs, train_size):
    """Wall seconds of Q4's one-epoch run from scratch in a fresh process, as `--jobs` runs it."""
    code = (
        "import sys, vae_helpers as v; cells = [v.cell_settings(**dict(s, epochs=1, "
        "train_size=%d)) "
        "for s in v.experiment_cells('q4')]; v.run_cells(cells, sys.argv[1], progress=False, "
        "jobs=%d)"
    )
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", code % (train_size, jobs), folder],
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        return time.perf_counter() - t0


def busy_core():
    """Another program keeping one core busy, at normal priority, as a student's laptop does."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def workers(train_size):
    """Q4 one epoch: two single-threaded workers against one process of two threads, idle and
    busy."""
    print(
        f"\nQ4 from scratch, one epoch of {train_size:,} images, in a fresh process (start-up "
        "included):"
    )
    idle = {jobs: q4_epoch_seconds(jobs, train_size) for jobs in (1, 2)}
    hog = busy_core()
    try:
        load = {jobs: q4_epoch_seconds(jobs, train_size) for jobs in (1, 2)}
    finally:
        hog.kill()
    print(
        f"  idle machine: --jobs 1 (2 threads) {idle[1]:.1f} s, --jobs 2 (1 thread each) "
        f"{idle[2]:.1f} s"
    )
    print(
        f"  one core busy: --jobs 1 (2 threads) {load[1]:.1f} s, --jobs 2 (1 thread each) "
        f"{load[2]:.1f} s"
    )
    print(f"q4 one epoch, 2 workers vs 1: {idle[1] / idle[2]:.1f}x")
    print(f"q4 one epoch under load, new vs 2 threads: {load[1] / load[2]:.1f}x")
    print(f"q4 one epoch idle, new vs 2 threads: {idle[1] / idle[2]:.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, default=60, help="mini-batches timed per model or group"
    )
    parser.add_argument("--grids", nargs="*", default=["q4", "q5"], choices=["q4", "q5"])
    parser.add_argument(
        "--wide",
        type=int,
        nargs="*",
        default=[4000],
        help="hidden sizes of Q7 wide cells (l=10) to time in float32 and bfloat16",
    )
    parser.add_argument(
        "--profile",
        type=int,
        nargs="*",
        default=[],
        help="hidden sizes of Q4 groups to profile op by op (e.g. 5 500)",
    )
    parser.add_argument(
        "--compile",
        type=int,
        nargs="*",
        default=[],
        help="hidden sizes of Q4 groups to time eager against torch.compile (e.g. 5 200)",
    )
    parser.add_argument(
        "--workers", action="store_true", help="time Q4's epoch with --jobs 1 and 2, idle and busy"
    )
    parser.add_argument(
        "--train-size", type=int, default=60_000, help="images per epoch for --workers"
    )
    args = parser.parse_args()
    if args.workers:
        return workers(args.train_size)
    grids = {"q4": v.grid(v.Q4_HIDDEN, v.Q4_LATENT), "q5": v.grid(v.Q5_HIDDEN, v.Q5_LATENT)}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.batches} of {BATCHES_PER_EPOCH} mini-batches timed per model or group, then scaled"
    )
    rate = matmul_rate()
    print(f"float32 matrix-multiply rate: {rate / 1e9:.1f} GFLOP/s")
    n, hours = study_limit(rate)
    print(
        f"the whole study ({n} distinct cells of {len(v.EXPERIMENTS)} experiments) at that rate: "
        f"{hours:.1f} h"
    )
    for name in args.grids:
        cells = grids[name]
        weights = sum(v.n_params_formula(s["hidden"], s["latent"]) for s in cells)
        limit = 6 * 60_000 * weights / rate
        v.keep_freed_memory(False)  # the allocator as the course's notebook has it
        course = course_way(cells, args.batches)
        plain = grid_way(cells, args.batches)
        v.keep_freed_memory(True)  # as vae_helpers trains on the CPU
        rows = []
        ours = grid_way(cells, args.batches, rows)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"\n{name}: {len(cells)} cells, {weights:,} weights")
        print(f"  (a) course's way: {course:8.1f} s per grid-epoch")
        print(
            f"  (b) grid trainer: {ours:8.1f} s per grid-epoch "
            f"({plain:.1f} s with glibc's default allocator thresholds)"
        )
        print(f"  speed-up (a)/(b): {course / ours:.1f}x")
        print(
            f"  matrix-multiply limit: {limit:.1f} s; (b) takes {ours / limit:.2f}x that, "
            f"reaching {limit / ours:.0%} of the rate"
        )
        print(f"  peak memory of this process so far: {peak:.2f} GB")
        print("  where (b)'s time goes, group by group (seconds per grid-epoch):")
        print("     h  cells     weights   total  matmul limit   Adam alone   rest")
        for r in rows:
            mm = 6 * 60_000 * r["weights"] / rate
            print(
                f"  {r['hidden']:4d}  {r['cells']:5d}  {r['weights']:10,d}  {r['seconds']:6.1f}  "
                f"{mm:12.1f}"
                f"  {r['adam']:11.1f}  {r['seconds'] - mm - r['adam']:5.1f}"
            )
    for h in args.profile:
        group = q4_group(h)
        print(
            f"\nprofile of the Q4 group h={h}, l = {[s['latent'] for s in group]}, "
            f"{args.batches} training steps:"
        )
        print(profile_table(group, args.batches))
    for h in args.compile:
        group = q4_group(h)
        eager, compiled = (
            group_epoch(group, args.batches)[0],
            group_epoch(group, args.batches, compile=True)[0],
        )
        print(
            f"\nQ4 group h={h}, l = {[s['latent'] for s in group]}: {eager:.1f} s per epoch eager, "
            f"{compiled:.1f} s with its model under torch.compile ({eager / compiled:.2f}x, "
            "compilation not counted)"
        )
    if args.wide:
        print(
            f"\nbfloat16 matrix-multiply rate: {matmul_rate(dtype=torch.bfloat16) / 1e9:.1f} "
            "GFLOP/s"
        )
    for h in args.wide:
        fp32 = v.cell_settings(h, v.Q7_LATENT)
        bf16 = v.cell_settings(h, v.Q7_LATENT, precision="bfloat16")
        limit = 6 * 60_000 * v.n_params_formula(h, v.Q7_LATENT) / rate
        t32, t16 = grid_way([fp32], args.batches), grid_way([bf16], args.batches)
        print(
            f"\nQ7 wide cell h={h}, l={v.Q7_LATENT} ({v.n_params_formula(h, v.Q7_LATENT):,} "
            "weights), one epoch:"
        )
        print(f"  float32 : {t32:8.1f} s ({limit / t32:.0%} of the float32 rate)")
        print(
            f"  bfloat16: {t16:8.1f} s (autocast: products in bfloat16, weights and Adam in "
            "float32)"
        )
        print(f"  speed-up float32/bfloat16: {t32 / t16:.2f}x")


if __name__ == "__main__":
    main()
