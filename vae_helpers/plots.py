"""Figures: heatmaps, curves against size, learning curves, image grids, and `show`, which puts a
figure in the notebook as a PNG with its alternative text."""

from itertools import groupby

import numpy as np
import torch

from .data import FASHION_CLASSES, TRAIN_VALUES
from .model import X_DIM, like

VFE_LABEL = "test VFE (nats per image)"


def heatmap(
    table,
    title,
    value="best_test_vfe",
    label=VFE_LABEL,
    ax=None,
    fmt=".2f",
    cmap="viridis",
    center=None,
    vmax=None,
    vmin=None,
):
    """Rows: hidden size; columns: latent size; every cell annotated with its value. With `vmax`,
    the colours stop there (cells above it drawn in the top colour, marked ">"), so that the range
    the text argues about gets the whole scale; `vmin` sets the bottom, so that two heatmaps can
    share one colour range."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid_ = table.pivot(index="hidden_dim", columns="latent_dim", values=value)
    ax = ax or plt.subplots(figsize=(1.2 * grid_.shape[1] + 2.5, 0.8 * grid_.shape[0] + 1.5))[1]
    text = grid_.map(lambda x: format(x, fmt) + (" >" if vmax is not None and x > vmax else ""))
    label += (
        f"; colours clipped at {vmax:g} (cells marked >)"
        if vmax is not None and (grid_ > vmax).any().any()
        else ""
    )
    sns.heatmap(
        grid_,
        annot=text,
        fmt="",
        cmap=cmap,
        center=center,
        vmax=vmax,
        vmin=vmin,
        ax=ax,
        cbar_kws={"label": label},
    )
    ax.set_xlabel("latent dimension l (units)")
    ax.set_ylabel("hidden dimension h (units)")
    ax.set_title(title)
    return ax


def vfe_vs_params(table, title, ax=None):
    """Best test VFE against total trainable parameters, with the training-data line."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 5))[1]
    gone = (
        table["diverged_epoch"].notna().to_numpy()
        if "diverged_epoch" in table
        else np.zeros(len(table), bool)
    )
    for l, rows in table[~gone].groupby("latent_dim"):
        ax.plot(rows["n_params"], rows["best_test_vfe"], "o", label=f"latent l = {l}")
    if gone.any():
        ax.plot(
            table.n_params[gone],
            table.best_test_vfe[gone],
            "kx",
            ms=9,
            zorder=3,
            label="diverged (best of the epochs before it)",
        )
    wide = (
        table[table.hidden_dim > 500].sort_values("best_test_vfe")
        if "hidden_dim" in table
        else table[:0]
    )
    for i, (_, r) in enumerate(
        wide.iterrows()
    ):  # the wide models, named; the crosses' labels fanned out
        out = gone[table.index.get_loc(r.name)]
        ax.annotate(
            f"h={r.hidden_dim}" + (f", seed {r.seed}" if r.seed else ""),
            (r.n_params, r.best_test_vfe),
            textcoords="offset points",
            xytext=(10, 12 * i - 40) if out else (-6, 6),
            fontsize=7,
            ha="left" if out else "right",
            arrowprops=dict(arrowstyle="-", lw=0.5) if out else None,
        )
    ax.axvline(
        TRAIN_VALUES,
        color="k",
        ls="--",
        label=f"training data: 60,000 x 784 = {TRAIN_VALUES:,} values",
    )
    ax.axvline(60_000, color="grey", ls=":", label="training data: 60,000 images")
    ax.set_xscale("log")
    ax.set_xlabel("total trainable parameters (count, log scale)")
    ax.set_ylabel("best " + VFE_LABEL)
    ax.set_title(title)
    ax.margins(x=0.12)  # room for the names of the outermost models
    ax.legend(
        fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2
    )  # below: no point hidden
    return ax


