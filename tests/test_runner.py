"""Training the missing cells (runner.py): here, its progress; the store in use is in
test_experiments.py, workers and signals in test_cli.py."""

from conftest import tiny

import vae_helpers as v


def test_progress_is_measured_in_work_so_a_small_cell_stored_is_a_small_step(tmp_path):
    small, wide = tiny(hidden=5), v.cell_settings(2000, 10)
    cells = {tmp_path / "small.json": small, tmp_path / "wide.json": wide}
    (tmp_path / "small.json").touch()
    with v.work_bar(list(cells.values()), "training", disable=False) as bar:
        v.stored_work(bar, cells)
        assert 0 < bar.n < bar.total / 1000 and bar.postfix == "1/2 cells stored"
        (tmp_path / "wide.json").touch()
        v.stored_work(bar, cells)
        assert bar.n == bar.total == v.work(small) + v.work(wide)


def test_training_into_a_folder_reads_no_other_folder(tmp_path, monkeypatch):
    asked = []
    recorded = v.store.recorded_device
    monkeypatch.setattr(v.store, "recorded_device", lambda p: asked.append(p) or recorded(p))
    v.run_cells([v.cell_settings(**dict(tiny(), device="cpu"))], tmp_path, progress=False)
    assert asked and all(tmp_path in p.parents for p in asked)
