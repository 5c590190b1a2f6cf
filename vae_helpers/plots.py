"""Figures: heatmaps, curves against size, learning curves, image grids, and `show`, which puts a
figure in the notebook as a PNG with its alternative text."""

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
):
    """Rows: hidden size; columns: latent size; every cell annotated with its value. With `vmax`,
    the colours stop there (cells above it drawn in the top colour, marked ">"), so that the range
    the text argues about gets the whole scale."""
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
    for r in records:
        s = r["settings"]
        gone = f", diverged in epoch {r['diverged_epoch']}" if "diverged_epoch" in r else ""
        seed = f", seed {s['seed']}" if s["seed"] else ""
        (line,) = ax.plot(r["eval_epochs"], r["test_vfe"], label=f"h={s['hidden']}{seed}{gone}")
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
    images over an n x n grid of the plane (Kingma and Welling 2014, figure 4)."""
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
        xlim=(-span, span),
        ylim=(-span, span),
    )
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
