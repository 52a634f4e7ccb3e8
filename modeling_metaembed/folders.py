"""Writing a whole folder atomically, for the package's tooling (checkpoints, LoRA export, publish staging,
conversion, indexes).

Not shipped inside checkpoints: no shipped file imports it. Files go to disk the way single files do
(`hub_metaembed.replace_atomically`): flushed before the folder is renamed into place, the parent folder flushed
after.
"""

import ctypes
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .hub_metaembed import fsync_file, fsync_folder


def is_occupied(directory) -> bool:
    """Whether `directory` holds something `save_folder_atomically` would refuse to replace (a file, or a
    non-empty folder)."""
    directory = Path(directory)
    return directory.exists() and (not directory.is_dir() or any(directory.iterdir()))


def fsync_tree(folder) -> None:
    """Flush every file under `folder`, then every folder (deepest first), to disk."""
    folders = []
    for root, _, files in os.walk(folder):
        folders.append(root)
        for name in files:
            fsync_file(os.path.join(root, name))
    for root in reversed(folders):
        fsync_folder(root)


def save_folder_atomically(save, directory, replace: bool = False) -> Path:
    """Run `save(folder)` into a sibling temporary folder, flush it to disk, then move it to `directory`. A failure
    leaves `directory` as it was and no temporary folder behind.

    `directory` must not exist or be empty, unless `replace=True`: then a folder there is exchanged with the new one
    in one step where the system can (Linux `renameat2(RENAME_EXCHANGE)`), so at every instant, even across a crash,
    the old or the new complete folder is at `directory`; elsewhere the old one is moved aside first (a crash between
    the two renames leaves it only at a hidden `.name.old.*` beside `directory`)."""
    directory = Path(directory)
    if is_occupied(directory) and not (replace and directory.is_dir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save(staging)
        fsync_tree(staging)
        _swap_in(staging, directory)
        fsync_folder(directory.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def _swap_in(staging: Path, directory: Path) -> None:
    """Move the complete `staging` folder to `directory`; a folder there is moved aside first and removed last."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    if not any(directory.iterdir()):
        directory.rmdir()
        os.replace(staging, directory)
        return
    if _exchange(staging, directory):  # staging now holds the old folder: the caller removes it
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    backup.rmdir()
    os.replace(directory, backup)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(backup, directory)
        raise
    shutil.rmtree(backup)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the system or file system
    cannot, and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc 2.28+
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


__all__ = ["save_folder_atomically", "is_occupied", "fsync_tree"]
