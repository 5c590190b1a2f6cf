"""A results store that survives faults and many workers (store.py, runner.py, stacked.py)."""

import json
import os
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import held_run, tiny, wait_until

import vae_helpers as v


def store_folder(path):
    """A results folder marked as the store's, as one that it made is."""
    path.mkdir(parents=True, exist_ok=True)
    (path / v.MARK).touch()
    return path


def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    import threading

    path, errors = tmp_path / "cells" / "one.json", []

    def write(k):
        for i in range(40):
            try:
                v.atomic_save({"writer": k, "i": i, "pad": "x" * 50_000}, path, v.write_json)
            except Exception as err:  # the fixed temporary name made 24 of 80 of these fail
                errors.append(err)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
    [t.start() for t in threads], [t.join() for t in threads]
    assert errors == [] and json.loads(path.read_text())["i"] == 39
    assert list(path.parent.glob("*.tmp")) == []


def train_and_log(cells, results_dir, log):
    """A second process's run (spawned: a forked PyTorch can hang), noting each group it trains."""
    real = v.train_group

    def logged(group, *a, **k):
        with open(log, "a") as f:
            f.write(f"{group[0]['hidden']}\n")
        return real(group, *a, **k)

    v.runner.train_group = logged
    v.run_cells(cells, results_dir, progress=False)


def test_two_processes_on_one_folder_train_each_group_once(tmp_path):
    import multiprocessing

    cells, log = (
        [tiny(hidden=h, epochs=3, train_size=3000) for h in (5, 6, 7, 8)],
        tmp_path / "trained.txt",
    )
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=train_and_log, args=(cells, tmp_path, log)) for _ in range(2)]
    [p.start() for p in procs], [p.join() for p in procs]
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(log.read_text().split()) == ["5", "6", "7", "8"]
    assert all(v.cell_path(s, tmp_path).exists() for s in cells)


def test_jobs_share_the_groups_among_worker_processes_and_store_every_cell(tmp_path):
    cells = [tiny(hidden=h) for h in (5, 6, 7)]
    records = v.run_cells(cells, tmp_path, progress=False, jobs=2)
    alone = v.run_cells(cells, tmp_path / "plain", progress=False)
    for a, b in zip(records, alone):
        assert a["test_vfe"] == pytest.approx(b["test_vfe"], rel=1e-4)


def test_a_cell_diverging_in_its_first_epoch_is_reported_and_its_group_mates_are_stored(
    tmp_path, monkeypatch
):
    real = v.train_epoch

    def second_cell_nan(grid, opt, train_x, cells, epoch, batches=None, bar=None):
        totals, peaks, first_bad = real(grid, opt, train_x, cells, epoch, batches)
        return totals * torch.tensor([1.0, float("nan")]), peaks, first_bad

    monkeypatch.setattr(v.stacked, "train_epoch", second_cell_nan)
    good, bad = tiny(latent=2), tiny(latent=3)
    with (
        pytest.raises(FloatingPointError, match="l=3"),
        pytest.warns(UserWarning, match="diverged"),
    ):
        v.run_cells([good, bad], tmp_path, progress=False)
    assert v.cell_path(good, tmp_path).exists() and not v.cell_path(bad, tmp_path).exists()
    assert not v.checkpoint_path([good, bad], tmp_path).exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "another group's"])
