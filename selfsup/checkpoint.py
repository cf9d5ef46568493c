"""Files that survive a kill: atomic writes, safe checkpoint loading, and resume from the newest good checkpoint.

Every checkpoint, export and cache file selfsup writes goes to a temporary file in the destination's
own directory (so the final rename never crosses filesystems), is ``fsync``-ed, then renamed over the
destination with ``os.replace`` (atomic on POSIX): a kill at any moment leaves either the old file or
the new one, never a truncated one. Temporary files are named ``<name>.tmp-<pid>``; a later run
removes those whose process is gone (:func:`clean_stale_temp_files`).

Checkpoints are loaded with ``torch.load(weights_only=True)``: a crafted pickle cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from selfsup.errors import CheckpointError, RunDirError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers may then drop each other's keys
    fcntl = None

TEMP_MARK = ".tmp-"
_TEMP_RE = re.compile(r"\.tmp-?(\d+)(\.[\w.]*)?$")  # also the feature cache's ``<name>.tmp<pid>``


def temp_path(path: str | Path) -> Path:
    """The temporary sibling of ``path`` this process writes before renaming: ``<name>.tmp-<pid>``."""
    path = Path(path)
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def free_bytes(path: str | Path) -> int | None:
    """Free space of the filesystem holding ``path`` (its nearest existing folder); None if unknown."""
    path = Path(path)
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            if p.exists():
                return shutil.disk_usage(p).free
    return None


def disk_full(err: BaseException, path: str | Path, needed: int | None = None) -> bool:
    """Whether ``err`` (raised writing ``path``) came from a full disk: ENOSPC/EDQUOT, or a writer (torch's zip
    writer) that hides the errno, with less space left than the write needed."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    free = free_bytes(Path(path).parent)
    return bool(needed) and free is not None and free < needed


def no_space_error(path: str | Path, needed: int | None = None) -> RunDirError:
    """One line for a write that a full disk stopped: which file, the space it needed and what is free."""
    free = free_bytes(Path(path).parent)
    parts = ([f"needs about {_mb(needed)}"] if needed else []) + ([f"{_mb(free)} free"] if free is not None else [])
    return RunDirError(f"cannot write {path}: no space left on the disk ({', '.join(parts)}); nothing half-written "
                       "was left: free some space, or write elsewhere")


