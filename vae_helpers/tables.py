"""The notebook's tables and printed numbers: the noise rule and the contrasts it judges, each
question's key numbers, and the appendix's checks. Each returns a DataFrame or text to print, with
numbers at the precision the text quotes them."""

import json

import numpy as np

from .analysis import eval_vfe, unit_kl
from .data import TRAIN_VALUES
from .experiments import (
    EXPERIMENTS,
    OWN_FOLDER,
    Q7_LATENT,
    by_size,
    end_of_epoch,
    experiment_cells,
    experiment_records,
    scaled_rate,
    seed_contrast,
    stored_records,
    summary_table,
)
from .gaps import gap_difference, gap_row_of, overfit_split, stored_gaps
from .model import X_DIM, n_params_formula
from .stacked import groups
from .store import cell_path, load_cell, results_folder

RESOLVED = 3  # standard errors: the one rule by which every contrast in the notebook is judged

# The contrasts the three-seed runs measure, as (question, name, cell a, cell b), read b minus a.
SEED_CONTRASTS = [
    ("Q4", "h = 200 minus h = 500, l = 10", (500, 10), (200, 10)),
    ("Q5", "l = 16 minus l = 8, h = 512", (512, 8), (512, 16)),
    ("Q5", "l = 16 minus l = 8, h = 1024", (1024, 8), (1024, 16)),
    ("Q5", "h = 1024 minus h = 512, l = 8", (512, 8), (1024, 8)),
    ("Q5", "h = 1024 minus h = 512, l = 16", (512, 16), (1024, 16)),
    ("Q5", "h = 512, l = 8 minus h = 500, l = 10", (500, 10), (512, 8)),
    ("Q5", "h = 1024, l = 8 minus h = 500, l = 10", (500, 10), (1024, 8)),
]

VALUES = ("best_test_vfe", "final_test_vfe")


def resolved(d, se):
    """The rule: a difference d is resolved when it is at least RESOLVED standard errors."""
    return bool(abs(d) >= RESOLVED * se)


def _verdict(d, se):
    return "resolved" if resolved(d, se) else "not resolved"


def _signed(x, digits=3):
    return f"{x:+.{digits}f}"


def seed_spread(seeds, value="best_test_vfe"):
    """Each repeated cell's value seed by seed, with their mean, sd and range."""
    per_seed = seeds.pivot_table(index=["hidden_dim", "latent_dim"], columns="seed", values=value)
    return per_seed.assign(
        mean=per_seed.mean(axis=1),
        sd=per_seed.std(axis=1),
        range=per_seed.max(axis=1) - per_seed.min(axis=1),
    )


def pooled_spread(seeds, value="best_test_vfe", contrasts=SEED_CONTRASTS):
    """The sd of one seed's difference between two cells, pooled over the contrasts, and its
    degrees of freedom."""
    diffs = [seed_contrast(seeds, a, b, value)[0] for _, _, a, b in contrasts]
    dof = sum(len(d) - 1 for d in diffs)
    return float(np.sqrt(sum((len(d) - 1) * d.var() for d in diffs) / dof)), dof


def difference_se(spread, n_a=1, n_b=1):
    """The standard error of a difference between the means of n_a and n_b runs, given `spread`,
    the sd of one seed's difference: spread for two single runs, spread / sqrt(3) for three."""
    return spread * np.sqrt((1 / n_a + 1 / n_b) / 2)


def noise_rule(seeds, contrasts=SEED_CONTRASTS):
    """The rule's numbers for the best and the final test VFE: the pooled spread, its degrees of
    freedom, the standard errors it gives, and the smallest difference it calls resolved."""
    import pandas as pd

    columns = {}
    for value in VALUES:
        s, dof = pooled_spread(seeds, value, contrasts)
        one, three = difference_se(s), difference_se(s, 3, 3)
        columns[value.replace("_", " ").replace("vfe", "VFE")] = {
            "contrasts pooled": str(len(contrasts)),
            "degrees of freedom": str(dof),
            "sd of one seed's difference": f"{s:.3f}",
            "SE: two single runs": f"{one:.3f}",
            "SE: three seeds each": f"{three:.3f}",
            f"resolved from ({RESOLVED} SE): single runs": f"{RESOLVED * one:.3f}",
            f"resolved from ({RESOLVED} SE): three seeds": f"{RESOLVED * three:.3f}",
        }
    return pd.DataFrame(columns)


def contrast_table(seeds, question=None, own=False, contrasts=SEED_CONTRASTS):
    """The three-seed contrasts (of one question, or all) in best and final test VFE: the
    differences seed by seed, their mean, its standard error from the pooled spread, and the
    rule's verdict; with `own`, also the error the contrast's own three seeds would give."""
    import pandas as pd

    rows = []
    for q, name, a, b in contrasts:
        for value in VALUES if question in (None, q) else ():
            s, _ = pooled_spread(seeds, value, contrasts)
            d, mean, se = seed_contrast(seeds, a, b, value, spread=s)
            row = {"contrast": name, "test VFE": value.split("_")[0]}
            row |= {f"seed {k}": _signed(x) for k, x in d.items()}
            row |= {"mean": _signed(mean), "SE": f"{se:.3f}", "mean / SE": _signed(mean / se, 1)}
            row["verdict"] = _verdict(mean, se)
            if own:
                row["SE from its own seeds"] = f"{seed_contrast(seeds, a, b, value)[2]:.3f}"
            rows.append(row)
    return pd.DataFrame(rows).set_index(["contrast", "test VFE"])


