"""The command line (vae_helpers/__main__.py)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HELD_ARGS, held_run, tiny, wait_until

import vae_helpers as v
import vae_helpers.__main__ as cli


def test_command_line_runs_an_experiment_and_prints_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: [tiny(latent=2)])
    cli.main(["q4", "--results", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "best_test_vfe" in out and (tmp_path / "q4.csv").exists()


def test_command_line_epochs_override_trains_that_long_into_its_own_table(tmp_path, monkeypatch):
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: [tiny(latent=2)])
    cli.main(["q4", "--results", str(tmp_path), "--no-progress", "--epochs", "2"])
    assert not (tmp_path / "q4.csv").exists()
    assert list(pd.read_csv(tmp_path / "q4_e2.csv")["epochs"]) == [2]


def test_a_shorter_run_without_a_results_folder_goes_to_scratch_not_the_studys_store(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: [tiny(latent=2)])
    monkeypatch.setattr(cli, "RESULTS", tmp_path)
    monkeypatch.delenv("VAE_RESULTS_DIR", raising=False)
    cli.main(["q4", "--no-progress", "--epochs", "2"])
    assert (tmp_path / "scratch" / "q4_e2.csv").exists() and not (tmp_path / "cells").exists()


def test_slurm_local_with_every_cell_stored_names_its_own_flag_and_warns_nothing(
    tmp_path, monkeypatch, capsys, recwarn
):
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: [tiny(latent=2)])
    v.run_cells([tiny(latent=2)], tmp_path, progress=False)
    cli.main(["q4", "--slurm-local", "--results", str(tmp_path)])
    assert "without --slurm-local for the table" in capsys.readouterr().out and not recwarn.list


def test_command_line_refuses_an_unknown_experiment(capsys):
    with pytest.raises(SystemExit):
        cli.main(["q9"])
    assert "invalid choice" in capsys.readouterr().err


def test_command_line_size_limits_train_only_the_cells_of_that_size(tmp_path, monkeypatch):
    small, large = tiny(hidden=5), tiny(hidden=30)
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: [small, large])
    cli.main(
        [
            "q4",
            "--results",
            str(tmp_path),
            "--no-progress",
            "--max-params",
            str(v.n_params_formula(5, 2)),
        ]
    )
    assert v.cell_path(small, tmp_path).exists() and not v.cell_path(large, tmp_path).exists()
    assert list(pd.read_csv(tmp_path / "q4.csv")["hidden_dim"]) == [5]
    cli.main(
        [
            "q4",
            "--results",
            str(tmp_path),
            "--no-progress",
            "--min-params",
            str(v.n_params_formula(30, 2)),
        ]
    )
    assert list(pd.read_csv(tmp_path / "q4.csv")["hidden_dim"]) == [5, 30]


def test_a_summary_table_with_a_diverged_record_says_so():
    rec, _ = v.train_cell(tiny(epochs=2), progress=False)
    gone = dict(json.loads(json.dumps(rec)), diverged_epoch=2)
    table = v.summary_table([rec, gone])
    assert list(table.diverged_epoch.isna()) == [True, False] and "diverged_epoch" in cli.readable(
        table
    )


def test_a_diverged_run_has_no_final_values_in_its_table_only_the_best_before_it():
    rec, _ = v.train_cell(tiny(epochs=2), progress=False)
    gone = dict(json.loads(json.dumps(rec)), diverged_epoch=2)
    row = v.summary_table([rec, gone]).iloc[1]
    assert row[["final_test_vfe", "final_train_vfe", "final_running_train_vfe"]].isna().all()
    assert row.best_test_vfe == round(rec["best_test_vfe"], 3)


def test_the_printed_table_leaves_out_settings_that_never_change():
    table = v.summary_table(v.stored_records("q4")[0])
    shown = cli.readable(table)
    assert {"hidden_dim", "latent_dim", "best_test_vfe", "final_test_vfe"} <= set(shown)
    assert not {"recon", "epochs", "seed", "train_size", "wall_seconds"} & set(shown)


def test_command_line_names_a_bad_results_folder_without_a_traceback(capsys):
    with pytest.raises(SystemExit):
        cli.main(["q4", "--results", "", "--no-progress"])
    assert capsys.readouterr().err.splitlines() == [
        "python -m vae_helpers: error: --results is empty; name a folder (default: results/) "
        "(see --help)"
    ]


def test_a_blank_results_folder_from_the_environment_is_refused_naming_the_variable(
    monkeypatch, capsys
):
    monkeypatch.setattr(cli, "RESULTS", Path("  "))  # as VAE_RESULTS_DIR="  " makes it
    with pytest.raises(SystemExit):
        cli.main(["q4", "--no-progress"])
    assert "error: VAE_RESULTS_DIR is empty" in capsys.readouterr().err


def test_the_command_lines_experiments_and_folder_are_the_packages():
    assert cli.NAMES == tuple(sorted(v.EXPERIMENTS))  # kept apart so that --help skips PyTorch
    assert Path(cli.RESULTS) == v.RESULTS_DIR


def test_help_answers_before_pytorch_is_loaded():
    code = (
        "import sys, vae_helpers.__main__ as cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch loaded:', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "--max-params" in out and out.splitlines()[-1] == "torch loaded: False"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--max-params", "0"], "--max-params: must be at least 1, got 0"),
        (["--min-params", "99999999999"], "no cell of q4 has at least 99,999,999,999 parameters"),
        (["--min-params", "10", "--max-params", "5"], "--min-params 10 is above --max-params 5"),
        (["--hours", "0", "--slurm-local"], "--hours: must be a positive number of hours"),
        (["--hours", "2"], "--hours applies only with --slurm"),
        (["--gpus", "1"], "--gpus applies only with --slurm"),
        (["--partition", "gpu"], "--partition applies only with --slurm"),
        (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
        (["--epochs", "two"], "--epochs: 'two' is not a whole number"),
        (["--jobs", "0"], "--jobs: must be at least 1, got 0"),
        (["--gpus", "-1", "--slurm-local"], "--gpus: must be at least 0, got -1"),
        (["--epochs", "18446744073709551616"], "--epochs: must be at most 100,000"),
        (["--gpus", "9" * 30, "--slurm-local"], "--gpus: must be at most 64"),
        (["--hours", "1e308", "--slurm-local"], "--hours: must be a positive number of hours"),
        (["--partition", "gpu\nrm -rf ~", "--slurm-local"], "is not a Slurm partition's name"),
    ],
)
def test_an_option_that_makes_no_sense_is_refused_in_one_line_before_anything_is_written(
    tmp_path, capsys, args, says
):
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as stop:
        cli.main(["q4", "--results", str(results), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and says in err
    assert not results.exists()


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 31360000"),
    ],
)
def test_running_out_of_memory_ends_in_one_error_line(tmp_path, monkeypatch, error):
    def out_of_memory(*args):
        raise error

    monkeypatch.setattr(cli, "run_command", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        cli.main(["q4", "--results", str(tmp_path)])
    assert str(stop.value.code).startswith("error: out of memory (") and "\n" not in stop.value.code


def test_slurm_without_sbatch_is_refused_and_offers_the_local_ways(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(SystemExit):
        cli.main(["q4", "--slurm", "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert "needs Slurm's sbatch" in err and "--jobs" in err and "--slurm-local" in err
    assert not (tmp_path / "results").exists()


def run_cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "vae_helpers", *args],
        capture_output=True,
        text=True,
        cwd=v.ROOT,
        **kw,
    )


def test_the_command_lines_cluster_path_stores_its_cells_as_jobs_run_by_submitit(tmp_path):
    args = ["q4", "--epochs", "1", "--max-params", "9000", "--results", str(tmp_path)]
    cells = v.experiment_cells("q4", 1, 9000)
    assert 1 <= len(cells) <= 4
    out = run_cli(*args, "--slurm-local")
    assert out.returncode == 0, out.stderr
    assert "as local processes (pids)" in out.stdout and "Slurm jobs" not in out.stdout
    wait_until(lambda: all(v.cell_path(s, tmp_path).exists() for s in cells), "the jobs' cells")
    table = run_cli(*args, "--jobs", "1")
    assert table.returncode == 0 and f"q4_e1 ({len(cells)} cells)" in table.stdout
    assert "resuming" not in table.stderr  # nothing left to train


def test_ctrl_c_stops_every_process_in_one_line_and_the_same_command_resumes(tmp_path):
    run, results, hold = held_run(tmp_path)
    try:
        os.killpg(run.pid, signal.SIGINT)  # as the terminal does: to every process of the job
        out, err = run.communicate(timeout=600)
    finally:
        hold.unlink()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    lines = [line for line in err.splitlines() if line.strip()]
    assert run.returncode == 1 and "Traceback" not in err, err
    assert len(lines) == 1 and "the same command resumes" in lines[0], err
    again = run_cli(*HELD_ARGS, "--results", str(results), "--jobs", "1", "--no-progress")
    assert again.returncode == 0 and "resuming h=5 l=5,10,100,300 after epoch 1" in again.stderr
    assert not list((results / "checkpoints").glob("*"))  # checkpoints and locks are gone


def test_a_finished_run_leaves_no_lock_files(tmp_path):
    v.run_cells([tiny(latent=2), tiny(hidden=7)], tmp_path, progress=False)
    assert not list((tmp_path / "checkpoints").glob("*.lock"))


def test_the_printed_table_says_what_was_not_measured_in_words_within_100_columns(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: [tiny(latent=2), tiny(latent=3)])
    cli.main(["q4", "--results", str(tmp_path), "--no-progress"])
    v.run_cells([tiny(latent=2)], tmp_path, progress=False)
    table = v.summary_table(v.stored_records("q4", tmp_path)[0]).assign(
        final_train_vfe=np.nan, diverged_epoch=pd.array([pd.NA, 3], dtype="Int64")
    )
    shown = cli.readable(table)
    assert "final_train_vfe" not in shown  # never measured in these records: left out, not NaN
    assert list(shown.active_units) == [str(n) for n in table.active_units]
    assert list(shown.diverged_epoch) == ["no", "3"]
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) < 100 and "NaN" not in out
    assert not any(line.endswith("\\") for line in out.splitlines())


def test_make_lab_lets_root_run_jupyterlab_and_passes_the_users_arguments():
    args = ["make", "--no-print-directory", "-n", "lab", "LAB_ARGS=--port 8890 --no-browser"]
    out = subprocess.run(args, cwd=v.ROOT, capture_output=True, text=True).stdout
    (lab,) = [line for line in out.splitlines() if "jupyter lab" in line]
    assert "--allow-root)" in lab and lab.endswith("--port 8890 --no-browser")


def repository_results():
    """What the repository's results/ holds (each file's hash), but the checkpoints of any
    training that is running there."""
    import hashlib

    root = v.ROOT / "results"
    return {
        p: hashlib.sha1(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "checkpoints"
    }


def test_each_analysis_command_writes_only_under_its_results_folder(tmp_path, monkeypatch, capsys):
    q4 = [tiny(), tiny(hidden=30)]
    runs = [dict(train_offset=300 * k, seed=k) for k in range(3)] + [dict(seed=s) for s in (1, 2)]
    split = [tiny(val_size=500, recon_images=20, **run) for run in runs]
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: q4)
    monkeypatch.setitem(v.EXPERIMENTS, "q7_bias_variance", lambda: split)
    monkeypatch.setattr(v.analysis, "BOUND", dict(images=20, ks=(1, 10), seed=0))
    quick = dict(draws=2, lr=0.02, every=5, tol=100.0, max_steps=10, check=4)
    monkeypatch.setattr(
        v.gaps, "GAP_RUNS", [(q4[0], "test", quick, 20), (split[0], "train", quick, 10)]
    )
    monkeypatch.setattr(v.gaps, "GAP_ESTIMATES", dict(k=20, draws=5, seed=0))
    results = tmp_path / "results"
    v.run_cells(q4 + split, results, progress=False)
    before = repository_results()
    for name in cli.ANALYSES:
        cli.main([name, "--results", str(results)])
        assert f"{name}: " in capsys.readouterr().out and (results / f"{name}.csv").exists()
    assert repository_results() == before
    made = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    for name in cli.ANALYSES:  # each resumes: with nothing left to do, nothing is written
        cli.main([name, "--results", str(results)])
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == made


def test_an_analysis_refuses_the_training_options_in_one_line_before_pytorch_loads(tmp_path):
    code = (
        "import sys, vae_helpers.__main__ as cli\n"
        f"try:\n    cli.main(['gaps', '--epochs', '2', '--results', {str(tmp_path)!r}])\n"
        "except SystemExit as stop:\n    print('exit', stop.code)\n"
        "print('torch loaded:', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.splitlines() == ["exit 2", "torch loaded: False"]
    assert out.stderr.splitlines() == [
        "python -m vae_helpers: error: --epochs applies only to training; gaps reads stored models "
        "(see --help)"
    ]
    assert list(tmp_path.iterdir()) == []
