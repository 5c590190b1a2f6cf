"""The study as data: the course's protocol, each cell's settings, every experiment's cells, and
the tables gathered from their stored records."""

import numpy as np

from .model import X_DIM, n_params_formula
from .runner import run_cells
from .settings import OPTIONS, cell_settings
from .store import ResultsError, atomic_save, results_folder, save_csv, stored_and_missing


def grid(hiddens, latents, **overrides):
    return [cell_settings(h, l, **overrides) for h in hiddens for l in latents]


Q4_HIDDEN, Q4_LATENT = [5, 50, 200, 500], [5, 10, 100, 300]

Q5_HIDDEN, Q5_LATENT = [2**k for k in range(7, 11)], [2**k for k in range(1, 9)]

# Chosen by the q6_sweep (the notebook's section 6 gives the reason, with its numbers).
Q6_WEIGHT_DECAY = 1.0

# The last three, with (1024, 8), are the Q5 contrasts the text argues from: l = 8 against 16,
# and h = 512 against 1024.
SEED_CELLS = [(50, 10), (200, 10), (500, 10), (1024, 8), (512, 8), (512, 16), (1024, 16)]

# Q7's wide models, at the latent size Q4 found best, on both sides of 60,000 x 784 values: two
# below (P(2000, 10) and P(3200, 10)) and three above (h = 4500, 4750, 5000). Seeds 1 and 2 of
# h = 5000 ask whether what happens there is the width or the seed (section 7 reports it).
Q7_LATENT = 10

Q7_WIDE = [cell_settings(h, Q7_LATENT) for h in (2000, 3200, 4500, 4750, 5000)] + [
    cell_settings(5000, Q7_LATENT, seed=seed) for seed in (1, 2)
]

# Q7 with the line moved down: the first N training images, so the line N x 784 falls where
# models are cheap and over-fitting shows. P(h, 10) passes 784,000 at h = 343 and 7,840,000 at
# h = 1,619; each size reaches 10 times past its line. {N: (epochs, eval_every, seeds)}.
Q7_DATA_HIDDEN = [10, 50, 150, 300, 500, 1000, 2000, 4000, 6000]

Q7_DATA = {1_000: (400, 10, (0, 1, 2)), 10_000: (100, 2, (0,))}

# At 10,000 images h = 50 and 300 are left out: four models below the line are enough.
# Bias and variance over training sets (Geman et al. 1992; Neal et al. 2018): K disjoint sets of
# 1,000 images (set k: images 1,000k on, trained with seed k), and seeds 1 and 2 on set 0 for the
# part of the variance that comes from the seed (initial weights, data order, noise). As q7_data
# at N = 1,000, plus a validation VFE on the last 5,000 training images and the reconstructions
# of the first 1,000 test images.
Q7_BV_HIDDEN = [10, 50, 150, 300, 500, 1000, 2000]

Q7_BV_SETS = 5

Q7_BV = dict(train_size=1_000, epochs=400, eval_every=10, val_size=5_000, recon_images=1_000)


# Two widths past the line (h = 4750 and 5000, 1.12 and 1.23 x); one such cell takes hours of
# a 2-core CPU.
Q7_SCALED_HIDDEN = [5, 50, 200, 500, 2000, 4750, 5000]


def scaled_rate(h):
    """Q7's one recipe: the course's rate up to h = 500, past it the h x h layers' x 500 / h."""
    return dict(hh_lr_scale=500 / h) if h > 500 else {}


def q7_bias_variance_cells():
    sets = [dict(train_offset=1_000 * k, seed=k) for k in range(Q7_BV_SETS)]
    runs = sets + [dict(train_offset=0, seed=seed) for seed in (1, 2)]
    return [cell_settings(h, Q7_LATENT, **Q7_BV, **run) for h in Q7_BV_HIDDEN for run in runs]


