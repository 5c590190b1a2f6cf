"""Training the cells an experiment still lacks: here, in worker processes that share the groups
through their locks, or as Slurm jobs (submitit) that resume from their checkpoints."""

import json
import os
import signal
import stat
import sys
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from . import stacked, store
from .model import label, n_params_formula
from .settings import cell_settings, recorded_settings
from .stacked import groups, train_group, without_latent
from .store import (
    OWN_NAME,
    RESULTS_DIR,
    ResultsError,
    atomic_save,
    cell_name,
    cell_path,
    checkpoint_path,
    group_lock,
    load_cell,
    recons_path,
    remove_leftovers,
    save_npz,
    stored_and_missing,
    weights_path,
    writable_results,
    write_json,
)

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

WAIT_SECONDS = 5  # how often a worker looks again for groups that others are training


def planned_groups(pending, results_dir):
    """The groups to train for the pending cells: first each checkpointed group that still lacks a
    cell (resumed as it was), then new groups of the rest. A checkpoint that no pending cell needs
    is removed when its group is not being trained; a malformed sidecar is set aside. Only the
    store's own names are read: another's file is left as it is."""
    plans, covered = [], []
    for side in sorted((Path(results_dir) / "checkpoints").glob("*.json")):
        group = sidecar_cells(side) if OWN_NAME.match(side.name) else None
        if group is None:
            continue
        if not all(s in pending or cell_path(s, results_dir).exists() for s in group):
            continue  # it names a cell not asked for here: its own command resumes it
        still = [s for s in group if s in pending and s not in covered]
        if still:
            plans.append(group)
            covered += still
        elif not any(s in pending for s in group):
            with group_lock(side.with_suffix(".pt"), say=False) as lock:
                if lock is not None and all(cell_path(s, results_dir).exists() for s in group):
                    side.with_suffix(".pt").unlink(missing_ok=True)
                    side.unlink(missing_ok=True)
    return plans + groups([s for s in pending if s not in covered])