def capacity_curves(summary, axes, diverged=None):
    """Left: best and final test VFE and the end-of-epoch training VFE against parameters, one
    colour per training-set size, its line N x 784 in that colour; `diverged` (summary_table rows)
    drawn as crosses at the best test VFE of the epochs before. Right: the final test-minus-training
    gap against parameters over the line. Curves join finished runs only."""
    import matplotlib.pyplot as plt

    left, right = axes
    colours = dict(zip(sorted(summary.train_size.unique()), plt.cm.tab10.colors))
    for n, rows in diverged.groupby("train_size") if diverged is not None else []:
        left.plot(
            rows.n_params,
            rows.best_test_vfe,
            "X",
            ms=10,
            mec="k",
            color=colours.get(n, "k"),
            zorder=4,
            label=f"N = {n:,}: diverged (in epoch {', '.join(map(str, rows.diverged_epoch))})",
        )
    for n, rows in summary[summary.seeds > 0].groupby("train_size"):
        colour = colours[n]
        kw, running = dict(color=colour, capsize=3), bool(rows.running.all())
        train = ("x:", "final training (running mean)") if running else ("^:", "final training")
        for col, style, what in [
            ("best_test_vfe", "o-", "best test"),
            ("final_test_vfe", "s--", "final test"),
            ("final_train_vfe", *train),
        ]:
            left.errorbar(
                rows.n_params,
                rows[col],
                rows[col + "_sd"],
                fmt=style,
                label=f"N = {n:,}: {what}",
                **kw,
            )
        left.axvline(n * X_DIM, color=colour, lw=1, alpha=0.6)
        seeds = int(rows.seeds.max())
        right.errorbar(
            rows.of_line,
            rows.gap,
            np.hypot(rows.final_test_vfe_sd, rows.final_train_vfe_sd),
            fmt="x--" if running else "o-",
            label=f"N = {n:,} ({seeds} seed{'s' * (seeds > 1)})"
            + (", against the running mean" if running else ""),
            **kw,
        )
    right.axvline(1, color="k", ls="--", lw=1, label="the line: parameters = N x 784")
    left.set(
        xscale="log",
        xlabel="total trainable parameters (count, log scale)",
        ylabel="VFE (nats per image)",
        title="Q7: VFE against model size for N training images\n"
        "(vertical line: N x 784 in the curve's colour)",
    )
    right.set(
        xscale="log",
        xlabel="parameters / (N x 784) (ratio, log scale)",
        ylabel="final test minus training VFE (nats per image)",
        title="Generalisation gap after the last epoch\n"
        "(test minus end-of-epoch training VFE, unless marked)",
    )
    left.legend(
        fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13)
    )  # below: no data hidden
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return axes