EXPERIMENTS = {
    "q4": lambda: grid(Q4_HIDDEN, Q4_LATENT),
    "q5": lambda: grid(Q5_HIDDEN, Q5_LATENT),
    "q6": lambda: grid(Q4_HIDDEN, Q4_LATENT, weight_decay=Q6_WEIGHT_DECAY),
    "q7": lambda: grid(Q4_HIDDEN, Q4_LATENT) + Q7_WIDE,
    "q7_data": lambda: [
        cell_settings(h, Q7_LATENT, train_size=n, epochs=e, eval_every=k, seed=seed)
        for n, (e, k, seeds) in Q7_DATA.items()
        for seed in seeds
        for h in Q7_DATA_HIDDEN
        if n == 1_000 or h not in (50, 300)
    ],
    "q7_bias_variance": q7_bias_variance_cells,
    # Is the wide models' deficit Adam's step size? Their h x h layers' rate scaled by 500 / h.
    "q7_lr_scale": lambda: [cell_settings(h, Q7_LATENT, hh_lr_scale=500 / h) for h in (2000, 4500)],
    # Q7's full-data curve with one recipe at every width and on one device (the CPU): the
    # protocol up to h = 500 (Q4's cells), the h x h layers' rate scaled by 500 / h past it.
    "q7_scaled": lambda: [
        cell_settings(h, Q7_LATENT, device="cpu", **scaled_rate(h)) for h in Q7_SCALED_HIDDEN
    ],
    # Is the rise past the line at 10,000 images the optimiser too? Its h = 2000 cell, width-scaled.
    "q7_data_lr_scale": lambda: [
        cell_settings(
            2000, Q7_LATENT, train_size=10_000, epochs=100, eval_every=2, hh_lr_scale=0.25
        )
    ],
    # Choosing Q6's weight decay on a small and a large Q4 cell.
    "q6_sweep": lambda: [
        cell_settings(h, 10, weight_decay=wd)
        for h in (50, 500)
        for wd in (0.0, 0.01, 0.1, 1.0, 10.0)
    ],
    # Seed-to-seed spread: a small, two middle and the largest well-performing cell, seeds 0-2.
    "seeds": lambda: [cell_settings(h, l, seed=seed) for h, l in SEED_CELLS for seed in (0, 1, 2)],
    # Does bfloat16 training reach the float32 VFE (within 0.1 nats) on Q5's best cell?
    "bf16_check": lambda: [cell_settings(1024, 8, precision=p) for p in ("float32", "bfloat16")],
    # What the course's Gaussian (squared-error) decoder does against a Bernoulli one.
    "recon": lambda: [cell_settings(200, 100, recon=r, epochs=5) for r in ("mse", "bernoulli")],
    # Four Q4 cells trained again, each alone rather than in its group, into a store of their own.
    "repro": lambda: [cell_settings(h, l) for h, l in ((5, 10), (50, 10), (200, 100), (500, 10))],
}

# Experiments stored in a folder of their own inside the results folder: their cells have the
# names of cells in the main store, which they are compared with.
OWN_FOLDER = {"repro": "repro"}


def experiment_folder(name, results_dir=None):
    """Where an experiment's cells are stored: the results folder, or its own folder inside it."""
    folder = results_folder(results_dir)
    return folder / OWN_FOLDER[name] if name in OWN_FOLDER else folder


def experiment_cells(name, epochs=None, max_params=None, min_params=0):
    """An experiment's cells, each trained `epochs` long if given, those of the size asked for."""
    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)} or 'all'"
        )
    cells = EXPERIMENTS[name]()
    if epochs is not None:
        cells = [cell_settings(**dict(s, epochs=epochs)) for s in cells]
    high = float("inf") if max_params is None else max_params
    return [s for s in cells if min_params <= n_params_formula(s["hidden"], s["latent"]) <= high]


def end_of_epoch(rec, epoch):
    """The end-of-epoch training VFE after `epoch` (-1: the last evaluated); NaN for older
    records."""
    if not rec.get("train_vfe"):
        return float("nan")
    i = -1 if epoch == -1 else rec["eval_epochs"].index(epoch)
    return round(rec["train_vfe"][i], 3)


def summary_table(records):
    """One row per cell: the columns of results/<name>.csv."""
    import pandas as pd

    rows = [
        dict(
            hidden_dim=r["settings"]["hidden"],
            latent_dim=r["settings"]["latent"],
            weight_decay=r["settings"]["weight_decay"],
            recon=r["settings"]["recon"],
            train_size=r["settings"]["train_size"],
            epochs=r["settings"]["epochs"],
            hh_lr_scale=round(r["settings"].get("hh_lr_scale", 1.0), 4),
            seed=r["settings"]["seed"],
            precision=r["settings"].get("precision", OPTIONS["precision"]),
            n_params=r["n_params"],
            best_test_vfe=round(r["best_test_vfe"], 3),
            best_epoch=r["best_epoch"],
            final_test_vfe=round(r["final_test_vfe"], 3),
            final_train_vfe=end_of_epoch(r, -1),
            best_epoch_train_vfe=end_of_epoch(r, r["best_epoch"]),
            final_running_train_vfe=round(r["running_train_vfe"][-1], 3),
            active_units=r["active_units"],
            wall_seconds=round(r["wall_seconds"], 1),
            device=r["device"],
        )
        for r in records
    ]
    table = pd.DataFrame(rows)
    if any("diverged_epoch" in r for r in records):  # only then, so other tables keep their columns
        table["diverged_epoch"] = pd.array(
            [r.get("diverged_epoch") for r in records], dtype="Int64"
        )
        # a diverged run has no final epoch: its last finite values would read as one
        final = ["final_test_vfe", "final_train_vfe", "final_running_train_vfe"]
        table.loc[table.diverged_epoch.notna().to_numpy(), final] = np.nan
    return table


