"""The results store: where each cell's record, weights and checkpoint live, atomic writes,
records checked when read, and the locks that let several processes share one folder."""

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .data import ROOT
from .model import n_params_formula

# The results folder the notebook reads and the command line writes by default; VAE_RESULTS_DIR
# names another (set it before `import vae_helpers`, e.g. to draw a re-run in /tmp/fresh).
RESULTS_DIR = Path(os.environ.get("VAE_RESULTS_DIR") or ROOT / "results")


class ResultsError(RuntimeError):
    """A stored result that cannot be trusted (corrupt, or not what its name says)."""


HOST = platform.node()


def atomic_save(obj, path, save):
    """Write to a temporary file of this process's own, then rename: a crash never leaves half a
    file, and two writers of one path never share a temporary file. A full disk is said so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}~{HOST}~{os.getpid()}~{os.urandom(4).hex()}.tmp")
    try:
        save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # torch.save reports a failed write as "unexpected pos ...", without the reason
        failed = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
            isinstance(err, RuntimeError) and "unexpected pos" in str(err)
        )
        if not failed:
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(
            errno.ENOSPC,
            f"{path} could not be written: the disk is full ({free:,} bytes free there); free "
            "some space and run the same command again, which resumes",
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def load_pt(path, device="cpu"):
    """A .pt file of tensors and plain data (weights, checkpoints). weights_only: a file planted
    in a shared results folder cannot run code as whoever loads it; it fails to load instead."""
    return torch.load(path, map_location=device, weights_only=True)


def save_csv(table, path):
    table.to_csv(path, index=False)


def write_json(obj, path):
    """Strict JSON: a number that is not finite (a diverged run's peak) is written as the string
    "inf", "-inf" or "nan"."""
    Path(path).write_text(json.dumps(finite_json(obj), indent=1, allow_nan=False))


def finite_json(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite_json(x) for k, x in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(x) for x in obj]
    return obj


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# atomic_save's temporary files: <target>~<host>~<pid>~<8 hex digits>.tmp, beside the target, in
# the store's own folders. Nothing else is ever deleted.
TMP_NAME = re.compile(r"^.+~(?P<host>[^~]+)~(?P<pid>\d+)~[0-9a-f]{8}\.tmp$")
STORE_FOLDERS = ("", "cells", "checkpoints", "weights", "recons", "models")


def remove_leftovers(results_dir, max_age=86_400):
    """Delete the temporary files of writers that died: this machine's dead processes', and any
    older than a day (another machine's). Only atomic_save's own, only in the store's folders."""
    for folder in STORE_FOLDERS:
        for tmp in (Path(results_dir) / folder).glob("*.tmp"):
            name = TMP_NAME.match(tmp.name)
            if name is None:
                continue
            try:
                old = time.time() - tmp.stat().st_mtime > max_age
            except FileNotFoundError:
                continue
            if old or (name["host"] == HOST and not alive(int(name["pid"]))):
                tmp.unlink(missing_ok=True)


def writable_results(results_dir):
    """The results folder, made and checked to take files before any training starts."""
    if not str(results_dir).strip():
        raise ValueError(
            "the results folder is named by an empty string; name a folder (default: results/)"
        )
    path = Path(results_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"the results folder {path} is a file, not a folder; name a folder"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe~{HOST}~{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"cannot write to the results folder {path} ({err.strerror}); "
            "name one you can write to with --results"
        ) from None
    return path


def cell_path(s, results_dir=RESULTS_DIR):
    """Where a cell's record lives: a readable name plus a hash of every setting."""
    digest = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
    slug = f"{s['dataset']}-h{s['hidden']}-l{s['latent']}-wd{s['weight_decay']:g}"
    slug += f"-e{s['epochs']}-s{s['seed']}"
    slug += "-bf16" if s.get("precision") == "bfloat16" else ""
    slug += f"-o{s['train_offset']}" if s.get("train_offset") else ""
    return Path(results_dir) / "cells" / f"{slug}-{digest}.json"


def recons_path(s, results_dir=RESULTS_DIR):
    """Where a cell's kept test reconstructions live (uint8 arrays `final` and `best_val`)."""
    return Path(results_dir) / "recons" / cell_path(s).with_suffix(".npz").name


def save_npz(arrays, path):
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def weights_path(s, results_dir=RESULTS_DIR):
    return Path(results_dir) / "weights" / cell_path(s).with_suffix(".pt").name


def checkpoint_path(group, results_dir=RESULTS_DIR):
    key = hashlib.sha1(json.dumps(group, sort_keys=True).encode()).hexdigest()[:16]
    return Path(results_dir) / "checkpoints" / f"{key}.pt"


def strict_json(text):
    """JSON as write_json writes it: no NaN or Infinity literals, no key given twice."""

    def refuse(constant):
        raise ValueError(f"{constant} is not a number JSON allows")

    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) < len(keys):
            raise ValueError(
                f"a key is given twice: {sorted({k for k in keys if keys.count(k) > 1})}"
            )
        return dict(items)

    return json.loads(text, parse_constant=refuse, object_pairs_hook=pairs)


def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def record_problem(rec):
    """What is wrong with a record, or None: its fields, types and finite values, list lengths that
    match the evaluated epochs, the best equal to the minimum, the parameter count the formula's."""
    s = rec.get("settings")
    if not isinstance(s, dict) or not {"hidden", "latent", "epochs"} <= set(s):
        return "settings"
    epochs = rec.get("eval_epochs")
    if not isinstance(epochs, list) or not epochs or not all(isinstance(e, int) for e in epochs):
        return "eval_epochs"
    if epochs != sorted(set(epochs)) or not 1 <= epochs[0] <= epochs[-1] <= s["epochs"]:
        return "eval_epochs"
    for field in ("test_vfe", "test_recon", "test_kl"):
        values = rec.get(field)
        if not isinstance(values, list) or len(values) != len(epochs):
            return field
        if not all(number(x) and x >= 0 for x in values):
            return field
    for field in ("train_vfe", "val_vfe"):  # train_vfe is empty in the oldest records
        values = rec.get(field, [])
        if values and (len(values) != len(epochs) or not all(number(x) for x in values)):
            return field
    running = rec.get("running_train_vfe")
    if not isinstance(running, list) or not running or not all(number(x) for x in running):
        return "running_train_vfe"
    if len(running) < epochs[-1]:
        return "running_train_vfe"
    if not number(rec.get("n_params")) or rec["n_params"] != n_params_formula(
        s["hidden"], s["latent"]
    ):
        return "n_params"
    test = rec["test_vfe"]
    checks = dict(best_test_vfe=min(test), final_test_vfe=test[-1])
    for field, value in checks.items():
        if not number(rec.get(field)) or rec[field] != value:
            return field
    if rec.get("best_epoch") != epochs[test.index(min(test))]:
        return "best_epoch"
    if not number(rec.get("wall_seconds")) or rec["wall_seconds"] < 0:
        return "wall_seconds"
    seconds = rec.get("epoch_seconds")
    if not isinstance(seconds, list) or not all(number(x) and x >= 0 for x in seconds):
        return "epoch_seconds"
    units = rec.get("active_units", "missing")
    if not (units is None and "diverged_epoch" in rec) and not (
        isinstance(units, int) and not isinstance(units, bool) and 0 <= units <= s["latent"]
    ):
        return "active_units"
    return None


def load_cell(path, s):
    """A stored record, checked to be whole and consistent, and to be the cell asked for."""
    try:
        rec = strict_json(Path(path).read_text())
        problem = record_problem(rec) if isinstance(rec, dict) else "the whole file"
        problem = problem and f"its {problem} is missing, of the wrong kind or inconsistent"
    except (ValueError, IsADirectoryError) as err:
        problem = str(err)
    if problem:
        raise ResultsError(
            f"{path} is corrupt ({problem}); it was left as it is. Delete it to retrain that cell."
        )
    if rec["settings"] != s:
        raise ResultsError(
            f"{path} holds a cell trained with {rec['settings']}, not {s}; "
            f"it was left as it is. Delete it to retrain that cell."
        )
    return rec


def stored_and_missing(cells, results_dir=RESULTS_DIR):
    """The stored records among `cells` (each checked), and the settings of those not stored (each
    once, though asked for twice)."""
    have = [s for s in cells if cell_path(s, results_dir).exists()]
    missing = [s for s in cells if s not in have]
    return (
        [load_cell(cell_path(s, results_dir), s) for s in have],
        [s for i, s in enumerate(missing) if s not in missing[:i]],
    )


@contextmanager
def group_lock(checkpoint):
    """An exclusive lock on a group (flock on <checkpoint>.lock), or None if another process holds
    it. The kernel drops the lock of a process that dies, so its successor can take the group. A
    lock file removed by its holder (remove_free_locks) is noticed, and the new file locked."""
    import fcntl

    path = Path(checkpoint).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            try:
                if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                    yield f
                    return
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
