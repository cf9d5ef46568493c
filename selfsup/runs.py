"""Run directories: claimed atomically, locked while a run writes into them, metrics kept across resumes.

Two runs started together with the same ``--name`` must never write into one directory. The claim is
``os.mkdir`` (atomic on every local and network filesystem: exactly one caller creates a directory)
followed by a lock file created with ``O_CREAT | O_EXCL`` that holds the owner's host and pid. A
second run gets one clear line naming the owner; a lock left by a killed run (its pid is gone on this
host) is taken over by ``--resume``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from selfsup.errors import ConfigError, RunDirError

LOCK_NAME = ".selfsup.lock"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")


def check_run_name(name: object, where: str = "name") -> str:
    """``name`` if it is a plain run name: letters, digits, ``-``, ``_`` and ``.``, not ``.`` or ``..``.

    A run name is one directory under ``--output``: a path (``../x``, ``/abs``), ``.`` or ``..`` would make
    the run directory some other folder (``runs/`` itself, the working directory), which a rerun could empty.

    Raises:
        ConfigError: one line naming the bad name.
    """
    if isinstance(name, str) and _PLAIN_NAME.fullmatch(name) and name not in (".", ".."):
        return name
    raise ConfigError(
        f"{where} must be a plain run name (letters, digits, '-', '_', '.'; not '.' or '..'), got {name!r}; "
        "--output chooses the folder runs go in"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _lock_is_stale(info: dict) -> bool:
    """A lock whose process is known to be gone (same host, pid not running, or not our pid reused)."""
    if info.get("host") != socket.gethostname():
        return False  # cannot tell from here
    pid = info.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def _os_error(err: OSError, path: Path, doing: str) -> RunDirError:
    reason = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += " (is the output directory read-only? pass --output elsewhere)"
    elif err.errno == errno.ENOSPC:
        reason += " (the disk is full)"
    return RunDirError(f"cannot {doing} {path}: {reason}")


def _take_lock(run_dir: Path, take_over_stale: bool) -> Path:
    lock = run_dir / LOCK_NAME
    payload = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read_lock(lock)
            if take_over_stale and _lock_is_stale(info):
                lock.unlink(missing_ok=True)  # a killed run's lock; a racing resumer loses at O_EXCL above
                continue
            owner = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
            raise RunDirError(
                f"{run_dir} is in use by another selfsup run ({owner}); wait for it, or pass another --name "
                f"(if that run is dead, delete {lock})"
            ) from None
        except OSError as err:
            raise _os_error(err, run_dir, "lock the run directory") from None
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        return lock
    raise RunDirError(f"{run_dir} is in use by another selfsup run; pass another --name")


def _has_results(run_dir: Path) -> bool:
    """Whether a run directory holds something a run produced: a checkpoint or an export."""
    return any((run_dir / "checkpoints").glob("*.ckpt")) or (run_dir / "export").exists()


def made_by_selfsup(run_dir: Path) -> bool:
    """Whether selfsup created ``run_dir``: it holds a selfsup lock, or a ``config.yaml`` naming this run.

    Only such a folder is ever emptied for a rerun: a folder of the user's (or ``runs/`` itself, or another
    run's parent) holds neither, whatever else it holds.
    """
    info = _read_lock(run_dir / LOCK_NAME)
    if isinstance(info, dict) and "pid" in info and "host" in info:
        return True
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):  # none, unreadable or not YAML: not a config of ours
        return False
    return isinstance(cfg, dict) and "method" in cfg and cfg.get("name") == run_dir.name


def _empty(run_dir: Path, keep: Path | None = None) -> None:
    for p in run_dir.iterdir():
        if p == keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def is_leftover(run_dir: Path) -> bool:
    """A run directory selfsup made that no run uses and nothing can resume: no checkpoint, no export, no
    live lock.

    What a run killed (or failed) before its first checkpoint leaves; a rerun with its name may take it.
    A folder selfsup did not create (:func:`made_by_selfsup`) is never a leftover, whatever it holds.
    """
    if _has_results(run_dir) or not made_by_selfsup(run_dir):
        return False
    lock = run_dir / LOCK_NAME
    return not lock.exists() or _lock_is_stale(_read_lock(lock))


@contextlib.contextmanager
def claim_run_dir(output: str | Path, name: str | None, base: str, resume: bool) -> Iterator[Path]:
    """Create (or, for ``resume``, lock) the run directory; yields it and releases the lock afterwards.

    ``name=None`` picks ``base``, ``base-1``, ... whichever ``os.mkdir`` creates first. ``name`` must be a
    plain name (:func:`check_run_name`). A given ``name`` whose directory selfsup made and that holds no
    checkpoint, no export and no live lock (a run that died before its first checkpoint) is emptied and
    reused; a non-empty folder selfsup did not make is refused, never emptied. If the block raises before the run wrote a checkpoint or an export,
    the directory goes again (a folder made by hand, empty before, is emptied), so a failed start never
    blocks a rerun.

    Raises:
        ConfigError: the name is not a plain name.
        RunDirError: the name is taken (or in use by a live run), the output folder is read-only or full.
    """
    if name is not None:
        check_run_name(name)
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _os_error(err, output, "create the output folder") from None
    created = leftover = False
    if resume:
        if not name:
            raise ConfigError("--resume needs the --name of the run to continue")
        run_dir = output / name
        if not run_dir.is_dir():
            raise ConfigError(f"cannot resume: {run_dir} not found")
    else:
        candidates = [name] if name else [base, *(f"{base}-{i}" for i in range(1, 10_000))]
        run_dir = None
        for cand in candidates:
            path = output / cand
            try:
                os.mkdir(path)
                run_dir, created = path, True
                break
            except FileExistsError:
                if name and path.is_dir() and not any(path.iterdir()):
                    run_dir = path  # an empty folder made by hand: ours once the lock is ours
                    break
                if name and path.is_dir() and is_leftover(path):
                    run_dir, leftover = path, True  # a run that died before its first checkpoint
                    break
                if name and path.is_dir() and not made_by_selfsup(path):
                    raise RunDirError(
                        f"{path} already exists and is not a selfsup run (no lock, no config.yaml of its own); "
                        "selfsup never empties a folder it did not make: pass another --name or --output"
                    ) from None
                if name:
                    info = _read_lock(path / LOCK_NAME) if path.is_dir() else {}
                    busy = f" and in use by pid {info['pid']}" if info.get("pid") and not _lock_is_stale(info) else ""
                    raise RunDirError(
                        f"{path} already exists{busy}: pass --resume to continue it, or another --name"
                    ) from None
            except OSError as err:
                raise _os_error(err, path, "create the run directory") from None
        if run_dir is None:
            raise RunDirError(f"no free run directory name under {output} for {base}")
    lock = _take_lock(run_dir, take_over_stale=resume or leftover)
    if leftover:  # the lock is ours: what the dead run left goes, the name is this run's
        _empty(run_dir, keep=lock)
        print(f"selfsup: note: reusing {run_dir}: the run there left no checkpoint and no export", file=sys.stderr)
    try:
        yield run_dir
    except BaseException:
        lock.unlink(missing_ok=True)
        if not resume and not _has_results(run_dir):  # failed before its first checkpoint: nothing worth keeping
            if created or leftover:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:  # a folder made by hand, empty before: empty again
                _empty(run_dir)
        raise
    lock.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# metrics.csv across resumes
# --------------------------------------------------------------------------------------------------


def set_aside_metrics(run_dir: Path) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv; keep it as a numbered part instead."""
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        i = 0
        while (run_dir / f"metrics.part{i}.csv").exists():
            i += 1
        metrics.rename(run_dir / f"metrics.part{i}.csv")


