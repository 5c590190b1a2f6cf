"""Q7's bias and variance, measured over disjoint training sets (Geman et al. 1992)."""

import numpy as np

from .data import load_data
from .experiments import experiment_cells, stored_records
from .model import X_DIM
from .plots import VFE_LABEL
from .store import ResultsError, cached_table, cell_path, load_npz, recons_path, results_folder


def bias_variance(x, recons):
    """Geman et al. (1992): K models' squared reconstruction errors of images x (n, 784), from their
    reconstructions (K, n, 784), split image by image into bias^2 = |x - mean_k r_k|^2 and
    variance = mean_k |r_k - mean_k r_k|^2; mse = bias2 + variance exactly (float64)."""
    r, x = np.asarray(recons, np.float64), np.asarray(x, np.float64)
    mean = r.mean(0)
    return dict(
        mse=((r - x) ** 2).sum(-1).mean(0),
        bias2=((mean - x) ** 2).sum(-1),
        variance=((r - mean) ** 2).sum(-1).mean(0),
    )


def bias_variance_runs(records):
    """{hidden: (the disjoint training sets' records, set 0's seeds' records)} of
    q7_bias_variance."""
    out = {}
    for r in sorted(
        records, key=lambda r: (r["settings"].get("train_offset", 0), r["settings"]["seed"])
    ):
        s = r["settings"]
        sets, seeds = out.setdefault(s["hidden"], ([], []))
        if s["seed"] == s.get("train_offset", 0) // s["train_size"]:
            sets.append(r)
        if s.get("train_offset", 0) == 0:
            seeds.append(r)
    return out


def at_epoch(rec, field, which):
    """A record's list `field` at its final evaluation or at its best-validation epoch."""
    i = -1 if which == "final" else rec["eval_epochs"].index(rec["best_val_epoch"])
    return rec[field][i]


def unbiased(split, k):
    """The split with the k-model mean's own noise moved out of bias^2: variance * k / (k - 1) and
    bias^2 - variance / (k - 1) estimate an infinite ensemble's; their sum is unchanged."""
    return dict(
        mse=split["mse"],
        bias2=split["bias2"] - split["variance"] / (k - 1),
        variance=split["variance"] * k / (k - 1),
    )


def jackknife_se(estimates):
    """The jackknife standard error from the leave-one-out estimates of a statistic."""
    e = np.asarray(estimates, np.float64)
    return float(np.sqrt((len(e) - 1) / len(e) * ((e - e.mean()) ** 2).sum()))


def reconstructions(records, which, results_dir):
    """The records' stored test reconstructions at the final or best-validation epoch, in [0, 1]."""
    return (
        np.stack([load_npz(recons_path(r["settings"], results_dir))[which] for r in records]) / 255
    )


def bias_variance_table(records, results_dir=None):
    """Per width and epoch (final, best validation): bias^2 and variance over the disjoint training
    sets (unbiased for an infinite ensemble; `_raw`: the exact split of the K models), the seed's
    part (set 0's seeds), jackknife standard errors over the training sets (`_jse`), and the test
    VFE, reconstruction and KL across sets. Read from results/bias_variance.csv, which
    `python -m vae_helpers bias_variance` makes (per-image values beside it, in .npz, for
    bias_variance_step). Nothing is written."""
    return split_table(records, results_folder(results_dir))


def make_bias_variance(results_dir=None):
    """Split q7_bias_variance's stored reconstructions into results/bias_variance.csv and .npz, the
    widths not stored there yet; a width whose cells are unchanged needs its reconstructions no
    more."""
    folder = results_folder(results_dir)
    return split_table(stored_records("q7_bias_variance", folder)[0], folder, make=True)


def split_table(records, folder, make=False):
    widths = {
        f"h{h}": runs for h, runs in sorted(bias_variance_runs(complete(records, folder)).items())
    }
    parts = {
        name: dict(sets=[r["settings"] for r in a], seeds=[r["settings"] for r in b])
        for name, (a, b) in widths.items()
    }
    compute = (lambda name: width_split(*widths[name], folder)) if make else None
    return cached_table(folder / "bias_variance.csv", parts, compute, arrays=True)


def complete(records, folder):
    """The records, if no cell of q7_bias_variance is missing among them; else an error naming one
    and the command that trains it."""
    have = [r["settings"] for r in records]
    missing = [s for s in experiment_cells("q7_bias_variance") if s not in have]
    if missing:
        raise ResultsError(
            f"{cell_path(missing[0], folder)} is missing ({len(missing)} of the cells of "
            f"q7_bias_variance are): train them with `.venv/bin/python -m vae_helpers "
            f"q7_bias_variance --results {folder}`, then run this again"
        )
    return records


