"""Figures and the tables behind them (plots.py, tradeoff.py)."""

import math

import numpy as np
import pandas as pd
import pytest

import vae_helpers as v


def test_heatmap_rows_are_hidden_and_columns_latent_sizes_as_labelled():
    import pandas as pd

    table = pd.DataFrame(
        [
            dict(hidden_dim=h, latent_dim=l, best_test_vfe=1000 * h + l)
            for h in (5, 50)
            for l in (2, 7, 9)
        ]
    )
    ax = v.heatmap(table, "test")
    rows = [int(t.get_text()) for t in ax.get_yticklabels()]
    cols = [int(t.get_text()) for t in ax.get_xticklabels()]
    texts = [float(t.get_text()) for t in ax.texts]  # row by row
    assert texts == [1000.0 * h + l for h in rows for l in cols]
    assert "hidden" in ax.get_ylabel() and "latent" in ax.get_xlabel()
    assert ax.figure.axes[-1].get_ylabel() == v.VFE_LABEL


def test_a_clipped_heatmap_marks_the_cells_beyond_its_colour_scale():
    import matplotlib.pyplot as plt

    table = pd.DataFrame(
        [
            dict(hidden_dim=h, latent_dim=l, best_test_vfe=v_)
            for (h, l), v_ in {(5, 2): 33.0, (5, 7): 23.5, (50, 2): 23.4, (50, 7): 23.45}.items()
        ]
    )
    ax = v.heatmap(table, "test", vmax=24)
    assert [t.get_text() for t in ax.texts] == ["33.00 >", "23.50", "23.40", "23.45"]
    assert "clipped at 24" in ax.figure.axes[-1].get_ylabel()
    assert ax.collections[0].get_clim()[1] == 24
    plt.close("all")


def test_parameter_plot_marks_the_training_data_size():
    import pandas as pd

    table = pd.DataFrame(dict(n_params=[1e4, 1e8], best_test_vfe=[30.0, 20.0], latent_dim=[5, 5]))
    ax = v.vfe_vs_params(table, "test")
    assert v.TRAIN_VALUES in [line.get_xdata()[0] for line in ax.get_lines()]
    assert ax.get_xscale() == "log"


def test_parameter_plot_draws_a_diverged_cell_apart_from_the_others():
    import pandas as pd

    table = pd.DataFrame(
        dict(
            n_params=[1e4, 1e8],
            best_test_vfe=[30.0, 20.0],
            latent_dim=[5, 5],
            diverged_epoch=[None, 21],
        )
    )
    lines = {
        line.get_label(): list(line.get_xdata())
        for line in v.vfe_vs_params(table, "test").get_lines()
    }
    assert lines["latent l = 5"] == [1e4]
    assert [x for label, x in lines.items() if label.startswith("diverged")] == [[1e8]]


def test_by_size_averages_seeds_and_measures_the_gap_between_like_measures():
    table = pd.DataFrame(
        dict(
            train_size=1000,
            hidden_dim=[5, 5, 9],
            n_params=[10, 10, 20],
            seed=[0, 1, 0],
            best_test_vfe=[30.0, 32.0, 28.0],
            final_test_vfe=[31.0, 33.0, 29.0],
            final_train_vfe=[25.0, 27.0, 20.0],
            best_epoch_train_vfe=[26.0, 28.0, 21.0],
            final_running_train_vfe=[99.0, 99.0, 99.0],
            best_epoch=[3, 5, 2],
        )
    )
    s = v.by_size(table)
    assert list(s.seeds) == [2, 1] and list(s.best_test_vfe) == [31.0, 28.0]
    assert s.best_test_vfe_sd[0] == pytest.approx(2**0.5) and list(s.gap) == [6.0, 9.0]
    assert v.by_size(table, running=True).final_train_vfe[0] == 99.0


