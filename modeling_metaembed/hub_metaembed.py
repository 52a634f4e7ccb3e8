"""A checkpoint's files: where they are read from (`HUB_KWARGS`), how they are written (atomically, on disk before
anyone sees them), and where they go (`upload_folder_to_hub`, for `push_to_hub`).

This file ships inside every checkpoint (remote code): it imports only the standard library and, inside
`upload_folder_to_hub`, huggingface_hub (transformers' own Hub client). The package's tooling writes its own files
(indexes, embeddings, model cards, results) through the same `replace_atomically`.
"""

import os
import tempfile
from pathlib import Path

PROCESSOR_CONFIG_NAME = "processor_config.json"
# from_pretrained keyword arguments that say where files come from; forwarded to every file lookup.
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder")


def fsync_file(path) -> None:
    """Flush a file's bytes to disk."""
    with open(path, "rb" if os.name == "posix" else "r+b") as file:  # Windows flushes only handles open for writing
        os.fsync(file.fileno())


def fsync_folder(folder) -> None:
    """Flush a folder's entries (a file renamed into it) to disk, where the system allows it (not Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # a file system that cannot flush a folder: the rename is still atomic
        pass
    finally:
        os.close(handle)


def replace_atomically(path, write) -> None:
    """Write `path` through `write(temporary_path)`: a temporary file beside it, flushed to disk, then renamed over
    `path` and the folder flushed. A reader sees the old file or the new one, never a part; after a crash the new
    file is whole or absent. A failure leaves `path` as it was and no temporary file behind."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_atomic(path, data: str | bytes) -> None:
    """Write a file (text as UTF-8, or bytes) atomically (`replace_atomically`)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    replace_atomically(path, lambda tmp: tmp.write_bytes(payload))


def upload_folder_to_hub(
    folder,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token=None,
):
    """Create the Hub repository if needed (and the branch `revision`), then upload `folder` as one commit."""
    from huggingface_hub import HfApi  # a dependency of transformers

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or "Upload MetaEmbed model",
    )


__all__ = [
    "HUB_KWARGS",
    "PROCESSOR_CONFIG_NAME",
    "replace_atomically",
    "write_atomic",
    "fsync_file",
    "fsync_folder",
    "upload_folder_to_hub",
]
