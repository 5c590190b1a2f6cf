"""Where the bound's looseness lies (Cremer, Li and Duvenaud 2018): q*(z|x), the best Gaussian
for each image, fitted with the decoder fixed; the amortisation gap VFE(encoder) - VFE(q*) and
the approximation gap VFE(q*) - (-log p(x)); and whether a model's over-fitting is its encoder's
or its decoder's."""

import json

import numpy as np
import torch

from .analysis import GAUSS_CONST, log_weights, trained_model
from .data import load_data
from .experiments import Q7_BV, Q7_LATENT
from .model import label, vfe_terms
from .settings import cell_settings
from .store import cached_table, results_folder

# Where the bound's looseness lives (Cremer, Li and Duvenaud 2018): VFE(encoder) - VFE(q*) is
# the amortisation gap, VFE(q*) - (-log p(x)) the approximation gap; q* is the best Gaussian for
# each image.
GAP_FIT = dict(draws=8, lr=0.02, every=50, tol=0.01, max_steps=3000, check=32)

# A fit run to its plateau: the step size shrinks by `decay` every `every` steps, and the fit
# stops when those steps gain less than 0.002 nats.
GAP_PLATEAU = dict(draws=8, lr=0.05, decay=0.7, every=100, tol=0.002, max_steps=2000, check=32)


def gaussian_vfe(model, x, mean, log_var, eps):
    """Each image's VFE under q(z|x) = N(mean, exp(log_var)), averaged over the draws eps (S, n,
    l)."""
    z = mean + torch.exp(0.5 * log_var) * eps
    rec, kl = vfe_terms(model.decoder(z), x, mean, log_var)
    return rec.mean(0) + kl


def fit_posterior(
    model, x, draws=8, lr=0.02, every=50, tol=0.01, max_steps=3000, check=32, seed=0, decay=1.0
):
    """q*(z|x) for each image: its mean and log-variance fitted by Adam to that image's VFE, the
    decoder fixed, from the encoder's output, fresh draws each step. Stops when `every` steps lower
    the mean VFE on `check` fixed draws by less than `tol` nats; the step size is multiplied by
    `decay` after each `every` steps. Returns (mean, log_var, steps)."""
    with torch.no_grad():
        mean, log_var = (t.clone().requires_grad_(True) for t in model.encode(x))
    g = torch.Generator().manual_seed(seed)
    fixed = torch.randn(check, *mean.shape, generator=g, dtype=x.dtype)
    opt = torch.optim.Adam([mean, log_var], lr=lr)
    with torch.no_grad():
        last, steps = float(gaussian_vfe(model, x, mean, log_var, fixed).mean()), 0
    while steps < max_steps:
        for _ in range(every):
            eps = torch.randn(draws, *mean.shape, generator=g, dtype=x.dtype)
            loss = gaussian_vfe(model, x, mean, log_var, eps).sum()  # each image its own gradient
            # only q*'s parameters get gradients: the decoder's weights are left untouched
            mean.grad, log_var.grad = torch.autograd.grad(loss, [mean, log_var])
            opt.step()
        for group in opt.param_groups:
            group["lr"] *= decay
        with torch.no_grad():
            steps, now = steps + every, float(gaussian_vfe(model, x, mean, log_var, fixed).mean())
        if last - now < tol:
            break
        last = now
    return mean.detach(), log_var.detach(), steps


def gaussian_nll(model, x, posterior, k, seed=0):
    """-log p(x) per image on the course's VFE scale, importance-weighted with k draws from
    `posterior` (a mean and log-variance) as the proposal (Burda et al.)."""
    w = log_weights(model, x, k, seed, posterior=posterior)
    return -(torch.logsumexp(w, 0) - np.log(k)) - GAUSS_CONST


@torch.no_grad()
def mean_vfe(model, x, posterior, eps, chunk=100):
    """Each image's VFE under `posterior` (a mean and log-variance) for the draws eps (S, n, l)."""
    parts = zip(x.split(chunk), *(p.split(chunk) for p in posterior), eps.split(chunk, 1))
    return torch.cat([gaussian_vfe(model, *part) for part in parts])


def posterior_gaps(model, x, k=1000, draws=100, seed=0, fit=GAP_FIT):
    """Per image: the VFE under the encoder and under q* (on the same `draws` fresh draws), and
    -log p(x) with q* as the proposal (k draws); the fit's steps."""
    star = fit_posterior(model, x, seed=seed, **fit)
    g = torch.Generator().manual_seed(seed + 1)
    eps = torch.randn(draws, len(x), star[0].shape[1], generator=g, dtype=x.dtype)
    with torch.no_grad():
        encoder = model.encode(x)
    return dict(
        vfe_encoder=mean_vfe(model, x, encoder, eps),
        vfe_best=mean_vfe(model, x, star[:2], eps),
        nll=gaussian_nll(model, x, star[:2], k, seed + 2),
        steps=star[2],
    )


def gap_row(g):
    """Means and standard errors over images of the amortisation, approximation and total gaps."""
    parts = dict(
        amortisation=g["vfe_encoder"] - g["vfe_best"],
        approximation=g["vfe_best"] - g["nll"],
        total=g["vfe_encoder"] - g["nll"],
        vfe_encoder=g["vfe_encoder"],
        vfe_best=g["vfe_best"],
        nll=g["nll"],
    )
    return dict(
        images=len(g["nll"]),
        steps=g["steps"],
        **{k: float(t.mean()) for k, t in parts.items()},
        **{f"{k}_se": float(t.std() / np.sqrt(len(t))) for k, t in parts.items()},
    )