def test_a_corrupt_checkpoint_is_set_aside_with_a_warning_and_the_group_retrained(
    tmp_path, monkeypatch, damage
):
    store_folder(tmp_path)
    monkeypatch.setattr(v.stacked, "CHECKPOINT_SECONDS", 0)
    cell = tiny(epochs=2)
    clean = v.run_cells([cell], tmp_path / "clean", progress=False)[0]
    path = v.checkpoint_path([cell], tmp_path)
    path.parent.mkdir(parents=True)
    if damage == "empty":
        path.write_bytes(b"")
    else:
        v.train_group([tiny(hidden=9, epochs=2)], progress=False, checkpoint=tmp_path / "other.pt")
        data = (tmp_path / "other.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else data)
    with pytest.warns(UserWarning, match="set aside"):
        (rec,) = v.run_cells([cell], tmp_path, progress=False)
    assert rec["test_vfe"] == clean["test_vfe"]
    assert len(list(path.parent.glob(path.name + ".corrupt-*"))) == 1


def test_a_finished_checkpoint_is_still_used_after_a_kill_between_two_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(v.stacked, "CHECKPOINT_SECONDS", 0)
    group = [tiny(latent=2), tiny(latent=3)]
    records, _ = v.train_group(group, progress=False, checkpoint=v.checkpoint_path(group, tmp_path))
    v.atomic_save(records[0], v.cell_path(group[0], tmp_path), v.write_json)  # killed after this
    monkeypatch.setattr(
        v.stacked, "train_epoch", lambda *a, **k: pytest.fail("a finished group was retrained")
    )
    second = v.run_cells([group[1]], tmp_path, progress=False)[0]
    assert second["test_vfe"] == records[1]["test_vfe"]
    assert list((tmp_path / "checkpoints").glob("*.pt")) == []


def test_a_checkpoint_that_no_group_needs_any_more_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(v.stacked, "CHECKPOINT_SECONDS", 0)
    group = [tiny(latent=2), tiny(latent=3)]
    v.run_cells(group, tmp_path, progress=False)
    v.train_group(
        group, progress=False, checkpoint=v.checkpoint_path(group, tmp_path)
    )  # left behind
    v.run_cells([tiny(hidden=6)], tmp_path, progress=False)
    assert list((tmp_path / "checkpoints").glob("*.pt")) == []


@pytest.mark.parametrize(
    "folder, error",
    [
        ("file", NotADirectoryError),
        ("", ValueError),
        ("/proc/vae-results", PermissionError),
        ("weights", NotADirectoryError),  # a file where the store keeps its folder
    ],
)
def test_a_results_folder_that_cannot_take_files_is_refused_before_any_training(
    tmp_path, monkeypatch, folder, error
):
    monkeypatch.setattr(
        v.runner, "train_group", lambda *a, **k: pytest.fail("trained before checking the folder")
    )
    if folder == "file":
        folder = tmp_path / "file"
        folder.write_text("")
    if folder == "weights":
        folder = store_folder(tmp_path)
        (folder / "weights").write_text("")
    with pytest.raises(error, match="folder"):
        v.run_cells([tiny()], folder, progress=False)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_params", None),  # None: the field is deleted
        ("n_params", "85,904"),
        ("n_params", -5),
        ("best_test_vfe", "low"),
        ("best_test_vfe", 1.0),  # not the minimum of test_vfe
        ("test_vfe", [-3.0]),
        ("test_vfe", [30.0, 29.0]),  # longer than the evaluated epochs
        ("test_vfe", [1e400]),  # read as infinity
        ("wall_seconds", -1.0),
        ("active_units", None),
        ("running_train_vfe", []),
        ("train_vfe", "23.4"),
        ("settings", v.recorded_settings(tiny()) | {"epochs": "1"}),
        ("settings", v.recorded_settings(tiny()) | {"hidden": "5"}),
        ("settings", v.recorded_settings(tiny()) | {"latent": None}),
        ("device", None),
        ("device", "tpu"),
        ("diverged_epoch", "x"),
        ("diverged_epoch", 99),
        ("wall_seconds", 10**400),  # an integer no float holds
    ],
)
def test_a_damaged_or_inconsistent_record_is_refused_naming_the_file_and_field(
    tmp_path, field, value
):
    v.run_cells([tiny()], tmp_path, progress=False)
    path = v.cell_path(tiny(), tmp_path)
    rec = json.loads(path.read_text())
    if value is None:
        del rec[field]
    else:
        rec[field] = value
    path.write_text(json.dumps(rec).replace("Infinity", "1e400"))
    with pytest.raises(v.ResultsError, match=f"{path.name} is corrupt .*its {field} is"):
        v.load_cell(path, tiny())


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_a_record_holding_a_number_json_does_not_allow_is_refused(tmp_path, literal):
    v.run_cells([tiny()], tmp_path, progress=False)
    path = v.cell_path(tiny(), tmp_path)
    rec = json.loads(path.read_text())
    rec["test_vfe"][0] = float(literal.lower().replace("infinity", "inf"))
    path.write_text(json.dumps(rec))
    with pytest.raises(v.ResultsError, match=f"{literal.lstrip('-')} is not a number JSON allows"):
        v.load_cell(path, tiny())


