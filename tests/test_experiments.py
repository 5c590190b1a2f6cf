"""Cells as data, the store in normal use, the tables (experiments.py, store.py, runner.py)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny

import vae_helpers as v


def test_finished_cells_are_stored_and_reused_without_training(tmp_path, monkeypatch):
    cells = [tiny(latent=2), tiny(latent=3)]
    first = v.run_cells(cells, tmp_path, progress=False)
    monkeypatch.setattr(
        v.runner, "train_group", lambda *a, **k: pytest.fail("a stored cell was retrained")
    )
    assert v.run_cells(cells, tmp_path, progress=False) == first


def test_an_interrupted_grid_resumes_with_the_cells_it_lacks(tmp_path, monkeypatch):
    done = v.run_cells([tiny(latent=2)], tmp_path, progress=False)
    trained = []
    real = v.train_group
    monkeypatch.setattr(
        v.runner,
        "train_group",
        lambda group, *a, **k: trained.append(group) or real(group, *a, **k),
    )
    records = v.run_cells([tiny(latent=2), tiny(hidden=7, latent=2)], tmp_path, progress=False)
    assert trained == [[tiny(hidden=7, latent=2)]] and records[0] == done[0]


def test_an_interrupted_group_resumes_mid_training_from_its_checkpoint(tmp_path, monkeypatch):
    cells = [tiny(latent=2, epochs=3), tiny(latent=4, epochs=3)]
    whole, _ = v.train_group(cells, progress=False)
    real, calls = v.append_epoch, []

    def stop_in_epoch_two(rec, *a):
        calls.append(1)
        if len(calls) > len(cells):
            raise KeyboardInterrupt
        real(rec, *a)

    monkeypatch.setattr(v.stacked, "append_epoch", stop_in_epoch_two)
    monkeypatch.setattr(v.stacked, "CHECKPOINT_SECONDS", 0)
    checkpoint = tmp_path / "group.pt"
    with pytest.raises(KeyboardInterrupt):
        v.train_group(cells, progress=False, checkpoint=checkpoint)
    monkeypatch.setattr(v.stacked, "append_epoch", real)
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 1
    resumed, _ = v.train_group(cells, progress=False, checkpoint=checkpoint)
    for a, b in zip(whole, resumed):
        assert a["test_vfe"] == pytest.approx(b["test_vfe"], rel=1e-6)
        assert a["train_vfe"] == pytest.approx(b["train_vfe"], rel=1e-6)
        assert a["running_train_vfe"] == pytest.approx(b["running_train_vfe"], rel=1e-6)


@pytest.mark.parametrize(
    "minutes_per_epoch, saved_after", [(0, [3]), (0.5, [2, 3]), (2, [1, 2, 3])]
)
def test_a_checkpoint_is_written_at_most_once_a_minute_and_after_the_last_epoch(
    tmp_path, monkeypatch, minutes_per_epoch, saved_after
):
    import time
    import types

    saves, ticks = (
        [],
        iter(range(10_000)),
    )  # the module's clock moves minutes_per_epoch at each reading
    clock = types.SimpleNamespace(
        perf_counter=time.perf_counter,
        strftime=time.strftime,
        monotonic=lambda: 60 * minutes_per_epoch * next(ticks),
    )
    monkeypatch.setattr(v.stacked, "time", clock)
    monkeypatch.setattr(
        v.stacked, "atomic_save", lambda obj, path, save: saves.append(obj.get("epoch"))
    )
    v.train_group([tiny(epochs=3)], progress=False, checkpoint=tmp_path / "group.pt")
    assert saves == [
        x for epoch in saved_after for x in (epoch, None)
    ]  # each with its list of cells


def test_a_cell_with_other_settings_is_trained_not_reused(tmp_path):
    v.run_cells([tiny()], tmp_path, progress=False)
    other = tiny(lr=2e-3)
    assert v.cell_path(other, tmp_path) != v.cell_path(tiny(), tmp_path)
    assert v.run_cells([other], tmp_path, progress=False)[0]["settings"]["lr"] == 2e-3


def test_a_record_whose_settings_differ_from_its_name_is_refused(tmp_path):
    path = v.cell_path(tiny(), tmp_path)
    v.run_cells([tiny()], tmp_path, progress=False)
    rec = json.loads(path.read_text())
    rec["settings"]["lr"] = 0.5
    path.write_text(json.dumps(rec))
    with pytest.raises(v.ResultsError, match="not"):
        v.run_cells([tiny()], tmp_path, progress=False)


def test_a_corrupt_results_file_raises_and_is_left_untouched(tmp_path):
    path = v.cell_path(tiny(), tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"settings": {"hid')
    with pytest.raises(v.ResultsError, match="corrupt"):
        v.run_cells([tiny()], tmp_path, progress=False)
    assert path.read_text() == '{"settings": {"hid'


def test_experiment_writes_its_summary_table(tmp_path, monkeypatch):
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: [tiny(latent=2), tiny(latent=3)])
    table, _ = v.run_experiment("q4", tmp_path, progress=False)
    csv = (tmp_path / "q4.csv").read_text().splitlines()
    for column in [
        "hidden_dim",
        "latent_dim",
        "weight_decay",
        "epochs",
        "seed",
        "n_params",
        "best_test_vfe",
        "best_epoch",
        "final_test_vfe",
        "active_units",
    ]:
        assert column in csv[0].split(",")
    assert len(csv) == 3 and list(table["latent_dim"]) == [2, 3]


def test_unknown_experiment_is_refused():
    with pytest.raises(ValueError, match="unknown experiment"):
        v.experiment_cells("q9")


@pytest.mark.parametrize("name", sorted(v.EXPERIMENTS))
def test_committed_results_hold_every_cell_of_every_experiment(name):
    """The notebook reads these; a changed setting or a lost file would retrain on the spot."""
    records, missing = v.stored_records(name)
    assert [f"h={s['hidden']} l={s['latent']}" for s in missing] == []
    assert len(records) == len(v.experiment_cells(name))


@pytest.mark.parametrize(
    "setting, value",
    [
        ("train_size", 100_000),
        ("train_size", 0),
        ("lr", 0),
        ("lr", "x"),
        ("lr", float("nan")),
        ("seed", "0"),
        ("seed", 1.5),
        ("seed", 2**62),
        ("seed", -1),
        ("epochs", True),
        ("precision", None),
        ("weight_decay", "x"),
        ("weight_decay", -1.0),
        ("eval_every", 0),
        ("eval_every", 2.5),
        ("hh_lr_scale", 0),
        ("hh_lr_scale", -0.5),
        ("hh_lr_scale", "x"),
        ("hh_lr_scale", float("inf")),
        ("hh_lr_scale", float("nan")),
        ("device", "tpu"),
    ],
)
def test_a_bad_setting_is_refused_with_its_name(setting, value):
    with pytest.raises(ValueError, match=setting):
        v.cell_settings(5, 5, **{setting: value})


def test_a_bad_setting_trains_and_stores_nothing(tmp_path):
    bad = dict(tiny(), train_size=60_001)  # past cell_settings, as a hand-made dict would be
    with pytest.raises(ValueError, match="train_size"):
        v.run_cells([bad], tmp_path, progress=False)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_q7_bias_variance_trains_on_disjoint_sets_held_apart_from_the_validation_images():
    cells = [
        dict(s, train_offset=s.get("train_offset", 0))
        for s in v.experiment_cells("q7_bias_variance")
    ]
    sets = {(s["train_offset"], s["seed"]) for s in cells}
    assert len(sets) == v.Q7_BV_SETS + 2  # one seed per set, two more seeds on set 0
    spans = sorted({(s["train_offset"], s["train_offset"] + s["train_size"]) for s in cells})
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint
    assert all(s["train_offset"] + s["train_size"] <= v.TRAIN_IMAGES - s["val_size"] for s in cells)
    line = 1000 * v.X_DIM
    sizes = sorted({v.n_params_formula(s["hidden"], s["latent"]) for s in cells})
    assert sum(p < line for p in sizes) >= 3 and sum(p > line for p in sizes) >= 3


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(train_offset=59_500, train_size=1000), "train_offset"),
        (dict(train_offset=55_000, train_size=1000, val_size=5000), "val_size"),
        (
            dict(val_size=10_000),
            "val_size",
        ),  # the protocol's 60,000 training images leave none to hold out
        (dict(train_offset=-1), "train_offset"),
        (dict(val_size=1.5), "val_size"),
        (dict(train_size=1000, recon_images=100), "recon_images"),
        (dict(recon_images=20_000), "recon_images"),
    ],
)
def test_a_training_set_that_overlaps_the_validation_images_or_runs_past_the_data_is_refused(
    overrides, name
):
    with pytest.raises(ValueError, match=name):
        v.cell_settings(5, 5, **overrides)


def test_an_overlapping_training_set_trains_and_stores_nothing(tmp_path):
    bad = dict(tiny(train_size=1000, val_size=5000), train_offset=58_000)  # past cell_settings
    with pytest.raises(ValueError, match="train_offset"):
        v.run_cells([bad], tmp_path, progress=False)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_cell_trains_on_its_own_slice_and_measures_the_held_out_images():
    s = tiny(train_offset=1000, val_size=500, eval_every=1)
    rec, model = v.train_cell(s, progress=False)
    train, test = v.load_data()

    def fixed():
        return v.noise(0, 0, 2, torch.device("cpu"))  # each measurement draws the same noise

    r, k, _ = v.eval_terms(model.eval(), train[1000:1300], fixed(), "mse")
    assert rec["train_vfe"] == [pytest.approx(float(r + k), rel=1e-6)]
    r, k, _ = v.eval_terms(model, train[-500:], fixed(), "mse")
    assert rec["val_vfe"] == [pytest.approx(float(r + k), rel=1e-6)]
    assert rec["best_val_epoch"] == 1 and rec["test_vfe_at_best_val"] == rec["test_vfe"][0]


def test_the_epoch_chosen_on_validation_reports_the_test_vfe_of_that_epoch():
    rec = dict(
        v.new_record(tiny(val_size=500), 10, "cpu"),
        eval_epochs=[1, 2, 3],
        test_vfe=[5.0, 4.0, 3.0],
        val_vfe=[6.0, 4.5, 4.9],
        running_train_vfe=[1.0],
        epoch_seconds=[1.0],
    )
    rec = v.finish_record(rec, torch.zeros(3, 2))
    assert (rec["best_epoch"], rec["best_val_epoch"], rec["test_vfe_at_best_val"]) == (3, 2, 4.0)


def test_grid_training_keeps_the_reconstructions_of_the_final_and_best_validation_epochs(tmp_path):
    s = tiny(hidden=20, epochs=3, val_size=500, recon_images=50)
    (rec,) = v.run_cells([s], tmp_path, progress=False)
    kept = np.load(v.recons_path(s, tmp_path))
    _, model = v.train_cell(s, progress=False)
    x = v.load_data()[1][:50]
    with torch.no_grad():
        final = torch.sigmoid(model.eval()(x, torch.zeros(50, 2))[0])
    assert kept["final"].dtype == np.uint8 and kept["final"].shape == (50, 784)
    assert np.abs(kept["final"] / 255 - final.numpy()).max() <= 0.5 / 255 + 1e-4
    assert rec["recon_mse_final"] == pytest.approx(
        float((final - x).pow(2).sum(-1).mean()), rel=1e-4
    )
    assert "best_val" in kept and "recons" not in rec


def test_q7_data_puts_three_models_each_side_of_every_line_and_reaches_ten_times_past_it():
    cells = v.experiment_cells("q7_data")
    for n in v.Q7_DATA:
        line = n * v.X_DIM
        sizes = sorted(
            {v.n_params_formula(s["hidden"], s["latent"]) for s in cells if s["train_size"] == n}
        )
        assert sum(p < line for p in sizes) >= 3 and sum(p > line for p in sizes) >= 3
        assert max(sizes) >= 10 * line
    smallest = min(v.Q7_DATA)
    assert {s["seed"] for s in cells if s["train_size"] == smallest} == {0, 1, 2}


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown settings"):
        v.cell_settings(5, 5, learning_rate=1)


def test_stored_records_train_nothing_and_name_the_missing_cells(tmp_path, monkeypatch):
    monkeypatch.setitem(v.EXPERIMENTS, "q7", lambda: [tiny(latent=2), tiny(latent=3)])
    done = v.run_cells([tiny(latent=2)], tmp_path, progress=False)
    monkeypatch.setattr(
        v.runner, "train_group", lambda *a, **k: pytest.fail("stored_records trained a cell")
    )
    assert v.stored_records("q7", tmp_path) == (done, [tiny(latent=3)])


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision"):
        v.cell_settings(5, 5, precision="float16")


def test_a_bfloat16_cell_is_stored_apart_and_trains_close_to_float32(tmp_path):
    fp32, bf16 = v.run_cells(
        [tiny(hidden=50), tiny(hidden=50, precision="bfloat16")], tmp_path, progress=False
    )
    assert v.cell_path(tiny(hidden=50), tmp_path) != v.cell_path(bf16["settings"], tmp_path)
    assert bf16["train_vfe"][0] != fp32["train_vfe"][0]  # the products really ran in bfloat16
    assert bf16["test_vfe"][0] == pytest.approx(fp32["test_vfe"][0], rel=0.02)


def test_reading_an_experiment_trains_and_writes_nothing_and_names_the_command(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(v.EXPERIMENTS, "q7", lambda: [tiny(latent=2), tiny(latent=3)])
    v.run_cells([tiny(latent=2)], tmp_path, progress=False)
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setattr(v.runner, "train_group", lambda *a, **k: pytest.fail("trained a cell"))
    with pytest.raises(v.ResultsError, match=r"1 of the 2 cells of q7 .* -m vae_helpers q7"):
        v.experiment_table("q7", tmp_path)
    assert sorted(tmp_path.rglob("*")) == before
    monkeypatch.setitem(v.EXPERIMENTS, "q7", lambda: [tiny(latent=2)])
    table, records = v.experiment_table("q7", tmp_path)
    assert list(table.latent_dim) == [2] and sorted(tmp_path.rglob("*")) == before


NOTEBOOK = Path(__file__).resolve().parent.parent / "M63556AB_RepLearning.ipynb"
READ = sorted(set(re.findall(r'experiment_(?:records|table)\(\\"(\w+)\\"', NOTEBOOK.read_text())))


def test_the_notebook_reads_only_whole_experiments():
    assert "stored_records" not in NOTEBOOK.read_text()
    assert {"q4", "q5", "q6", "q7", "q7_scaled", "q7_bias_variance"} <= set(READ)


@pytest.mark.parametrize("name", READ)
def test_a_record_missing_from_a_copied_folder_stops_the_notebooks_read_with_its_command(
    name, tmp_path
):
    shutil.copytree(v.RESULTS_DIR / "cells", tmp_path / "cells")
    cells = v.experiment_cells(name)
    v.cell_path(cells[0], tmp_path).unlink()
    with pytest.raises(
        v.ResultsError,
        match=rf"1 of the {len(cells)} cells of {name} .*vae_helpers {name} --results {tmp_path}`",
    ):
        v.experiment_records(name, tmp_path)


def test_an_experiment_with_a_folder_of_its_own_trains_and_reads_there(tmp_path, monkeypatch):
    monkeypatch.setitem(v.EXPERIMENTS, "repro", lambda: [tiny(latent=2)])
    v.run_experiment("repro", tmp_path, progress=False)
    assert v.cell_path(tiny(latent=2), tmp_path / "repro").exists()
    assert not v.cell_path(tiny(latent=2), tmp_path).exists() and (tmp_path / "repro.csv").exists()
    assert v.experiment_records("repro", tmp_path)[0]["settings"] == tiny(latent=2)


def test_the_results_folder_can_be_named_by_an_environment_variable(tmp_path):
    code = (
        "import vae_helpers as v; print(v.RESULTS_DIR, v.cell_path(v.cell_settings(5, 2)).parent)"
    )
    env = dict(os.environ, VAE_RESULTS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == [str(tmp_path), str(tmp_path / "cells")]