def _with_se(differences, se):
    """Differences in nats, each followed by its size in standard errors in brackets, and by *
    where the rule calls it resolved."""
    return differences.map(lambda x: f"{x:+.3f} ({x / se:+.1f})" + "*" * resolved(x, se))


def grid_differences(table, spread, base=None, along="latent_dim", value="best_test_vfe"):
    """A grid's single runs: each cell minus the cell at `base` along `along` (the cell before it,
    when base is None), in nats, with the difference in standard errors (`spread`: the SE of two
    single runs) in brackets and * where resolved; one row per size on the other axis."""
    other = "hidden_dim" if along == "latent_dim" else "latent_dim"
    grid = table.pivot(index=other, columns=along, values=value)
    axis = "l" if along == "latent_dim" else "h"
    if base is None:
        d = grid.diff(axis=1).iloc[:, 1:]
        d.columns = [f"{axis} = {a} to {b}" for a, b in zip(grid.columns, grid.columns[1:])]
    else:
        d = grid.drop(columns=base).sub(grid[base], axis=0)
        d.columns = [f"{axis} = {c} minus {base}" for c in d.columns]
    d.columns.name = "nats (SE), * resolved"
    return _with_se(d, spread)


def grid_facts(table):
    """A grid's key numbers as lines: its lowest and highest best test VFE, the means over each
    axis, where each row is lowest, the best epochs, and how much the best epoch flatters."""
    best = table.loc[table.best_test_vfe.idxmin()]
    worst = table.loc[table.best_test_vfe.idxmax()]
    flatter = table.final_test_vfe - table.best_test_vfe

    def means(col, name):
        by = table.groupby(col).best_test_vfe.mean()
        return ", ".join(f"{name} = {k}: {x:.2f}" for k, x in by.items())

    def lowest(value):
        rows = table.pivot(index="hidden_dim", columns="latent_dim", values=value)
        return ", ".join(map(str, rows.idxmin(axis=1)))

    return "\n".join(
        [
            f"lowest best test VFE {best.best_test_vfe:.2f} nats at h = {best.hidden_dim:.0f},"
            f" l = {best.latent_dim:.0f} (epoch {best.best_epoch:.0f}); highest"
            f" {worst.best_test_vfe:.2f} at h = {worst.hidden_dim:.0f}, l = {worst.latent_dim:.0f}",
            "mean best test VFE over the latent sizes: " + means("hidden_dim", "h"),
            "mean best test VFE over the hidden sizes: " + means("latent_dim", "l"),
            f"lowest in each row (h = {', '.join(map(str, sorted(table.hidden_dim.unique())))}):"
            f" best test VFE at l = {lowest('best_test_vfe')}; final at l = "
            + lowest("final_test_vfe"),
            f"best epochs {table.best_epoch.min()} to {table.best_epoch.max()}, the last epoch"
            f" in {int((table.best_epoch == table.epochs).sum())} of {len(table)} cells",
            f"final minus best test VFE: {flatter.mean():.2f} nats on average,"
            f" at most {flatter.max():.2f}",
        ]
    )


def runs_against(runs, reference, spread):
    """Lines: each run's best test VFE against a repeated cell's three-seed mean (`reference`, a
    row of seed_spread), then the first run against each other one, each with the rule's verdict."""

    def compared(d, se):
        return f"{d:+.3f} nats (SE {se:.3f}, {d / se:+.1f} SE, {_verdict(d, se)})"

    def name(r):
        return f"h = {r.hidden_dim:.0f}, h x h layers' rate x {r.hh_lr_scale:g} ({r.device})"

    lines, first = [], runs.iloc[0]
    for _, r in runs.iterrows():
        d, se = r.best_test_vfe - reference["mean"], difference_se(spread, 1, 3)
        lines.append(
            f"{name(r)}: best test VFE {r.best_test_vfe:.3f}; minus the three-seed mean"
            f" {reference['mean']:.3f}: {compared(d, se)}"
        )
    for _, r in runs.iloc[1:].iterrows():
        d = first.best_test_vfe - r.best_test_vfe
        lines.append(f"{name(first)} minus {name(r)}: {compared(d, difference_se(spread))}")
    return "\n".join(lines)