def test_a_record_giving_a_key_twice_is_refused(tmp_path):
    v.run_cells([tiny()], tmp_path, progress=False)
    path = v.cell_path(tiny(), tmp_path)
    path.write_text(
        path.read_text().replace('{\n "settings"', '{\n "n_params": 1,\n "settings"', 1)
    )
    with pytest.raises(v.ResultsError, match="given twice: \\['n_params'\\]"):
        v.load_cell(path, tiny())


def test_a_diverged_records_peaks_are_written_as_strict_json(tmp_path):
    v.write_json({"peak": float("inf"), "list": [1.0, float("nan")]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"peak": "inf", "list": [1.0, "nan"]}


def test_a_folder_where_a_record_should_be_is_corrupt(tmp_path):
    path = v.cell_path(tiny(), tmp_path)
    path.mkdir(parents=True)
    with pytest.raises(v.ResultsError, match="corrupt"):
        v.load_cell(path, tiny())


def test_leftover_temporary_files_of_dead_writers_are_removed_when_a_run_starts(tmp_path):
    store_folder(tmp_path)
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    ours = f"~{v.HOST}~{dead.pid}~0000abcd.tmp"  # atomic_save's name for a dead writer's file
    gone = [tmp_path / "cells" / f"a.json{ours}", tmp_path / f"q4.csv{ours}"]
    kept = [tmp_path / "cells" / f"c.json~{v.HOST}~{os.getpid()}~0000abcd.tmp"]  # alive
    for p in gone + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half")
    v.run_cells([tiny()], tmp_path, progress=False)
    assert [p.exists() for p in gone] == [False, False] and all(p.exists() for p in kept)


def test_temporary_files_that_are_not_the_stores_own_are_left_alone(tmp_path):
    store_folder(tmp_path)
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    others = [
        "notes.tmp",
        f"cells/notes~{v.HOST}~99999999999999999999~deadbeef.tmp",  # no process id
        "cells/b.pt.tmp",
        "project/build/report.tmp",
        ".cache/x.tmp",
        f"docs/a.json~{v.HOST}~{dead.pid}~0000abcd.tmp",
    ]  # the last: not a store folder
    for name in others:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("someone's work")
    v.run_cells([tiny()], tmp_path, progress=False)
    assert all((tmp_path / name).read_text() == "someone's work" for name in others)


def test_slurm_jobs_store_the_same_records_as_a_plain_run(tmp_path):
    cells = [tiny(latent=2), tiny(latent=3), tiny(hidden=7)]
    jobs = v.submit_slurm(cells, tmp_path / "slurm", local=True)
    assert len(jobs) == 2  # one job per group
    [job.result() for job in jobs]
    plain = v.run_cells(cells, tmp_path / "plain", progress=False)
    for s, rec in zip(cells, plain):
        stored = v.load_cell(v.cell_path(s, tmp_path / "slurm"), s)
        assert stored["test_vfe"] == pytest.approx(rec["test_vfe"], rel=1e-5)


def child_processes(pid):
    """The processes whose parent is pid (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    return out


def test_a_slurm_job_preempted_after_a_checkpoint_is_requeued_and_resumes_from_it(
    tmp_path, monkeypatch
):
    store_folder(tmp_path)
    hold = tmp_path / "hold"  # the job waits after each checkpoint while this file exists
    hold.touch()
    monkeypatch.setenv("VAE_CHECKPOINT_SECONDS", "0")  # the job's process reads both
    monkeypatch.setenv("VAE_HOLD_FILE", str(hold))
    cell = tiny(hidden=50, epochs=3, train_size=3000)
    (job,) = v.submit_slurm([cell], tmp_path, hours=1, local=True)  # requeued up to 3 times
    try:
        wait_until(
            lambda: v.checkpoint_path([cell], tmp_path).with_suffix(".json").exists(),
            "the first checkpoint",
        )
        (task,) = child_processes(
            job._process.pid
        )  # the job itself, under submitit's local controller
        os.kill(
            task, signal.SIGUSR2
        )  # what Slurm sends a job before its time limit or a preemption
        wait_until(lambda: task not in child_processes(job._process.pid), "the job to stop")
    finally:
        hold.unlink()  # the requeued job goes on (and no job is left waiting if this test failed)
    job.result()
    assert "resuming" in job.stderr()
    (plain,) = v.run_cells([cell], tmp_path / "plain", progress=False)
    assert v.load_cell(v.cell_path(cell, tmp_path), cell)["test_vfe"] == pytest.approx(
        plain["test_vfe"], rel=1e-5
    )


def test_the_environment_has_a_working_jupyter_lab_to_open_the_notebook():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "jupyterlab", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip()[0].isdigit()


def test_a_long_epoch_shows_its_mini_batches_with_the_group_and_the_time_left(capsys, monkeypatch):
    monkeypatch.setattr(v.stacked, "TTY", True)  # as in a terminal
    v.train_group([v.cell_settings(5, 2, epochs=1, train_size=10_000)], progress=True)
    err = capsys.readouterr().err
    assert "h=5 l=2 epoch 1" in err and "/100 [" in err and "<" in err  # "<": time left
    assert "batch/s]" in err or "s/batch]" in err  # tqdm turns the rate round below one a second


def test_progress_written_to_a_file_is_a_few_lines_not_one_per_batch(capsys, monkeypatch):
    monkeypatch.setattr(v.stacked, "TTY", False)
    monkeypatch.setattr(v.stacked, "BAR", dict(mininterval=1e9, maxinterval=1e9))  # no clock
    v.train_group([v.cell_settings(5, 2, epochs=3, train_size=10_000)], progress=True)
    lines = [x for x in capsys.readouterr().err.replace("\r", "\n").splitlines() if x.strip()]
    assert "epoch 1" not in " ".join(lines) and len(lines) <= 4  # the epoch bar's start and end


def test_every_committed_record_is_found_under_its_own_settings_and_device():
    paths = sorted(v.RESULTS_DIR.glob("**/cells/**/*.json"))
    assert len(paths) > 125
    for path in paths:
        rec = json.loads(path.read_text())
        s, twin = rec["settings"], path.parent.name != "cells"
        rest = {k: x for k, x in s.items() if k not in ("hidden", "latent")}
        assert v.cell_settings(s["hidden"], s["latent"], **rest) == s, path.name
        root = path.parents[2] if twin else path.parents[1]
        assert v.cell_path(dict(s, device=rec["device"].split(":")[0]), root) == path
        assert twin or v.cell_path(s, root) == path


# A cell trained on the GPU whose CPU twin is committed too (the device is not a setting).
TWINNED = "fashion-mnist-h2000-l10-wd0-e30-s0-ef0f716471.json"


def twinned_record(tmp_path, device):
    """The twinned cell's settings, with its record written into tmp_path as if from `device`."""
    rec = json.loads((v.RESULTS_DIR / "cells" / TWINNED).read_text())
    s = v.cell_settings(**rec["settings"])
    (tmp_path / "cells").mkdir()
    v.write_json(dict(rec, device=device), v.cell_path(s, tmp_path))
    return s


def test_a_cell_pinned_to_a_device_reads_its_twin_where_another_device_took_its_name(tmp_path):
    s = twinned_record(tmp_path, "cuda")
    pinned = dict(s, device="cpu")
    twin = tmp_path / "cells" / "cpu" / TWINNED
    assert v.cell_path(pinned, tmp_path) == twin
    assert v.stored_and_missing([pinned], tmp_path) == ([], [pinned])
    twin.parent.mkdir()
    v.write_json(dict(json.loads(v.cell_path(s, tmp_path).read_text()), device="cpu"), twin)
    assert v.stored_and_missing([pinned], tmp_path)[0][0]["device"] == "cpu"
    assert v.stored_and_missing([s], tmp_path)[0][0]["device"] == "cuda"
    assert v.stored_and_missing([dict(s, device="cuda")], tmp_path)[0][0]["device"] == "cuda"


def test_a_record_from_another_device_than_the_pinned_one_is_refused(tmp_path):
    s = twinned_record(tmp_path, "cuda")
    twin = tmp_path / "cells" / "cpu" / TWINNED
    twin.parent.mkdir()
    v.cell_path(s, tmp_path).rename(twin)  # a GPU record where the CPU twin belongs
    with pytest.raises(v.ResultsError, match="trained on cuda, not on cpu"):
        v.load_cell(twin, dict(s, device="cpu"))


def test_a_pinned_cell_trains_on_its_device_and_its_record_does_not_name_the_pin(tmp_path):
    pinned = tiny(device="cpu")
    (rec,) = v.run_cells([pinned], tmp_path, progress=False)
    assert rec["device"] == "cpu" and "device" not in rec["settings"]
    assert v.cell_path(pinned, tmp_path) == v.cell_path(tiny(), tmp_path)
    assert v.weights_path(pinned, tmp_path).exists()


class Planted:
    """Unpickled by a full pickle load, it runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_planted_checkpoint_runs_no_code_and_is_set_aside(tmp_path):
    store_folder(tmp_path)
    marker, cell = tmp_path / "ran", tiny()
    checkpoint = v.checkpoint_path([cell], tmp_path)
    checkpoint.parent.mkdir(parents=True)
    torch.save({"records": Planted(f"touch {marker}"), "epoch": 1}, checkpoint)
    (checkpoint.with_suffix(".json")).write_text(json.dumps({"cells": [cell]}))
    with pytest.warns(UserWarning, match="set aside"):
        v.run_cells([cell], tmp_path, progress=False)
    assert not marker.exists() and v.cell_path(cell, tmp_path).exists()
    assert len(list(checkpoint.parent.glob("*.corrupt-*"))) == 1


def test_a_sidecar_naming_a_cell_not_asked_for_is_not_resumed_here(tmp_path):
    store_folder(tmp_path)
    side = tmp_path / "checkpoints" / "0123456789abcdef.json"
    side.parent.mkdir(parents=True)
    huge = v.cell_settings(**dict(tiny(), latent=3_000_000))  # of its group, but not asked for
    side.write_text(json.dumps({"cells": [tiny(), huge]}))
    assert v.planned_groups([tiny()], tmp_path) == [[tiny()]] and side.exists()


@pytest.mark.parametrize(
    "sidecar",
    ['{"cells": "abc"}', '{"cells": [1]}', '{"other": []}', '{"cells": [{"hidden": 5}]}', "[1]"],
)
def test_a_malformed_checkpoint_sidecar_is_set_aside_and_the_run_goes_on(tmp_path, sidecar):
    store_folder(tmp_path)
    side = tmp_path / "checkpoints" / "0123456789abcdef.json"
    side.parent.mkdir(parents=True)
    side.write_text(sidecar)
    with pytest.warns(UserWarning, match="malformed"):
        v.run_cells([tiny()], tmp_path, progress=False)
    assert v.cell_path(tiny(), tmp_path).exists() and not side.exists()
    assert len(list(side.parent.glob("*.malformed-*"))) == 1


def test_a_checkpointed_group_stores_only_the_cells_asked_for(tmp_path, monkeypatch):
    store_folder(tmp_path)
    monkeypatch.setattr(v.stacked, "CHECKPOINT_SECONDS", 0)
    asked, extra = tiny(latent=2, epochs=2), tiny(latent=3, epochs=2)
    side = v.checkpoint_path([asked, extra], tmp_path).with_suffix(".json")
    side.parent.mkdir(parents=True)
    side.write_text(json.dumps({"cells": [asked, extra]}))  # as a run asked for both would leave
    v.run_cells([asked], tmp_path, progress=False)
    assert v.cell_path(asked, tmp_path).exists() and not v.cell_path(extra, tmp_path).exists()


def test_two_runs_sharing_a_cell_train_it_once_and_both_read_the_claimants_record(tmp_path):
    store_folder(tmp_path)
    import subprocess
    import sys

    hold = tmp_path / "hold"  # the first run waits after its first checkpoint while this exists
    hold.touch()
    shared, first, second = (
        tiny(latent=2, epochs=2),
        tiny(latent=3, epochs=2),
        tiny(latent=4, epochs=2),
    )
    code = (
        "import json, sys, vae_helpers as v; cells = json.loads(sys.argv[1]); "
        "v.run_cells(cells, sys.argv[2], progress=False)"
    )

    def run(cells, **env):
        env = dict(os.environ, VAE_CHECKPOINT_SECONDS="0", **env)
        args = [sys.executable, "-c", code, json.dumps(cells), str(tmp_path)]
        return subprocess.Popen(args, env=env, cwd=v.ROOT)

    a = run([shared, first], VAE_HOLD_FILE=str(hold))
    try:
        group = v.checkpoint_path([shared, first], tmp_path).with_suffix(".json")
        wait_until(group.exists, "the first run's checkpoint")  # it holds the shared cell's claim
        b = run([shared, second])
        wait_until(lambda: v.cell_path(second, tmp_path).exists(), "the second run's own cell")
        assert not v.cell_path(shared, tmp_path).exists()  # left to the run that claimed it
    finally:
        hold.unlink()
    assert a.wait(timeout=600) == 0 and b.wait(timeout=600) == 0
    rec = v.load_cell(v.cell_path(shared, tmp_path), shared)
    assert rec["group"] == [2, 3]  # trained in the first run's group


def to_full_device(obj, path):  # /dev/full: every write fails as on a full disk
    torch.save(obj, "/dev/full")


def json_to_full_device(obj, path):
    Path("/dev/full").write_text(json.dumps(obj, default=str))


@pytest.mark.parametrize("save", [to_full_device, json_to_full_device])
def test_a_full_disk_is_said_so_with_the_file_that_could_not_be_written(tmp_path, save):
    with pytest.raises(OSError, match="x.pt could not be written: the disk is full"):
        v.atomic_save({"w": torch.zeros(10_000)}, tmp_path / "x.pt", save)
    assert list(tmp_path.iterdir()) == []


def test_a_complete_results_folder_is_read_without_write_access(tmp_path, monkeypatch):
    cells = [tiny(latent=2), tiny(latent=3)]
    first = v.run_cells(cells, tmp_path, progress=False)
    for name in ("writable_results", "remove_leftovers", "atomic_save"):
        monkeypatch.setattr(v.runner, name, lambda *a, **k: pytest.fail("asked to write"))
    monkeypatch.setattr(v.experiments, "atomic_save", lambda *a, **k: pytest.fail("wrote"))
    assert v.run_cells(cells, tmp_path, progress=False) == first
    monkeypatch.setitem(v.EXPERIMENTS, "q7", lambda: cells)
    assert v.experiment_table("q7", tmp_path)[1] == first


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (Path("/proc") / str(pid) / "stat").read_text().split(") ")[1][0] != "Z"


def worker_pids(pid):
    """The worker processes of a parent (multiprocessing's resource tracker left out)."""
    return [
        p
        for p in child_processes(pid)
        if "resource_tracker" not in (Path("/proc") / str(p) / "cmdline").read_text()
    ]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_workers_stop_when_their_parent_is_stopped_or_killed(tmp_path, stop):
    parent, _, hold = held_run(tmp_path)
    try:
        workers = worker_pids(parent.pid)
        assert len(workers) == 2
        parent.send_signal(stop)  # to the parent alone, as Jupyter's interrupt or a kill does
        parent.wait(timeout=600)
        wait_until(lambda: not any(alive(p) for p in workers), "the workers to stop")
    finally:
        hold.unlink()
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    assert "Traceback" not in parent.stderr.read()


def test_a_worker_lost_while_another_finishes_its_work_costs_one_line_and_the_table_is_written(
    tmp_path,
):
    parent, results, hold = held_run(tmp_path)
    try:
        workers = worker_pids(parent.pid)
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: not alive(workers[0]), "the killed worker to go")
    finally:
        hold.unlink()
    out, err = parent.communicate(timeout=600)
    assert parent.returncode == 0, err
    assert "1 of 2 workers were lost (signal 9); the others stored every cell" in err
    assert "Traceback" not in err and (results / "q4_e2.csv").exists() and "q4_e2 (6 cells)" in out


def test_the_writability_probe_follows_no_link_planted_where_it_writes(tmp_path):
    precious, results = tmp_path / "precious.txt", store_folder(tmp_path / "results")
    precious.write_text("someone's work")
    (results / f".probe~{v.HOST}~{os.getpid()}").symlink_to(precious)  # the probe's old name
    v.writable_results(results)
    assert precious.read_text() == "someone's work"


THEIRS = {  # another project's files, found where --results points
    "checkpoints/config.json": '{"lr": 1}',
    "checkpoints/trainer_state.json": '{"step": 5}',
    "checkpoints/run.lock": "1234",
    "checkpoints/model.pt.lock": "99",
}


def plant_theirs(folder):
    for name, text in THEIRS.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)


