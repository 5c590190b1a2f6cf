"""The command line: `python -m vae_helpers q4` runs or resumes an experiment, then prints its
table. The arguments are checked before PyTorch is imported, so `--help` and mistakes answer at
once, and before anything is trained or written."""

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

if not __package__:  # run as a file: the package's relative imports cannot work
    sys.exit(f"run it as a module, from any folder: python -m vae_helpers {' '.join(sys.argv[1:])}")

# The experiments' names (experiments.EXPERIMENTS; a test checks that the two agree).
NAMES = ("bf16_check", "q4", "q5", "q6", "q6_sweep", "q7", "q7_bias_variance", "q7_data")
NAMES += ("q7_data_lr_scale", "q7_lr_scale", "q7_scaled", "recon", "repro", "seeds")
# The analyses: each reads stored models and writes <results>/<name>.csv (and .npz), through one
# cache (store.cached_table), so that the same command resumes and recomputes only what changed.
ANALYSES = ("bias_variance", "bound", "gaps")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
RESULTS = Path(
    os.environ.get("VAE_RESULTS_DIR") or Path(__file__).resolve().parent.parent / "results"
)


def count(low, high=None):
    """An argparse type: an integer of at least `low` (and at most `high`)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:30]!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,}, got {text[:30]}")
        return value

    return parse


def hours(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 8760:
        raise argparse.ArgumentTypeError(
            f"must be a positive number of hours, at most 8760 (a year), got {text[:30]}"
        )
    return value


def partition(text):
    """A Slurm partition's name (or a comma-separated list): no space or line break, which would
    reach the job's script."""
    if not re.fullmatch(r"[\w.,-]+", text):
        raise argparse.ArgumentTypeError(f"{text[:30]!r} is not a Slurm partition's name")
    return text


