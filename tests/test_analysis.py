"""Analyses of kept models: keeping and loading them, the bound, the latent code (analysis.py)."""

import hashlib
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny

import vae_helpers as v


def files(folder):
    """What a folder holds: each file's path and a hash of its bytes."""
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A results folder holding a tiny Q4 of two cells, with a bound of few images and draws."""
    monkeypatch.setitem(v.EXPERIMENTS, "q4", lambda: [tiny(), tiny(hidden=30)])
    monkeypatch.setattr(v.analysis, "BOUND", dict(images=20, ks=(1, 10), seed=0))
    v.run_cells(v.experiment_cells("q4"), tmp_path, progress=False)
    return tmp_path


def small_model(latent=3):
    torch.manual_seed(0)
    return v.VAE(20, latent).eval()


def test_log_weights_are_the_gaussian_joint_over_the_encoders_density():
    model, x = small_model(), v.load_data()[1][:4]
    w = v.log_weights(model, x, k=3, seed=1)
    h = model.encoder(x)
    mean, std = model.mean(h), torch.exp(0.5 * model.log_var(h))
    z = mean + std * torch.randn(3, *mean.shape, generator=torch.Generator().manual_seed(1))
    N = torch.distributions.Normal
    direct = (
        N(torch.sigmoid(model.decoder(z)), math.sqrt(0.5)).log_prob(x).sum(-1)
        + N(0.0, 1.0).log_prob(z).sum(-1)
        - N(mean, std).log_prob(z).sum(-1)
    )
    torch.testing.assert_close(w, direct.detach(), rtol=1e-5, atol=1e-3)


def test_the_importance_weighted_estimate_falls_with_k_and_stays_below_the_one_sample_bound():
    rec, model = v.train_cell(v.cell_settings(20, 3, epochs=1, train_size=3000), progress=False)
    rows = v.iwae_nll(model.eval(), v.load_data()[1][:200], ks=(1, 10, 100))
    nll = [r["nll"] for r in rows]
    assert nll[0] > nll[1] > nll[2] and abs(nll[0] - rec["test_vfe"][-1]) < 5


def test_unit_kl_adds_up_to_the_models_kl():
    model, x = small_model(latent=4), v.load_data()[1][:50]
    h = model.encoder(x)
    _, kl = v.vfe_terms(model.decoder(model.mean(h)), x, model.mean(h), model.log_var(h))
    units = v.unit_kl(model, x)
    assert len(units) == 4 and (units[:-1] >= units[1:]).all()
    assert units.sum() == pytest.approx(kl.mean().item(), rel=1e-5)


@pytest.mark.parametrize("kept", range(len(v.kept_models())))
def test_each_kept_model_matches_its_record_when_re_evaluated(kept):
    rec, model = v.kept_models()[kept]
    assert v.eval_vfe(model, rec["settings"], v.load_data()[1]) == pytest.approx(
        rec["final_test_vfe"], abs=0.01
    )


def test_latent_plane_colours_codes_by_class_beside_the_decoded_grid():
    import matplotlib.pyplot as plt

    _, axes = plt.subplots(1, 2)
    model = small_model(latent=2)
    with torch.no_grad():
        model.mean.weight.mul_(100)  # codes far outside the decoder's grid of +-3
    v.latent_plane(model, v.load_data()[1][:300], v.image_labels()[:300], axes, n=4)
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == v.FASHION_CLASSES
    assert axes[0].get_xlabel() and axes[1].get_xlabel() and len(axes[1].images) == 1
    codes = np.concatenate([c.get_offsets() for c in axes[0].collections])
    (x0, x1), (y0, y1) = axes[0].get_xlim(), axes[0].get_ylim()
    assert (x0 <= codes[:, 0]).all() and (codes[:, 0] <= x1).all()  # no code clipped
    assert (y0 <= codes[:, 1]).all() and (codes[:, 1] <= y1).all()
    plt.close("all")


def test_best_model_is_the_lowest_vfe_cell_read_from_the_kept_models(folder):
    records = v.stored_records("q4", folder)[0]
    for rec in records:
        v.keep_model(rec, folder)
    best, model = v.best_model(records, folder)
    assert best["best_test_vfe"] == min(r["best_test_vfe"] for r in records)
    assert v.load_pt(v.kept_path(best["settings"], folder))["record"] == best
    assert v.generate(model, n=4).shape == (4, 784)


def test_a_best_model_not_kept_is_an_error_naming_the_command_and_nothing_is_written(folder):
    records, before = v.stored_records("q4", folder)[0], files(folder)
    with pytest.raises(v.ResultsError, match=rf"-m vae_helpers bound --results {folder}"):
        v.best_model(records, folder)
    assert files(folder) == before


def test_loading_kept_models_writes_nothing_even_in_a_read_only_folder(folder):
    records = v.stored_records("q4", folder)[0]
    v.make_bound(folder)
    before = files(folder)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)  # a reader other than root cannot write
    try:
        (best, _), kept = v.best_model(records, folder), v.kept_models(folder)
        v.trained_model(best["settings"], folder), v.trained_model(records[1]["settings"], folder)
        v.bound_table(kept, folder)
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert [r["settings"] for r, _ in kept] == [best["settings"]] and files(folder) == before


def test_a_kept_model_of_another_cell_under_this_cells_name_is_refused_naming_the_file(folder):
    records = v.stored_records("q4", folder)[0]
    for rec in records:
        v.keep_model(rec, folder)
    best, _ = v.best_model(records, folder)
    other = next(r for r in records if r != best)
    path = v.kept_path(best["settings"], folder)
    shutil.copy(v.kept_path(other["settings"], folder), path)
    for load in (
        lambda: v.best_model(records, folder),
        lambda: v.trained_model(best["settings"], folder),
        lambda: v.kept_models(folder),
    ):
        with pytest.raises(v.ResultsError, match=f"{path} holds the model of another cell"):
            load()


@pytest.mark.parametrize(
    "damage", [dict(best_test_vfe=float("nan")), dict(active_units="lots"), dict(n_params=None)]
)
def test_a_kept_model_whose_record_is_damaged_is_refused_naming_the_file(folder, damage):
    rec = v.stored_records("q4", folder)[0][0]
    v.keep_model(rec, folder)
    path = v.kept_path(rec["settings"], folder)
    kept = torch.load(path, weights_only=True)
    torch.save(dict(kept, record=dict(kept["record"], **damage)), path)
    with pytest.raises(v.ResultsError, match=f"{path} holds a damaged record .*its {[*damage][0]}"):
        v.kept_models(folder)


@pytest.mark.parametrize("planted", ["fifo", "pickle", "text", "a tensor", "settings as text"])
def test_a_file_where_a_kept_model_belongs_that_is_not_one_is_refused_naming_it(folder, planted):
    path = folder / "models" / "x.pt"
    path.parent.mkdir()
    if planted == "fifo":
        os.mkfifo(path)
    elif planted == "pickle":
        torch.save({"f": os.system}, path)  # weights_only refuses to load a callable
    elif planted == "a tensor":
        torch.save(torch.zeros(3), path)
    elif planted == "settings as text":
        torch.save({"record": {"settings": "x"}, "state": {}}, path)
    else:
        path.write_text("not a model")
    with pytest.raises(v.ResultsError, match=f"{path}"):
        v.kept_models(folder)


def test_weights_of_another_cell_are_refused_naming_the_file(folder):
    small, wide = (r["settings"] for r in v.stored_records("q4", folder)[0])
    path = v.weights_path(small, folder)
    shutil.copy(v.weights_path(wide, folder), path)
    with pytest.raises(v.ResultsError, match=rf"{path} does not hold the weights of .*-h5-l2-"):
        v.trained_model(small, folder)


def test_weights_of_another_cell_of_the_same_sizes_are_refused_too(folder):
    s = v.stored_records("q4", folder)[0][0]["settings"]
    other = v.cell_settings(**dict(s, weight_decay=1.0))
    v.weights_path(other, folder).write_bytes(v.weights_path(s, folder).read_bytes())
    with pytest.raises(v.ResultsError, match="does not hold the weights of .*-wd1-"):
        v.trained_model(other, folder)
    with pytest.raises(v.ResultsError, match="does not hold the weights"):
        v.keep_model(dict(v.stored_records("q4", folder)[0][0], settings=other), folder)


def test_the_bound_command_keeps_the_best_model_and_measures_each_kept_model_once(folder):
    records = v.stored_records("q4", folder)[0]
    table = v.make_bound(folder)
    best = v.best_model(records, folder)
    assert list(table.hidden_dim) == [best[0]["settings"]["hidden"]] * 2 and list(table.k) == [
        1,
        10,
    ]
    assert (table.test_vfe - table.nll == table.gap).all()
    pd.testing.assert_frame_equal(v.bound_table([best], folder), table)
    other = next(r for r in records if r["settings"] != best[0]["settings"])
    v.keep_model(other, folder)
    with pytest.raises(v.ResultsError, match=r"lacks fashion-mnist-h.*-m vae_helpers bound"):
        v.bound_table(v.kept_models(folder), folder)
    os.remove(v.weights_path(best[0]["settings"], folder))  # the best need not be measured again
    grown = v.make_bound(folder)
    pd.testing.assert_frame_equal(grown.iloc[:2], table)
    assert len(grown) == 4 and list(pd.read_csv(folder / "bound.csv").k) == [1, 10, 1, 10]


def test_the_kept_models_are_read_from_the_default_folder_set_when_called(tmp_path, monkeypatch):
    monkeypatch.setattr(v.store, "RESULTS_DIR", tmp_path)
    with pytest.raises(v.ResultsError, match=f"{v.kept_path(tiny(), tmp_path)} is missing"):
        v.best_model([dict(settings=tiny(), best_test_vfe=1.0)])
    assert v.kept_models() == []