def _step(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def merge_metrics(run_dir: Path, resumed_step: int | None = None) -> None:
    """Join the parts set aside on resume and the new metrics.csv into one metrics.csv.

    Rows of earlier parts logged at or after ``resumed_step`` (the global step of the checkpoint the
    run resumed from) were redone by the resumed run; they are dropped so no step appears twice.
    """
    parts = sorted(run_dir.glob("metrics.part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics.part")))
    if not parts:
        return
    segments: list[list[dict]] = []
    for p in parts:
        with p.open(newline="") as f:
            segments.append(list(csv.DictReader(f)))
    # Each part ends where the next one resumed: cut it at the next part's first step.
    cutoff = resumed_step
    for rows_ in reversed(segments):
        kept = [r for r in rows_ if cutoff is None or _step(r) is None or _step(r) < cutoff]
        rows_[:] = kept
        steps = [s for s in map(_step, kept) if s is not None]
        if steps:
            cutoff = min(steps) if cutoff is None else min(cutoff, min(steps))
    rows = [r for seg in segments for r in seg]
    new = run_dir / "metrics.csv"
    if new.is_file():
        with new.open(newline="") as f:
            rows.extend(csv.DictReader(f))
    keys = sorted({k for r in rows for k in r})
    tmp = run_dir / "metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, new)
    for p in parts:
        p.unlink()