def table_name(name, epochs=None):
    """The summary table's name: the experiment's, with _e<N> when its epochs are overridden."""
    return name if epochs is None else f"{name}_e{epochs}"


def run_experiment(
    name, results_dir=None, progress=True, epochs=None, max_params=None, min_params=0, jobs=1
):
    """Run or resume one question's grid, write results/<name>.csv, return (table, records).
    With `epochs`, every cell trains that long instead, and the table is <name>_e<epochs>.csv.
    With `max_params` or `min_params`, only the cells of that size train (a laptop takes the
    small ones, a GPU the large); the table holds every stored cell. `jobs`: worker processes."""
    store = experiment_folder(name, results_dir)
    run_cells(experiment_cells(name, epochs, max_params, min_params), store, progress, jobs)
    records = stored_and_missing(experiment_cells(name, epochs), store)[0]
    table = summary_table(records)
    atomic_save(table, results_folder(results_dir) / f"{table_name(name, epochs)}.csv", save_csv)
    return table, records


def experiment_records(name, results_dir=None):
    """Every record of an experiment, read from the store: nothing is trained or written. A
    missing cell is an error that names the command which trains it (and resumes, if stopped)."""
    records, missing = stored_records(name, results_dir)
    if missing:
        folder = results_folder(results_dir)
        raise ResultsError(
            f"{len(missing)} of the {len(records) + len(missing)} cells of {name} are not in "
            f"{experiment_folder(name, folder)}; train them with `.venv/bin/python -m vae_helpers "
            f"{name} --results {folder}` (it shows progress and resumes if stopped), then run "
            "this again"
        )
    return records


def experiment_table(name, results_dir=None):
    """An experiment's table and records (experiment_records: every cell, or an error)."""
    records = experiment_records(name, results_dir)
    return summary_table(records), records


def stored_records(name, results_dir=None):
    """The stored records of an experiment's cells (training nothing), and the settings it still
    lacks."""
    return stored_and_missing(experiment_cells(name), experiment_folder(name, results_dir))


def by_size(table, running=False):
    """Per training-set size and hidden size: the mean and seed-to-seed sd (missing for one seed) of
    each VFE column over the finished runs; `diverged` counts the runs left out because they
    diverged. With `running`, older records' running mean stands in for the end-of-epoch training
    VFE."""
    import pandas as pd

    table = table.copy()
    if running:
        table["final_train_vfe"] = table.final_running_train_vfe
    gone = (
        table.diverged_epoch.notna()
        if "diverged_epoch" in table
        else pd.Series(False, index=table.index)
    )
    keys = ["train_size", "hidden_dim", "n_params"]
    cols = [
        "best_test_vfe",
        "final_test_vfe",
        "final_train_vfe",
        "best_epoch_train_vfe",
        "best_epoch",
    ]
    g = table[~gone].groupby(keys)[cols]
    out = g.mean().join(g.std().add_suffix("_sd")).join(g.size().rename("seeds"))
    out = out.join(table[gone].groupby(keys).size().rename("diverged"), how="outer")
    if "device" in table:
        out = out.join(
            table.groupby(keys).device.agg(lambda d: ", ".join(sorted(set(d)))).rename("devices")
        )
    out = out.reset_index()
    out[["seeds", "diverged"]] = out[["seeds", "diverged"]].fillna(0).astype(int)
    out["running"] = running
    out["of_line"] = out.n_params / (out.train_size * X_DIM)
    out["gap"] = (
        out.final_test_vfe - out.final_train_vfe
    )  # both measured after the last epoch, alike
    return out


def seed_contrast(table, a, b, value="best_test_vfe", spread=None):
    """Cell b minus cell a, each (hidden, latent), paired seed by seed (the seed fixes the data
    order): the per-seed differences, their mean and the mean's standard error. That error comes
    from `spread`, the sd of one seed's difference pooled over contrasts, when given: three seeds
    alone leave it two degrees of freedom."""
    per_seed = table.pivot_table(index=["hidden_dim", "latent_dim"], columns="seed", values=value)
    d = per_seed.loc[b] - per_seed.loc[a]
    sd = d.std() if spread is None else spread
    return d, float(d.mean()), float(sd / np.sqrt(len(d)))
