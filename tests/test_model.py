"""The VAE and its objective (vae_helpers/model.py)."""

import math

import pytest
import torch

import vae_helpers as v


def test_vfe_terms_match_a_hand_computation():
    x = torch.tensor([[0.0, 1.0]])
    logits = torch.tensor([[0.0, math.log(3.0)]])  # sigmoid: 0.5 and 0.75
    mean, log_var = torch.tensor([[1.0]]), torch.tensor([[math.log(2.0)]])
    rec, kl = v.vfe_terms(logits, x, mean, log_var)
    assert rec.item() == pytest.approx(0.5**2 + 0.25**2)
    assert kl.item() == pytest.approx(-0.5 * (1 + math.log(2.0) - 1.0 - 2.0))
    rec_b, _ = v.vfe_terms(logits, x, mean, log_var, recon="bernoulli")
    assert rec_b.item() == pytest.approx(-math.log(0.5) - math.log(0.75))


def test_summed_squared_error_is_a_gaussian_log_likelihood_with_variance_half_up_to_a_constant():
    torch.manual_seed(0)
    x, logits = torch.rand(3, 784), torch.randn(3, 784)
    rec, _ = v.vfe_terms(logits, x, torch.zeros(3, 1), torch.zeros(3, 1))
    nll = -torch.distributions.Normal(torch.sigmoid(logits), math.sqrt(0.5)).log_prob(x).sum(-1)
    assert torch.allclose(rec + 392 * math.log(math.pi), nll, rtol=1e-5)


def test_closed_form_kl_matches_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mean, log_var = torch.randn(1, 4), torch.randn(1, 4)
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    z = q.sample((200_000,))
    p = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean()
    _, kl = v.vfe_terms(torch.zeros(1, 1), torch.zeros(1, 1), mean, log_var)
    assert kl.item() == pytest.approx(mc.item(), rel=0.02)


def test_unknown_reconstruction_is_refused():
    with pytest.raises(ValueError, match="unknown reconstruction"):
        v.vfe_terms(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), "laplace"
        )


@pytest.mark.parametrize(
    "hidden, latent",
    [(h, l) for h in v.Q4_HIDDEN for l in v.Q4_LATENT]
    + [(h, l) for h in v.Q5_HIDDEN for l in v.Q5_LATENT],
)
def test_parameter_formula_matches_counted_parameters(hidden, latent):
    assert v.n_params_formula(hidden, latent) == v.n_params(v.VAE(hidden, latent))


def test_parameter_formula_gives_the_courses_examples():
    assert v.n_params_formula(5, 5) == 8_779
    assert v.n_params_formula(500, 300) == 1_737_384
    assert v.n_params_formula(1024, 8) == 3_732_256


def test_gradients_reach_mean_and_log_variance_through_the_reparameterisation():
    torch.manual_seed(0)
    model = v.VAE(8, 3)
    x = torch.rand(4, 784)
    logits, mean, log_var = model(x, torch.randn(4, 3))
    mean.retain_grad(), log_var.retain_grad()
    rec, _ = v.vfe_terms(logits, x, mean, log_var)  # reconstruction alone: no KL path to them
    rec.sum().backward()
    assert mean.grad.abs().sum() > 0 and log_var.grad.abs().sum() > 0


@pytest.mark.parametrize("hidden, latent", [(0, 5), (-1, 5), (5, 2.5), (5, "10"), (True, 5)])
def test_bad_dimensions_are_refused(hidden, latent):
    with pytest.raises(ValueError, match="positive integer"):
        v.VAE(hidden, latent)
    with pytest.raises(ValueError, match="positive integer"):
        v.cell_settings(hidden, latent)
