"""A `MetaEmbedIndex` folder on disk: segments, the manifest that names one, and how a save replaces it.

    pages.index/
      index.json             {"format": "metaembed-index/2", "segment": "segment-000003", count, shape, dtypes,
                              SHA-256 of each file}: the one file that says which segment is the index
      segment-000003/        vectors.safetensors, full.safetensors (int8 / binary), ids.jsonl (one JSON id a line)

Saving writes a new segment folder beside the current one (in a hidden staging folder, flushed to disk, then
renamed), then replaces `index.json` atomically (`replace_atomically`: temporary file flushed, renamed, the folder
flushed), then removes the segments it no longer names. At every instant `index.json` names a complete segment: a
crash (even SIGKILL or power loss) at any step leaves the old index or the new one at the path, plus at most a
stale folder that the next save removes. Folders saved by earlier versions ("metaembed-index/1": the files and
the ids in `index.json` at the top) still load, and are converted by their next save.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

from modeling_metaembed.folders import save_folder_atomically
from modeling_metaembed.hub_metaembed import fsync_folder, write_atomic

FORMAT = "metaembed-index/2"
LEGACY_FORMAT = "metaembed-index/1"  # files and ids at the top of the folder
MANIFEST_NAME = "index.json"
VECTORS_NAME = "vectors.safetensors"
FULL_NAME = "full.safetensors"
IDS_NAME = "ids.jsonl"
SEGMENT = re.compile(r"segment-(\d{6,})")
STAGING_PREFIX = ".segment-"


class IndexFileError(ValueError):
    """An index folder that is missing, truncated, tampered with or inconsistent."""


def _owned(entry: Path) -> bool:
    """Whether `entry` is something a save writes into an index folder (and may remove)."""
    return (
        SEGMENT.fullmatch(entry.name) is not None
        or entry.name.startswith(STAGING_PREFIX)
        or entry.name.startswith(f".{MANIFEST_NAME}.")
        or entry.name in (VECTORS_NAME, FULL_NAME)
    )


def check_writable(directory: Path) -> None:
    """Refuse a path that is not an index folder (a file, or a folder holding other things)."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder")
    if directory.is_dir() and not (directory / MANIFEST_NAME).is_file():
        foreign = [entry.name for entry in directory.iterdir() if not _owned(entry)]
        if foreign:
            raise FileExistsError(
                f"{directory} holds files but no {MANIFEST_NAME} ({foreign[0]}, ...): refusing to replace it"
            )


def save_segment(directory: Path, write, manifest: dict) -> None:
    """Write a new segment through `write(folder) -> {file key: path}` and make `directory/index.json` name it.
    `manifest` gets the segment's name and the SHA-256 of each file returned."""
    check_writable(directory)
    directory.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for e in directory.iterdir() if (m := SEGMENT.fullmatch(e.name))]
    name = f"segment-{max(numbers, default=0) + 1:06d}"
    files = {}
    # Staged as `.segment-NNNNNN.*` beside the segments (a leftover `_owned` recognises), flushed, renamed in.
    save_folder_atomically(lambda staging: files.update(write(staging)), directory / name)
    manifest = {"format": FORMAT, "segment": name, **manifest}
    for key, path in files.items():
        manifest[key] = sha256_file(directory / name / Path(path).name)
    write_atomic(directory / MANIFEST_NAME, json.dumps(manifest) + "\n")  # the switch: old index, then new
    for entry in directory.iterdir():  # what the manifest no longer names; best effort (a mapped file on Windows
        if _owned(entry) and entry.name != name:  # cannot be removed: the next save removes it)
            try:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            except OSError:
                pass
    fsync_folder(directory)


def read_manifest(directory: Path) -> tuple:
    """(manifest, folder holding its files) of a saved index; IndexFileError naming what is wrong."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise IndexFileError(f"{manifest_path} is missing: {directory} is not a saved MetaEmbedIndex")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFileError(f"{manifest_path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, LEGACY_FORMAT):
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise IndexFileError(f"{manifest_path}: format is {found!r}, expected {FORMAT!r}")
    if manifest["format"] == LEGACY_FORMAT:
        return manifest, directory
    segment = manifest.get("segment")
    if not isinstance(segment, str) or SEGMENT.fullmatch(segment) is None:
        raise IndexFileError(f"{manifest_path}: segment must name a segment-NNNNNN folder, got {segment!r}")
    folder = directory / segment
    if not folder.is_dir():
        raise IndexFileError(f"{folder} is missing: {manifest_path} names it")
    return manifest, folder


def write_ids(path: Path, ids: list) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(i) + "\n" for i in ids)


def read_ids(manifest: dict, folder: Path) -> list:
    """The ids of a saved index: from `ids.jsonl` in its segment, or in the manifest of a legacy folder."""
    if manifest["format"] == LEGACY_FORMAT:
        return manifest.get("ids")
    path = folder / IDS_NAME
    try:
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFileError(f"{path} is missing or unreadable: {error}") from error


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):  # 1 MB at a time: two are alive at once
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "FORMAT",
    "LEGACY_FORMAT",
    "MANIFEST_NAME",
    "VECTORS_NAME",
    "FULL_NAME",
    "IDS_NAME",
    "IndexFileError",
    "save_segment",
    "read_manifest",
    "read_ids",
    "write_ids",
    "check_writable",
    "sha256_file",
]
