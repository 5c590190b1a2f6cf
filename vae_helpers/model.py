"""The model and its objective: the course's VAE, the Variational Free Energy, parameter counts."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

X_DIM = 28 * 28


def check_dims(hidden, latent):
    for name, value in (("hidden", hidden), ("latent", latent)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} dimension must be a positive integer, got {value!r}")


def mlp(*sizes):
    """Linear layers of the given sizes with LeakyReLU(0.2) between them (not after the last)."""
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers[:-1])


class VAE(nn.Module):
    """The course's VAE: two LeakyReLU(0.2) layers each side, Gaussian encoder heads."""

    def __init__(self, hidden, latent, x_dim=X_DIM):
        super().__init__()
        check_dims(hidden, latent)
        # The encoder's last layer is activated too: the heads read LeakyReLU outputs.
        self.encoder = nn.Sequential(*mlp(x_dim, hidden, hidden), nn.LeakyReLU(0.2))
        self.mean = nn.Linear(hidden, latent)
        self.log_var = nn.Linear(hidden, latent)
        # The decoder ends in logits; the course's sigmoid is applied in vfe_terms and decode.
        self.decoder = mlp(latent, hidden, hidden, x_dim)

    def encode(self, x):
        """The Gaussian q(z | x): its mean and log-variance."""
        h = self.encoder(x)
        return self.mean(h), self.log_var(h)

    def forward(self, x, eps):
        mean, log_var = self.encode(x)
        z = mean + torch.exp(0.5 * log_var) * eps  # reparameterisation: noise outside the graph
        return self.decoder(z), mean, log_var

    def decode(self, z):
        return torch.sigmoid(self.decoder(z))


def n_params_formula(hidden, latent, x_dim=X_DIM):
    """Closed-form trainable parameters of encoder + decoder (weights and biases)."""
    heads = 2 * (hidden * latent + latent)
    encoder = (x_dim * hidden + hidden) + (hidden * hidden + hidden) + heads
    decoder = (latent * hidden + hidden) + (hidden * hidden + hidden) + (hidden * x_dim + x_dim)
    return encoder + decoder


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kl_to_prior(mean, log_var):
    """KL(N(mean, exp(log_var)) || N(0, I)) per latent unit, in closed form (Kingma and Welling
    2014, appendix B): -(1 + log_var - mean^2 - exp(log_var)) / 2."""
    return -0.5 * (1 + log_var - mean.pow(2) - log_var.exp())


def vfe_terms(logits, x, mean, log_var, recon="mse"):
    """Reconstruction and KL per image (nats), summed over the last axis; VFE = recon + kl.

    "mse": the course's summed squared error, a Gaussian log-likelihood with variance 1/2
    up to the constant 392 log(pi). "bernoulli": binary cross-entropy on the logits.
    """
    if recon == "mse":
        rec = (torch.sigmoid(logits) - x).pow(2).sum(-1)
    elif recon == "bernoulli":
        bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        rec = bce.sum(-1)
    else:
        raise ValueError(f"unknown reconstruction {recon!r}; choose 'mse' or 'bernoulli'")
    return rec, kl_to_prior(mean, log_var).sum(-1)


def active_units(means, threshold=0.01):
    """Burda et al. (2016): latent units whose posterior mean varies across inputs (Var > 0.01)."""
    return int((means.var(dim=0) > threshold).sum())


def like(model, x):
    """x in the model's float type: the kept models run in float64 (see kept_models)."""
    return x.to(next(model.parameters()).dtype)


def label(s):
    """A cell's short name in messages and progress bars."""
    return f"h={s['hidden']} l={s['latent']}"