def sweep_table(sweep, spread_best, spread_final):
    """The weight-decay sweep: per hidden size and lambda, the best and final test VFE and their
    change from lambda = 0, with the change in standard errors of two single runs in brackets."""
    import pandas as pd

    parts = {}
    for value, spread in (("best_test_vfe", spread_best), ("final_test_vfe", spread_final)):
        grid = sweep.pivot(index="weight_decay", columns="hidden_dim", values=value)
        change = grid - grid.loc[0.0]
        name = value.split("_")[0]
        parts[f"{name} test VFE"] = grid.map(lambda x: f"{x:.3f}")
        parts[f"{name}: change from 0 (SE)"] = _with_se(change, spread)
    out = pd.concat(parts, axis=1)
    out.columns.names = ["", "h"]
    out.index.name = "lambda"
    return out


def decay_facts(q4, q6, q4_records, q6_records, spread):
    """Lines: how weight decay moved each cell of the Q4 grid (q6 minus q4, single runs), and the
    final test KL and active units of the widest models."""
    key = ["hidden_dim", "latent_dim"]
    both = q6.merge(q4, on=key, suffixes=("", "_q4"))
    d = both.best_test_vfe - both.best_test_vfe_q4
    up, down, wide = d > 0, d < 0, both.hidden_dim >= 50
    lines = [
        f"weight decay raised the best test VFE in {int(up.sum())} of {len(d)} cells, resolved"
        f" ({RESOLVED} SE = {RESOLVED * spread:.3f}) in {int((d >= RESOLVED * spread).sum())};"
        f" by {d[wide].min():.2f} to {d[wide].max():.2f} nats where h >= 50",
    ]
    for _, r in both[down].iterrows():
        x = r.best_test_vfe - r.best_test_vfe_q4
        lines.append(
            f"lowered it at h = {r.hidden_dim:.0f}, l = {r.latent_dim:.0f}: {x:+.2f} nats"
            f" ({x / spread:+.1f} SE); active units {r.active_units_q4:.0f} without decay,"
            f" {r.active_units:.0f} with it"
        )
    by_h = both.groupby("hidden_dim")[["best_test_vfe_q4", "best_test_vfe"]].mean()
    lines.append(
        "mean best test VFE over l, Q4 -> Q6: "
        + ", ".join(f"h = {h}: {a:.2f} -> {b:.2f}" for h, (a, b) in by_h.iterrows())
    )
    kl = [
        np.mean([r["test_kl"][-1] for r in rs if r["settings"]["hidden"] == 500])
        for rs in (q4_records, q6_records)
    ]
    units = [t[t.hidden_dim == 500].active_units.mean() for t in (q4, q6)]
    lines.append(
        f"h = 500, averaged over l: final test KL Q4 {kl[0]:.1f}, Q6 {kl[1]:.1f} nats;"
        f" active units Q4 {units[0]:.2f}, Q6 {units[1]:.2f}"
    )
    return "\n".join(lines)


def decoder_cost(recon, recon_records, q4):
    """The Gaussian and the Bernoulli decoder's runs side by side, with the same Gaussian cell's
    active units after Q4's 30 epochs."""
    table = recon.assign(
        test_reconstruction=[r["test_recon"][-1] for r in recon_records],
        test_kl=[r["test_kl"][-1] for r in recon_records],
    )
    cols = ["recon", "hidden_dim", "latent_dim", "epochs", "test_reconstruction", "test_kl"]
    table = table[cols + ["final_test_vfe", "active_units"]]
    same = q4.merge(table[["hidden_dim", "latent_dim"]].drop_duplicates())
    return table, same[["hidden_dim", "latent_dim", "epochs", "active_units"]]


def pixel_costs(errors=(0.05, 0.1, 0.2)):
    """Lines: what one pixel error costs under the Gaussian (variance 1/2) and the Bernoulli."""
    lines = [
        f"pixel error {e}: Gaussian {e**2:.4f} nats, Bernoulli (pixel at 0 or 1)"
        f" {-np.log(1 - e):.4f} nats, {-np.log(1 - e) / e**2:.0f} times more"
        for e in errors
    ]
    return "\n".join(
        lines + [f"the Gaussian's dropped constant 392 log(pi) = {392 * np.log(np.pi):.2f}"]
    )


def kept_check(models, test_x):
    """Each kept model's final test VFE as recorded and re-evaluated from its weights, beside the
    grid's record of the same settings."""
    import pandas as pd

    rows = []
    for rec, model in models:
        s = rec["settings"]
        grid = load_cell(cell_path(s), s)
        rows.append(
            {
                "h": s["hidden"],
                "l": s["latent"],
                "kept: final": f"{rec['final_test_vfe']:.3f}",
                "re-evaluated": f"{eval_vfe(model, s, test_x):.3f}",
                "grid: final": f"{grid['final_test_vfe']:.3f}",
                "grid: best": f"{grid['best_test_vfe']:.3f}",
            }
        )
    return pd.DataFrame(rows)


def bound_gaps(bound):
    """Per model, the one-draw estimate (k = 1, `k1_vfe`), the estimate at the largest k and the gap
    between them (`k1_vfe` = `nll` + `gap`), paired image by image (`gap_se`)."""
    k1 = bound[bound.k == 1].nll.to_numpy()
    top = bound[bound.k == bound.k.max()]
    top = top.assign(k1_vfe=k1, gap=k1 - top.nll.to_numpy(), gap_se=top.below_k1_se)
    return top[
        ["hidden_dim", "latent_dim", "active_units", "k1_vfe", "k", "nll", "se", "gap", "gap_se"]
    ]


