"""Analyses of kept models: the bound, its gap, the latent code (analysis.py)."""

import math

import pytest
import torch

import vae_helpers as v


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
    v.latent_plane(small_model(latent=2), v.load_data()[1][:300], v.image_labels()[:300], axes, n=4)
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == v.FASHION_CLASSES
    assert axes[0].get_xlabel() and axes[1].get_xlabel() and len(axes[1].images) == 1
    plt.close("all")


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
    parts = gaps.nll + gaps.amortisation + gaps.approximation
    assert (parts - gaps.vfe_encoder).abs().max() < 1e-4
    split = v.overfit_split(gaps, 2000, "plateau")
    (vfe, _), *rest = split.values()
    assert vfe == pytest.approx(sum(d for d, _ in rest), abs=1e-4)
    test = v.gap_row_of(gaps, 2000, "test", "plateau")
    assert test.images == 200 and split["nll"][0] == pytest.approx(
        test.nll - v.gap_row_of(gaps, 2000, "train", "plateau").nll
    )