def test_by_size_leaves_a_diverged_run_out_of_the_means_and_counts_it():
    table = pd.DataFrame(
        dict(
            train_size=1000,
            hidden_dim=[5, 5, 9],
            n_params=[10, 10, 20],
            seed=[0, 1, 0],
            best_test_vfe=[30.0, 32.0, 28.0],
            final_test_vfe=[31.0, 99.0, 29.0],
            final_train_vfe=25.0,
            best_epoch_train_vfe=26.0,
            final_running_train_vfe=99.0,
            best_epoch=3,
            diverged_epoch=pd.array([None, 7, 7], dtype="Int64"),
        )
    )
    s = v.by_size(table)
    assert list(s.seeds) == [1, 0] and list(s.diverged) == [1, 1]
    assert s.final_test_vfe[0] == 31.0 and math.isnan(s.final_test_vfe[1])


def test_a_single_seeds_spread_is_missing_not_zero():
    table = pd.DataFrame(
        dict(
            train_size=1000,
            hidden_dim=[5],
            n_params=[10],
            seed=[0],
            best_test_vfe=[30.0],
            final_test_vfe=31.0,
            final_train_vfe=25.0,
            best_epoch_train_vfe=26.0,
            final_running_train_vfe=99.0,
            best_epoch=3,
        )
    )
    assert math.isnan(v.by_size(table).best_test_vfe_sd[0])


def test_capacity_curves_mark_a_diverged_run_apart_from_the_curves():
    import matplotlib.pyplot as plt

    table = pd.DataFrame(
        dict(
            train_size=1000,
            hidden_dim=[5, 9, 20],
            n_params=[10, 20, 40],
            seed=0,
            best_test_vfe=[30.0, 28.0, 27.0],
            final_test_vfe=31.0,
            final_train_vfe=25.0,
            best_epoch_train_vfe=26.0,
            final_running_train_vfe=99.0,
            best_epoch=3,
            diverged_epoch=pd.array([None, None, 69], dtype="Int64"),
        )
    )
    _, axes = plt.subplots(1, 2)
    v.capacity_curves(v.by_size(table), axes, diverged=table[table.diverged_epoch.notna()])
    curves = [l for l in axes[0].lines if len(l.get_xdata()) > 1]
    assert curves and all(40 not in l.get_xdata() for l in curves)
    crosses = [l for l in axes[0].lines if l.get_marker() == "X"]
    assert (
        len(crosses) == 1
        and list(crosses[0].get_xdata()) == [40]
        and "diverged" in crosses[0].get_label()
    )
    plt.close("all")


def test_capacity_curves_draw_each_sizes_line_at_its_own_training_values():
    import matplotlib.pyplot as plt

    table = pd.DataFrame(
        dict(
            train_size=[1000, 1000, 10_000, 10_000],
            hidden_dim=[5, 9, 5, 9],
            n_params=[10, 20, 10, 20],
            seed=0,
            best_test_vfe=[30.0, 28.0, 29.0, 27.0],
            final_test_vfe=31.0,
            final_train_vfe=25.0,
            best_epoch_train_vfe=26.0,
            final_running_train_vfe=99.0,
            best_epoch=3,
        )
    )
    _, axes = plt.subplots(1, 2)
    v.capacity_curves(v.by_size(table), axes)
    lines = sorted(l.get_xdata()[0] for l in axes[0].lines if len(set(l.get_xdata())) == 1)
    assert lines == [1000 * 784, 10_000 * 784]
    assert axes[0].get_xscale() == axes[1].get_xscale() == "log" and axes[1].get_ylabel()
    plt.close("all")


def grid_table(shift=0.0, **columns):
    """A 2 x 2 grid: best test VFE 30 + shift at h = 5, 25 + shift at h = 9; final 0.5 higher."""
    table = pd.DataFrame(
        [
            dict(hidden_dim=h, latent_dim=l, best_test_vfe=(30.0 if h == 5 else 25.0) + shift + l)
            for h in (5, 9)
            for l in (0, 1)
        ]
    )
    return table.assign(
        final_test_vfe=table.best_test_vfe + 0.5, epochs=30, active_units=[2, 3, 4, 5], **columns
    )


def running_mean_record(h):
    return dict(
        settings=dict(hidden=h, latent=1, seed=0),
        eval_epochs=[1, 2],
        test_vfe=[26.0, 25.0],
        running_train_vfe=[26.5, 25.5],
    )