def _runs_in(folder: Path) -> list[str]:
    """Names of the run directories (with export/ or checkpoints/) in ``folder``."""
    try:
        return sorted(p.name for p in folder.iterdir()
                      if p.is_dir() and ((p / "export" / "config.json").is_file() or (p / "checkpoints").is_dir()))
    except OSError:
        return []


def _listing(names: list[str], most: int = 8) -> str:
    """``a, b, c`` or ``a, ..., h and 4 more``."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def not_an_encoder_message(path: Path, what: str = "a run directory (runs/<name>), its export/ or a .ckpt file") -> str:
    """Why ``path`` is no encoder, specifically: missing (with the nearest runs beside it, or where runs
    live), a run without an export (with its newest checkpoint), or a folder or file of another kind."""
    import difflib

    if not path.exists():
        folder = path.parent if str(path.parent) not in ("", ".") else Path("runs")
        if not folder.is_dir() and str(path.parent) in ("", "."):
            folder = Path(".")
        names = _runs_in(folder) if folder.is_dir() else []
        close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
        if close:
            hint = "did you mean " + " or ".join(str(folder / c) for c in close) + "?"
        elif names:
            hint = f"the runs in {folder}/ are: {_listing(names)}"
        elif folder.is_dir():
            hint = (f"{folder.resolve()} holds no run (selfsup pretrain writes runs/<name>/; pass {what})")
        else:
            hint = f"{folder} does not exist either (selfsup pretrain writes runs/<name>/; pass {what})"
        return f"{path} does not exist: {hint}"
    if path.is_dir():
        ckpts = sorted((path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime) \
            if (path / "checkpoints").is_dir() else []
        inside = _runs_in(path)
        if inside:
            return f"{path} is a folder of runs ({_listing(inside)}): pass one of them, e.g. {path / inside[0]}"
        if ckpts:
            return (f"{path} is a run without an exported encoder (no export/config.json: its pretraining has not "
                    f"finished); evaluate a checkpoint instead, e.g. {ckpts[-1]}")
        return (f"{path} is neither a run directory (no export/config.json) nor an export directory (no config.json); "
                f"pass {what}")
    return f"{path} is a file, not {what}"


def finished_run_dir(path: str | Path) -> Path:
    """The run directory ``path`` names (itself, or the parent of its ``export/``) when the run has an export.

    Raises:
        ConfigError: ``path`` is a checkpoint, missing, or no finished run; one line saying which, and what to pass.
    """
    p = Path(path)
    if (p / "export" / "config.json").is_file():
        return p
    if (p / "config.json").is_file() and p.name == "export":
        return p.parent
    if p.is_file() and p.suffix == ".ckpt":
        run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        raise ConfigError(f"{p} is a checkpoint, and this command takes a run directory: pass {run} (once its "
                          "pretraining has written export/), or evaluate the checkpoint with selfsup probe, knn or sweep")
    raise ConfigError(not_an_encoder_message(p, "a run directory (runs/<name>) of a finished run"))


def check_encoder_source(source: str | None, random_init: str | None = None) -> None:
    """The checks of :func:`selfsup.eval.harness.resolve_source` that need no torch: exactly one of a path and
    ``--random-init``, and a path that holds an encoder (a run or export directory, or a ``.ckpt`` file).

    Raises:
        ConfigError: one line saying what is wrong and what to pass.
    """
    if (source is None) == (random_init is None):
        raise ConfigError("give either a run or export directory (or a .ckpt file), or --random-init BACKBONE")
    if source is None:
        return
    path = Path(source)
    if path.is_file() and path.suffix == ".ckpt":
        return
    export = path / "export" if (path / "export" / "config.json").is_file() else path
    if not (export / "config.json").is_file():
        raise ConfigError(not_an_encoder_message(path))


def is_launcher_rank_zero() -> bool:
    """Whether this process is global rank 0 of a (possibly not yet started) distributed run.

    Reads the variables torchrun, SLURM and Lightning's own launcher set; a plain process is rank 0.
    """
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var) is not None:
            return int(os.environ[var]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
