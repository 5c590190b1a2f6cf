"""Analyses of trained models: samples, the importance-weighted bound, where the bound's gap lies
(amortisation or approximation), the latent code."""

import json
from pathlib import Path

import numpy as np
import torch

from .data import load_data
from .model import VAE, X_DIM, kl_to_prior, label, like
from .store import (
    RESULTS_DIR,
    ResultsError,
    atomic_save,
    cell_path,
    load_pt,
    save_csv,
    weights_path,
    write_json,
)
from .train import chunk_sizes, eval_terms, noise


def best_model(records, results_dir=RESULTS_DIR):
    """(record, VAE) of the cell with the lowest best test VFE, its final weights kept in
    results/sample_vae.pt (a few MB, committed) so the samples need no training."""
    best = min(records, key=lambda r: r["best_test_vfe"])
    path = Path(results_dir) / "sample_vae.pt"
    if not path.exists() or load_pt(path)["settings"] != best["settings"]:
        state = load_pt(weights_path(best["settings"], results_dir))
        atomic_save({"settings": best["settings"], "state": state}, path, torch.save)
    model = VAE(best["settings"]["hidden"], best["settings"]["latent"])
    model.load_state_dict(load_pt(path)["state"])
    return best, model.double().eval()  # float64, as kept_models


@torch.no_grad()
def generate(model, n=64, seed=0):
    """Decoder outputs for n draws of z ~ N(0, I) from a seeded generator, as (n, 784)."""
    z = torch.randn(n, model.mean.out_features, generator=torch.Generator().manual_seed(seed))
    return model.decode(like(model, z))


GAUSS_CONST = 0.5 * X_DIM * np.log(np.pi)  # 392 log(pi): what the course's VFE leaves out


@torch.no_grad()
def log_weights(model, x, k, seed=0, chunk=100, posterior=None):
    """log p(x, z_i) - log q(z_i | x) for k draws z_i from q = the encoder (or `posterior`, a mean
    and log-variance), shape (k, images), under the course's decoder with variance 1/2, constant
    included."""
    x = like(model, x)
    mean, log_var = model.encode(x) if posterior is None else posterior
    std = torch.exp(0.5 * log_var)
    g, out = torch.Generator().manual_seed(seed), []
    for n in chunk_sizes(k, chunk):
        eps = like(model, torch.randn(n, *mean.shape, generator=g))
        z = mean + std * eps
        recon = -(torch.sigmoid(model.decoder(z)) - x).pow(2).sum(-1) - GAUSS_CONST
        prior = -0.5 * (z.pow(2) + np.log(2 * np.pi)).sum(-1)
        post = -0.5 * (eps.pow(2) + np.log(2 * np.pi)).sum(-1) - std.log().sum(-1)
        out.append(recon + prior - post)
    return torch.cat(out)


def iwae_nll(model, x, ks=(1, 10, 100, 1000, 5000), seed=0):
    """Burda et al.'s importance-weighted estimate of -log p(x) for each k (the first k draws of one
    set), on the course's VFE scale (the constant 392 log(pi) removed): mean, its standard error
    over images, and the standard error of its distance below the k = 1 estimate."""
    w = log_weights(model, x, max(ks), seed)
    one = -w[0] - GAUSS_CONST  # k = 1: a one-sample VFE of each image
    rows = []
    for k in ks:
        nll = -(torch.logsumexp(w[:k], 0) - np.log(k)) - GAUSS_CONST
        rows.append(
            dict(
                k=k,
                nll=float(nll.mean()),
                se=float(nll.std() / np.sqrt(len(nll))),
                below_k1_se=float((one - nll).std() / np.sqrt(len(nll))),
            )
        )  # paired: image by image
    return rows


@torch.no_grad()
def unit_kl(model, x):
    """Each latent unit's KL to the prior, averaged over images (nats per unit), largest first."""
    kl = kl_to_prior(*model.encode(like(model, x))).mean(0)
    return kl.sort(descending=True).values.numpy()