def test_learning_curves_name_only_the_kinds_of_training_line_they_draw():
    import matplotlib.pyplot as plt

    ax = v.learning_curves([running_mean_record(5)], "test")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "training VFE (running mean)" in labels
    assert not [x for x in labels if "end of epoch" in x]
    plt.close("all")


def test_vfe_limits_round_out_over_both_tables_leaving_out_the_clipped_rows():
    a, b = grid_table(), grid_table(shift=0.23)
    assert v.vfe_limits(a, b, leave_out=("hidden_dim", 5)) == (25.0, 26.8)
    assert v.vfe_limits(a) == (25.0, 31.5)


def test_best_and_final_share_the_colour_range_and_clip_what_lies_above_it():
    import matplotlib.pyplot as plt

    fig = v.best_and_final(grid_table(), "Q4", (25.0, 26.5))
    best, final = fig.axes[0], fig.axes[1]
    assert best.collections[0].get_clim() == final.collections[0].get_clim() == (25.0, 26.5)
    assert [t.get_text() for t in best.texts] == ["30.00 >", "31.00 >", "25.00", "26.00"]
    assert "best" in best.get_title() and "final" in final.get_title()
    plt.close("all")


def test_units_and_curves_show_the_active_units_and_the_curves_at_one_latent_size():
    import matplotlib.pyplot as plt

    records = [
        running_mean_record(5),
        dict(running_mean_record(9), settings=dict(hidden=9, latent=0, seed=0)),
    ]
    fig = v.units_and_curves(grid_table(), records, "Q4", latent=1, clip=4)
    units, curves, colours = fig.axes  # the colour bar comes last
    assert [t.get_text() for t in units.texts] == ["2", "3", "4", "5 >"]
    assert colours.get_ylabel().startswith("active latent units (count)")
    assert [line.get_label() for line in curves.get_lines()][:1] == ["h=5"]
    plt.close("all")


def test_best_and_units_draw_the_vfe_on_its_range_beside_the_units():
    import matplotlib.pyplot as plt

    fig = v.best_and_units(grid_table(), "Q5", (25.0, 31.5))
    assert fig.axes[0].collections[0].get_clim() == (25.0, 31.5)
    assert [t.get_text() for t in fig.axes[1].texts] == ["2", "3", "4", "5"]
    plt.close("all")


def test_decay_heatmaps_show_each_cells_change_from_the_same_cell_without_decay():
    import matplotlib.pyplot as plt

    plain = grid_table()
    decayed = grid_table(weight_decay=1.0).assign(best_test_vfe=plain.best_test_vfe + [1, 2, 3, -1])
    fig = v.decay_heatmaps(decayed.iloc[::-1], plain, (25.0, 32.0))
    change = fig.axes[1]
    assert [float(t.get_text()) for t in change.texts] == [1.0, 2.0, 3.0, -1.0]
    assert fig.axes[0].collections[0].get_clim() == (25.0, 32.0)
    assert "weight decay 1" in fig.axes[0].get_title()
    assert fig.axes[3].get_ylabel() == "change in best test VFE (nats per image)"
    plt.close("all")


def test_sweep_figure_draws_no_decay_as_a_dotted_line_beside_the_log_axis():
    import matplotlib.pyplot as plt

    sweep = pd.DataFrame(
        dict(
            hidden_dim=50,
            latent_dim=10,
            weight_decay=[0.0, 0.1, 1.0],
            epochs=30,
            best_test_vfe=[24.0, 24.2, 25.0],
        )
    )
    (ax,) = v.sweep_figure(sweep).axes
    curve, none = ax.get_lines()
    assert list(curve.get_xdata()) == [0.1, 1.0] and list(none.get_ydata()) == [24.0, 24.0]
    assert ax.get_xscale() == "log" and "λ" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    plt.close("all")


