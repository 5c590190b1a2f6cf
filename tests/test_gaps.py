"""The bound's gap split into amortisation and approximation (gaps.py)."""

import json
import math

import pandas as pd
import pytest
import torch
from conftest import tiny

import vae_helpers as v

# A fit that stops after a few steps: these tests check where rows go, not how good the fit is.
QUICK = dict(draws=2, lr=0.02, every=5, tol=100.0, max_steps=10, check=4)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A results folder with two tiny trained models, and gap runs on them."""
    small, wide = tiny(), tiny(hidden=30)
    v.run_cells([small, wide], tmp_path, progress=False)
    runs = [(small, "test", QUICK, 20), (wide, "train", QUICK, 10)]
    monkeypatch.setattr(v.gaps, "GAP_RUNS", runs)
    monkeypatch.setattr(v.gaps, "GAP_ESTIMATES", dict(k=20, draws=5, seed=0))
    return tmp_path


def test_the_amortisation_and_approximation_gaps_add_up_to_the_gap_to_the_exact_likelihood():
    torch.manual_seed(0)
    model, x = v.VAE(8, 1).eval(), v.load_data()[1][:20]  # one latent unit: p(x) by quadrature
    z = torch.linspace(-10, 10, 8001)[:, None]
    with torch.no_grad():
        log_joint = -(model.decode(z)[:, None] - x).pow(2).sum(-1) - 0.5 * z.pow(2)
    exact = -(
        torch.logsumexp(log_joint, 0) + math.log(z[1, 0] - z[0, 0]) - 0.5 * math.log(2 * math.pi)
    )
    g = v.posterior_gaps(model, x, k=2000, draws=200)
    row = v.gap_row(g)
    assert (g["nll"] - exact).abs().max() < 0.02  # the estimate with q* as proposal
    assert row["amortisation"] > 0 and row["approximation"] > -0.02  # q* beats the encoder
    total = row["vfe_encoder"] - float(exact.mean())
    assert row["amortisation"] + row["approximation"] == pytest.approx(total, abs=0.02)


def test_each_stored_gap_row_adds_up_and_the_over_fitting_split_is_its_difference():
    gaps = v.stored_gaps()
    assert len(gaps) == len(v.GAP_RUNS)
    parts = gaps.nll + gaps.amortisation + gaps.approximation
    assert (parts - gaps.vfe_encoder).abs().max() < 1e-4
    split = v.overfit_split(gaps, 2000, "plateau")
    (vfe, _), *rest = split.values()
    assert vfe == pytest.approx(sum(d for d, _ in rest), abs=1e-4)
    test = v.gap_row_of(gaps, 2000, "test", "plateau")
    assert test.images == 200 and split["nll"][0] == pytest.approx(
        test.nll - v.gap_row_of(gaps, 2000, "train", "plateau").nll
    )


def test_the_gap_runs_are_fitted_once_and_read_back_in_their_order(folder):
    table = v.make_gaps(folder)
    assert list(zip(table.hidden_dim, table.split, table.images)) == [
        (5, "test", 20),
        (30, "train", 10),
    ]
    assert set(table.fit) == {json.dumps(QUICK)}
    written = (folder / "gaps.csv").read_bytes()
    pd.testing.assert_frame_equal(v.stored_gaps(folder), table.astype({c: int for c in v.GAP_INTS}))
    v.make_gaps(folder)  # nothing left to fit: nothing written
    assert (folder / "gaps.csv").read_bytes() == written


def test_a_run_with_another_fit_is_fitted_again_and_the_others_are_kept(folder, monkeypatch):
    first = v.make_gaps(folder)
    (small, *_), (wide, *_) = v.GAP_RUNS
    other = dict(QUICK, lr=0.05)
    monkeypatch.setattr(v.gaps, "GAP_RUNS", [v.GAP_RUNS[0], (wide, "train", other, 10)])
    with pytest.raises(v.ResultsError, match=r"lacks h=30 .*-m vae_helpers gaps"):
        v.stored_gaps(folder)
    v.weights_path(small, folder).unlink()  # its row could not be fitted again
    again = v.make_gaps(folder)
    pd.testing.assert_frame_equal(again.iloc[:1], first.iloc[:1])
    assert again.fit[1] == json.dumps(other) and len(pd.read_csv(folder / "gaps.csv")) == 2


def test_reading_the_gaps_writes_nothing_and_names_the_command_that_makes_them(folder):
    before = sorted(folder.rglob("*"))
    with pytest.raises(v.ResultsError, match=rf"-m vae_helpers gaps --results {folder}"):
        v.stored_gaps(folder)
    assert sorted(folder.rglob("*")) == before


def test_the_default_results_folder_is_the_one_set_when_a_function_is_called(tmp_path, monkeypatch):
    monkeypatch.setattr(v.store, "RESULTS_DIR", tmp_path)
    with pytest.raises(v.ResultsError, match=str(tmp_path / "gaps.csv")):
        v.stored_gaps()
