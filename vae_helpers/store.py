"""The results store: where each cell's record, weights and checkpoint live, atomic writes,
records checked when read, and the locks that let several processes share one folder."""

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .data import ROOT
from .model import n_params_formula
from .settings import DEVICES, cell_settings, recorded_settings

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
        failed = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (
            isinstance(err, RuntimeError) and "unexpected pos" in str(err)
        )
        if not failed:
            raise
        code, why = why_not_written(path.parent)
        raise OSError(
            code,
            f"{path} could not be written: {why} and run the same command again, which resumes",
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def why_not_written(folder):
    """Why a write failed for want of room: a file-size limit (ulimit -f) smaller than the space
    left on the disk, or the disk itself."""
    import resource

    limit, free = resource.getrlimit(resource.RLIMIT_FSIZE)[0], shutil.disk_usage(folder).free
    if limit != resource.RLIM_INFINITY and limit < free:
        return (
            errno.EFBIG,
            f"it is larger than the file-size limit ({limit:,} bytes, ulimit -f); raise it",
        )
    return errno.ENOSPC, f"the disk is full ({free:,} bytes free there); free some space"


def load_pt(path, device="cpu"):
    """A .pt file of tensors and plain data (weights, checkpoints). weights_only: a file planted
    in a shared results folder cannot run code as whoever loads it; it is refused, named."""
    try:
        return torch.load(
            plain_file(path) if os.path.lexists(path) else path,
            map_location=device,
            weights_only=True,
        )
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many kinds for a damaged or foreign file
        why = str(err).strip().splitlines()[0][:120]
        raise ResultsError(
            f"{path} is not a file of tensors this package wrote ({why}); it was left as it is"
        ) from None


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
    except (PermissionError, OverflowError):  # another user's, or no process id at all
        pass
    return True


# atomic_save's temporary files: <target>~<host>~<pid>~<8 hex digits>.tmp, beside the target, in
# the store's own folders. Nothing else is ever deleted.
TMP_NAME = re.compile(r"^.+~(?P<host>[^~]+)~(?P<pid>\d{1,7})~[0-9a-f]{8}\.tmp$")
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


# The store's other names: in checkpoints/, a group's <16 hex digits>.pt, .json and .lock and a
# cell's claim <cell name>.lock. Nothing else there is renamed or deleted.
CELL = r"[a-z-]+-h\d+-l\d+-wd.+-[0-9a-f]{10}"
CELL_NAME = re.compile(rf"^{CELL}\.\w+$")
OWN_NAME = re.compile(rf"^([0-9a-f]{{16}}\.(pt|json|lock)|{CELL}\.lock)$")
# The store's mark, made in each results folder it makes (or finds empty).
MARK = ".vae-results"


def writable_results(results_dir):
    """The results folder, made and checked before any training starts: the store's own (see
    marked), with no file where its sub-folders go, and taking a probe file."""
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
        marked(path)
        fd, probe = tempfile.mkstemp(prefix=".probe~", dir=path)  # O_EXCL: it follows no link
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"cannot write to the results folder {path} ({err.strerror}); "
            "name one you can write to with --results"
        ) from None
    for name in STORE_FOLDERS[1:] + ("slurm",):
        if os.path.lexists(path / name) and not (path / name).is_dir():
            raise NotADirectoryError(
                f"{path / name} is a file where the store keeps its folder {name}/; move it "
                "away, or name another results folder with --results"
            )
    return path