def bound_facts(bound):
    """Lines: how far k = 5,000 moves the estimates past k = 1,000, and h = 500's l = 300 model
    against its l = 10 sibling, split into estimated likelihood and gap."""
    last = bound.pivot_table(index=["hidden_dim", "latent_dim"], columns="k", values="nll")
    step = last[1000] - last[5000]
    top = bound_gaps(bound).set_index(["hidden_dim", "latent_dim"])
    one, many = top.loc[(500, 10)], top.loc[(500, 300)]
    return "\n".join(
        [
            f"k = 1,000 to 5,000 lowers the estimates by {step.min():.3f} to {step.max():.3f} nats",
            f"h=500, l=300 against l=10: one-sample VFE"
            f" {many.nll + many.gap - one.nll - one.gap:+.2f} = estimated -log p(x)"
            f" {many.nll - one.nll:+.2f} + gap {many.gap - one.gap:+.2f}"
            f" ± {np.hypot(many.gap_se, one.gap_se):.2f} nats (errors added as if independent)",
        ]
    )


def unit_kls(models, test_x, min_latent=10):
    """Each model's latent units' KL to the prior, largest first, by name (l >= min_latent)."""
    return {
        f"h={r['settings']['hidden']}, l={r['settings']['latent']}": unit_kl(m, test_x)
        for r, m in models
        if r["settings"]["latent"] >= min_latent
    }


def unit_kl_lines(kls, floor=0.1):
    """Lines: how many units carry more than `floor` nats, and what the others carry together."""
    return "\n".join(
        f"{name}: {(kl > floor).sum()} units carry more than {floor} nats, together"
        f" {kl[kl > floor].sum():.2f} of {kl.sum():.2f}; the other {(kl <= floor).sum()} carry"
        f" {kl[kl <= floor].sum():.3f}"
        for name, kl in kls.items()
    )


def gap_split(gaps, bound):
    """Per full-data model: the bound's gap split into amortisation and approximation (the plateau
    fit, ± over images), -log p(x) with q* and with the encoder (k = 5,000), and how much the
    looser fit, stopped early, changes the amortisation gap and -log p(x)."""
    import pandas as pd

    top = bound[bound.k == bound.k.max()].set_index(["hidden_dim", "latent_dim"])
    rows = []
    for r in gaps[(gaps.train_size == 60_000) & (gaps.fit == "plateau")].itertuples():
        loose = gap_row_of(gaps, r.hidden_dim, "test", "default", 60_000, r.latent_dim)
        rows.append(
            {
                "h": r.hidden_dim,
                "l": r.latent_dim,
                "steps": r.steps,
                "amortisation": f"{r.amortisation:.3f} ± {r.amortisation_se:.3f}",
                "approximation": f"{r.approximation:.3f} ± {r.approximation_se:.3f}",
                "total": f"{r.total:.3f}",
                "amortisation share": f"{r.amortisation / r.total:.0%}",
                "-log p(x), q*": f"{r.nll:.3f}",
                "-log p(x), encoder": f"{top.nll[r.hidden_dim, r.latent_dim]:.3f}",
                "looser fit: amortisation": _signed(loose.amortisation - r.amortisation),
                "looser fit: -log p(x)": _signed(loose.nll - r.nll),
            }
        )
    return pd.DataFrame(rows)


def fixed_step_check(gaps):
    """A line: the best model's amortisation gap with a fixed small step, against the plateau's."""
    strict = gaps[~gaps.fit.isin(["default", "plateau"]) & (gaps.train_size == 60_000)].iloc[0]
    plateau = gap_row_of(gaps, 500, "test", "plateau", 60_000)
    return (
        f"h=500, l=10, fixed step 0.01, 32 draws, 0.001 nats per 50 steps: amortisation"
        f" {strict.amortisation:.3f}, against the plateau's {plateau.amortisation:.3f}"
    )


def class_centres(model, x, labels):
    """A two-unit model's posterior means averaged per class, with the mean within-class sd."""
    import pandas as pd
    import torch

    from .data import FASHION_CLASSES

    with torch.no_grad():
        codes = pd.DataFrame(model.mean(model.encoder(x.double())).numpy())
    by_class = codes.groupby(labels.numpy())
    centres = by_class.mean().rename(columns={0: "unit 1", 1: "unit 2"})
    centres.index = FASHION_CLASSES
    return centres.assign(within_class_sd=by_class.std().mean(axis=1).to_numpy())


