"""Variational autoencoders on Fashion-MNIST for COMP61021 Coursework 2.

Read in this order; each module imports only modules above it:

    model.py        the VAE (encode, reparameterise, decode), the VFE and its KL, parameter counts
    data.py         Fashion-MNIST from Debian's package or torchvision, class names
    settings.py     a cell's settings: the course's protocol, checked
    train.py        seeded data order and noise, records, evaluation, train_cell (one model)
    store.py        results/: paths, atomic writes, checked records, locks
    stacked.py      GridVAE: the cells of one hidden size trained as one model, with checkpoints
    runner.py       training the missing cells: in this process, worker processes or Slurm
    experiments.py  each question's cells as data, and their tables
    plots.py        heatmaps, curves, image grids, figures shown with alternative text
    analysis.py     kept models: samples, the importance-weighted bound and its gap, the code
    gaps.py         that gap split into amortisation and approximation (Cremer et al. 2018)
    tradeoff.py     Q7's bias and variance over training sets, and their figure
    tables.py       the notebook's tables: the noise rule and its contrasts, key numbers, checks
    __main__.py     the command line: `python -m vae_helpers q4`

`import vae_helpers as v` gives every public name of these modules as v.<name>, imported when
first asked for (so `python -m vae_helpers --help` answers before PyTorch loads). Tests that
replace a function replace it in the module that calls it.
"""

import importlib

MODULES = ("model", "data", "settings", "train", "store", "stacked", "runner", "experiments")
MODULES += ("plots", "analysis", "gaps", "tradeoff", "tables")


def __getattr__(name):
    """v.<name>: a module of the package, or the name from the first module above that has it."""
    if name in MODULES:
        return importlib.import_module(f".{name}", __name__)
    for module in MODULES:
        found = getattr(importlib.import_module(f".{module}", __name__), name, MODULES)
        if found is not MODULES and not name.startswith("_"):
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    names = {n for m in MODULES for n in vars(__getattr__(m)) if not n.startswith("_")}
    return sorted(names | set(MODULES))
