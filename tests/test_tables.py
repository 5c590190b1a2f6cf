"""The notebook's tables (tables.py): the noise rule, the contrasts it judges, the key numbers."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import vae_helpers as v

# Two contrasts over three seeds: A's differences agree exactly (its own seeds would give it no
# error at all), B's scatter.
CONTRASTS = [("Q4", "A", (1, 1), (2, 1)), ("Q5", "B", (3, 1), (4, 1))]
DIFFS = {"A": [0.05, 0.05, 0.05], "B": [0.0, 0.2, -0.2]}


def seeds_table(final_shift=0.0):
    rows = []
    for _, name, a, b in CONTRASTS:
        for seed, d in enumerate(DIFFS[name]):
            for (h, l), x in ((a, 20.0), (b, 20.0 + d)):
                rows.append(
                    dict(
                        hidden_dim=h,
                        latent_dim=l,
                        seed=seed,
                        best_test_vfe=x,
                        final_test_vfe=x + final_shift,
                    )
                )
    return pd.DataFrame(rows)


def grid(values, **columns):
    """A grid table with best test VFE values[(h, l)], and the columns given."""
    table = pd.DataFrame(
        [dict(hidden_dim=h, latent_dim=l, best_test_vfe=x) for (h, l), x in values.items()]
    )
    return table.assign(**columns)


def test_the_spread_is_pooled_over_contrasts_by_their_degrees_of_freedom():
    s, dof = v.pooled_spread(seeds_table(), contrasts=CONTRASTS)
    assert dof == 4 and s == pytest.approx(np.sqrt((0.0 + 0.04) / 2))


def test_a_difference_of_single_runs_has_the_spread_as_its_error_and_three_seeds_a_third_less():
    assert v.difference_se(0.1) == pytest.approx(0.1)
    assert v.difference_se(0.1, 3, 3) == pytest.approx(0.1 / np.sqrt(3))
    assert v.difference_se(0.1, 1, 3) == pytest.approx(0.1 * np.sqrt(2 / 3))


def test_a_difference_is_resolved_from_three_standard_errors_on():
    assert v.resolved(0.75, 0.25) and v.resolved(-0.8, 0.25) and not v.resolved(0.74, 0.25)


def test_a_three_seed_contrast_takes_its_error_from_the_pooled_spread_not_its_own_seeds():
    table = v.contrast_table(seeds_table(), contrasts=CONTRASTS, own=True)
    a = table.loc[("A", "best")]
    s, _ = v.pooled_spread(seeds_table(), contrasts=CONTRASTS)
    assert float(a["SE"]) == pytest.approx(s / np.sqrt(3), abs=5e-4)
    assert a["SE from its own seeds"] == "0.000" and a["verdict"] == "not resolved"
    assert [a[f"seed {k}"] for k in range(3)] == ["+0.050"] * 3 and a["mean"] == "+0.050"


def test_contrast_table_keeps_one_questions_contrasts_in_best_and_final_values():
    table = v.contrast_table(seeds_table(), "Q5", contrasts=CONTRASTS)
    assert list(table.index) == [("B", "best"), ("B", "final")]


def test_noise_rule_prints_the_smallest_resolved_difference_as_three_errors():
    rule = v.noise_rule(seeds_table(), contrasts=CONTRASTS)
    s = np.sqrt(0.02)
    best = rule["best test VFE"]
    assert best["degrees of freedom"] == "4" and best["sd of one seed's difference"] == f"{s:.3f}"
    assert best["resolved from (3 SE): single runs"] == f"{3 * s:.3f}"
    assert best["resolved from (3 SE): three seeds"] == f"{3 * s / np.sqrt(3):.3f}"


def test_seed_spread_gives_each_cells_seeds_mean_sd_and_range():
    spread = v.seed_spread(seeds_table())
    b = spread.loc[(4, 1)]
    assert b["mean"] == pytest.approx(20.0) and b["range"] == pytest.approx(0.4)
    assert b.sd == pytest.approx(0.2)


def test_grid_differences_subtract_the_base_latent_size_row_by_row_and_mark_the_resolved():
    table = grid({(5, 2): 30.0, (5, 8): 30.5, (9, 2): 25.0, (9, 8): 25.1})
    d = v.grid_differences(table, spread=0.1, base=2)
    assert list(d.columns) == ["l = 8 minus 2"]
    assert list(d.iloc[:, 0]) == ["+0.500 (+5.0)*", "+0.100 (+1.0)"]


def test_grid_differences_without_a_base_step_from_each_width_to_the_next():
    table = grid({(5, 2): 30.0, (9, 2): 29.0, (20, 2): 29.5})
    d = v.grid_differences(table, spread=0.1, along="hidden_dim")
    assert list(d.columns) == ["h = 5 to 9", "h = 9 to 20"]
    assert list(d.iloc[0]) == ["-1.000 (-10.0)*", "+0.500 (+5.0)*"]


def test_grid_facts_name_the_extremes_the_last_epochs_and_what_the_best_epoch_flatters():
    table = grid({(5, 2): 30.0, (5, 8): 31.0, (9, 2): 25.0, (9, 8): 26.0}, epochs=30)
    table = table.assign(
        best_epoch=[30, 20, 30, 30], final_test_vfe=table.best_test_vfe + [0, 0.4, 0, 0]
    )
    facts = v.grid_facts(table)
    assert "lowest best test VFE 25.00 nats at h = 9, l = 2 (epoch 30)" in facts
    assert "highest 31.00 at h = 5, l = 8" in facts
    assert "the last epoch in 3 of 4 cells" in facts
    assert "0.10 nats on average, at most 0.40" in facts
    assert "best test VFE at l = 2, 2" in facts


def test_runs_against_compare_each_run_with_a_three_seed_mean_and_the_first_with_the_rest():
    runs = pd.DataFrame(
        dict(hidden_dim=2000, hh_lr_scale=[0.25, 1.0], device="cpu", best_test_vfe=[23.3, 23.8])
    )
    lines = v.runs_against(runs, pd.Series({"mean": 23.4}), spread=0.1).split("\n")
    se3 = 0.1 * np.sqrt(2 / 3)
    assert f"-0.100 nats (SE {se3:.3f}, -1.2 SE, not resolved)" in lines[0]
    assert "x 0.25 (cpu) minus h = 2000, h x h layers' rate x 1 (cpu): -0.500" in lines[2]
    assert lines[2].endswith("resolved)") and "not" not in lines[2]


def test_sweep_table_gives_each_lambdas_change_from_none_in_nats_and_errors():
    sweep = pd.DataFrame(
        dict(
            hidden_dim=[50, 50, 500, 500],
            weight_decay=[0.0, 1.0, 0.0, 1.0],
            best_test_vfe=[24.0, 25.0, 23.0, 23.1],
            final_test_vfe=[24.0, 24.0, 23.0, 23.5],
        )
    )
    t = v.sweep_table(sweep, spread_best=0.1, spread_final=0.2)
    assert t.loc[1.0, ("best: change from 0 (SE)", 50)] == "+1.000 (+10.0)*"
    assert t.loc[1.0, ("best: change from 0 (SE)", 500)] == "+0.100 (+1.0)"
    assert t.loc[1.0, ("final: change from 0 (SE)", 500)] == "+0.500 (+2.5)"


def test_decay_facts_count_the_cells_raised_the_resolved_rises_and_the_one_lowered():
    q4 = grid({(5, 2): 30.0, (50, 2): 25.0, (500, 2): 23.0}, active_units=[9, 5, 6])
    q6 = grid({(5, 2): 29.0, (50, 2): 25.1, (500, 2): 24.0}, active_units=[3, 4, 5])
    recs = [dict(settings=dict(hidden=500), test_kl=[8.0, 7.0])]
    facts = v.decay_facts(q4, q6, recs, [dict(settings=dict(hidden=500), test_kl=[6.0])], 0.1)
    assert "raised the best test VFE in 2 of 3 cells, resolved (3 SE = 0.300) in 1" in facts
    assert "by 0.10 to 1.00 nats where h >= 50" in facts
    assert "lowered it at h = 5, l = 2: -1.00 nats (-10.0 SE); active units 9 without" in facts
    assert "final test KL Q4 7.0, Q6 6.0 nats" in facts


def test_decoder_cost_sets_the_runs_side_by_side_with_the_gaussian_cells_q4_units():
    recon = pd.DataFrame(
        dict(
            recon=["mse", "bernoulli"],
            hidden_dim=200,
            latent_dim=100,
            epochs=5,
            final_test_vfe=[26.0, 248.0],
            active_units=[17, 26],
        )
    )
    records = [
        dict(test_recon=[20.0, 19.0], test_kl=[7.0]),
        dict(test_recon=[236.0], test_kl=[12.5]),
    ]
    q4 = grid({(200, 100): 23.9, (200, 10): 23.6}, epochs=30, active_units=[6, 6])
    table, same = v.decoder_cost(recon, records, q4)
    assert list(table.test_reconstruction) == [19.0, 236.0] and list(table.test_kl) == [7.0, 12.5]
    assert same.to_dict("records") == [
        dict(hidden_dim=200, latent_dim=100, epochs=30, active_units=6)
    ]


def test_pixel_costs_compare_the_squared_error_with_the_bernoullis_log_loss():
    line = v.pixel_costs((0.1,)).split("\n")[0]
    assert "Gaussian 0.0100 nats" in line and f"{-np.log(0.9):.4f}" in line and "11 times" in line


def test_bound_gaps_measure_each_models_gap_from_its_one_draw_estimate():
    bound = pd.DataFrame(
        dict(
            hidden_dim=[5, 5, 9, 9],
            latent_dim=2,
            active_units=2,
            test_vfe=30.0,
            k=[1, 10] * 2,
            nll=[30.0, 29.0, 28.0, 27.5],
            se=0.1,
            below_k1_se=[0.0, 0.05, 0.0, 0.04],
        )
    )
    top = v.bound_gaps(bound)
    assert list(top.gap) == [1.0, 0.5] and list(top.gap_se) == [0.05, 0.04]


def test_bound_gaps_columns_add_up_the_one_draw_estimate_is_the_estimate_plus_its_gap():
    bound = pd.DataFrame(
        dict(hidden_dim=5, latent_dim=2, active_units=2, test_vfe=31.0, k=[1, 10])
        | dict(nll=[30.0, 29.0], se=0.1, below_k1_se=[0.0, 0.05])
    )
    top = v.bound_gaps(bound)
    assert "test_vfe" not in top and list(top.k1_vfe) == list(top.nll + top.gap) == [30.0]


def test_bound_facts_split_two_models_difference_into_likelihood_and_gap():
    ks = [1, 1000, 5000]
    bound = pd.DataFrame(
        dict(
            hidden_dim=500,
            latent_dim=[10] * 3 + [300] * 3,
            active_units=5,
            test_vfe=0.0,
            k=ks * 2,
            nll=[23.0, 22.1, 22.0, 24.0, 22.9, 22.8],
            se=0.1,
            below_k1_se=0.03,
        )
    )
    facts = v.bound_facts(bound)
    assert "lowers the estimates by 0.100 to 0.100 nats" in facts
    assert "one-sample VFE +1.00 = estimated -log p(x) +0.80 + gap +0.20 ± 0.04" in facts


def test_unit_kls_keep_the_models_with_enough_latent_units_and_their_lines_count_the_carriers():
    torch.manual_seed(0)
    models = [(dict(settings=dict(hidden=5, latent=l)), v.VAE(5, l)) for l in (2, 10)]
    kls = v.unit_kls(models, torch.rand(50, 784))
    assert list(kls) == ["h=5, l=10"] and len(kls["h=5, l=10"]) == 10
    lines = v.unit_kl_lines({"m": np.array([0.5, 0.2, 0.05, 0.01])})
    assert (
        lines
        == "m: 2 units carry more than 0.1 nats, together 0.70 of 0.76; the other 2 carry 0.060"
    )


def test_class_centres_average_a_two_unit_models_codes_per_class():
    torch.manual_seed(0)
    model = v.VAE(5, 2).double()
    x, labels = torch.rand(40, 784), torch.arange(40) % 10
    centres = v.class_centres(model, x, labels)
    with torch.no_grad():
        codes = model.mean(model.encoder(x.double())).numpy()
    assert list(centres.index) == v.FASHION_CLASSES
    assert centres["unit 1"].iloc[3] == pytest.approx(codes[labels.numpy() == 3, 0].mean())


def test_gap_split_and_the_fixed_step_check_read_the_plateau_fit_against_the_others():
    row = dict(
        hidden_dim=500,
        latent_dim=10,
        train_size=60_000,
        split="test",
        images=1000,
        steps=100,
        amortisation=0.7,
        approximation=0.3,
        total=1.0,
        nll=22.0,
        amortisation_se=0.02,
        approximation_se=0.01,
    )
    gaps = pd.DataFrame(
        [
            dict(row, fit="plateau"),
            dict(row, fit="default", amortisation=0.65, nll=22.01),
            dict(row, fit="fixed", amortisation=0.69),
        ]
    )
    bound = pd.DataFrame(dict(hidden_dim=[500], latent_dim=[10], k=[5000], nll=[22.2]))
    (split,) = v.gap_split(gaps, bound).to_dict("records")
    assert split["amortisation"] == "0.700 ± 0.020" and split["amortisation share"] == "70%"
    assert split["looser fit: amortisation"] == "-0.050" and split["-log p(x), encoder"] == "22.200"
    assert v.fixed_step_check(gaps).endswith("amortisation 0.690, against the plateau's 0.700")


def test_repro_table_pairs_each_cell_trained_again_with_its_stored_q4_record():
    again = v.repro_table()
    q4 = v.experiment_table("q4")[0].set_index(["hidden_dim", "latent_dim"])
    assert len(again) > 0
    for r in again.itertuples():
        assert round(r.best_stored, 3) == q4.best_test_vfe[r.h, r.l]
        assert r.best_diff == pytest.approx(r.best_again - r.best_stored)


def test_kept_check_re_evaluates_a_kept_model_to_its_recorded_final_test_vfe():
    (row,) = v.kept_check(v.kept_models()[:1], v.load_data()[1]).to_dict("records")
    assert row["re-evaluated"] == row["kept: final"]


def test_training_times_count_a_cell_shared_between_experiments_once():
    times, cells, hours = v.training_times()
    q4 = times.set_index("experiment").loc["q4"]
    assert q4.cells == len(v.experiment_cells("q4"))
    assert cells < times.cells.sum() and hours < times.minutes.sum() / 60


def test_training_times_count_a_twin_on_another_device_and_a_cell_trained_again_as_cells():
    cells = [(n, s) for n in v.EXPERIMENTS for s in v.experiment_cells(n)]
    files = {v.cell_path(s, v.experiment_folder(n)) for n, s in cells}
    assert v.training_times()[1] == len({f for f in files if f.exists()})


def test_the_cells_trained_again_are_read_from_their_own_folder_or_named_by_command(tmp_path):
    again = v.repro_table()
    assert len(again) == len(v.experiment_cells("repro")) and again.best_diff.abs().max() > 0
    shutil.copytree(v.RESULTS_DIR / "cells", tmp_path / "cells")
    with pytest.raises(v.ResultsError, match=rf"-m vae_helpers repro --results {tmp_path}`"):
        v.repro_table(tmp_path)


def test_the_lowest_width_is_tied_with_every_width_the_rule_cannot_separate_from_it():
    paired = {10: [30.0, 30.2, 29.9], 150: [26.2, 26.3, 26.25], 300: [26.3, 26.32, 26.36]}
    t = v.lowest_width(paired, 1_000, None).set_index("h")
    assert t.minus_lowest[150] == 0 and bool(t.resolved[10]) and not t.resolved[300]
    single = {500: [23.49], 2000: [23.34], 4750: [23.70]}
    t = v.lowest_width(single, 60_000, 0.1).set_index("h")
    assert list(t.resolved) == [False, False, True]  # 0.15 is 1.5 SE; 0.36 is 3.6
    assert "tied with it by the rule: h = 500" in v.minimum_line(t.reset_index())


def far_run(hidden, test, train):
    epochs = list(range(1, len(test) + 1))
    best = min(test)
    return dict(
        settings=dict(hidden=hidden), n_params=hidden * 10_000, test_vfe=test, train_vfe=train,
        eval_epochs=epochs, best_test_vfe=best, best_epoch=epochs[test.index(best)],
        final_test_vfe=test[-1],
    )  # fmt: skip


def test_the_far_side_lines_give_each_runs_last_epoch_and_judge_it_against_h_2000():
    runs = [far_run(2000, [23.5, 23.3], [23.2, 23.1]), far_run(5000, [23.4, 23.7], [23.2, 23.5])]
    lines = v.q7_far_side_lines(runs, {"best_test_vfe": 0.1, "final_test_vfe": 0.1}).split("\n")
    assert (
        "final minus best +0.300" in lines[1]
        and "at the best epoch 23.200, at the final 23.500" in lines[1]
    )
    assert lines[2].startswith("h = 5000 minus h = 2000, best: +0.100 (+1.0 SE, not resolved)")
    assert lines[3].startswith("h = 5000 minus h = 2000, final: +0.400 (+4.0 SE, resolved)")


def test_the_widths_on_the_gpu_name_the_seeds_where_only_some_ran_there():
    runs = [
        dict(settings=dict(hidden=h, seed=seed), device=device)
        for h, seed, device in [
            (500, 0, "cpu"),
            (1000, 0, "cpu"),
            (1000, 2, "cuda"),
            (2000, 0, "cuda"),
        ]
    ]
    assert v.on_gpu(runs) == "h = 1000 (seed 2), h = 2000"
    assert v.on_gpu(runs[:2]) == "none"