@torch.no_grad()
def interpolations(model, x_pairs, steps=9, ends=False):
    """Decoder images along straight lines between the posterior means of pairs of images; with
    `ends`, each row starts and ends with the two images themselves."""
    rows = []
    for a, b in x_pairs:
        za, zb = (model.encode(like(model, v[None]))[0] for v in (a, b))
        t = like(model, torch.linspace(0, 1, steps)[:, None])
        line = model.decode((1 - t) * za + t * zb)
        rows.append(torch.cat([like(model, a[None]), line, like(model, b[None])]) if ends else line)
    return torch.cat(rows)


MODELS_DIR = RESULTS_DIR / "models"


def kept_models(models_dir=MODELS_DIR):
    """Every kept model as (record, VAE in eval mode), smallest first."""
    out = []
    for path in sorted(Path(models_dir).glob("*.pt")):
        kept = load_pt(path)
        s = kept["record"]["settings"]
        model = VAE(s["hidden"], s["latent"])
        model.load_state_dict(kept["state"])
        # float64: a figure drawn from these models is the same bytes on any CPU (float32 sums
        # in another order move a few pixels by one grey level).
        out.append((kept["record"], model.double().eval()))
    return sorted(out, key=lambda rm: rm[0]["n_params"])


@torch.no_grad()
def eval_vfe(model, s, test_x):
    """A model's test VFE measured as training measured it (fixed noise of its seed, epoch 0)."""
    r, k, _ = eval_terms(
        model, like(model, test_x), noise(s["seed"], 0, s["latent"], "cpu"), s["recon"]
    )
    return float(r + k)


def bound_table(
    models, images=1000, ks=(1, 10, 100, 1000, 5000), seed=0, path=RESULTS_DIR / "bound.csv"
):
    """Per model and k: test VFE, the importance-weighted NLL estimate on the first `images` test
    images with its standard error, and the gap; stored in results/bound.csv and read from it."""
    import pandas as pd

    key = dict(images=images, ks=list(ks), seed=seed, models=[r["settings"] for r, _ in models])
    side = Path(path).with_suffix(".json")
    if Path(path).exists() and side.exists() and json.loads(side.read_text()) == key:
        return pd.read_csv(path)
    x = load_data()[1][:images]
    rows = []
    for rec, model in models:
        s = rec["settings"]
        vfe = eval_vfe(model, s, x)
        for row in iwae_nll(model, x, ks, seed):
            rows.append(
                dict(
                    hidden_dim=s["hidden"],
                    latent_dim=s["latent"],
                    active_units=rec["active_units"],
                    test_vfe=vfe,
                    **row,
                    gap=vfe - row["nll"],
                )
            )
    table = pd.DataFrame(rows)
    atomic_save(table, path, save_csv)
    atomic_save(key, side, write_json)
    return table


# Where the bound's looseness lives (Cremer, Li and Duvenaud 2018): VFE(encoder) - VFE(q*) is
# the amortisation gap, VFE(q*) - (-log p(x)) the approximation gap; q* is the best Gaussian for
# each image.
GAP_FIT = dict(draws=8, lr=0.02, every=50, tol=0.01, max_steps=3000, check=32)


def gaussian_vfe(model, x, mean, log_var, eps):
    """Each image's VFE under q(z|x) = N(mean, exp(log_var)), averaged over the draws eps (S, n,
    l)."""
    z = mean + torch.exp(0.5 * log_var) * eps
    rec = (torch.sigmoid(model.decoder(z)) - x).pow(2).sum(-1).mean(0)
    return rec + kl_to_prior(mean, log_var).sum(-1)


def fit_posterior(model, x, draws=8, lr=0.02, every=50, tol=0.01, max_steps=3000, check=32, seed=0):
    """q*(z|x) for each image: its mean and log-variance fitted by Adam to that image's VFE, the
    decoder fixed, from the encoder's output, fresh draws each step. Stops when `every` steps lower
    the mean VFE on `check` fixed draws by less than `tol` nats. Returns (mean, log_var, steps)."""
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