def verb(options):
    return "applies" if len(options) == 1 else "apply"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage: --help gives that
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser():
    p = Parser(
        prog="python -m vae_helpers",
        description="Train the cells (one trained model each) that an experiment still lacks, "
        "resuming any stopped ones, then print its table. Ctrl-C stops it; the same command "
        "resumes.",
    )
    p.add_argument(
        "experiment",
        choices=NAMES + ("all",) + ANALYSES,
        help="an experiment to train, or all; or an analysis of the stored models "
        f"({', '.join(ANALYSES)}) that writes <results>/<name>.csv, computing what it lacks",
    )
    p.add_argument(
        "--results",
        help="results folder (default: results/, or $VAE_RESULTS_DIR; with --epochs, "
        "results/scratch/, which the notebook does not read); name a new one to re-run from "
        "scratch",
    )
    p.add_argument(
        "--epochs",
        type=count(1, 100_000),
        help="train every cell this many epochs instead of "
        "the experiment's own protocol; the table goes to <results>/<name>_e<N>.csv",
    )
    p.add_argument(
        "--max-params",
        type=count(1, 10**12),
        help="train only the cells of at most this many parameters",
    )
    p.add_argument(
        "--min-params",
        type=count(0, 10**12),
        default=0,
        help="train only the cells of at least this many parameters",
    )
    p.add_argument(
        "--jobs",
        type=count(1),
        default=CORES,
        help="worker processes, "
        f"single-threaded when there are enough groups (default: one per core, {CORES} "
        "here)",
    )
    slurm = p.add_argument_group("Slurm (train on a cluster instead of here)")
    slurm.add_argument(
        "--slurm",
        action="store_true",
        help="submit the missing groups to Slurm "
        "as one job array (submitit); run again without it for the table",
    )
    slurm.add_argument(
        "--slurm-local",
        action="store_true",
        help="the same jobs, run as "
        "processes on this machine by submitit's local executor: a trial of the "
        "cluster path without a cluster",
    )
    slurm.add_argument("--partition", type=partition, help="Slurm partition")
    slurm.add_argument(
        "--hours",
        type=hours,
        help="time limit per job (default 4); a job "
        "stopped by it is requeued and resumes from its checkpoint",
    )
    slurm.add_argument("--gpus", type=count(0, 64), help="GPUs per job (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def checked(p, args):
    """Refuse combinations that would do something other than what was asked."""
    cluster = [f"--{k}" for k in ("partition", "hours", "gpus") if getattr(args, k) is not None]
    if cluster and not (args.slurm or args.slurm_local):
        p.error(f"{', '.join(cluster)} {verb(cluster)} only with --slurm")
    if args.slurm and args.slurm_local:
        p.error("choose one of --slurm and --slurm-local")
    if args.slurm and shutil.which("sbatch") is None:
        p.error(
            "--slurm needs Slurm's sbatch, and none is on this machine's PATH. Train here "
            "with --jobs N, or try the job path on this machine with --slurm-local"
        )
    if args.max_params is not None and args.min_params > args.max_params:
        p.error(f"--min-params {args.min_params:,} is above --max-params {args.max_params:,}")
    given = "--results" if args.results is not None else "VAE_RESULTS_DIR"
    if args.results is None:  # a shorter protocol's cells are not the study's: kept apart
        scratch = args.epochs is not None and not os.environ.get("VAE_RESULTS_DIR")
        args.results = str(RESULTS / "scratch" if scratch else RESULTS)
    if not str(args.results).strip():
        p.error(f"{given} is empty; name a folder (default: results/)")
    if re.search(r"[\x00-\x1f\x7f]", str(args.results)):  # it reaches Slurm's job script
        p.error(f"--results {str(args.results)[:60]!r} holds a line break or control character")
    return args


def main(argv=None):
    p = parser()
    args = checked(p, p.parse_args(argv))
    if args.experiment in ANALYSES:
        analysis_checked(p, args)
    names = list(NAMES) if args.experiment == "all" else [args.experiment]
    try:  # PyTorch loads here, once the arguments are known to be good
        from .store import ResultsError
    except ImportError as err:  # also a memory limit (ulimit -v) too small to map its libraries
        sys.exit(
            f"error: PyTorch could not be loaded ({err}); under a memory limit (ulimit -v) allow "
            "it more, else set up .venv again with make"
        )

    try:
        run_analysis(args) if args.experiment in ANALYSES else run_command(args, names, p)
    except KeyboardInterrupt:
        if args.experiment in ANALYSES:
            sys.exit("\ninterrupted: each part finished so far is stored; the same command resumes")
        sys.exit(
            "\ninterrupted: every cell finished so far is stored, and each group in "
            "training keeps its last checkpoint (at most its epoch in progress is lost); "
            "the same command resumes"
        )
    except (ValueError, OSError, ResultsError) as err:  # bad input or a bad results folder
        sys.exit(f"error: {err}")
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "memory" not in str(err):
            raise
        why = str(err).rpartition("Allocator: ")[2][:100] or "MemoryError"
        sys.exit(
            f"error: out of memory ({why}); free memory or raise the limit (ulimit -v), or train "
            "fewer cells at once (--jobs 1, --max-params); the same command resumes"
        )


def analysis_checked(p, args):
    """An analysis reads stored models: the options that choose what to train, or where, refused."""
    unset = dict(epochs=None, max_params=None, min_params=0, slurm=False, slurm_local=False)
    unset.update(partition=None, hours=None, gpus=None)
    given = [f"--{k.replace('_', '-')}" for k, x in unset.items() if getattr(args, k) != x]
    if given:
        p.error(
            f"{', '.join(given)} {verb(given)} only to training; {args.experiment} reads stored "
            "models"
        )


def run_analysis(args):
    from . import analysis, gaps, tradeoff

    make = dict(
        bias_variance=tradeoff.make_bias_variance, bound=analysis.make_bound, gaps=gaps.make_gaps
    )[args.experiment]
    table = make(args.results)
    print(f"{args.experiment}: {len(table)} rows in {Path(args.results) / args.experiment}.csv")


def run_command(args, names, p):
    from .experiments import experiment_cells, experiment_folder, run_experiment, table_name
    from .runner import submit_slurm

    cells = [
        s for n in names for s in experiment_cells(n, args.epochs, args.max_params, args.min_params)
    ]
    if not cells:
        size = (
            f"at least {args.min_params:,}"
            if args.max_params is None
            else (f"between {args.min_params:,} and {args.max_params:,}")
        )
        p.error(f"no cell of {', '.join(names)} has {size} parameters; nothing to train")
    if args.slurm or args.slurm_local:
        hours_ = 4.0 if args.hours is None else args.hours
        by_folder = {}  # an experiment with a folder of its own (repro) is submitted into it
        for n in names:
            folder = experiment_folder(n, args.results)
            by_folder.setdefault(folder, []).extend(
                experiment_cells(n, args.epochs, args.max_params, args.min_params)
            )
        jobs = [
            job
            for folder, some in by_folder.items()
            for job in submit_slurm(
                some, folder, args.partition, hours_, args.gpus or 0, local=args.slurm_local
            )
        ]
        ids = ", ".join(j.job_id for j in jobs)
        flag = "--slurm-local" if args.slurm_local else "--slurm"
        where, watch = (
            ("local processes (pids)", "`ps -p <pid>`")
            if args.slurm_local
            else ("Slurm jobs", "`squeue --me` (gone from it: finished)")
        )
        print(
            f"submitted {len(jobs)} groups as {where} {ids}; logs in "
            f"{Path(args.results) / 'slurm'}; {watch} shows which still run. When they finish, "
            f"run this command without {flag} for the table."
            if jobs
            else f"every cell is stored already: run this command without {flag} for the table"
        )
        return
    for name in names:
        table, _ = run_experiment(
            name,
            args.results,
            not args.no_progress,
            args.epochs,
            args.max_params,
            args.min_params,
            args.jobs,
        )
        name = table_name(name, args.epochs)
        print(
            f"\n{name} ({len(table)} cells); every column is in\n"
            f"{Path(args.results) / (name + '.csv')}\nhere the settings that vary and the results:"
        )
        text = readable(table).to_string(index=False, line_width=99)
        print(re.sub(r" *\\$", "", text, flags=re.M))  # blocks of columns, without pandas' "\"


def readable(table):
    """The table as printed: settings that are the same in every row left out, counts as whole
    numbers, and what was not measured or did not happen said in words rather than NaN."""
    results = [
        "n_params",
        "best_test_vfe",
        "best_epoch",
        "final_test_vfe",
        "final_train_vfe",
        "final_running_train_vfe",
        "active_units",
        "diverged_epoch",
    ]
    keep = [
        c
        for c in table
        if c in results or (c != "wall_seconds" and table[c].nunique(dropna=False) > 1)
    ]
    import pandas as pd

    out = table[keep].copy()
    if "final_train_vfe" in out and out.final_train_vfe.isna().all():
        out = out.drop(columns="final_train_vfe")  # older records never measured it
    for col, missing in (
        ("active_units", "-"),
        ("diverged_epoch", "no"),
        ("final_train_vfe", "not measured"),
    ):
        if col in out:
            out[col] = [
                missing if pd.isna(x) else (f"{x:.3f}" if col == "final_train_vfe" else str(int(x)))
                for x in out[col]
            ]
    return out


if __name__ == "__main__":
    main()
