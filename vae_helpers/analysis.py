"""Analyses of trained models: samples, the importance-weighted bound, where the bound's gap lies
(amortisation or approximation), the latent code."""

from pathlib import Path

import numpy as np
import torch

from .data import load_data
from .experiments import experiment_table
from .model import VAE, X_DIM, kl_to_prior, like
from .settings import cell_settings, recorded_settings
from .store import (
    ResultsError,
    atomic_save,
    cached_table,
    cell_name,
    load_pt,
    record_problem,
    results_folder,
    weights_path,
)
from .train import chunk_sizes, eval_terms, noise


def kept_path(s, results_dir=None):
    """Where a kept model lives: results/models/<cell name>.pt, its record and final weights."""
    return results_folder(results_dir) / "models" / f"{cell_name(s)}.pt"


def keep_model(rec, results_dir=None):
    """Keep a trained cell's record with its final weights (from results/weights/, local) in
    results/models/ (a few MB each, committed), so that the notebook needs no training."""
    s, folder = rec["settings"], results_folder(results_dir)
    if not weights_path(s, folder).exists():
        raise ResultsError(
            f"no weights of {cell_name(s)}.json in {folder / 'weights'} (they stay local): train "
            "the cell again (delete its record) to keep them"
        )
    state = cell_weights(s, folder)
    atomic_save({"record": rec, "state": state}, kept_path(s, folder), torch.save)


def cell_weights(s, folder):
    """A trained cell's final weights (results/weights/, local), refused unless the file names
    this cell: another cell's of the same sizes would load without a murmur."""
    path = weights_path(s, folder)
    weights = load_pt(path)
    named = weights.get("settings") if isinstance(weights, dict) else None
    if named != recorded_settings(s) or "state" not in weights:
        raise ResultsError(
            f"{path} does not hold the weights of {cell_name(s)} (it names "
            f"{'no cell' if named is None else named}); it was left as it is: train that cell "
            "again (delete its record) to make them"
        )
    return weights["state"]


def vae_with(state, s, path):
    """A VAE of the cell's sizes holding `state`, or an error naming the file whose weights do not
    fit it."""
    model = VAE(s["hidden"], s["latent"])
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise ResultsError(
            f"{path} does not hold the weights of a VAE with h={s['hidden']}, l={s['latent']} "
            f"({first}); it was left as it is: put that cell's own file there"
        ) from None
    return model


def kept_model(path):
    """A kept model as (record, VAE in eval mode, float64: a figure drawn from it is then the same
    bytes on any CPU, where float32 sums in another order move a few pixels by a grey level). A
    file holding another cell than its name says is refused."""
    kept = load_pt(path)
    try:
        rec, state, s = kept["record"], kept["state"], kept["record"]["settings"]
        named = f"{cell_name(cell_settings(**s))}.pt"
    except (KeyError, TypeError, ValueError, IndexError):
        raise ResultsError(
            f"{path} is not a kept model (a record with its weights); it was left as it is"
        ) from None
    problem = record_problem(rec) if isinstance(rec, dict) else "whole record"
    if problem:
        raise ResultsError(f"{path} holds a damaged record (its {problem}); it was left as it is")
    if named != Path(path).name:
        raise ResultsError(
            f"{path} holds the model of another cell ({named}); it was left as it is: delete it "
            "and keep that cell's own model again (`.venv/bin/python -m vae_helpers bound` "
            "keeps the best Q4 model)"
        )
    return rec, vae_with(state, s, path).double().eval()


def best_model(records, results_dir=None):
    """(record, VAE) of the cell with the lowest best test VFE, read from results/models/ (where
    `python -m vae_helpers bound` keeps it); nothing is written."""
    best = min(records, key=lambda r: r["best_test_vfe"])
    path = kept_path(best["settings"], results_dir)
    if not path.exists():
        raise ResultsError(
            f"{path} is missing: keep the best model with `.venv/bin/python -m vae_helpers bound "
            f"--results {results_folder(results_dir)}` (it needs the cell's weights, which "
            "training leaves in weights/), then run this again"
        )
    return kept_model(path)


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


def kept_models(results_dir=None):
    """Every kept model as (record, VAE in eval mode, float64), smallest first."""
    paths = sorted((results_folder(results_dir) / "models").glob("*.pt"))
    return sorted((kept_model(p) for p in paths), key=lambda rm: rm[0]["n_params"])


@torch.no_grad()
def eval_vfe(model, s, test_x):
    """A model's test VFE measured as training measured it (fixed noise of its seed, epoch 0)."""
    r, k, _ = eval_terms(
        model, like(model, test_x), noise(s["seed"], 0, s["latent"], "cpu"), s["recon"]
    )
    return float(r + k)


# The bound measured for each model: on the first 1,000 test images, with k draws.
BOUND = dict(images=1000, ks=(1, 10, 100, 1000, 5000), seed=0)


def bound_table(models, results_dir=None):
    """Per model (record, VAE) and k: test VFE, the importance-weighted NLL estimate on the first
    images with its standard error, and the gap; read from results/bound.csv, which
    `python -m vae_helpers bound` makes. Nothing is written."""
    return bound_cache(models, results_folder(results_dir))


def make_bound(results_dir=None):
    """Keep the best Q4 model (from its weights) if it is not kept yet, then measure the bound of it
    and of every other kept model into results/bound.csv, those not stored there yet."""
    folder = results_folder(results_dir)
    _, q4 = experiment_table("q4", folder)  # a missing cell is an error naming its command
    best = min(q4, key=lambda r: r["best_test_vfe"])
    if not kept_path(best["settings"], folder).exists():
        keep_model(best, folder)
    best = best_model(q4, folder)
    others = [m for m in kept_models(folder) if m[0]["settings"] != best[0]["settings"]]
    return bound_cache([best] + others, folder, make=True)


def bound_cache(models, folder, make=False):
    parts = {cell_name(r["settings"]): dict(settings=r["settings"], **BOUND) for r, _ in models}
    by_name = {cell_name(r["settings"]): (r, m) for r, m in models}
    compute = (lambda name: (bound_rows(*by_name[name]), {})) if make else None
    return cached_table(folder / "bound.csv", parts, compute)


def bound_rows(rec, model):
    s, x = rec["settings"], load_data()[1][: BOUND["images"]]
    vfe = eval_vfe(model, s, x)
    return [
        dict(
            hidden_dim=s["hidden"],
            latent_dim=s["latent"],
            active_units=rec["active_units"],
            test_vfe=vfe,
            **row,
            gap=vfe - row["nll"],
        )
        for row in iwae_nll(model, x, BOUND["ks"], BOUND["seed"])
    ]


def trained_model(s, results_dir=None):
    """A trained cell's VAE (float32, eval mode) from its kept final weights: results/models/, or
    results/weights/ (local, not committed)."""
    folder = results_folder(results_dir)
    if kept_path(s, folder).exists():
        return kept_model(kept_path(s, folder))[1].float()
    path = weights_path(s, folder)
    if not path.exists():
        raise ResultsError(
            f"no weights of {cell_name(s)}.json in {folder}: train its cell again to keep them"
        )
    return vae_with(cell_weights(s, folder), s, path).float().eval()