def marked(path):
    """Refuse a folder that is not the store's before anything in it is touched: one that holds
    other files and neither the store's mark nor records (a folder from before the mark). An
    empty one is marked."""
    if any(CELL_NAME.match(p.name) for p in (path / "cells").glob("*.json")):
        return  # a folder from before the mark: it holds records by the store's names
    names = sorted(p.name for p in path.iterdir())
    if MARK in names:
        return
    if names:
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ResultsError(
            f"{path} is not a results folder of this package (it holds {listed} and not the "
            f"store's mark {MARK}); nothing in it was touched: name a new or empty folder "
            "(--results)"
        )
    try:
        os.close(os.open(path / MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    except FileExistsError:
        pass  # marked by another command at the same moment


def cell_path(s, results_dir=RESULTS_DIR):
    """Where a cell's record lives: cells/<a readable name plus a hash of every setting>.json.
    A cell pinned to a device whose name holds another device's record is its twin there:
    cells/<device>/<name>.json (the name is the same: the device is not a setting)."""
    return Path(results_dir) / "cells" / f"{cell_key(s, results_dir)}.json"


def cell_name(s):
    """The cell's name, from its settings alone: a readable part and a hash of every setting."""
    plain = recorded_settings(s)
    digest = hashlib.sha1(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:10]
    slug = f"{s['dataset']}-h{s['hidden']}-l{s['latent']}-wd{s['weight_decay']:g}"
    slug += f"-e{s['epochs']}-s{s['seed']}"
    slug += "-bf16" if s.get("precision") == "bfloat16" else ""
    slug += f"-o{s['train_offset']}" if s.get("train_offset") else ""
    return f"{slug}-{digest}"


def cell_key(s, results_dir=RESULTS_DIR):
    """The cell's name, under <device>/ for a pinned twin: records, weights and reconstructions
    are stored by it."""
    name = cell_name(s)
    pinned = s.get("device")
    if pinned and recorded_device(Path(results_dir) / "cells" / f"{name}.json") not in (
        None,
        pinned,
    ):
        return f"{pinned}/{name}"
    return name


def recorded_device(path):
    """The device ("cpu" or "cuda") of the record at `path`, or None where there is none."""
    if not os.path.lexists(path):
        return None
    try:
        return (
            str(strict_json(plain_file(path).read_text()).get("device", "")).split(":")[0] or None
        )
    except (ValueError, AttributeError, OSError) as err:
        raise ResultsError(f"{path} is corrupt ({err}); it was left as it is") from None


def plain_file(path):
    """`path`, refused as a ValueError unless it is a regular file: a FIFO would hang the read."""
    if not Path(path).is_file():
        raise ValueError("it is not a regular file")
    return Path(path)


def recons_path(s, results_dir=RESULTS_DIR):
    """Where a cell's kept test reconstructions live (uint8 arrays `final` and `best_val`)."""
    return Path(results_dir) / "recons" / f"{cell_key(s, results_dir)}.npz"


def save_npz(arrays, path):
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def weights_path(s, results_dir=RESULTS_DIR):
    return Path(results_dir) / "weights" / f"{cell_key(s, results_dir)}.pt"


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

    try:
        return json.loads(text, parse_constant=refuse, object_pairs_hook=pairs)
    except RecursionError:
        raise ValueError("it is nested too deeply to be a record") from None


def number(x):
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:  # an integer too large for a float is no number a record holds
        return bool(np.isfinite(x))
    except (TypeError, OverflowError):
        return False


def record_problem(rec):
    """What is wrong with a record, or None: its fields, types and finite values, list lengths that
    match the evaluated epochs, the best equal to the minimum, the parameter count the formula's."""
    s = rec.get("settings")
    try:  # every setting named and of its kind, as cell_settings checks a new cell's
        cell_settings(**s)
    except (TypeError, ValueError):
        return "settings"
    if not isinstance(rec.get("device"), str) or rec["device"].split(":")[0] not in DEVICES:
        return "device"
    gone = rec.get("diverged_epoch", 1)
    if not isinstance(gone, int) or isinstance(gone, bool) or not 1 <= gone <= s["epochs"]:
        return "diverged_epoch"
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
        rec = strict_json(plain_file(path).read_text())
        problem = record_problem(rec) if isinstance(rec, dict) else "the whole file"
        problem = problem and f"its {problem} is missing, of the wrong kind or inconsistent"
    except (ValueError, IsADirectoryError) as err:
        problem = str(err)
    if problem:
        raise ResultsError(
            f"{path} is corrupt ({problem}); it was left as it is. Delete it to retrain that cell."
        )
    if rec["settings"] != recorded_settings(s):
        raise ResultsError(
            f"{path} holds a cell trained with {rec['settings']}, not {recorded_settings(s)}; "
            f"it was left as it is. Delete it to retrain that cell."
        )
    if s.get("device") and not str(rec.get("device")).startswith(s["device"]):
        raise ResultsError(
            f"{path} was trained on {rec.get('device')}, not on {s['device']} as asked; it was "
            "left as it is. Delete it to retrain that cell."
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
def group_lock(checkpoint, say=True):
    """An exclusive lock on a group (flock on <checkpoint>.lock), or None if another process holds
    it (with `say`, said once). The kernel drops the lock of a process that dies, so its successor
    can take the group. A lock file removed by its holder (remove_free_locks) is noticed, and the
    new file locked. The holder writes its command into the file, for those who wait."""
    import fcntl

    path = Path(checkpoint).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with os.fdopen(own_file(path), "r+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if say:
                    say_waiting(path, f)
                yield None
                return
            try:
                try:
                    now = os.lstat(path).st_ino
                except FileNotFoundError:
                    now = None
                if now == os.fstat(f.fileno()).st_ino:
                    f.truncate(0)
                    f.write(command_id().encode())
                    f.flush()
                    yield f
                    return
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def own_file(path):
    """A descriptor of the plain file at `path`, made if absent. A link there (symbolic or hard,
    as the file is written) is not followed, and it, a FIFO (which would hang an open) or
    anything else is an error naming it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        fd = None
    if fd is not None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:  # 0: removed by its holder just now
            return fd
        os.close(fd)
    kinds = {stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO"}
    kinds[stat.S_IFREG] = "a hard link to a file elsewhere"
    kind = kinds.get(stat.S_IFMT(os.lstat(path).st_mode), "not a plain file")
    raise ResultsError(
        f"{path} is {kind}, where the store keeps a lock file of its own (it follows no link "
        "out of its folder); remove it and run the command again"
    )


SAY_WAITING = True  # False in all of a command's worker processes but the first
SAID = set()  # the locks this process has said it waits for


def command_id():
    """This command, as a lock's holder: its host and its main process (a worker's parent)."""
    import multiprocessing

    return f"{HOST} {os.getppid() if multiprocessing.parent_process() else os.getpid()}"


def say_waiting(path, f):
    """Say, once, that another command holds the lock at `path`, and which one."""
    f.seek(0)
    holder = f.read(300).decode(errors="replace").strip()
    if not SAY_WAITING or path in SAID or holder == command_id():
        return
    SAID.add(path)
    host, _, pid = holder.rpartition(" ")  # checked: the file's text may be anyone's
    known = re.fullmatch(r"[\w.-]+ \d+", holder)
    who = f"the command of process {pid} on {host}" if known else "another command"
    what = f"the cell {path.stem}" if CELL_NAME.match(path.name) else "a group of cells"
    side = path.with_suffix(".json")  # a group's sidecar, made with its first checkpoint
    try:
        cells = json.loads(side.read_text())["cells"] if side.is_file() else None
        what = f"h={cells[0]['hidden']} l={','.join(str(s['latent']) for s in cells)}"
    except (OSError, ValueError, LookupError, TypeError, RecursionError):
        pass
    print(
        f"waiting for {what}, which {who} is training (it holds {path}); if that command was "
        "stopped (Ctrl-Z), resume it (fg) or end it, and this one takes over",
        file=sys.stderr,
    )


# The analyses' tables, <results>/<name>.csv, each made by `python -m vae_helpers <name>`, share
# one cache scheme. A table is made of parts; each of a part's rows holds the part's key (the
# canonical JSON of every input that changes those rows: the cells, the fit, the sizes) in the
# column `key`. A part's per-image arrays go beside the table, in <name>.npz as <part>_<array>,
# with the key as <part>_key. So a part is computed once, and again only if an input changes.


def results_folder(results_dir=None):
    """The results folder named, or the default one (RESULTS_DIR, read when called)."""
    return Path(RESULTS_DIR if results_dir is None else results_dir)


def load_npz(path):
    """Every array of an .npz file. One holding pickled objects (which could run code when loaded)
    or not an array file at all is refused with the file named."""
    from zipfile import BadZipFile

    try:
        with np.load(plain_file(path) if os.path.lexists(path) else path) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, BadZipFile, MemoryError) as err:
        raise ResultsError(
            f"{path} is not an array file this package wrote ({err}); it was left as it is: "
            "delete it and run the command that made it again"
        ) from None


def cached_table(path, parts, compute=None, arrays=False):
    """The table in `path` (a CSV) made of `parts` ({name: key}), in their order. A part stored
    under its key is read back; compute(name) makes another as (rows, per-image arrays), and the
    files are rewritten after each (arrays first), so an interrupted run keeps what it finished.
    Without `compute` nothing is written, and a part not stored is an error naming the command."""
    import pandas as pd

    path, keys = Path(path), {n: json.dumps(k, sort_keys=True) for n, k in parts.items()}
    table = stored_table(path) if os.path.lexists(path) else pd.DataFrame(columns=["key"])
    side = path.with_suffix(".npz")
    images = load_npz(side) if arrays and os.path.lexists(side) else {}
    done = {
        n: table[table.key == k]
        for n, k in keys.items()
        if (table.key == k).any() and (not arrays or str(images.get(f"{n}_key")) == k)
    }
    missing = [n for n in keys if n not in done]
    if missing and compute is None:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ResultsError(
            f"{path} lacks {missing[0]}{more} (or holds them made from other inputs); make "
            f"them with `.venv/bin/python -m "
            f"vae_helpers {path.stem} --results {path.parent}`, then run this again"
        )
    images = {a: x for a, x in images.items() if any(a.startswith(f"{n}_") for n in done)}
    for n in missing:
        rows, new = compute(n)
        done[n] = pd.DataFrame(rows).assign(key=keys[n])
        if arrays:
            images.update({f"{n}_{a}": x for a, x in new.items()}, **{f"{n}_key": keys[n]})
            atomic_save(images, side, save_npz)
        atomic_save(in_order(done, keys), path, save_csv)
    return in_order(done, keys)


def stored_table(path):
    """A CSV that cached_table wrote (a `key` column); anything else is refused, named, and left."""
    import pandas as pd

    try:
        table = pd.read_csv(plain_file(path))
        if "key" not in table:
            raise ValueError("it has no key column")
    except (ValueError, OSError, pd.errors.ParserError) as err:  # EmptyDataError is a ValueError
        raise ResultsError(
            f"{path} is not a table this package wrote ({str(err).splitlines()[0][:100]}); it was "
            f"left as it is: delete it and make it again with `.venv/bin/python -m vae_helpers "
            f"{path.stem} --results {path.parent}`"
        ) from None
    return table


def in_order(done, keys):
    import pandas as pd

    frames = [done[n] for n in keys if n in done]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["key"])