def reserve_space(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of an open file on disk now (``posix_fallocate``), so that writing into its
    memory map later never finds the disk full (which kills the process with SIGBUS).

    Raises:
        OSError: ENOSPC when the disk has not that much room. Where the filesystem cannot allocate ahead, the
            free space is compared instead.
    """
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except AttributeError:  # not on this platform
        pass
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    st = os.fstatvfs(fd)
    if st.f_bavail * st.f_frsize < size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def update_json(path: str | Path, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into the JSON object stored at ``path`` (created when absent) and return the result.

    The read, merge and atomic write happen under an exclusive lock on ``<path>.lock`` (``flock``, where
    the platform has it), so processes sharing the file each add their keys without dropping another's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        current = json.loads(path.read_text()) if path.is_file() else {}
        current.update(updates)
        atomic_write_text(path, json.dumps(current, indent=2) + "\n")
    return current


def atomic_save(writer: Callable[[str], Any], path: str | Path) -> None:
    """Call ``writer(tmp_path)`` (e.g. safetensors' ``save_file``), then fsync and rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        writer(str(tmp))
        finish_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finish_temp(tmp: str | Path, path: str | Path) -> None:
    """fsync a temporary file written elsewhere (a memory map) and rename it over ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_stale_temp_files(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Remove ``*.tmp-<pid>*`` files under ``directory`` whose writing process no longer runs.

    Returns the removed paths. Files of live processes (another run writing now) are kept.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    files = directory.rglob("*") if recursive else directory.iterdir()
    for p in files:
        m = _TEMP_RE.search(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and _pid_gone(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def refusal_message(path: str | Path, err: BaseException, what: str = "checkpoint") -> str:
    """One line for a file ``torch.load(weights_only=True)`` refused: truncated or foreign, or a pickle of
    objects other than tensors and plain containers.

    Never quotes torch's own text for the latter: it advises re-running with ``weights_only=False``, which
    would run whatever code the file holds.
    """
    said = str(err)
    if "weights_only" in said or isinstance(err, pickle.UnpicklingError):
        # torch's text: its advice, (an invitation to file an issue,) what it met, a link to its documentation
        lines = [ln.split("WeightsUnpickler error:")[-1].strip() for ln in said.splitlines()[1:]]
        lines = [ln for ln in lines if ln and "weights_only" not in ln and not ln.startswith("Check the doc")]
        met = lines[0].rstrip(".") if lines else "objects other than tensors and plain containers"
        why = "it names code to run" if "global" in met.lower() else "a pickle of other objects, or corrupt"
        return f"{what} {path} is not a plain checkpoint and was not loaded ({why}: {met})"
    first = said.strip().splitlines()[0] if said.strip() else ""
    return f"{what} {path} cannot be loaded: not a torch checkpoint, or truncated ({type(err).__name__}: {first})"


def safe_torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as one :class:`CheckpointError` line.

    A pickle that names a function or a class outside torch's weights-only allow-list (what a crafted
    file needs in order to run code) is refused before anything in it runs. The message never repeats
    torch's advice to retry with ``weights_only=False``, which is exactly what must not be done with
    such a file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes; a save was interrupted)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file; all mean "unusable"
        raise CheckpointError(refusal_message(path, err, what)) from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """A training checkpoint read by :func:`safe_torch_load`, checked to hold ``state_dict`` and ``global_step``.

    ``mmap=True`` maps the tensors instead of reading them (cheap: to look at ``global_step``).

    Raises:
        CheckpointError: missing, empty, truncated, not a torch file, or holding objects other than
            tensors and plain containers (a pickle that would run code is refused, never executed).
    """
    ckpt = safe_torch_load(path, map_location=map_location, mmap=mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a selfsup/Lightning training checkpoint "
                              "(no state_dict and global_step)")
    return ckpt


def _atomic_checkpoint_io() -> type:
    """:class:`AtomicCheckpointIO`, defined on first use: it subclasses Lightning's, and evaluation, which reads
    checkpoints too, imports no Lightning."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning's checkpoint IO, made atomic and safe.

        Saves to ``<name>.tmp-<pid>`` in the checkpoint's own directory, fsyncs, renames (Lightning's
        default stages the file in a temporary directory that may be on another filesystem, so a kill
        during the final copy truncates ``last.ckpt``). Loads with ``weights_only=True``.
        """

        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
            if storage_options is not None:
                raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
            try:
                with atomic_write(path) as f:
                    torch.save(checkpoint, f)
            except (OSError, RuntimeError) as err:  # torch's writer turns ENOSPC into "[enforce fail at ...]"
                needed = _tensor_bytes(checkpoint)
                if disk_full(err, path, needed):
                    raise no_space_error(path, needed) from None  # the earlier checkpoints are as they were
                raise

        def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
            return load_checkpoint(path, map_location=map_location or "cpu")

    AtomicCheckpointIO.__qualname__ = "AtomicCheckpointIO"
    return AtomicCheckpointIO


def __getattr__(name: str):
    if name == "AtomicCheckpointIO":
        globals()[name] = value = _atomic_checkpoint_io()
        return value
    raise AttributeError(f"module 'selfsup.checkpoint' has no attribute {name!r}")


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint (what a save writes, give or take its pickles)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def checkpoint_candidates(directory: str | Path) -> list[Path]:
    """``*.ckpt`` files of a run, newest first (``last.ckpt`` first among equally new ones)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = [p for p in directory.glob("*.ckpt") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def find_resumable_checkpoint(directory: str | Path, say: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The checkpoint under ``directory`` with the most training steps among those that load.

    Every ``*.ckpt`` is opened memory-mapped (tensors are not read) to learn its step, so the choice
    does not depend on modification times (a copied run directory keeps working). Says, in one line,
    which checkpoint is used (path, epoch, step) and which were skipped and why.

    Raises:
        CheckpointError: no checkpoint, or none loads (each reason named).
    """
    directory = Path(directory)
    candidates = checkpoint_candidates(directory)
    if not candidates:
        raise CheckpointError(f"cannot resume: no checkpoint (*.ckpt) in {directory}")
    problems, usable = [], []
    for order, path in enumerate(candidates):
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        usable.append(((int(ckpt["global_step"]), int(ckpt.get("epoch", 0)), -order), path, ckpt))
    if not usable:
        raise CheckpointError(f"cannot resume: no checkpoint in {directory} loads ({'; '.join(problems)})")
    _, path, ckpt = max(usable, key=lambda u: u[0])
    skipped = f"skipped {len(problems)} unusable checkpoint(s) ({'; '.join(problems)}); " if problems else ""
    say(f"selfsup: {skipped}resuming from {path} (epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')})")
    return path, ckpt


SIGNAL_CHECKPOINTS = ("sigterm.ckpt", "interrupt.ckpt")
_STEP_IN_NAME = re.compile(r"(?:^|-)step=(\d+)\.ckpt$")


def checkpoint_step(path: Path, cache: dict | None = None) -> int | None:
    """The global step a checkpoint holds: from its name (``step=N``, ``epoch=E-step=N``), else read
    memory-mapped (cached by name, size and mtime); None when it does not load."""
    m = _STEP_IN_NAME.search(path.name)
    if m:
        return int(m.group(1))
    try:
        st = path.stat()
    except OSError:
        return None
    key = (path.name, st.st_size, st.st_mtime_ns)
    if cache is not None and key in cache:
        return cache[key]
    try:
        step = int(load_checkpoint(path, mmap=True)["global_step"])
    except (CheckpointError, OSError, ValueError, TypeError):
        step = None
    if cache is not None:
        cache[key] = step
    return step


def prune_checkpoints(directory: str | Path, keep: int, cache: dict | None = None) -> list[Path]:
    """Remove old checkpoints of a run; returns the removed paths.

    Kept: ``last.ckpt``; the ``keep`` newest numbered checkpoints (by step; ``keep=0``: all of them); any
    file whose step cannot be read (not ours to judge). ``sigterm.ckpt`` and ``interrupt.ckpt`` go once a
    checkpoint with more steps exists (the resumed run has passed them). The checkpoint with the most steps,
    the one ``--resume`` takes, is never removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = {p: checkpoint_step(p, cache) for p in directory.glob("*.ckpt") if p.is_file()}
    known = {p: s for p, s in steps.items() if s is not None}
    if not known:
        return []
    newest = max(known.values())
    doomed = [p for p, s in known.items() if p.name in SIGNAL_CHECKPOINTS and s < newest]
    numbered = sorted((p for p in known if p.name != "last.ckpt" and p.name not in SIGNAL_CHECKPOINTS),
                      key=lambda p: (known[p], p.stat().st_mtime_ns), reverse=True)
    if keep > 0:
        doomed += [p for p in numbered[keep:] if known[p] < newest]
    removed = []
    for p in doomed:
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
