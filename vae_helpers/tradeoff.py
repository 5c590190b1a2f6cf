"""Q7's bias and variance, measured over disjoint training sets (Geman et al. 1992)."""

import json
from pathlib import Path

import numpy as np

from .data import load_data
from .model import X_DIM
from .plots import VFE_LABEL
from .store import RESULTS_DIR, atomic_save, recons_path, save_csv, save_npz, write_json


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


def reconstructions(records, which, results_dir=RESULTS_DIR):
    """The records' stored test reconstructions at the final or best-validation epoch, in [0, 1]."""
    return (
        np.stack([np.load(recons_path(r["settings"], results_dir))[which] for r in records]) / 255
    )


def bias_variance_table(records, results_dir=RESULTS_DIR, path=RESULTS_DIR / "bias_variance.csv"):
    """Per width and epoch (final, best validation): bias^2 and variance over the disjoint training
    sets (unbiased for an infinite ensemble; `_raw`: the exact split of the K models), the seed's
    part (set 0's seeds), jackknife standard errors over the training sets (`_jse`), and the test
    VFE, reconstruction and KL across sets. Computed from the stored reconstructions and kept in
    `path`, with per-image values beside it for paired differences (bias_variance_step)."""
    import pandas as pd

    runs = bias_variance_runs(records)
    key = {
        str(h): sorted(json.dumps(r["settings"], sort_keys=True) for r in a + b)
        for h, (a, b) in runs.items()
    }
    side, per_image = Path(path).with_suffix(".json"), Path(path).with_suffix(".npz")
    old, old_rows, old_images = {}, None, {}
    if all(
        p.exists() for p in (Path(path), side, per_image)
    ):  # a width whose cells are unchanged is kept
        old, old_rows, old_images = (
            json.loads(side.read_text()).get("widths", {}),
            pd.read_csv(path),
            np.load(per_image),
        )
    if old == key:
        return old_rows
    rows, images = [], {}
    for h, (sets, seeds) in sorted(runs.items()):
        if old.get(str(h)) == key[str(h)]:  # its reconstructions need not be here any more
            rows += old_rows[old_rows.hidden_dim == h].to_dict("records")
            images.update({k: old_images[k] for k in old_images.files if k.startswith(f"h{h}_")})
            continue
        s0, K, S = sets[0]["settings"], len(sets), len(seeds)
        x = load_data(s0["dataset"])[1][: s0["recon_images"]].numpy()
        for which in ("final", "best_val"):
            r_sets = reconstructions(sets, which, results_dir)
            raw = bias_variance(x, r_sets)
            d = unbiased(raw, K)
            seed = unbiased(bias_variance(x, reconstructions(seeds, which, results_dir)), S)
            drops = [unbiased(bias_variance(x, np.delete(r_sets, i, 0)), K - 1) for i in range(K)]
            for k in d:
                images[f"h{h}_{which}_{k}"] = d[k]
                images[f"h{h}_{which}_{k}_drop"] = np.stack([dr[k] for dr in drops])
            vfe = np.array([at_epoch(r, "test_vfe", which) for r in sets])
            rows.append(
                dict(
                    hidden_dim=h,
                    n_params=sets[0]["n_params"],
                    of_line=sets[0]["n_params"] / (s0["train_size"] * X_DIM),
                    epoch=which,
                    sets=K,
                    seeds=S,
                    **{k: d[k].mean() for k in ("bias2", "variance")},
                    total=d["mse"].mean(),
                    **{
                        f"{k.replace('mse', 'total')}_jse": jackknife_se(
                            [dr[k].mean() for dr in drops]
                        )
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
    table = pd.DataFrame(rows)
    atomic_save(images, per_image, save_npz)
    atomic_save(table, path, save_csv)
    atomic_save(dict(widths=key), side, write_json)
    return table


def bias_variance_step(a, b, which="final", path=RESULTS_DIR / "bias_variance.npz"):
    """Width b minus width a in mse, bias2 and variance (unbiased): (mean, jackknife standard error
    over the training sets, standard error over the test images, paired image by image)."""
    images = np.load(path)
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
