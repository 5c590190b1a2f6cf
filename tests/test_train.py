"""Training one model and a stacked group of them (train.py, stacked.py)."""

import json

import pytest
import torch
from conftest import tiny

import vae_helpers as v


def test_short_training_lowers_the_test_vfe():
    rec, _ = v.train_cell(v.cell_settings(50, 10, epochs=2, train_size=6000), progress=False)
    untrained = v.cell_settings(50, 10, epochs=1, train_size=100, lr=1e-9)
    assert rec["test_vfe"][-1] < v.train_cell(untrained, progress=False)[0]["test_vfe"][0] - 20


def test_record_holds_every_epoch_and_the_best_and_final_test_vfe():
    rec, _ = v.train_cell(tiny(epochs=3), progress=False)
    assert len(rec["test_vfe"]) == len(rec["train_vfe"]) == len(rec["running_train_vfe"]) == 3
    assert (
        rec["eval_epochs"] == [1, 2, 3]
        and len(rec["max_log_var"]) == len(rec["max_grad_norm"]) == 3
    )
    assert rec["best_test_vfe"] == min(rec["test_vfe"]) == rec["test_vfe"][rec["best_epoch"] - 1]
    assert rec["final_test_vfe"] == rec["test_vfe"][-1]
    assert rec["n_params"] == v.n_params_formula(5, 2) and 0 <= rec["active_units"] <= 2


def test_training_is_repeatable_from_its_seed():
    a, _ = v.train_cell(tiny(), progress=False)
    b, _ = v.train_cell(tiny(), progress=False)
    c, _ = v.train_cell(tiny(seed=1), progress=False)
    assert a["test_vfe"] == b["test_vfe"] != c["test_vfe"]