def repro_table(results_dir=None):
    """Q4 cells trained again alone (the `repro` experiment, in results/repro) against their stored
    records, trained in a group: best and final test VFE and their differences."""
    import pandas as pd

    q4_groups = {
        (s["hidden"], s["latent"]): [x["latent"] for x in g]
        for g in groups(experiment_cells("q4"))
        for s in g
    }
    rows = []
    for again in experiment_records("repro", results_dir):
        s = again["settings"]
        stored = load_cell(cell_path(s, results_folder(results_dir)), s)
        rows.append(
            dict(
                h=s["hidden"],
                l=s["latent"],
                stored_in_group=f"l={stored.get('group', q4_groups[s['hidden'], s['latent']])}",
                best_stored=stored["best_test_vfe"],
                best_again=again["best_test_vfe"],
                final_stored=stored["final_test_vfe"],
                final_again=again["final_test_vfe"],
            )
        )
    t = pd.DataFrame(rows)
    return t.assign(
        best_diff=t.best_again - t.best_stored, final_diff=t.final_again - t.final_stored
    )


def training_times(results_dir=None):
    """Per experiment: its stored cells, their devices and their summed wall time; and the hours of
    all distinct cells (cells shared between experiments counted once; a cell's twin on another
    device, or trained again in a folder of its own, is another cell)."""
    import pandas as pd

    runs = {name: stored_records(name, results_dir)[0] for name in EXPERIMENTS}
    times = pd.DataFrame(
        [
            dict(
                experiment=name,
                cells=len(r),
                devices=", ".join(sorted({x["device"] for x in r})),
                minutes=sum(x["wall_seconds"] for x in r) / 60,
            )
            for name, r in runs.items()
        ]
    )
    unique = {
        (OWN_FOLDER.get(name), json.dumps(x["settings"], sort_keys=True), x["device"]): x[
            "wall_seconds"
        ]
        for name, r in runs.items()
        for x in r
    }
    return times, len(unique), sum(unique.values()) / 3600


# Q7


def q7_wide_table(records):
    """Q7's runs wider than h = 500 at 60,000 images, one row each: recipe, device, size against
    the line, best and final test VFE, its last five epochs, and how it ended. A diverged run has
    no final value."""
    import pandas as pd

    rows = []
    for r in sorted(records, key=lambda r: (r["n_params"], r["settings"]["seed"])):
        s, gone, tail = r["settings"], r.get("diverged_epoch"), r["test_vfe"][-5:]
        rows.append(
            {
                "h": s["hidden"],
                "seed": s["seed"],
                "h x h rate": "course's" if s.get("hh_lr_scale", 1.0) == 1 else "x 500/h",
                "device": r["device"],
                "x the line": round(r["n_params"] / TRAIN_VALUES, 2),
                "best test VFE": round(r["best_test_vfe"], 3),
                "best epoch": r["best_epoch"],
                "final test VFE": np.nan if gone else round(r["final_test_vfe"], 3),
                "final minus best": np.nan
                if gone
                else round(r["final_test_vfe"] - r["best_test_vfe"], 2),
                "last 5 epochs": "-" if gone else f"{min(tail):.2f} to {max(tail):.2f}",
                "ended": f"diverged in epoch {gone}" if gone else f"after epoch {s['epochs']}",
            }
        )
    return pd.DataFrame(rows)


def lowest_width(runs, n, spread=None):
    """Where a curve of test VFE against width is lowest, as closely as its noise places it. `runs`:
    {h: values}. With `spread` (the rule's pooled sd of a one-seed difference) a difference of means
    has the rule's standard error; without, the values are paired across training sets and the
    error is their own. One row per width: its mean, its difference from the lowest with that
    error, and whether the rule resolves it."""
    import pandas as pd

    low = min(runs, key=lambda h: np.mean(runs[h]))
    rows = []
    for h, x in runs.items():
        d = np.mean(x) - np.mean(runs[low])
        if h == low:
            se = np.nan
        elif spread is not None:
            se = difference_se(spread, len(x), len(runs[low]))
        else:
            paired = np.asarray(x, float) - np.asarray(runs[low], float)
            se = paired.std(ddof=1) / np.sqrt(len(paired))
        rows.append(
            dict(
                h=h,
                of_line=n_params_formula(h, Q7_LATENT) / (n * X_DIM),
                test_vfe=np.mean(x),
                runs=len(x),
                minus_lowest=d,
                se=se,
                resolved=h != low and resolved(d, se),
            )
        )
    return pd.DataFrame(rows)


def with_seeds(scaled, seed_records, value="best_test_vfe"):
    """{h: values} of the one-recipe curve: each run's value, with seeds 1 and 2 where the seeds
    experiment has them at the same settings (the protocol, up to h = 500)."""
    out = {r["settings"]["hidden"]: [r[value]] for r in scaled}
    for r in seed_records:
        s = r["settings"]
        if s["latent"] == Q7_LATENT and s["seed"] > 0 and s["hidden"] in out:
            if not scaled_rate(s["hidden"]):
                out[s["hidden"]].append(r[value])
    return out


