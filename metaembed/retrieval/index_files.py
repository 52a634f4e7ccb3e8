"""A `MetaEmbedIndex` folder on disk: its segments, the manifest that lists them, and how a save changes it.

    pages.index/
      index.json             {"format": "metaembed-index/3", count, num_vectors, dim, dtype(s),
                              "segments": [{"name": "segment-000001", "count", SHA-256 of each file}, ...]}:
                              the one file that says which segments, in which order, are the index
      segment-000001/        vectors.safetensors, full.safetensors (int8 / binary), ids.jsonl (one JSON id a line)
      segment-000004/        the items of a later append
      .metaembed-index.lock  what writers of the folder take turns on (never removed: see `save_segments`)

A segment is written once and never changed. Saving writes only what is new: the items added since the index was
loaded go into a new segment (in a hidden staging folder, flushed to disk, then renamed); the segments already in
the folder are kept as they are (segments loaded from another folder are copied in, file by file). Then `index.json`
is replaced atomically (`write_atomic`: temporary file flushed, renamed, the folder flushed), and the segments it
no longer names are removed. At every instant `index.json` names complete segments: a crash (even SIGKILL or power
loss) at any step leaves the old index or the new one at the path, plus at most a stale folder that the next save
removes. So an append costs the I/O of the new items, never a rewrite of the index.

Folders saved by earlier versions still load, and are converted by their next save: "metaembed-index/2" (one
segment, named by "segment", its checksums at the top) and "metaembed-index/1" (the files and the ids in
`index.json` at the top of the folder).
"""

import contextlib
import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from modeling_metaembed.folders import save_folder_atomically
from modeling_metaembed.hub_metaembed import fsync_folder, write_atomic

from .embeddings_file import read_json_lines
from .safetensors_header import read_header, tensor_span

FORMAT = "metaembed-index/3"
SINGLE_SEGMENT_FORMAT = "metaembed-index/2"  # one segment, named by "segment", its checksums at the top
LEGACY_FORMAT = "metaembed-index/1"  # files and ids at the top of the folder
MANIFEST_NAME = "index.json"
VECTORS_NAME = "vectors.safetensors"
FULL_NAME = "full.safetensors"
IDS_NAME = "ids.jsonl"
SEGMENT = re.compile(r"segment-(\d{6,})")
STAGING_PREFIX = ".segment-"
LOCK_NAME = ".metaembed-index.lock"  # writers of one folder take turns on it (save_segments)
# The checksum keys of a segment entry and the file each one covers.
CHECKSUMS = {"sha256": VECTORS_NAME, "full_sha256": FULL_NAME, "ids_sha256": IDS_NAME}

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Compressed storage: the torch dtype of the codes.
COMPRESSED = {"int8": torch.int8, "binary": torch.uint8}
# safetensors dtype names, and the numpy type of the same width used to memory-map the raw bytes.
SAFETENSORS_DTYPES = {
    "bfloat16": ("BF16", np.uint16),
    "float16": ("F16", np.float16),
    "float32": ("F32", np.float32),
    "int8": ("I8", np.int8),
    "binary": ("U8", np.uint8),
}


class IndexFileError(ValueError):
    """An index folder that is missing, truncated, tampered with or inconsistent."""


