"""Analyses of trained models: samples, the importance-weighted bound, where the bound's gap lies
(amortisation or approximation), the latent code."""

import json
from pathlib import Path

import numpy as np
import torch

from .data import load_data
from .model import VAE, X_DIM, kl_to_prior, like
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


def kept_path(s, results_dir=RESULTS_DIR):
    """Where a kept model lives: results/models/<cell name>.pt, its record and final weights."""
    return Path(results_dir) / "models" / cell_path(s).with_suffix(".pt").name


def keep_model(rec, results_dir=RESULTS_DIR):
    """Keep a trained cell's record with its final weights (from results/weights/, local) in
    results/models/ (a few MB each, committed), so that the notebook needs no training."""
    state = load_pt(weights_path(rec["settings"], results_dir))
    atomic_save(
        {"record": rec, "state": state}, kept_path(rec["settings"], results_dir), torch.save
    )


def kept_model(path):
    """A kept model as (record, VAE in eval mode, float64: a figure drawn from it is then the same
    bytes on any CPU, where float32 sums in another order move a few pixels by a grey level)."""
    kept = load_pt(path)
    s = kept["record"]["settings"]
    model = VAE(s["hidden"], s["latent"])
    model.load_state_dict(kept["state"])
    return kept["record"], model.double().eval()


def best_model(records, results_dir=RESULTS_DIR):
    """(record, VAE) of the cell with the lowest best test VFE, kept in results/models/ the first
    time it is asked for."""
    best = min(records, key=lambda r: r["best_test_vfe"])
    if not kept_path(best["settings"], results_dir).exists():
        keep_model(best, results_dir)
    return kept_model(kept_path(best["settings"], results_dir))


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
    """Every kept model as (record, VAE in eval mode, float64), smallest first."""
    out = [kept_model(path) for path in sorted(Path(models_dir).glob("*.pt"))]
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


def trained_model(s, results_dir=RESULTS_DIR):
    """A trained cell's VAE (float32, eval mode) from its kept final weights: results/models/, or
    results/weights/ (local, not committed)."""
    if kept_path(s, results_dir).exists():
        state = load_pt(kept_path(s, results_dir))["state"]
    elif weights_path(s, results_dir).exists():
        state = load_pt(weights_path(s, results_dir))
    else:
        raise ResultsError(
            f"no weights of {cell_path(s).name} in {results_dir}: train its cell again to keep them"
        )
    model = VAE(s["hidden"], s["latent"])
    model.load_state_dict(state)
    return model.float().eval()