def test_a_folder_of_other_files_without_the_stores_mark_is_refused_and_left_as_it_is(tmp_path):
    plant_theirs(tmp_path)
    with pytest.raises(v.ResultsError, match="not a results folder of this package"):
        v.run_cells([tiny()], tmp_path, progress=False)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {str(p.relative_to(tmp_path)): p.read_text() for p in files} == THEIRS


def test_a_folder_with_a_cells_folder_of_other_files_is_refused_too(tmp_path):
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "config.json").write_text("{}")
    (tmp_path / "thesis.tex").write_text("")
    with pytest.raises(v.ResultsError, match="not a results folder of this package"):
        v.run_cells([tiny()], tmp_path, progress=False)


def test_files_the_store_did_not_write_are_neither_renamed_nor_deleted_in_its_folder(tmp_path):
    plant_theirs(store_folder(tmp_path))
    v.run_cells([tiny()], tmp_path, progress=False)
    assert {k: (tmp_path / k).read_text() for k in THEIRS if (tmp_path / k).exists()} == THEIRS


@pytest.mark.parametrize("folder", ["new", "empty", "records from before the mark"])
def test_a_new_or_empty_folder_is_marked_and_one_with_records_is_the_stores(tmp_path, folder):
    results = tmp_path / "results"
    if folder != "new":
        results.mkdir()
    if folder == "records from before the mark":
        (results / "cells").mkdir()
        v.cell_path(tiny(), results).write_text("{}")  # a record by the store's name
    v.writable_results(results)
    assert (results / v.MARK).exists() == (folder != "records from before the mark")