def sidecar_cells(side):
    """The cells a checkpoint's sidecar names, each a cell's full settings, all of one group; or
    None, with the sidecar set aside and a warning, when it is not that."""
    try:
        if not side.is_file():  # a FIFO would hang the read
            raise TypeError("it is not a plain file")
        cells = json.loads(side.read_text())["cells"]
        if not isinstance(cells, list) or not cells:
            raise TypeError("its cells are not a list of cells")
        for s in cells:
            if not isinstance(s, dict) or cell_settings(**s) != s:
                raise TypeError(f"{str(s)[:80]} is not a cell's settings")
        if len({json.dumps(without_latent(s), sort_keys=True) for s in cells}) > 1:
            raise TypeError("its cells differ in more than their latent size")
        return cells
    except FileNotFoundError:
        return None  # removed by the process that finished its group
    except (ValueError, KeyError, TypeError, OSError, RecursionError) as err:
        aside = side.with_name(f"{side.name}.malformed-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(side, aside)
        warnings.warn(
            f"checkpoint sidecar {side} is malformed ({err}); set aside as {aside.name}",
            stacklevel=2,
        )
        return None


def store_group(group, results_dir, progress, wanted=None):
    """Train one group (resuming its checkpoint) and store the cells of `wanted` (default: all)
    that it still lacks; returns the cells that diverged before their first evaluation."""
    checkpoint = checkpoint_path(group, results_dir)
    wanted = group if wanted is None else wanted
    todo = [s for s in group if s in wanted and not cell_path(s, results_dir).exists()]
    if todo:
        records, models = train_group(group, progress, checkpoint)
        for s, rec, model in zip(group, records, models):
            if s in todo and rec is not None:
                store_cell(s, rec, model, results_dir)
    checkpoint.unlink(missing_ok=True)
    checkpoint.with_suffix(".json").unlink(missing_ok=True)
    return [s for s in todo if not cell_path(s, results_dir).exists()]


def store_cell(s, rec, model, results_dir):
    """A trained cell's weights, kept reconstructions and, last, its record: a stored record means
    that everything of its cell is stored."""
    weights = {"settings": recorded_settings(s), "state": model.state_dict()}  # named: see load
    atomic_save(weights, weights_path(s, results_dir), torch.save)
    recons = rec.pop("recons", None)
    if recons:
        rec.update({f"recon_mse_{k}": r["mse"] for k, r in recons.items()})
        arrays = {k: r["images"].numpy() for k, r in recons.items()}
        atomic_save(arrays, recons_path(s, results_dir), save_npz)
    atomic_save(rec, cell_path(s, results_dir), write_json)


def cell_claim(s, results_dir):
    """A lock on one cell (checkpoints/<its name>.lock): the process holding it is the one that
    trains and stores the cell, whichever group, or experiment, it trains it in."""
    return group_lock(Path(results_dir) / "checkpoints" / f"{cell_name(s)}.json")


def run_cells(cells, results_dir=RESULTS_DIR, progress=True, jobs=1):
    """Records for every cell: stored ones reused, the rest trained in groups and stored at once.
    Safe with other processes on the same folder: each group is trained by the one that locks it.
    With `jobs` > 1, that many single-threaded worker processes share the groups."""
    for s in cells:  # a hand-made dict is checked as cell_settings checks it, before any work
        if cell_settings(**s) != s:
            raise ValueError(f"{s} is not a cell's full settings; make it with cell_settings")
    _, pending = stored_and_missing(cells, results_dir)
    if not pending:  # reading needs no write access
        return [load_cell(cell_path(s, results_dir), s) for s in cells]
    results_dir = writable_results(results_dir)
    remove_leftovers(results_dir)
    jobs = min(jobs, len(planned_groups(pending, results_dir)))
    if jobs > 1:  # more workers than groups would idle, and take threads from the others
        run_workers(cells, results_dir, jobs, progress)
        pending = stored_and_missing(cells, results_dir)[1]
    failed = []
    while pending:
        busy = False
        plan = planned_groups(pending, results_dir)
        bars = progress and stacked.PROGRESS_ROW == 0 and len(plan) > 1
        bar, last = work_bar([s for g in plan for s in g], "training", not bars), []
        for done, group in enumerate(plan):
            bar.set_postfix_str(f"{done}/{len(plan)} groups done", refresh=False)
            bar.update(sum(map(work, last)))
            last = group
            with group_lock(checkpoint_path(group, results_dir)) as lock, ExitStack() as claims:
                if lock is None:
                    busy = True  # another process is training it
                    continue
                asked = [s for s in group if s in pending]
                mine = [s for s in asked if claims.enter_context(cell_claim(s, results_dir))]
                busy = busy or len(mine) < len(asked)  # another process trains the others
                if mine:
                    failed += store_group(group, results_dir, progress, mine)
        bar.update(sum(map(work, last)))
        bar.close()
        pending = [s for s in pending if not cell_path(s, results_dir).exists() and s not in failed]
        if pending and busy:
            time.sleep(WAIT_SECONDS)
    remove_free_locks(results_dir)
    if failed:
        names = ", ".join(f"{label(s)} seed {s['seed']}" for s in failed)
        raise FloatingPointError(
            f"{names} diverged before the first evaluation and was not stored; "
            "the other cells of its group were"
        )
    return [load_cell(cell_path(s, results_dir), s) for s in cells]


def work(s):
    """A cell's training work, to which its time is about proportional: parameters x images seen."""
    return n_params_formula(s["hidden"], s["latent"]) * s["epochs"] * s["train_size"]


def work_bar(cells, desc, disable):
    """A progress bar over the cells' work rather than their number, so that its time left is not
    an average over cells of a thousand times different sizes."""
    return tqdm(
        total=sum(map(work, cells)),
        desc=desc,
        disable=disable,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]",
        **stacked.BAR,
    )


def stored_work(bar, cells):
    """Move the bar to the work of the cells stored so far ({path: settings}), and say how many."""
    done = [s for p, s in cells.items() if p.exists()]
    bar.set_postfix_str(f"{len(done)}/{len(cells)} cells stored", refresh=False)
    bar.update(sum(map(work, done)) - bar.n)


