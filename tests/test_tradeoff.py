"""Q7's bias and variance over training sets (tradeoff.py)."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import tiny

import vae_helpers as v

# A tiny q7_bias_variance: three disjoint sets of 300 images (seed k on set k) and seeds 1 and 2
# on set 0, at two widths.
RUNS = [dict(train_offset=300 * k, seed=k) for k in range(3)] + [dict(seed=s) for s in (1, 2)]


def split_cells(widths=(5, 9)):
    return [tiny(hidden=h, val_size=500, recon_images=20, **run) for h in widths for run in RUNS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A results folder holding the tiny experiment's records and reconstructions."""
    folder = tmp_path_factory.mktemp("results")
    v.run_cells(split_cells((5, 9, 13)), folder, progress=False)
    return folder


@pytest.fixture
def folder(trained, tmp_path, monkeypatch):
    """A copy of the trained folder, whose q7_bias_variance is the tiny one (widths 5 and 9)."""
    monkeypatch.setitem(v.EXPERIMENTS, "q7_bias_variance", split_cells)
    return shutil.copytree(trained, tmp_path / "results")


def test_bias_squared_plus_variance_is_the_mean_squared_error_image_by_image():
    g = np.random.default_rng(0)
    x, r = g.random((30, 784)), g.random((5, 30, 784))
    d = v.bias_variance(x, r)
    np.testing.assert_allclose(d["bias2"] + d["variance"], d["mse"], rtol=1e-12)
    np.testing.assert_allclose(d["mse"], ((r - x) ** 2).sum(-1).mean(0), rtol=1e-12)
    assert (d["variance"] > 0).all()
    same = v.bias_variance(x, np.stack([r[0]] * 4))  # identical models: no variance
    np.testing.assert_allclose(same["variance"], 0, atol=1e-12)


def test_the_unbiased_split_moves_the_mean_models_noise_from_bias_to_variance_and_keeps_the_sum():
    g = np.random.default_rng(1)
    x, r = g.random((20, 784)), g.random((4, 20, 784))
    raw, u = v.bias_variance(x, r), v.unbiased(v.bias_variance(x, r), 4)
    np.testing.assert_allclose(u["bias2"] + u["variance"], raw["mse"], rtol=1e-12)
    np.testing.assert_allclose(u["variance"], raw["variance"] * 4 / 3, rtol=1e-12)


def test_the_jackknife_error_of_a_mean_is_its_standard_error():
    a = np.array([1.0, 4.0, 2.0, 8.0, 5.0])
    drops = [np.delete(a, i).mean() for i in range(len(a))]
    assert v.jackknife_se(drops) == pytest.approx(a.std(ddof=1) / np.sqrt(len(a)))


def test_the_split_of_the_stored_reconstructions_is_kept_and_then_needs_them_no_more(folder):
    table = v.make_bias_variance(folder)
    assert len(table) == 4 and set(table.sets) == {3} and set(table.seeds) == {3}
    assert table.identity_error.max() < 1e-9
    np.testing.assert_allclose(table.bias2 + table.variance, table.total, rtol=1e-12)
    np.testing.assert_allclose(table.bias2_raw + table.variance_raw, table.total, rtol=1e-12)
    step = v.bias_variance_step(5, 9, "final", folder)
    final = table[table.epoch == "final"].set_index("hidden_dim")
    assert step["variance"][0] == pytest.approx(final.variance[9] - final.variance[5])
    shutil.rmtree(folder / "recons")  # as in the repository, where they stay local
    records = v.stored_records("q7_bias_variance", folder)[0]
    pd.testing.assert_frame_equal(v.bias_variance_table(records, folder), table)
    pd.testing.assert_frame_equal(v.make_bias_variance(folder), table)


def test_a_new_width_is_split_and_the_stored_ones_are_kept(folder, monkeypatch):
    table = v.make_bias_variance(folder)
    for s in split_cells((5, 9)):  # the stored widths' reconstructions are gone
        v.recons_path(s, folder).unlink()
    monkeypatch.setitem(v.EXPERIMENTS, "q7_bias_variance", lambda: split_cells((5, 9, 13)))
    grown = v.make_bias_variance(folder)
    assert sorted(set(grown.hidden_dim)) == [5, 9, 13]
    pd.testing.assert_frame_equal(grown[grown.hidden_dim < 13], table)
    assert v.bias_variance_step(9, 13, "final", folder)["mse"][0] == pytest.approx(
        grown.total[grown.epoch == "final"].diff().iloc[-1]
    )