def test_the_slurm_folder_is_private_and_one_that_others_can_write_to_is_refused(tmp_path):
    slurm = tmp_path / "slurm"
    assert v.submit_slurm([], tmp_path, local=True) == []  # nothing to train: no empty batch
    assert slurm.stat().st_mode & 0o777 == 0o700
    slurm.chmod(0o777)
    with pytest.raises(v.ResultsError, match="chmod 700"):
        v.submit_slurm([], tmp_path, local=True)


def test_slurm_refuses_a_results_folder_that_others_can_rename_its_folder_in(tmp_path):
    results = store_folder(tmp_path / "results")
    results.chmod(0o777)  # no sticky bit: anyone may swap slurm/ for a folder of their own
    with pytest.raises(v.ResultsError, match="chmod 700"):
        v.submit_slurm([], results, local=True)
    assert not (results / "slurm").exists()


@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_a_link_or_fifo_where_a_lock_belongs_is_an_error_naming_it(tmp_path, planted):
    lock = store_folder(tmp_path / "results") / "checkpoints" / "0123456789abcdef.lock"
    lock.parent.mkdir()
    if planted == "link":
        lock.symlink_to(tmp_path / "outside")
    else:
        os.mkfifo(lock)  # an open for writing would wait for a reader for ever
    with pytest.raises(v.ResultsError, match=f"{lock.name} is a (symbolic link|FIFO)"):
        with v.group_lock(lock.with_suffix(".pt")):
            pass
    assert not (tmp_path / "outside").exists()