def minimum_line(table):
    """Two lines: where a curve is lowest, the widths the rule cannot tell from it, and how far
    above it the widest width is."""
    low, wide = table.loc[table.test_vfe.idxmin()], table.iloc[-1]
    tied = table[~table.resolved & (table.h != low.h)]
    ties = ", ".join(f"h = {r.h:.0f} ({r.of_line:.2f})" for r in tied.itertuples()) or "none"
    above = (
        "is the lowest"
        if wide.h == low.h
        else f"above it by {wide.minus_lowest:+.2f} ± {wide.se:.2f}"
    )
    return (
        f"lowest at h = {low.h:.0f} ({low.of_line:.2f} x the line);\n  tied with it by the rule:"
        f" {ties}; widest (h = {wide.h:.0f}, {wide.of_line:.2f} x) {above}"
    )


def q7_far_side_lines(scaled, spread):
    """Lines: each one-recipe run past h = 500, its best and final test VFE and last epochs, and
    each wider one against h = 2000 with the rule's verdict (`spread`: {value: the rule's s})."""
    wide = sorted((r for r in scaled if r["settings"]["hidden"] > 500), key=lambda r: r["n_params"])
    lines = []
    for r in wide:
        tail = r["test_vfe"][-5:]
        lines.append(
            f"h = {r['settings']['hidden']} ({r['n_params'] / TRAIN_VALUES:.2f} x the line):"
            f" best {r['best_test_vfe']:.3f} (epoch {r['best_epoch']}), final"
            f" {r['final_test_vfe']:.3f}, final minus best"
            f" {r['final_test_vfe'] - r['best_test_vfe']:+.3f}; last 5 epochs {min(tail):.2f}"
            f" to {max(tail):.2f}; end-of-epoch training VFE at the best epoch"
            f" {end_of_epoch(r, r['best_epoch']):.3f}, at the final {end_of_epoch(r, -1):.3f}"
        )
    base = wide[0]
    for r in wide[1:]:
        for value in ("best_test_vfe", "final_test_vfe"):
            d, se = r[value] - base[value], difference_se(spread[value])
            lines.append(
                f"h = {r['settings']['hidden']} minus h = {base['settings']['hidden']},"
                f" {value.split('_')[0]}: {d:+.3f} ({d / se:+.1f} SE, {_verdict(d, se)})"
            )
    return "\n".join(lines)


def by_seed(records, value):
    """{h: the records' values in seed order}: paired seed by seed across widths."""
    out = {}
    for r in sorted(records, key=lambda r: r["settings"]["seed"]):
        out.setdefault(r["settings"]["hidden"], []).append(r[value])
    return out


def moved_line_lines(data_records, bv_records, control, spread):
    """Lines: at 1,000 and 10,000 images, the steps taken, where the test VFE is lowest with the
    widths the rule ties to it, the gap below and past the line, and the lowest training VFE; then
    `control`, a width-scaled run at 10,000 images, against that size's lowest width."""
    from .tradeoff import at_epoch, bias_variance_runs

    lines = []
    for which in ("best_val", "final"):
        runs = {
            h: [at_epoch(r, "test_vfe", which) for r in sets]
            for h, (sets, _) in bias_variance_runs(bv_records).items()
        }
        when = "best-validation" if which == "best_val" else "final"
        lines.append(f"five disjoint sets (CPU), {when} epoch, SE over the sets:")
        lines.append("  " + minimum_line(lowest_width(runs, 1000)))
    for n in (1_000, 10_000):
        recs = [r for r in data_records if r["settings"]["train_size"] == n]
        done = [r for r in recs if "diverged_epoch" not in r]
        s = recs[0]["settings"]
        gone = [
            f"h = {r['settings']['hidden']} seed {r['settings']['seed']}"
            f" in epoch {r['diverged_epoch']}"
            for r in recs
            if "diverged_epoch" in r
        ]
        lines.append(
            f"N = {n:,}: {s['epochs']} epochs = {s['epochs'] * -(-n // s['batch_size']):,} Adam"
            f" steps, seeds {sorted({r['settings']['seed'] for r in recs})}; on the GPU:"
            f" {on_gpu(recs)}; diverged: {', '.join(gone) or 'none'}"
        )
        for value in VALUES:
            curve = lowest_width(by_seed(done, value), n, spread[value])
            lines.append(f"  {value.split('_')[0]} test VFE: " + minimum_line(curve))
        t = by_size(summary_table(done))
        below, past = t[t.of_line < 1], t[t.of_line > 1]
        lines.append(
            f"  final test minus training VFE: below the line {below.gap.min():.2f} to"
            f" {below.gap.max():.2f}, past it {past.gap.min():.2f} to {past.gap.max():.2f}"
        )
        lines.append(
            f"  lowest end-of-epoch training VFE {t.final_train_vfe.min():.2f} nats;"
            f" log N = {np.log(n):.2f}"
        )
    for r in control:
        same = [
            x for x in data_records if x["settings"]["train_size"] == r["settings"]["train_size"]
        ]
        low = min((x for x in same if "diverged_epoch" not in x), key=lambda x: x["best_test_vfe"])
        parts = []
        for value in VALUES:
            d, se = r[value] - low[value], difference_se(spread[value])
            parts.append(
                f"{value.split('_')[0]} {r[value]:.3f}, minus h = {low['settings']['hidden']}'s"
                f" {d:+.3f} ({_verdict(d, se)})"
            )
        lines.append(
            f"N = {r['settings']['train_size']:,}, h = {r['settings']['hidden']} with the h x h"
            f" rate x {r['settings']['hh_lr_scale']:g} ({r['device']}): " + "; ".join(parts)
        )
    return "\n".join(lines)