def test_bound_figure_draws_one_line_per_model_against_k():
    import matplotlib.pyplot as plt

    bound = pd.DataFrame(
        dict(
            hidden_dim=[5, 5, 9, 9],
            latent_dim=2,
            k=[1, 10] * 2,
            nll=[30.0, 29.0, 28.0, 27.5],
            below_k1_se=[0.0, 0.05, 0.0, 0.04],
        )
    )
    (ax,) = v.bound_figure(bound).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["h=5, l=2", "h=9, l=2"]
    assert ax.get_xscale() == "log" and "nats" in ax.get_ylabel()
    plt.close("all")


def test_code_figure_names_each_row_of_images_by_its_two_classes():
    import matplotlib.pyplot as plt
    import torch

    kls = {"h=5, l=10": np.linspace(1, 0.01, 10)}
    fig = v.code_figure(kls, torch.rand(22, 784), [(0, 1), (7, 9)], "lines")
    left, right = fig.axes
    assert [t.get_text() for t in right.get_yticklabels()] == [
        f"{v.FASHION_CLASSES[0]} to\n{v.FASHION_CLASSES[1]}",
        f"{v.FASHION_CLASSES[7]} to\n{v.FASHION_CLASSES[9]}",
    ]
    assert left.get_yscale() == "log" and len(left.get_lines()) == 1
    plt.close("all")


def test_plane_figure_puts_the_codes_and_the_decoders_grid_under_one_title():
    import matplotlib.pyplot as plt
    import torch

    fig = v.plane_figure(v.VAE(5, 2), torch.rand(20, 784), torch.arange(20) % 10, "plane")
    assert fig._suptitle.get_text() == "plane" and len(fig.axes) == 2
    assert fig.axes[0].get_xlabel() == "latent unit 1 (posterior mean)"
    plt.close("all")


def q7_record(h, scale=None, device="cpu", test=(24.0, 23.5), diverged=None, seed=0):
    """A stand-in record of a full-data Q7 run, as plots and tables read it."""
    s = v.cell_settings(h, 10, seed=seed, **({"hh_lr_scale": scale} if scale else {}))
    rec = dict(settings=s, device=device, n_params=v.n_params_formula(h, 10), test_vfe=list(test))
    rec.update(
        best_test_vfe=min(test), final_test_vfe=test[-1], best_epoch=test.index(min(test)) + 1
    )
    return rec | ({"diverged_epoch": diverged} if diverged else {})


def test_a_curve_of_one_recipe_refuses_a_run_of_another_recipe_or_device():
    curve = [q7_record(500), q7_record(2000, 0.25)]
    assert v.one_recipe(curve, v.scaled_rate, "cpu") == curve
    for stranger in (q7_record(2000), q7_record(2000, 0.5), q7_record(2000, 0.25, "cuda")):
        with pytest.raises(ValueError, match="h=2000 seed 0 was trained with"):
            v.one_recipe(curve + [stranger], v.scaled_rate, "cpu")


def test_the_full_data_figure_marks_an_unstable_run_and_draws_a_diverged_one_as_a_cross():
    import matplotlib.pyplot as plt

    protocol = [
        q7_record(4500, test=(24.0, 23.7, 25.8)),
        q7_record(5000, test=(24.2,), diverged=18),
    ]
    fig, ax = plt.subplots()
    v.q7_full_data([q7_record(500), q7_record(2000, 0.25)], protocol, ax)
    (bar,) = [c for c in ax.collections if len(c.get_segments())]
    assert np.allclose(bar.get_segments()[0][:, 1], [23.7, 25.8])
    crosses = [ln for ln in ax.lines if ln.get_marker() == "X" and len(ln.get_xdata())]
    assert [ln.get_ydata()[0] for ln in crosses] == [24.2]
    assert any("diverged in epoch 18" in t.get_text() for t in ax.texts)
    plt.close(fig)


def test_the_full_data_figure_draws_every_cell_of_the_q4_grid_when_given():
    import matplotlib.pyplot as plt

    grid = [q7_record(5), q7_record(50), q7_record(500)]
    fig, ax = plt.subplots()
    v.q7_full_data([q7_record(500)], [], ax, grid=grid)
    (dots,) = [ln for ln in ax.lines if ln.get_label().startswith("Q4 grid")]
    assert list(dots.get_xdata()) == [r["n_params"] for r in grid]
    plt.close(fig)