def test_a_run_waiting_for_a_group_another_command_holds_says_so_once_and_who(
    tmp_path, monkeypatch, capsys
):
    import fcntl
    import threading

    cell, polls = tiny(), []
    lock = v.checkpoint_path([cell], store_folder(tmp_path)).with_suffix(".lock")
    lock.parent.mkdir()
    monkeypatch.setattr(v.runner, "WAIT_SECONDS", 0.01)
    real = v.runner.planned_groups
    monkeypatch.setattr(v.runner, "planned_groups", lambda *a: polls.append(1) or real(*a))
    with open(lock, "w") as f:
        f.write("otherhost 4242")  # as the other command's group_lock writes it
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        run = threading.Thread(target=v.run_cells, args=([cell], tmp_path, False))
        run.start()
        wait_until(lambda: len(polls) > 5, "the run to look at the group a few times")
    run.join()
    said = [line for line in capsys.readouterr().err.splitlines() if "waiting" in line]
    assert len(said) == 1 and "process 4242 on otherhost" in said[0] and lock.name in said[0]
    assert v.cell_path(cell, tmp_path).exists()


def test_a_file_size_limit_is_said_so_rather_than_a_full_disk(tmp_path):
    import resource

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, before[1]))  # as `ulimit -f` sets it
    try:
        with pytest.raises(OSError, match="x.pt could not be written: .* file-size limit"):
            v.atomic_save({"w": torch.zeros(10_000)}, tmp_path / "x.pt", torch.save)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", ""])