def width_split(sets, seeds, folder):
    """One width's rows (final and best-validation epoch) and per-image arrays."""
    s0, K, S = sets[0]["settings"], len(sets), len(seeds)
    x = load_data(s0["dataset"])[1][: s0["recon_images"]].numpy()
    rows, images = [], {}
    for which in ("final", "best_val"):
        r_sets = reconstructions(sets, which, folder)
        raw = bias_variance(x, r_sets)
        d = unbiased(raw, K)
        seed = unbiased(bias_variance(x, reconstructions(seeds, which, folder)), S)
        drops = [unbiased(bias_variance(x, np.delete(r_sets, i, 0)), K - 1) for i in range(K)]
        for k in d:
            images[f"{which}_{k}"] = d[k]
            images[f"{which}_{k}_drop"] = np.stack([dr[k] for dr in drops])
        vfe = np.array([at_epoch(r, "test_vfe", which) for r in sets])
        rows.append(
            dict(
                hidden_dim=s0["hidden"],
                n_params=sets[0]["n_params"],
                of_line=sets[0]["n_params"] / (s0["train_size"] * X_DIM),
                epoch=which,
                sets=K,
                seeds=S,
                **{k: d[k].mean() for k in ("bias2", "variance")},
                total=d["mse"].mean(),
                **{
                    f"{k.replace('mse', 'total')}_jse": jackknife_se([dr[k].mean() for dr in drops])
                    for k in ("bias2", "variance", "mse")
                },
                variance_seed=seed["variance"].mean(),
                bias2_raw=raw["bias2"].mean(),
                variance_raw=raw["variance"].mean(),
                identity_error=float(np.abs(raw["mse"] - raw["bias2"] - raw["variance"]).max()),
                mse_unquantised=float(np.mean([r[f"recon_mse_{which}"] for r in sets])),
                test_vfe=vfe.mean(),
                test_vfe_sd=vfe.std(ddof=1),
                test_recon=float(np.mean([at_epoch(r, "test_recon", which) for r in sets])),
                test_kl=float(np.mean([at_epoch(r, "test_kl", which) for r in sets])),
                val_epoch=float(np.mean([r["best_val_epoch"] for r in sets])),
                best_on_test=float(np.mean([r["best_test_vfe"] for r in sets])),
                diverged=sum("diverged_epoch" in r for r in sets + seeds),
            )
        )
    return rows, images


def bias_variance_step(a, b, which="final", results_dir=None):
    """Width b minus width a in mse, bias2 and variance (unbiased): (mean, jackknife standard error
    over the training sets, standard error over the test images, paired image by image)."""
    images = load_npz(results_folder(results_dir) / "bias_variance.npz")
    out = {}
    for k in ("mse", "bias2", "variance"):
        d = images[f"h{b}_{which}_{k}"] - images[f"h{a}_{which}_{k}"]
        drops = (images[f"h{b}_{which}_{k}_drop"] - images[f"h{a}_{which}_{k}_drop"]).mean(1)
        out[k] = (float(d.mean()), jackknife_se(drops), float(d.std(ddof=1) / np.sqrt(len(d))))
    return out


def bias_variance_curves(table, axes, n=1_000):
    """Three panels against parameters, final epoch solid and best-validation epoch dashed, error
    bars the jackknife standard errors over the training sets: bias^2 and their sum; the variance
    and the seed's part of it; the test VFE across training sets (sd)."""
    # (panel, column, its error, marker, colour, label): the error bars of each epoch
    bars = [
        (0, "total", "total_jse", "o", "C0", "bias² + variance, {when}"),
        (0, "bias2", "bias2_jse", "s", "C1", "bias², {when}"),
        (1, "variance", "variance_jse", "o", "C2", "variance over {sets} training sets, {when}"),
        (2, "test_vfe", "test_vfe_sd", "o", "C3", "test VFE at the {when}"),
    ]
    for which, ls in (("final", "-"), ("best_val", "--")):
        t = table[table.epoch == which].sort_values("n_params")
        when = "final epoch" if which == "final" else "best-validation epoch"
        for panel, col, err, marker, colour, text in bars:
            axes[panel].errorbar(
                t.n_params,
                t[col],
                t[err],
                fmt=marker + ls,
                color=colour,
                label=text.format(when=when, sets=t.sets.max()),
                capsize=3,
                ms=5,
            )
            if col == "variance":  # the seed's part beside it, in the same panel
                axes[1].plot(
                    t.n_params,
                    t.variance_seed,
                    "^" + ls,
                    color="C4",
                    label=f"variance over {t.seeds.max()} seeds on one set, {when}",
                )
    t = table[table.epoch == "final"].sort_values("n_params")
    axes[2].plot(
        t.n_params,
        t.best_on_test,
        "k:",
        marker="x",
        label="best test VFE (epoch chosen on the test set)",
    )
    titles = [
        "Squared error of 1,000 test reconstructions",
        "Its variance part (own scale)",
        "Test VFE, mean and sd over the training sets",
    ]
    ylabels = ["squared error (nats per image)", "variance (nats per image)", VFE_LABEL]
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.axvline(n * X_DIM, color="k", ls="--", lw=1, label=f"N x 784 = {n * X_DIM:,}")
        ax.set(
            xscale="log",
            xlabel="total trainable parameters (count, log scale)",
            ylabel=ylabel,
            title=title,
        )
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    return axes