def trained_model(s, results_dir=RESULTS_DIR):
    """A trained cell's VAE (float32, eval mode) from its kept final weights: results/models/,
    results/sample_vae.pt, or results/weights/ (local, not committed)."""
    name = cell_path(s).with_suffix(".pt").name
    kept, sample = Path(results_dir) / "models" / name, Path(results_dir) / "sample_vae.pt"
    if kept.exists():
        state = load_pt(kept)["state"]
    elif sample.exists() and load_pt(sample)["settings"] == s:
        state = load_pt(sample)["state"]
    elif weights_path(s, results_dir).exists():
        state = load_pt(weights_path(s, results_dir))
    else:
        raise ResultsError(
            f"no weights of {name} in {results_dir}: train its cell again to keep them"
        )
    model = VAE(s["hidden"], s["latent"])
    model.load_state_dict(state)
    return model.float().eval()


def split_images(s, split, images):
    """The first `images` test images, or the first `images` of the cell's own training images."""
    train_x, test_x = load_data(s["dataset"])
    if split == "test":
        return test_x[:images]
    start = s.get("train_offset", 0)
    return train_x[start : start + min(images, s["train_size"])]


def gap_table(
    runs,
    images=1000,
    k=1000,
    draws=100,
    seed=0,
    path=RESULTS_DIR / "gaps.csv",
    results_dir=RESULTS_DIR,
):
    """One row per (settings, split, fit) in `runs`: the amortisation and approximation gaps with
    standard errors over images. Rows are kept in `path` and only missing ones computed."""
    import pandas as pd

    old = pd.read_csv(path) if Path(path).exists() else pd.DataFrame(columns=["key"])
    rows = []
    for s, split, fit in runs:
        key = json.dumps(
            dict(settings=s, split=split, fit=fit, images=images, k=k, draws=draws, seed=seed),
            sort_keys=True,
        )
        if key in set(old.key):
            rows.append(old[old.key == key].iloc[0].to_dict())
            continue
        print(f"fitting q* for {label(s)} N={s['train_size']} on {split} images", flush=True)
        g = posterior_gaps(
            trained_model(s, results_dir), split_images(s, split, images), k, draws, seed, fit
        )
        rows.append(
            dict(
                hidden_dim=s["hidden"],
                latent_dim=s["latent"],
                train_size=s["train_size"],
                split=split,
                fit="default" if fit == GAP_FIT else json.dumps(fit),
                **gap_row(g),
                key=key,
            )
        )
        new = pd.DataFrame(rows)
        table = new if old.empty else pd.concat([old, new]).drop_duplicates("key", keep="last")
        atomic_save(table, path, save_csv)  # each row kept as soon as it is done
    return pd.DataFrame(rows)


GAP_INTS = ["hidden_dim", "latent_dim", "train_size", "images", "steps"]


def stored_gaps(path=RESULTS_DIR / "gaps.csv"):
    """gap_table's stored rows, read only: one per (model, images, fit)."""
    import pandas as pd

    return pd.read_csv(path).astype({c: int for c in GAP_INTS})


def overfit_split(gaps, hidden, train_size=1_000):
    """One model's test-minus-training differences (as many images each): the VFE's and its three
    parts', -log p(x) (the decoder), the amortisation gap (the encoder) and the approximation gap;
    each (difference, standard error)."""
    rows = gaps[
        (gaps.hidden_dim == hidden) & (gaps.train_size == train_size) & (gaps.fit == "default")
    ]
    train, test = (rows[rows.split == s].iloc[0] for s in ("train", "test"))
    parts = ("vfe_encoder", "nll", "amortisation", "approximation")
    return {
        k: (test[k] - train[k], float(np.hypot(test[f"{k}_se"], train[f"{k}_se"]))) for k in parts
    }
