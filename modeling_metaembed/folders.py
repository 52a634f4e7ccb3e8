"""Writing a whole folder atomically, for the package's tooling (LoRA export, publish staging, conversion).

Not shipped inside checkpoints: no shipped file imports it.
"""

import os
import shutil
import tempfile
from pathlib import Path


def is_occupied(directory) -> bool:
    """Whether `directory` holds something `save_folder_atomically` would refuse to replace (a file, or a
    non-empty folder)."""
    directory = Path(directory)
    return directory.exists() and (not directory.is_dir() or any(directory.iterdir()))


def save_folder_atomically(save, directory) -> Path:
    """Run `save(folder)` into a sibling temporary folder, then move it to `directory` (which must not exist or be
    empty). A failure leaves `directory` as it was and no temporary folder behind."""
    directory = Path(directory)
    if is_occupied(directory):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save(staging)
        if directory.exists():
            directory.rmdir()
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


__all__ = ["save_folder_atomically", "is_occupied"]
