"""Helpers shared by the tests."""

import matplotlib

import vae_helpers as v

matplotlib.use("Agg")


def tiny(hidden=5, latent=2, **kw):
    """A cell that trains in about a second: 300 images, one epoch."""
    return v.cell_settings(hidden, latent, **{"epochs": 1, "train_size": 300, **kw})


def wait_until(done, what, limit=600):
    """Poll until done() holds; the limit only stops a hung test, it is no measure of speed."""
    import time

    end = time.monotonic() + limit
    while not done():
        assert time.monotonic() < end, f"still waiting for {what} after {limit} s"
        time.sleep(0.05)


# A run of two worker processes on two groups (h = 5 and h = 50, 2 epochs), each group held after
# its first checkpoint while the hold file exists: a known point at which to signal the processes.
HELD_ARGS = ["q4", "--epochs", "2", "--max-params", "90000"]


def held_run(tmp_path):
    """Start the held run in a session of its own; returns (process, results folder, hold file)
    once both groups are held. The caller removes the hold file to let it go on."""
    import os
    import subprocess
    import sys

    hold, results = tmp_path / "hold", tmp_path / "results"
    hold.touch()
    env = dict(os.environ, VAE_CHECKPOINT_SECONDS="0", VAE_HOLD_FILE=str(hold))
    cmd = [
        sys.executable,
        "-m",
        "vae_helpers",
        *HELD_ARGS,
        "--results",
        str(results),
        "--jobs",
        "2",
        "--no-progress",
    ]
    run = subprocess.Popen(
        cmd,
        env=env,
        cwd=v.ROOT,
        start_new_session=True,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_until(lambda: len(list((results / "checkpoints").glob("*.json"))) == 2, "both groups")
    return run, results, hold