def worker(cells, results_dir, threads, row=0, progress=False):
    """One of run_cells' worker processes: single-threaded, claiming groups through their locks.
    Its parent stops it (SIGTERM, also sent by the kernel when the parent dies): it then exits
    cleanly, and says nothing; the parent says what was kept. Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop_worker)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the line above
        return
    stacked.PROGRESS_ROW = row  # this worker's progress bars go below the others'
    store.SAY_WAITING = row == 1  # the first worker says what the command waits for
    torch.set_num_threads(threads)
    try:
        run_cells(cells, results_dir, progress=progress)
    except (OSError, ValueError, ResultsError, MemoryError) as err:  # one line, as the command's
        sys.exit(f"error: {err}")
    except RuntimeError as err:
        if "memory" not in str(err):
            raise
        sys.exit(f"error: out of memory ({str(err).rpartition('Allocator: ')[2][:100]})")


def stop_worker(signum, frame):
    sys.exit(128 + signum)


def run_workers(cells, results_dir, jobs, progress):
    """Train the missing cells in `jobs` processes, the machine's cores shared among them. The
    workers are stopped when this process is interrupted or terminated."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    threads = max(1, CORES // jobs)
    procs = [
        ctx.Process(target=worker, args=(cells, str(results_dir), threads, 1 + 2 * i, progress))
        for i in range(jobs)
    ]
    unique = {cell_path(s, results_dir): s for s in cells}
    with stopped_by_sigterm():
        try:
            for p in procs:
                p.start()
            with work_bar(list(unique.values()), f"{jobs} workers", not progress) as bar:
                while any(p.is_alive() for p in procs):
                    stored_work(bar, unique)
                    time.sleep(1)
                stored_work(bar, unique)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
    lost = [p.exitcode for p in procs if p.exitcode != 0]
    if lost:
        how = ", ".join(f"signal {-c}" if c < 0 else f"exit code {c}" for c in lost)
        missing = [s for s in cells if not cell_path(s, results_dir).exists()]
        if missing:  # an OSError: the command says it in one line
            raise ChildProcessError(
                f"{len(lost)} of {jobs} workers were lost ({how}); not stored: "
                + ", ".join(f"{label(s)} seed {s['seed']}" for s in missing)
            )
        print(
            f"{len(lost)} of {jobs} workers were lost ({how}); the others stored every cell",
            file=sys.stderr,
        )


@contextmanager
def stopped_by_sigterm():
    """Within it, SIGTERM stops this process as Ctrl-C does, so that `finally` blocks run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def remove_free_locks(results_dir):
    """Remove the lock files of finished groups (no checkpoint left) that no process holds: the
    store's own, by their names."""
    for path in (Path(results_dir) / "checkpoints").glob("*.lock"):
        if OWN_NAME.match(path.name) and not path.with_suffix(".pt").exists():
            with group_lock(path.with_suffix(".pt"), say=False) as lock:
                if lock is not None and not path.with_suffix(".pt").exists():
                    path.unlink(missing_ok=True)


class GroupJob:
    """A Slurm job of submit_slurm: train and store one group. On preemption or time-out submitit
    calls `checkpoint`, requeues the same call, and it resumes from the group's last checkpoint."""

    def __call__(self, group, results_dir):
        return run_cells(group, results_dir, progress=False)

    def checkpoint(self, group, results_dir):
        import submitit

        return submitit.helpers.DelayedSubmission(self, group, results_dir)


def submit_slurm(cells, results_dir=RESULTS_DIR, partition=None, hours=4.0, gpus=0, local=False):
    """Submit the groups that `cells` still lack as one Slurm job array (submitit); returns the
    jobs. With `local`, submitit's local executor runs the same jobs as processes here."""
    import submitit

    results_dir = writable_results(results_dir)
    folder = private_folder(results_dir / "slurm")
    plan = planned_groups(stored_and_missing(cells, results_dir)[1], results_dir)
    if not plan:  # nothing to submit (submitit would warn of an empty batch)
        return []
    if local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=max(1, round(hours * 60)))
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(
            slurm_partition=partition,
            gpus_per_node=gpus,
            cpus_per_task=2,
            timeout_min=max(1, round(hours * 60)),
            slurm_array_parallelism=len(plan) or 1,
        )
    with executor.batch():
        jobs = [executor.submit(GroupJob(), group, str(results_dir)) for group in plan]
    return jobs


def private_folder(path):
    """submitit's folder, made private (mode 0700): a job un-pickles the files it finds there
    when it starts, so whoever can write there could run code as the job's user. One that
    others can write to, or that is not a folder of this user's own, is refused; so is one in a
    results folder that is not this user's, or that others may rename it in (no sticky bit)."""
    refuse_shared(path.parent, sticky_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    refuse_shared(path, sticky_ok=False)
    return path


def refuse_shared(folder, sticky_ok):
    st = os.stat(folder)
    others = st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.getuid(), 0) or others:
        raise ResultsError(
            f"{folder} is not a folder of yours that only you can write to, and a Slurm job runs "
            f"the pickles that submitit keeps in it; make it private (chmod 700 {folder}) or "
            "name another results folder"
        )
