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