def test_grid_training_matches_each_cell_trained_alone():
    cells = [tiny(hidden=20, latent=l, epochs=2) for l in (2, 5, 9)]
    records, models = v.train_group(cells, progress=False)
    for s, rec, model in zip(cells, records, models):
        alone_rec, alone = v.train_cell(s, progress=False)
        for a, b in zip(model.state_dict().values(), alone.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert rec["test_vfe"] == pytest.approx(alone_rec["test_vfe"], rel=1e-5)
        assert rec["train_vfe"] == pytest.approx(alone_rec["train_vfe"], rel=1e-5)
        assert rec["running_train_vfe"] == pytest.approx(alone_rec["running_train_vfe"], rel=1e-5)
        assert rec["max_grad_norm"] == pytest.approx(alone_rec["max_grad_norm"], rel=1e-4)
        assert rec["active_units"] == alone_rec["active_units"]


def test_training_vfe_is_measured_like_the_test_vfe_on_the_first_training_images():
    for size in (300, 12_000):  # all of a small training set; the first 10,000 of a large one
        rec, model = v.train_cell(v.cell_settings(5, 2, epochs=1, train_size=size), progress=False)
        first = v.load_data()[0][: min(size, v.TRAIN_EVAL_IMAGES)]
        r, k, _ = v.eval_terms(model.eval(), first, v.noise(0, 0, 2, torch.device("cpu")), "mse")
        assert rec["train_vfe"] == [pytest.approx(float(r + k), rel=1e-6)]


def test_running_training_vfe_sits_above_the_end_of_epoch_value_while_the_model_improves():
    rec, _ = v.train_cell(v.cell_settings(50, 10, epochs=1, train_size=6000), progress=False)
    assert rec["running_train_vfe"][0] > rec["train_vfe"][0] + 1


def test_eval_every_measures_every_kth_epoch_and_the_last():
    rec, _ = v.train_cell(tiny(epochs=5, eval_every=2), progress=False)
    assert rec["eval_epochs"] == [2, 4, 5] and len(rec["test_vfe"]) == len(rec["train_vfe"]) == 3
    assert len(rec["running_train_vfe"]) == 5 and rec["best_epoch"] in rec["eval_epochs"]
    records, _ = v.train_group([tiny(epochs=5, eval_every=2)], progress=False)
    assert records[0]["eval_epochs"] == [2, 4, 5]
    assert records[0]["test_vfe"] == pytest.approx(rec["test_vfe"], rel=1e-5)


def test_options_at_their_defaults_are_left_out_so_older_records_keep_their_names():
    assert v.cell_settings(5, 5, **v.OPTIONS) == v.cell_settings(5, 5)
    assert not set(v.OPTIONS) & set(v.cell_settings(5, 5))


def test_hh_lr_scale_changes_the_rate_of_the_two_h_by_h_weight_matrices_only():
    cells = [tiny(hidden=20, hh_lr_scale=1e-9)]
    grid, opt, _ = v.new_group(cells, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in grid.named_parameters()}
    v.train_epoch(grid, opt, v.load_data()[0][:300], cells, epoch=1, batches=2)
    moved = {name: (p - before[name]).abs().max().item() for name, p in grid.named_parameters()}
    assert moved["w2"] < 1e-9 and moved["d2"] < 1e-9
    assert min(x for name, x in moved.items() if name not in ("w2", "d2")) > 1e-4


def test_width_scaled_grid_training_matches_the_cell_trained_alone():
    s = tiny(hidden=20, latent=3, epochs=2, hh_lr_scale=0.25)
    (rec,), (model,) = v.train_group([s], progress=False)
    alone_rec, alone = v.train_cell(s, progress=False)
    assert rec["test_vfe"] == pytest.approx(alone_rec["test_vfe"], rel=1e-5)
    for a, b in zip(model.state_dict().values(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_step_whose_log_variance_overflows_is_caught_at_that_step():
    cells = [tiny(latent=2), tiny(latent=3)]
    grid, opt, _ = v.new_group(cells, torch.device("cpu"))
    with torch.no_grad():
        grid.bh[1, :, 3:] = 200.0  # cell 1's log-variance: exp(200) is not a float32
    _, peaks, first_bad = v.train_epoch(
        grid, opt, v.load_data()[0][:300], cells, epoch=1, batches=1
    )
    assert first_bad[0].tolist() == [-1, -1, -1, -1]
    assert first_bad[1, v.NONFINITE.index("exp(log-variance)")] == 0
    assert peaks[1, 0] > 150


def test_padded_latent_units_stay_exactly_zero():
    records, models = v.train_group([tiny(latent=2), tiny(latent=6)], progress=False)
    model = v.GridVAE(models)
    _, mean, log_var = model(torch.rand(7, 784), torch.zeros(2, 7, 6))
    assert mean[0, :, 2:].abs().max() == 0 and log_var[0, :, 2:].abs().max() == 0


def test_a_group_must_share_every_setting_but_the_latent_size():
    with pytest.raises(ValueError, match="differ only in their latent size"):
        v.train_group([tiny(hidden=5), tiny(hidden=6)], progress=False)


def test_groups_keep_padding_waste_small_and_split_by_other_settings():
    cells = v.grid([5, 500], [5, 10, 300]) + [v.cell_settings(500, 5, seed=1)]
    for group in v.groups(cells):
        assert len({json.dumps({k: x for k, x in s.items() if k != "latent"}) for s in group}) == 1
        real = sum(v.n_params_formula(s["hidden"], s["latent"]) for s in group)
        padded = len(group) * v.n_params_formula(
            group[0]["hidden"], max(s["latent"] for s in group)
        )
        assert padded <= 1.1 * real or padded <= 4_000_000
    assert sorted(map(len, v.groups(cells))) == [1, 1, 2, 3]  # at h=500, latent 300 pads too much


def test_divergence_in_the_first_epoch_stores_nothing(tmp_path, monkeypatch):
    real = v.vfe_terms
    monkeypatch.setattr(
        v.stacked, "vfe_terms", lambda *a: tuple(t * float("nan") for t in real(*a))
    )
    with pytest.raises(FloatingPointError, match="diverged"):
        v.run_cells([tiny()], tmp_path, progress=False)
    assert not v.cell_path(tiny(), tmp_path).exists()


def test_a_cell_that_diverges_later_is_stored_with_the_epochs_it_finished(tmp_path, monkeypatch):
    real, epochs = v.train_epoch, []

    def gradient_nan_in_epoch_two_step_three(
        grid, opt, train_x, cells, epoch, batches=None, bar=None
    ):
        epochs.append(epoch)
        totals, peaks, first_bad = real(grid, opt, train_x, cells, epoch, batches)
        if epoch == 2:
            first_bad[0, v.NONFINITE.index("gradient")] = 3
            first_bad[0, v.NONFINITE.index("reconstruction")] = 4
            totals = totals * float("nan")
        return totals, peaks, first_bad

    monkeypatch.setattr(v.stacked, "train_epoch", gradient_nan_in_epoch_two_step_three)
    (rec,) = v.run_cells([tiny(epochs=3)], tmp_path, progress=False)
    assert rec["diverged_epoch"] == 2 and len(rec["test_vfe"]) == 1 and rec["best_epoch"] == 1
    assert rec["active_units"] is None and epochs == [1, 2]  # training stopped at the divergence
    assert rec["divergence"]["first_nonfinite"] == "gradient" and rec["divergence"]["step"] == 3
    assert rec["divergence"]["max_grad_norm_epoch_before"] == rec["max_grad_norm"][0]
    assert v.load_cell(v.cell_path(tiny(epochs=3), tmp_path), tiny(epochs=3)) == rec
