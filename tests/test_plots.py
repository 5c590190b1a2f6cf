"""Figures and the tables behind them (plots.py, tradeoff.py)."""

import math

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
