"""Scanning an ImageNet-layout folder: its classes, files, labels, bad entries and content fingerprint.

Layout: ``root/train/<class>/<image>`` and optionally ``root/val/<class>/<image>`` (or ``root/test``);
hidden files are ignored; images may sit in sub-folders of a class folder. Nothing is decoded here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from selfsup.data.decode import IMAGE_EXTENSIONS, not_image_message
from selfsup.errors import DataError
from selfsup.names import name_bytes


def _visible_entries(directory: Path) -> list[os.DirEntry]:
    with os.scandir(directory) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _walk_files(directory: Path) -> Iterator[os.DirEntry]:
    """Non-hidden files under ``directory``, recursively, in sorted order."""
    for entry in _visible_entries(directory):
        if entry.is_dir():
            yield from _walk_files(Path(entry.path))
        elif entry.is_file():
            yield entry


def _class_names(train_dir: Path, root: Path) -> list[str]:
    classes = [e.name for e in _visible_entries(train_dir) if e.is_dir()]
    if not classes:
        raise DataError(
            f"{train_dir} has no class folders: expected the layout {root}/train/<class>/<image> "
            f"(one sub-folder per class)"
        )
    return classes


def split_dir_of(root: Path, split: str) -> Path | None:
    if split == "train":
        return root / "train" if (root / "train").is_dir() else None
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    return None



class Scan:
    """Files of one split of a folder: absolute paths, labels, stat fingerprint and bad files."""

    def __init__(self, root: Path, split: str) -> None:
        if not root.exists():
            raise DataError(
                f"data root {root} does not exist: give a directory in the layout "
                f"root/train/<class>/<image>, or 'digits' for the embedded data"
            )
        if not root.is_dir():
            raise DataError(
                f"data root {root} is not a directory: expected the layout root/train/<class>/<image>"
            )
        train_dir = split_dir_of(root, "train")
        if train_dir is None:
            raise DataError(
                f"{root} has no 'train' directory: expected the layout root/train/<class>/<image> "
                f"(and optionally root/val/<class>/<image>)"
            )
        self.classes = _class_names(train_dir, root)
        split_dir = split_dir_of(root, split)
        if split_dir is None:
            raise DataError(f"{root} has no 'val' or 'test' directory: expected root/val/<class>/<image>")
        self.split_dir = split_dir
        index = {c: i for i, c in enumerate(self.classes)}
        class_dirs = [e.name for e in _visible_entries(split_dir) if e.is_dir()]
        if not class_dirs:
            raise DataError(
                f"{split_dir} has no class folders: expected the layout "
                f"{root}/{split_dir.name}/<class>/<image>"
            )
        unknown = [c for c in class_dirs if c not in index]
        if unknown:
            raise DataError(
                f"{split_dir / unknown[0]} is a class that {train_dir} does not have: the classes of "
                f"{split_dir.name} must be a subset of the train classes"
            )
        self.files: list[str] = []
        self.labels: list[int] = []
        self.fingerprint: list[tuple[str, int, int]] = []
        self.bad: list[tuple[str, str]] = []  # (path, message)
        for name in class_dirs:
            class_dir = split_dir / name
            n_images = 0
            for entry in _walk_files(class_dir):
                if Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                    self.bad.append((entry.path, not_image_message(entry.path)))
                    continue
                st = entry.stat()
                self.files.append(entry.path)
                self.labels.append(index[name])
                self.fingerprint.append((os.path.relpath(entry.path, root), st.st_size, st.st_mtime_ns))
                n_images += 1
            if n_images == 0:
                raise DataError(
                    f"class folder {class_dir} has no images: add images to it or remove the folder"
                )


def default_cache_dir() -> Path:
    """``$SELFSUP_CACHE`` if set, else ``~/.cache/selfsup/data``."""
    return Path(os.environ.get("SELFSUP_CACHE") or Path.home() / ".cache" / "selfsup" / "data")


def content_digest(root: Path, split: str, scan: Scan, decoding: list) -> str:
    """Digest of a split's files (relative paths, sizes, modification times) and how they are decoded."""
    key = json.dumps([*decoding, str(root), split, scan.classes, scan.fingerprint])
    return hashlib.sha256(key.encode()).hexdigest()


def tree_fingerprint(root: Path, limit: int = 10_000) -> str:
    """Digest of the files under ``root`` (relative paths, sizes, modification times), at most ``limit``."""
    h = hashlib.sha256(name_bytes(str(root)))
    for i, (dirpath, dirnames, filenames) in enumerate(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.stat(path)
                h.update(name_bytes(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n"))
        if i >= limit:
            break
    return h.hexdigest()