def tradeoff_lines(bv):
    """Lines: bias² and variance (the mean code's squared error) over width at the final epoch,
    and from h = 300 to 2000 the test VFE's change split into its two terms, beside the squared
    error's split into bias² and variance (± jackknife SE over the training sets)."""
    from .tradeoff import bias_variance_step

    fin = bv[bv.epoch == "final"].set_index("hidden_dim")
    share = fin.variance_seed / fin.variance
    lines = [
        f"final epoch, h = {fin.index[0]} to {fin.index[-1]}: bias² {fin.bias2.iloc[0]:.2f} to"
        f" {fin.bias2.iloc[-1]:.2f}; variance {fin.variance.min():.2f}"
        f" (h = {fin.variance.idxmin()}) to {fin.variance.iloc[-1]:.2f};\n  the seed alone"
        f" {share.min():.0%} to {share.max():.0%} of it"
    ]
    for which, when in (("final", "final"), ("best_val", "best-validation")):
        t = bv[bv.epoch == which].set_index("hidden_dim")
        cols = ["test_vfe", "test_recon", "test_kl", "variance", "variance_seed"]
        d = t.loc[2000, cols] - t.loc[300, cols]
        step = bias_variance_step(300, 2000, which)
        lines.append(
            f"h = 300 to 2000, {when} epoch: test VFE {d.test_vfe:+.2f} = reconstruction"
            f" {d.test_recon:+.2f} + KL {d.test_kl:+.2f};\n  mean-code squared error"
            f" {step['mse'][0]:+.2f} ± {step['mse'][1]:.2f} = bias² {step['bias2'][0]:+.2f} ±"
            f" {step['bias2'][1]:.2f} + variance {step['variance'][0]:+.2f} ±"
            f" {step['variance'][1]:.2f};\n  of the variance's change, seeds on one set"
            f" {d.variance_seed:+.2f}, the rest (training sets) {d.variance - d.variance_seed:+.2f}"
        )
    return "\n".join(lines)


def rise_split_lines(gaps, splits=(("test", "default"), ("test", "plateau"), ("train", "plateau"))):
    """Lines: the test VFE's rise from h = 300 to 2000 at 1,000 images split into -log p(x) (the
    decoder), the amortisation gap (the encoder) and the approximation gap, on test and training
    images (Cremer et al. 2018; one model per width, errors as if the images were independent)."""

    lines = []
    for split, fit in splits:
        a, b = (gap_row_of(gaps, h, split, fit) for h in (300, 2000))
        (vfe, vse), (nll, nse), (am, ase), (ap, pse) = gap_difference(a, b).values()
        lines.append(
            f"h = 300 to 2000, {a.images} {split} images ({fit} fit):\n  VFE {vfe:+.2f} ± {vse:.2f}"
            f" = -log p(x) {nll:+.2f} ± {nse:.2f} + amortisation {am:+.2f} ± {ase:.2f}"
            f" + approximation {ap:+.2f} ± {pse:.2f}"
        )
    return "\n".join(lines)


def divergence_table(records):
    """The diverged runs: when, what became non-finite first and at which step, and the largest
    log-variance and gradient norm in the epoch before and in the diverging epoch ("inf" where a
    peak overflowed; missing where the record predates the diagnostics)."""
    import pandas as pd

    rows = []
    for r in (r for r in records if "diverged_epoch" in r):
        d = r.get("divergence", {})
        rows.append(
            dict(
                h=r["settings"]["hidden"],
                seed=r["settings"]["seed"],
                device=r["device"],
                diverged_in=r["diverged_epoch"],
                first_nonfinite=d.get("first_nonfinite"),
                step=d.get("step"),
                **{
                    f"{k}_{when}": float(d[f"{k}_{src}"]) if f"{k}_{src}" in d else np.nan
                    for k in ("max_log_var", "max_grad_norm")
                    for when, src in (("before", "epoch_before"), ("then", "this_epoch"))
                },
            )
        )
    return pd.DataFrame(rows)