def split_images(s, split, images):
    """The first `images` test images, or the first `images` of the cell's own training images."""
    train_x, test_x = load_data(s["dataset"])
    if split == "test":
        return test_x[:images]
    start = s.get("train_offset", 0)
    return train_x[start : start + min(images, s["train_size"])]


# A fixed-step fit with more draws and a strict stopping rule, to check the others against.
GAP_STRICT = dict(draws=32, lr=0.01, every=50, tol=0.001, max_steps=3000, check=32)

FULL = [cell_settings(h, l) for h, l in ((500, 10), (50, 10), (500, 300), (512, 2))]
ONE_SET = {h: cell_settings(h, Q7_LATENT, **Q7_BV) for h in (300, 1000, 2000)}  # set 0, seed 0

# results/gaps.csv's rows as (model's settings, images' split, fit, images), in the order the
# notebook prints them: the kept full-data models on 1,000 test images with both fits, the
# strict fit on two models, and q7_bias_variance's set 0 models on their own training images
# and as many test images (1,000 with the default fit, 200 fitted to the plateau).
GAP_RUNS = (
    [(s, "test", GAP_FIT, 1000) for s in FULL]
    + [(ONE_SET[300], split, GAP_FIT, 1000) for split in ("train", "test")]
    + [(ONE_SET[300], "test", GAP_STRICT, 1000), (FULL[0], "test", GAP_STRICT, 1000)]
    + [(ONE_SET[h], split, GAP_FIT, 1000) for h in (2000, 1000) for split in ("train", "test")]
    + [(s, "test", GAP_PLATEAU, 1000) for s in FULL]
    + [
        (ONE_SET[h], split, GAP_PLATEAU, 200)
        for h in (300, 2000, 1000)
        for split in ("train", "test")
    ]
)

# Each run's estimates: -log p(x) from k draws, the VFEs from `draws` draws, one seed.
GAP_ESTIMATES = dict(k=1000, draws=100, seed=0)


def fit_name(fit):
    return {json.dumps(GAP_FIT): "default", json.dumps(GAP_PLATEAU): "plateau"}.get(
        json.dumps(fit), json.dumps(fit)
    )


def gap_cache(folder, make=False):
    """results/gaps.csv through the analyses' cache: one part per run of GAP_RUNS."""
    runs = {
        f"{label(s)} N={s['train_size']} {split} {fit_name(fit)} {n}": (s, split, fit, n)
        for s, split, fit, n in GAP_RUNS
    }
    parts = {
        name: dict(settings=s, split=split, fit=fit, images=images, **GAP_ESTIMATES)
        for name, (s, split, fit, images) in runs.items()
    }
    compute = (lambda name: ([gap_run(*runs[name], folder)], {})) if make else None
    return cached_table(folder / "gaps.csv", parts, compute)


def gap_run(s, split, fit, images, folder):
    """One row of the gap table: the amortisation and approximation gaps with standard errors over
    images."""
    print(f"fitting q* for {label(s)} N={s['train_size']} on {split} images", flush=True)
    k, draws, seed = GAP_ESTIMATES["k"], GAP_ESTIMATES["draws"], GAP_ESTIMATES["seed"]
    x = split_images(s, split, images)
    g = posterior_gaps(trained_model(s, folder), x, k, draws, seed, fit)
    return dict(
        hidden_dim=s["hidden"],
        latent_dim=s["latent"],
        train_size=s["train_size"],
        split=split,
        fit=fit_name(fit),
        **gap_row(g),
    )


def make_gaps(results_dir=None):
    """Fit the runs of GAP_RUNS not stored in results/gaps.csv yet (hours on a CPU), each row kept
    as soon as it is done."""
    return gap_cache(results_folder(results_dir), make=True)


GAP_INTS = ["hidden_dim", "latent_dim", "train_size", "images", "steps"]


def stored_gaps(results_dir=None):
    """The gap table's rows, one per run of GAP_RUNS, read from results/gaps.csv (which
    `python -m vae_helpers gaps` makes); nothing is written."""
    return gap_cache(results_folder(results_dir)).astype({c: int for c in GAP_INTS})


GAP_PARTS = ("vfe_encoder", "nll", "amortisation", "approximation")


def gap_row_of(gaps, hidden, split, fit="default", train_size=1_000, latent=10):
    """The stored gap row of one model (by its sizes and training-set size) on one split."""
    rows = gaps[(gaps.hidden_dim == hidden) & (gaps.latent_dim == latent)]
    rows = rows[(rows.train_size == train_size) & (rows.split == split) & (rows.fit == fit)]
    return rows.iloc[0]


def gap_difference(a, b):
    """Row b minus row a in the VFE and its three parts, each (difference, standard error), the
    errors added as for different images (an overstatement where the images are the same)."""
    return {k: (b[k] - a[k], float(np.hypot(a[f"{k}_se"], b[f"{k}_se"]))) for k in GAP_PARTS}


def overfit_split(gaps, hidden, fit="default", train_size=1_000):
    """One model's test minus training values (as many images each): the VFE's generalisation gap
    and its parts, -log p(x) (the decoder), the amortisation gap (the encoder), the approximation
    gap; each (difference, standard error)."""
    rows = (gap_row_of(gaps, hidden, s, fit, train_size) for s in ("train", "test"))
    return gap_difference(*rows)