def learning_curves(records, title, ax=None):
    """Test (solid) and training (dashed) VFE per epoch for each record."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 5))[1]
    drawn = {"-"}  # the legend names only the kinds of line drawn
    for r in records:
        s = r["settings"]
        gone = f", diverged in epoch {r['diverged_epoch']}" if "diverged_epoch" in r else ""
        seed = f", seed {s['seed']}" if s["seed"] else ""
        (line,) = ax.plot(r["eval_epochs"], r["test_vfe"], label=f"h={s['hidden']}{seed}{gone}")
        drawn.add("--" if r.get("train_vfe") else ":")
        if r.get("train_vfe"):  # measured like the test VFE
            ax.plot(r["eval_epochs"], r["train_vfe"], ls="--", color=line.get_color())
        else:  # older records: the running mean of the epoch's mini-batch VFEs
            ax.plot(
                range(1, len(r["running_train_vfe"]) + 1),
                r["running_train_vfe"],
                ls=":",
                color=line.get_color(),
            )
    from matplotlib.lines import Line2D

    styles = [
        Line2D([], [], color="grey", ls=ls, label=what)
        for ls, what in [
            ("-", "test VFE"),
            ("--", "training VFE (end of epoch)"),
            (":", "training VFE (running mean)"),
        ]
        if ls in drawn
    ]
    ax.set_xlabel("epoch (passes over the training images)")
    ax.set_ylabel("VFE (nats per image)")
    ax.set_title(title)
    ax.legend(
        handles=ax.get_legend_handles_labels()[0] + styles,
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )  # beside the axes: the curves stay visible
    return ax


def image_grid(images, title, path=None, nrow=8, ax=None):
    """Show (and optionally save) images of shape (n, 784) as one grid."""
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid, save_image

    images = images.detach().reshape(-1, 1, 28, 28).cpu()
    if path is not None:
        save_image(images, path, nrow=nrow)
    ax = ax or plt.subplots(figsize=(6, 6 * ((len(images) + nrow - 1) // nrow) / nrow))[1]
    ax.imshow(make_grid(images, nrow=nrow, pad_value=1).permute(1, 2, 0))
    ax.set_title(title)
    ax.axis("off")
    return ax


def show(alt, fig=None):
    """Display a figure as an image/png output with alternative text in its metadata (read by
    nbconvert's templates and nbsphinx) and as text/plain; then close it."""
    import base64
    import io

    import matplotlib.pyplot as plt
    from IPython.display import display

    fig = fig or plt.gcf()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=fig.dpi, metadata={"Software": None})
    plt.close(fig)
    display(
        {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": f"<figure: {alt}>"},
        metadata={"image/png": {"alt": alt}},
        raw=True,
    )


def latent_plane(model, x, labels, axes, n=15, span=3.0):
    """A 2-unit model: the test images' posterior means coloured by class, and the decoder's
    images over an n x n grid of the plane (the latter as Kingma and Welling 2014 drew it)."""
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    with torch.no_grad():
        means = model.mean(model.encoder(like(model, x))).numpy()
    left, right = axes
    colours = plt.cm.tab10.colors
    for c, name in enumerate(FASHION_CLASSES):
        at = labels.numpy() == c
        left.scatter(means[at, 0], means[at, 1], s=2, color=colours[c], label=name)
    left.set(
        xlabel="latent unit 1 (posterior mean)",
        ylabel="latent unit 2 (posterior mean)",
        title="Test images' codes, coloured by class",
    )
    lim = max(span, 1.05 * float(np.abs(means).max()))  # every code in view, however far out
    left.set(xlim=(-lim, lim), ylim=(-lim, lim))
    left.add_patch(
        plt.Rectangle((-span, -span), 2 * span, 2 * span, fill=False, ls="--", color="0.4")
    )  # the region the decoder's grid (right) covers
    left.legend(
        markerscale=5, fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12)
    )  # off the points
    u = torch.linspace(-span, span, n)
    z = torch.stack(torch.meshgrid(u, u.flip(0), indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        images = model.decode(like(model, z)).reshape(-1, 1, 28, 28)
    right.imshow(
        make_grid(images, nrow=n, padding=0).permute(1, 2, 0).numpy(),
        extent=(-span, span, -span, span),
    )
    right.set(
        xlabel="latent unit 1",
        ylabel="latent unit 2",
        title=f"Decoder over a {n} x {n} grid of the plane",
    )
    return axes


def vfe_limits(*tables, leave_out=None):
    """One colour range for heatmaps of test VFE: the tables' lowest to highest best or final
    value, rounded out to 0.1 nats, leaving out the rows where `leave_out` (column, value) holds
    (drawn clipped and marked)."""
    import pandas as pd

    rows = pd.concat(tables)
    if leave_out is not None:
        rows = rows[rows[leave_out[0]] != leave_out[1]]
    values = rows[["best_test_vfe", "final_test_vfe"]].to_numpy()
    return float(np.floor(values.min() * 10) / 10), float(np.ceil(values.max() * 10) / 10)


def best_and_final(table, name, limits):
    """Two heatmaps of a grid on the colour range `limits`: the best test VFE, and the test VFE
    after the last epoch."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    low, high = limits
    epochs = table.epochs.max()
    heatmap(table, f"{name}: best test VFE over {epochs} epochs", ax=axes[0], vmin=low, vmax=high)
    title = f"{name}: test VFE after the final ({epochs}th) epoch"
    heatmap(table, title, value="final_test_vfe", ax=axes[1], vmin=low, vmax=high)
    fig.tight_layout()
    return fig


def units_heatmap(table, name, ax, clip=None):
    """The active latent units of a grid, colours clipped at `clip` units."""
    title = f"{name}: active latent units (posterior-mean variance > 0.01)"
    label = "active latent units (count)"
    return heatmap(table, title, "active_units", label, ax, ".0f", "magma", vmax=clip)


def units_and_curves(table, records, name, latent=10, clip=10):
    """Left: a grid's active latent units; right: the VFE per epoch of its models at `latent`."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    units_heatmap(table, name, axes[0], clip)
    at = [r for r in records if r["settings"]["latent"] == latent]
    learning_curves(at, f"{name}: VFE per epoch at latent l = {latent}", ax=axes[1])
    axes[1].set_ylim(top=table[table.latent_dim == latent].best_test_vfe.max() + 15)
    fig.tight_layout()
    return fig


def best_and_units(table, name, limits):
    """Two heatmaps of a grid: the best test VFE on the colour range `limits`, and the active
    latent units."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    low, high = limits
    title = f"{name}: best test VFE over {table.epochs.max()} epochs"
    heatmap(table, title, ax=axes[0], vmin=low, vmax=high)
    units_heatmap(table, name, axes[1])
    fig.tight_layout()
    return fig


def decay_heatmaps(decayed, plain, limits):
    """Left: the grid with weight decay on the colour range `limits`; right: its best test VFE
    minus the same cell's without decay."""
    import matplotlib.pyplot as plt

    key = ["hidden_dim", "latent_dim"]
    both = decayed.merge(plain[key + ["best_test_vfe"]], on=key, suffixes=("", "_plain"))
    both["change"] = both.best_test_vfe - both.best_test_vfe_plain
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    wd, epochs = decayed.weight_decay.iloc[0], decayed.epochs.max()
    title = f"Q6: best test VFE, weight decay {wd:g}, {epochs} epochs"
    heatmap(decayed, title, ax=axes[0], vmin=limits[0], vmax=limits[1])
    label = "change in best test VFE (nats per image)"
    title = "Q6 minus Q4 (no weight decay), cell by cell"
    heatmap(both, title, "change", label, axes[1], cmap="coolwarm", center=0)
    fig.tight_layout()
    return fig


def sweep_figure(sweep):
    """Best test VFE against Adam's weight decay (log axis), one line per hidden size, with its
    value without decay as a dotted line (lambda = 0 has no place on a log axis)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (h, rows), colour in zip(sweep.groupby("hidden_dim"), ["C0", "C1", "C2", "C3"]):
        cell, decayed = f"h={h}, l={rows.latent_dim.iloc[0]}", rows[rows.weight_decay > 0]
        ax.plot(decayed.weight_decay, decayed.best_test_vfe, "o-", color=colour, label=cell)
        plain = rows[rows.weight_decay == 0].best_test_vfe.iloc[0]
        ax.axhline(plain, color=colour, ls=":", label=f"{cell} without weight decay (λ = 0)")
    ax.set(
        xscale="log",
        xlabel="Adam weight decay λ (log scale)",
        ylabel="best " + VFE_LABEL,
        title=f"Q6 sweep: weight decay against test VFE, {sweep.epochs.max()} epochs",
    )
    ax.legend()
    return fig


def bound_figure(bound):
    """The importance-weighted estimate of -log p(x) against k, one line per model, with error
    bars of its distance below the one-draw estimate."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (h, l), rows in bound.groupby(["hidden_dim", "latent_dim"]):
        ax.errorbar(rows.k, rows.nll, rows.below_k1_se, fmt="o-", capsize=3, label=f"h={h}, l={l}")
    ax.set(
        xscale="log",
        xlabel="importance samples k per image (log scale)",
        ylabel="estimated -log p(x) (nats per image,\ncourse's scale: 392 log(pi) removed)",
        title="Importance-weighted estimates settle as k grows (first 1,000 test images)",
    )
    ax.legend(fontsize=8)
    return fig


def code_figure(kls, lines, pairs, title):
    """Left: each latent unit's KL to the prior, sorted, one line per model (`kls`, by name);
    right: `lines`, rows of 11 images between the test images of each pair of classes `pairs`."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    for name, kl in kls.items():
        axes[0].plot(range(1, len(kl) + 1), kl, "o-", ms=3, label=name)
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="latent unit, sorted by its KL (rank, log scale)",
        ylabel="KL to the prior (nats per image, log scale)",
        title="Which latent units carry information",
    )
    axes[0].legend(fontsize=8)
    image_grid(lines, title, nrow=11, ax=axes[1])
    axes[1].axis("on")  # the rows named by their two classes
    axes[1].set_xticks([])
    names = [f"{FASHION_CLASSES[a]} to\n{FASHION_CLASSES[b]}" for a, b in pairs]
    axes[1].set_yticks([16 + 30 * i for i in range(len(pairs))], names, fontsize=8)
    fig.tight_layout()
    return fig


def plane_figure(model, x, labels, title):
    """latent_plane as a figure of its own, under `title`."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    latent_plane(model, x, labels, axes)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def one_recipe(records, recipe, device):
    """The records, each checked to be trained with `recipe(h)`'s settings on `device`: a curve
    drawn as one recipe never mixes in another's runs."""
    for r in records:
        s, want = r["settings"], recipe(r["settings"]["hidden"])
        got = {k: s.get(k, 1.0) for k in want or {"hh_lr_scale": 1.0}}
        if got != ({"hh_lr_scale": 1.0} if not want else want) or r["device"] != device:
            raise ValueError(
                f"h={s['hidden']} seed {s['seed']} was trained with {got} on {r['device']}, not "
                f"with this curve's recipe {want or 'the protocol'} on {device}"
            )
    return records


def last_epochs(rec, k=5):
    """The lowest and highest test VFE of a record's last k evaluated epochs."""
    tail = rec["test_vfe"][-k:]
    return min(tail), max(tail)


def hidden_of(rec):
    return rec["settings"]["hidden"]


def q7_full_data(scaled, protocol, ax, swing=0.5, names=True, other=(), grid=()):
    """Q7 as asked, at 60,000 images: best test VFE against parameters with the line. `scaled`:
    one recipe's records on one device, joined (open: the final epoch); `protocol`: the course's
    rate past h = 500, squares, crosses where a run diverged, and a bar over the last five epochs
    where the final test VFE is more than `swing` nats above the best; `names`: label the widths;
    `other`: the same recipe on another device, diamonds, not joined; `grid`: Q4's cells, every
    (h, l), as grey dots (the question re-reads them)."""
    if grid:
        x, y = zip(*((r["n_params"], r["best_test_vfe"]) for r in grid))
        ax.plot(x, y, ".", color="0.55", ms=7, label="Q4 grid, every (h, l): best", zorder=1)
    rows = sorted(scaled, key=lambda r: r["n_params"])
    p = [r["n_params"] for r in rows]
    ax.plot(p, [r["best_test_vfe"] for r in rows], "o-", color="C0", label="one recipe: best")
    ax.plot(
        p,
        [r["final_test_vfe"] for r in rows],
        "o",
        mfc="none",
        color="C0",
        ms=9,
        label="one recipe: final epoch",
    )
    for h, runs in groupby(sorted(protocol, key=lambda r: r["n_params"]), hidden_of):
        runs = list(runs)
        gone = [r["diverged_epoch"] for r in runs if r.get("diverged_epoch")]
        for r in runs:
            out = bool(r.get("diverged_epoch"))
            style = dict(ms=9, mec="k", color="C3", zorder=4) if out else dict(color="C1", ms=7)
            ax.plot(r["n_params"], r["best_test_vfe"], "X" if out else "s", **style)
            low, high = last_epochs(r)
            unstable = not out and r["final_test_vfe"] - r["best_test_vfe"] > swing
            if unstable:
                ax.vlines(r["n_params"], low, high, color="C1", lw=3, alpha=0.5)
            if unstable and names:
                ax.annotate(
                    f"h={h}: last 5 epochs\n{low:.2f} to {high:.2f}",
                    (r["n_params"], high),
                    xytext=(-8, -10),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                )
        if not names:
            continue
        r = runs[0]
        name = f"h={h}" + (f": diverged in epoch {', '.join(map(str, gone))}" if gone else "")
        ax.annotate(
            name,
            (r["n_params"], max(x["best_test_vfe"] for x in runs)),
            fontsize=7,
            xytext=(-6, 14 + 22 * (r["n_params"] > 55e6)) if gone else (0, 8),
            textcoords="offset points",
            ha="right" if gone else "center",
            arrowprops=dict(arrowstyle="-", lw=0.5) if gone else None,
        )
    for r in other:
        ax.plot(r["n_params"], r["best_test_vfe"], "D", mfc="none", color="C2", ms=8)
    if other:
        ax.plot(
            [], [], "D", mfc="none", color="C2", label=f"one recipe, {other[0]['device']}: best"
        )
    ax.plot([], [], "s", color="C1", label="course's rate, h > 500: best")
    ax.plot([], [], "X", color="C3", mec="k", ms=9, label="course's rate: diverged (best before)")
    ax.axvline(TRAIN_VALUES, color="k", ls="--", label=f"60,000 x 784 = {TRAIN_VALUES:,} values")
    ax.set(xscale="log", xlabel="total trainable parameters (count, log scale)", ylabel=VFE_LABEL)
    return ax


def q7_full_data_figure(scaled, protocol, zoom=(23.0, 26.0), other=(), grid=()):
    """Two panels of q7_full_data: every width, and the widths above a million parameters."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, title in zip(axes, ("every width", "above a million parameters, zoomed")):
        q7_full_data(scaled, protocol, ax, names=ax is axes[1], other=other, grid=grid)
        ax.set_title(f"Q7: test VFE against parameters, 60,000 images, 30 epochs\n({title})")
    axes[1].set(xlim=(1e6, 1e8), ylim=zoom)
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(1.1, -0.14), ncol=4)
    return fig


def capacity_figure(data, full):
    """capacity_curves for the moved line (`data`, q7_data's table) and the full-data curve of one
    recipe (`full`, whose older records hold only the running-mean training VFE); the moved line's
    diverged runs as crosses."""
    import matplotlib.pyplot as plt

    from .experiments import by_size

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    import pandas as pd

    curves = pd.concat([by_size(data), by_size(full, running=True)], ignore_index=True)
    capacity_curves(curves, axes, diverged=data[data.diverged_epoch.notna()])
    fig.tight_layout()
    return fig


def bias_variance_figure(table):
    """Q7's three bias-variance panels (bias_variance_curves) as one figure."""
    import matplotlib.pyplot as plt

    from .tradeoff import bias_variance_curves

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    bias_variance_curves(table, axes)
    fig.tight_layout()
    return fig