def test_a_checkpoint_interval_that_is_no_number_of_seconds_is_refused_naming_it(
    monkeypatch, value
):
    monkeypatch.setenv("VAE_CHECKPOINT_SECONDS", value)
    with pytest.raises(ValueError, match=f"VAE_CHECKPOINT_SECONDS='{value}' is not a number"):
        v.stacked.seconds_from("VAE_CHECKPOINT_SECONDS", 60)


def test_a_fifo_where_a_record_belongs_is_corrupt_not_a_hang(tmp_path):
    s = tiny()
    path = v.cell_path(s, tmp_path)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with pytest.raises(v.ResultsError, match="not a regular file"):
        v.load_cell(path, s)
    with pytest.raises(v.ResultsError, match="not a regular file"):
        v.cell_path(dict(s, device="cpu"), tmp_path)


@pytest.mark.parametrize("planted", ["fifo", "empty", "binary", "no key column"])
def test_a_file_where_an_analysis_table_belongs_that_is_not_one_is_refused_and_left(
    tmp_path, planted
):
    path = tmp_path / "bound.csv"
    content = {"empty": b"", "binary": bytes(range(256)) * 4, "no key column": b"a,b\n1,2\n"}
    os.mkfifo(path) if planted == "fifo" else path.write_bytes(content[planted])
    with pytest.raises(
        v.ResultsError, match=rf"{path} is not a table .*vae_helpers bound --results"
    ):
        v.cached_table(path, {"a": 1}, compute=lambda n: ([dict(x=1)], {}))
    assert planted == "fifo" or path.read_bytes() == content[planted]


@pytest.mark.parametrize("planted", ["fifo", "huge"])
def test_a_file_where_arrays_belong_that_is_not_ours_is_refused_naming_it(tmp_path, planted):
    path = tmp_path / "bias_variance.npz"
    if planted == "fifo":
        os.mkfifo(path)
    else:  # a member whose header claims 800 GB
        header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
        with zipfile.ZipFile(path, "w") as z, z.open("x.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, dict(header, shape=(10**11,)))
    with pytest.raises(v.ResultsError, match=f"{path} is not an array file"):
        v.load_npz(path)