def test_a_width_whose_cells_changed_is_split_again(folder, monkeypatch):
    table = v.make_bias_variance(folder)
    fewer = [s for s in split_cells() if s != tiny(hidden=9, val_size=500, recon_images=20, seed=2)]
    monkeypatch.setitem(v.EXPERIMENTS, "q7_bias_variance", lambda: fewer)
    records = v.stored_records("q7_bias_variance", folder)[0]
    with pytest.raises(v.ResultsError, match=r"lacks h9 .*-m vae_helpers bias_variance"):
        v.bias_variance_table(records, folder)
    again = v.make_bias_variance(folder)
    assert list(again.seeds) == [3, 3, 2, 2]
    pd.testing.assert_frame_equal(again[again.hidden_dim == 5], table[table.hidden_dim == 5])


def test_a_split_whose_per_image_values_are_lost_is_made_again(folder):
    table = v.make_bias_variance(folder)
    (folder / "bias_variance.npz").unlink()
    records = v.stored_records("q7_bias_variance", folder)[0]
    with pytest.raises(v.ResultsError, match=r"lacks h5 and 1 more"):
        v.bias_variance_table(records, folder)
    pd.testing.assert_frame_equal(v.make_bias_variance(folder), table)
    assert v.bias_variance_step(5, 9, "final", folder)["mse"][0] == pytest.approx(
        table.total[2] - table.total[0]
    )


def test_each_width_is_kept_as_soon_as_it_is_split(folder):
    v.recons_path(split_cells((9,))[0], folder).unlink()
    with pytest.raises(FileNotFoundError):
        v.make_bias_variance(folder)
    assert list(pd.read_csv(folder / "bias_variance.csv").hidden_dim) == [5, 5]


def test_reading_the_split_writes_nothing_and_names_the_command_that_makes_it(folder):
    before = sorted(folder.rglob("*"))
    records = v.stored_records("q7_bias_variance", folder)[0]
    with pytest.raises(v.ResultsError, match=rf"-m vae_helpers bias_variance --results {folder}"):
        v.bias_variance_table(records, folder)
    assert sorted(folder.rglob("*")) == before


def test_a_missing_cell_is_named_with_the_command_that_trains_it(folder):
    v.make_bias_variance(folder)
    shutil.rmtree(folder / "recons")
    gone = split_cells()[3]
    v.cell_path(gone, folder).unlink()
    records = v.stored_records("q7_bias_variance", folder)[0]
    says = rf"{v.cell_path(gone).name} is missing .*-m vae_helpers q7_bias_variance"
    with pytest.raises(v.ResultsError, match=says):
        v.bias_variance_table(records, folder)
    with pytest.raises(v.ResultsError, match=says):
        v.make_bias_variance(folder)


def test_reconstructions_holding_objects_are_refused_naming_the_file(folder):
    bad = v.recons_path(split_cells()[1], folder)
    np.savez(bad, final=np.array([{"code": "run"}]), best_val=np.zeros(1))
    with pytest.raises(v.ResultsError, match=bad.name):
        v.make_bias_variance(folder)


def test_a_per_image_file_holding_objects_is_refused_naming_the_file(folder):
    v.make_bias_variance(folder)
    np.savez(folder / "bias_variance.npz", h5_final_mse=np.array([None]))
    with pytest.raises(v.ResultsError, match="bias_variance.npz"):
        v.bias_variance_step(5, 9, "final", folder)


def test_the_committed_split_is_complete_and_adds_up():
    records = v.stored_records("q7_bias_variance")[0]
    table = v.bias_variance_table(records)
    assert set(table.hidden_dim) == set(v.Q7_BV_HIDDEN) and len(table) == 2 * len(v.Q7_BV_HIDDEN)
    np.testing.assert_allclose(table.bias2 + table.variance, table.total, rtol=1e-12)