def rate_control_lines(protocol, scaled, lr_scale, spread):
    """Lines: h = 2000 on this CPU at the course's rate and scaled, the scaled cell on the GPU
    against the CPU, and h = 4500 (scaled on the GPU only), with the rule's verdicts."""

    def run(records, h, device):
        return next(r for r in records if r["settings"]["hidden"] == h and r["device"] == device)

    pairs = [
        (
            "h = 2000, CPU: scaled minus course's rate",
            run(protocol, 2000, "cpu"),
            run(scaled, 2000, "cpu"),
        ),
        ("h = 2000, scaled: GPU minus CPU", run(scaled, 2000, "cpu"), run(lr_scale, 2000, "cuda")),
        (
            "h = 4500: scaled (GPU) minus course's rate (CPU)",
            run(protocol, 4500, "cpu"),
            run(lr_scale, 4500, "cuda"),
        ),
    ]
    lines = []
    for name, a, b in pairs:
        parts = []
        for value in ("best_test_vfe", "final_test_vfe"):
            d, se = b[value] - a[value], difference_se(spread[value])
            parts.append(f"{value.split('_')[0]} {d:+.3f} ({d / se:+.1f} SE, {_verdict(d, se)})")
        lines.append(f"{name}: " + "; ".join(parts))
    gap = [r["running_train_vfe"][-1] - r["train_vfe"][-1] for r in scaled if r.get("train_vfe")]
    lines.append(
        f"running mean minus end-of-epoch training VFE after epoch 30, scaled runs on the"
        f" CPU: {min(gap):.2f} to {max(gap):.2f} nats"
    )
    return "\n".join(lines)


def bias_variance_checks(bv, records):
    """Lines: what the decomposition rests on (models, devices, exactness, 8-bit storage) and how
    much choosing the epoch on the test set would flatter the test VFE."""
    val = bv[bv.epoch == "best_val"]
    flatter = val.test_vfe - val.best_on_test
    return (
        f"{len(records)} models on {sorted({r['device'] for r in records})}; bias² + variance ="
        f" squared error image by image to {bv.identity_error.max():.0e} nats;\n8-bit storage moves"
        f" the squared error by at most {(bv.total - bv.mse_unquantised).abs().max():.4f} nats;"
        f" the epoch chosen on the test set\nflatters the test VFE by"
        f" {flatter.min():.3f} to {flatter.max():.3f} nats (mean over sets)"
    )


def overfit_lines(gaps):
    """Lines: for h = 300, 1000 and 2000 at 1,000 images, the test-minus-training VFE split into
    -log p(x), amortisation and approximation (plateau fit, 200 images each)."""

    lines = []
    for h in (300, 1000, 2000):
        (gap, gse), (dec, dse), (enc, ese), (app, ase) = overfit_split(gaps, h, "plateau").values()
        lines.append(
            f"h = {h}: test minus training VFE {gap:.2f} ± {gse:.2f} = -log p(x) {dec:.2f} ±"
            f" {dse:.2f} ({dec / gap:.0%})\n  + amortisation {enc:.2f} ± {ese:.2f}"
            f" ({enc / gap:.0%}) + approximation {app:.2f} ± {ase:.2f}"
        )
    return "\n".join(lines)


def repeat_lines(records):
    """Lines: q7_bias_variance's set-0 runs against q7_data's runs of the same settings, on the
    same device and across devices: the largest difference in final and best test VFE."""

    same, other = [], []
    for r in records:
        s = r["settings"]
        if s.get("train_offset", 0) == 0:
            twin = {k: x for k, x in s.items() if k not in ("val_size", "recon_images")}
            old = load_cell(cell_path(twin), twin)
            d = (
                abs(r["final_test_vfe"] - old["final_test_vfe"]),
                abs(r["best_test_vfe"] - old["best_test_vfe"]),
            )
            (same if old["device"] == r["device"] else other).append(d)
    return "\n".join(
        f"{name} ({len(ds)} models): final test VFE differs by {max(d[0] for d in ds):.3f} nats at"
        f" most, best by {max(d[1] for d in ds):.3f}"
        for name, ds in (("same device", same), ("GPU against CPU", other))
    )


def on_gpu(records):
    """The widths trained on the GPU: 'h = 2000' where every seed was, 'h = 1000 (seed 2)' where
    only some were."""
    parts = []
    for h in sorted({r["settings"]["hidden"] for r in records if r["device"] != "cpu"}):
        runs = [r for r in records if r["settings"]["hidden"] == h]
        seeds = [r["settings"]["seed"] for r in runs if r["device"] != "cpu"]
        some = len(seeds) < len(runs)
        parts.append(
            f"h = {h}"
            + (f" (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})" if some else "")
        )
    return ", ".join(parts) or "none"


def q7_headline():
    """Q7's key numbers from the store: where the best test VFE is lowest at 60,000 images with one
    recipe, and at 1,000 images over five training sets (best-validation epoch)."""
    from .tradeoff import at_epoch, bias_variance_runs

    seed_records = experiment_records("seeds")
    s = pooled_spread(summary_table(seed_records))[0]
    full = with_seeds(experiment_records("q7_scaled"), seed_records)
    runs = bias_variance_runs(experiment_records("q7_bias_variance"))
    small = {
        h: [at_epoch(r, "test_vfe", "best_val") for r in sets] for h, (sets, _) in runs.items()
    }
    full = lowest_width(full, 60_000, s)
    return (
        f"Q7, 60,000 images, one recipe: {minimum_line(full)}\n"
        f"Q7, 1,000 images, five training sets: {minimum_line(lowest_width(small, 1_000))}\n"
        "Q7, 1,000 images, one model per width: "
        + rise_split_lines(stored_gaps(), [("test", "default")])
    )