def _owned(entry: Path) -> bool:
    """Whether `entry` is something a save writes into an index folder (and may remove)."""
    return (
        SEGMENT.fullmatch(entry.name) is not None
        or entry.name.startswith(STAGING_PREFIX)
        or entry.name.startswith(f".{MANIFEST_NAME}.")
        or entry.name in (VECTORS_NAME, FULL_NAME, LOCK_NAME)
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


def save_segments(directory: Path, kept: list, write_new, manifest: dict) -> list:
    """Make `directory/index.json` list the segments `kept` then, when `write_new` is given, a new one; returns the
    (folder, entry) of each segment it now lists, in order.

    `kept`: (folder, entry, ids, rewrite) of segments already saved (`entry` as `read_manifest` gives it; `ids` a
    function returning the segment's ids; `rewrite(folder) -> count` writes its files from the tensors held). One
    that lies in `directory` is kept as it is; any other (another folder's, or a legacy layout) is copied in as a
    new segment, its bytes checked against its entry's checksums on the way, or rewritten from the tensors when its
    files are gone (a folder removed since it was loaded or saved: mapped files stay readable until closed).
    `write_new(folder) -> count` writes the new segment's files. `manifest`: the index-wide fields.

    Writers of one folder take turns (an OS lock on `.metaembed-index.lock`, where the system has `fcntl`). An index
    loaded from `directory` is saved there only if `index.json` still lists what it loaded: a save from a stale
    index (another writer appended since) would drop that writer's segments, so it raises instead."""
    check_writable(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _writer_lock(directory):
        _check_not_stale(directory, kept)
        numbers = [int(m.group(1)) for e in directory.iterdir() if (m := SEGMENT.fullmatch(e.name))]
        next_number = max(numbers, default=0) + 1
        listed = []

        def new_segment(write, known: dict) -> tuple:
            nonlocal next_number
            name, next_number = f"segment-{next_number:06d}", next_number + 1
            found = {}
            # Staged as `.segment-NNNNNN.*` beside the segments (a leftover `_owned` recognises), flushed, renamed in.
            save_folder_atomically(lambda staging: found.update(count=write(staging)), directory / name)
            entry = {"name": name, "count": found["count"]}
            for key, file_name in CHECKSUMS.items():
                if (directory / name / file_name).is_file():
                    entry[key] = known.get(key) or sha256_file(directory / name / file_name)
            return directory / name, entry

        for folder, entry, ids, rewrite in kept:
            if SEGMENT.fullmatch(folder.name) and _lies_in(folder, directory) and folder.is_dir():
                listed.append((folder, entry))
                continue
            if not all(path.is_file() for path, _ in checksummed_files(folder, entry)):
                listed.append(new_segment(rewrite, {}))
                continue
            known = {}

            def copy(staging: Path, folder=folder, entry=entry, ids=ids, known=known) -> int:
                for key, file_name in CHECKSUMS.items():
                    if key == "ids_sha256" or not isinstance(entry.get(key), str):
                        continue
                    shutil.copyfile(folder / file_name, staging / file_name)  # the kernel copies; no bytes held here
                    known[key] = sha256_file(staging / file_name)
                    if known[key] != entry[key]:
                        raise IndexFileError(
                            f"{folder / file_name} does not match the checksum in its manifest: not copied"
                        )
                segment_ids = ids()
                write_ids(staging / IDS_NAME, segment_ids)
                return len(segment_ids)

            listed.append(new_segment(copy, known))
        if write_new is not None:
            listed.append(new_segment(write_new, {}))
        entries = [entry for _, entry in listed]
        manifest = {"format": FORMAT, **manifest, "segments": entries}
        write_atomic(directory / MANIFEST_NAME, json.dumps(manifest) + "\n")  # the switch: old index, then new
        named = {entry["name"] for entry in entries}
        for entry in directory.iterdir():  # what the manifest no longer names; best effort (a mapped file on Windows
            if _owned(entry) and entry.name not in named and entry.name != LOCK_NAME:  # cannot be removed: the next
                try:  # save removes it)
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                except OSError:
                    pass
        fsync_folder(directory)
    return listed


@contextlib.contextmanager
def _writer_lock(directory: Path):
    """Hold an exclusive lock on the folder's lock file for one save (no-op where `fcntl` is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer at a time is the user's to ensure
        yield
        return
    with open(directory / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_not_stale(directory: Path, kept: list) -> None:
    """Refuse to save an index loaded from `directory` when `index.json` no longer lists what it loaded."""
    here = [entry for folder, entry, _, _ in kept if _lies_in(folder, directory)]
    if not here or not (directory / MANIFEST_NAME).is_file():
        return
    current = [entry for _, entry in read_manifest(directory)[1]]
    if [(e.get("name"), e.get("count")) for e in current] != [(e.get("name"), e.get("count")) for e in here]:
        raise IndexFileError(
            f"{directory / MANIFEST_NAME} changed since this index was loaded (another writer saved to it): saving "
            "would drop its items. Load the index again, add the items, and save."
        )


def _lies_in(folder: Path, directory: Path) -> bool:
    """Whether a loaded segment's `folder` is part of the index at `directory` (a segment, or a legacy folder)."""
    if folder.resolve() == directory.resolve():
        return True
    return SEGMENT.fullmatch(folder.name) is not None and folder.parent.resolve() == directory.resolve()


def read_manifest(directory: Path) -> tuple:
    """(manifest, [(segment folder, entry), ...]) of a saved index, in the index's order; each entry holds the
    segment's "count" and the SHA-256 of its files (and, in a legacy folder, "ids"). IndexFileError naming what is
    wrong."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise IndexFileError(f"{manifest_path} is missing: {directory} is not a saved MetaEmbedIndex")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFileError(f"{manifest_path} is not valid JSON: {error}") from error
    formats = (FORMAT, SINGLE_SEGMENT_FORMAT, LEGACY_FORMAT)
    if not isinstance(manifest, dict) or manifest.get("format") not in formats:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise IndexFileError(f"{manifest_path}: format is {found!r}, expected {FORMAT!r}")
    check_manifest(manifest, manifest_path)
    if manifest["format"] == LEGACY_FORMAT:
        entry = {key: manifest.get(key) for key in ("count", "sha256", "full_sha256", "ids")}
        segments = [(directory, entry)]
    elif manifest["format"] == SINGLE_SEGMENT_FORMAT:
        entry = {"name": manifest.get("segment"), **{key: manifest.get(key) for key in ("count", *CHECKSUMS)}}
        segments = [(directory / str(entry["name"]), entry)]
    else:
        listed = manifest.get("segments")
        if not isinstance(listed, list) or not all(isinstance(entry, dict) for entry in listed):
            raise IndexFileError(f"{manifest_path}: segments must be a list of segment entries")
        segments = [(directory / str(entry.get("name")), entry) for entry in listed]
    compressed = manifest["dtype"] in COMPRESSED
    for folder, entry in segments:
        where = f"{manifest_path}: segment {entry.get('name')!r}"
        if manifest["format"] != LEGACY_FORMAT:
            if not isinstance(entry.get("name"), str) or SEGMENT.fullmatch(entry["name"]) is None:
                raise IndexFileError(f"{where}: the name must be a segment-NNNNNN folder")
            if not folder.is_dir():
                raise IndexFileError(f"{folder} is missing: {manifest_path} names it")
        count = entry.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise IndexFileError(f"{where}: count must be a non-negative integer, got {count!r}")
        needed = ["sha256"] + (["full_sha256"] if compressed else [])
        needed += ["ids_sha256"] if manifest["format"] != LEGACY_FORMAT else []
        for key in needed:
            if not isinstance(entry.get(key), str):
                raise IndexFileError(f"{where}: {key} is missing")
    total = sum(entry["count"] for _, entry in segments)
    if total != manifest["count"]:
        raise IndexFileError(f"{manifest_path}: the segments hold {total} items, count says {manifest['count']}")
    return manifest, segments


def check_manifest(manifest: dict, path: Path) -> None:
    """The index-wide fields of a manifest: counts, shape and dtypes."""
    for key in ("count", "num_vectors", "dim"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "count" else 1):
            raise IndexFileError(f"{path}: {key} must be a non-negative integer, got {value!r}")
    dtypes = sorted(DTYPES) + sorted(COMPRESSED)
    if manifest.get("dtype") not in dtypes:
        raise IndexFileError(f"{path}: dtype must be one of {dtypes}, got {manifest.get('dtype')!r}")
    if manifest["dtype"] == "binary" and manifest["dim"] % 8:
        raise IndexFileError(f"{path}: a binary index needs dim a multiple of 8, got {manifest['dim']}")
    if manifest["dtype"] in COMPRESSED and manifest.get("full_dtype") not in DTYPES:
        found = manifest.get("full_dtype")
        raise IndexFileError(f"{path}: full_dtype must be one of {sorted(DTYPES)}, got {found!r}")


def checksummed_files(folder: Path, entry: dict) -> list:
    """(path, expected SHA-256) of each file of a segment."""
    return [(folder / name, entry[key]) for key, name in CHECKSUMS.items() if isinstance(entry.get(key), str)]


def read_tensors(path: Path, expected: dict, mmap: bool, optional: tuple = ()) -> dict:
    """Tensors of a safetensors file, each checked against `expected` {name: (dtype name, shape)}, read or
    memory-mapped; those named in `optional` may be absent (then they are left out of the result)."""
    if not path.is_file():
        raise IndexFileError(f"{path} is missing: the index's manifest names its segment")
    header, data_start, size = read_header(path, IndexFileError)
    tensors = {}
    for name, (dtype_name, shape) in expected.items():
        safetensors_dtype, numpy_dtype = SAFETENSORS_DTYPES[dtype_name]
        if header.get(name) is None and name in optional:
            continue
        found_dtype, found_shape, offset, nbytes = tensor_span(header, data_start, name, path, IndexFileError)
        if found_dtype != safetensors_dtype or found_shape != shape:
            raise IndexFileError(
                f"{path}: tensor {name!r} is {found_dtype} {found_shape}, the manifest says {safetensors_dtype} {shape}"
            )
        count = int(np.prod(shape))
        if nbytes != count * np.dtype(numpy_dtype).itemsize or offset + nbytes > size:
            raise IndexFileError(f"{path} is truncated: the bytes of tensor {name!r} are incomplete")
        if mmap and count:
            array = np.memmap(path, dtype=numpy_dtype, mode="r", offset=offset, shape=(count,))
        else:
            array = np.fromfile(path, dtype=numpy_dtype, count=count, offset=offset)
        with warnings.catch_warnings():  # a read-only map: torch warns that writes would be undefined (we never write)
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        if dtype_name == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        tensors[name] = tensor.view(*shape)
    return tensors


def write_ids(path: Path, ids: list) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(i) + "\n" for i in ids)


def read_ids(folder: Path, entry: dict) -> list:
    """The ids of a saved segment, checked: a list of `entry["count"]` unique strs or ints."""
    path = folder / (IDS_NAME if "ids" not in entry else MANIFEST_NAME)
    if "ids" in entry:  # legacy: in the manifest
        ids = entry["ids"]
    else:
        try:
            ids = read_json_lines(path)
        except (OSError, ValueError) as error:  # JSON and encoding errors are ValueErrors
            raise IndexFileError(f"{path} is missing or unreadable: {error}") from error
    if not isinstance(ids, list) or len(ids) != entry["count"]:
        raise IndexFileError(f"{path}: ids must be a list of {entry['count']} entries")
    if any(not isinstance(i, (str, int)) or isinstance(i, bool) for i in ids):
        raise IndexFileError(f"{path}: ids must be strings or integers")
    return ids


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):  # 1 MB at a time: two are alive at once
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "FORMAT",
    "SINGLE_SEGMENT_FORMAT",
    "LEGACY_FORMAT",
    "MANIFEST_NAME",
    "VECTORS_NAME",
    "FULL_NAME",
    "IDS_NAME",
    "DTYPES",
    "COMPRESSED",
    "IndexFileError",
    "save_segments",
    "read_manifest",
    "check_manifest",
    "checksummed_files",
    "read_tensors",
    "read_ids",
    "write_ids",
    "check_writable",
    "sha256_file",
]
