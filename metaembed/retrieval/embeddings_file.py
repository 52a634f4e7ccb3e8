"""The embeddings format: what `metaembed encode` writes and `metaembed score` / `index` / `search` read.

A folder of shards, written and read one shard at a time, so nothing in it grows with the number of items:
- `chunk-000042.safetensors`: one tensor "embeddings" (n, k, D) in the stored precision;
- `chunk-000042.ids.jsonl`: the shard's n ids, one JSON value per line (beside the vectors, not in a header:
  safetensors refuses headers over 100 MB, which JSON ids passed at a few million items);
- `embeddings.json`: the manifest {"format": "metaembed-embeddings/2", "role", "model", "precision", "count",
  "num_vectors", "dim", "shards": [{"vectors", "ids", "count"}, ...]} (paths relative to the folder), written last
  and atomically: a folder without it is not (yet) an embeddings folder.
The sharded encoder's chunks are these shards (`metaembed.serving.sharded`): nothing is merged. Every tool that
reads safetensors and JSON lines reads the shards as they are.

A single file of the earlier format ("metaembed-embeddings/1": ids in the safetensors header) still loads.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_metaembed.folders import is_occupied, save_folder_atomically
from modeling_metaembed.hub_metaembed import replace_atomically, write_atomic

from .safetensors_header import read_header, tensor_span

EMBEDDINGS_FORMAT = "metaembed-embeddings/2"
SINGLE_FILE_FORMAT = "metaembed-embeddings/1"
MANIFEST_NAME = "embeddings.json"
SHARD_NAME = "chunk-{:06d}"
SHARD_ROWS = 1 << 16  # items per shard written by `save_embeddings`
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NUMPY = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.int16, 2)}  # safetensors dtype: read as, width


def read_json_lines(path) -> list:
    """The values of a file of one JSON value per line (an ids sidecar), parsed a few MB of lines per call: one
    `json.loads` of many lines runs about 6x faster than one per line (10M ids: seconds instead of half a minute).
    The writers never put a raw newline inside a value (JSON escapes it), so lines joined by commas are an array."""
    values, first_line = [], 1
    with open(path, encoding="utf-8") as file:
        while lines := file.readlines(1 << 22):
            try:
                parsed = json.loads("[" + ",".join(lines) + "]")
            except json.JSONDecodeError:
                parsed = None
            if parsed is None or len(parsed) != len(lines):  # find the line at fault, one at a time
                for number, line in enumerate(lines, first_line):
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}, line {number}: not one JSON value ({error})") from None
                raise ValueError(f"{path}: a line holds more than one JSON value")
            values.extend(parsed)
            first_line += len(lines)
    return values


def write_shard(folder, number: int, embeddings: torch.Tensor, ids: list, metadata: dict | None = None) -> dict:
    """Write shard `number` (its ids first, then its vectors, each atomically) into `folder`; its manifest entry."""
    if embeddings.dim() != 3 or embeddings.shape[0] != len(ids):
        raise ValueError(f"expected (N, k, D) embeddings for {len(ids)} ids, got shape {tuple(embeddings.shape)}")
    folder, stem = Path(folder), SHARD_NAME.format(number)
    folder.mkdir(parents=True, exist_ok=True)
    ids_name, vectors_name = f"{stem}.ids.jsonl", f"{stem}.safetensors"

    def write_ids(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(i) + "\n" for i in ids)

    replace_atomically(folder / ids_name, write_ids)
    info = {**(metadata or {}), "count": str(len(ids)), "ids": ids_name}
    tensor = embeddings.contiguous()
    replace_atomically(folder / vectors_name, lambda tmp: save_file({"embeddings": tensor}, str(tmp), metadata=info))
    return {"vectors": vectors_name, "ids": ids_name, "count": len(ids)}


def write_manifest(folder, shards: list, role: str, model: str, precision: str, shape: tuple) -> None:
    """Write `embeddings.json` listing `shards` (entries of `write_shard`, paths relative to `folder`) atomically.
    `shape` is (num_vectors, dim) of every shard."""
    manifest = {
        "format": EMBEDDINGS_FORMAT,
        "role": role,
        "model": str(model),
        "precision": precision,
        "count": sum(s["count"] for s in shards),
        "num_vectors": shape[0],
        "dim": shape[1],
        "shards": shards,
    }
    write_atomic(Path(folder) / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def save_embeddings(
    path,
    embeddings: torch.Tensor,
    ids: list,
    role: str,
    model: str,
    precision: str = "float32",
    shard_rows: int = SHARD_ROWS,
):
    """Write an embeddings folder at `path` (replacing one there) in shards of `shard_rows` items."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if embeddings.dim() != 3 or embeddings.shape[0] != len(ids):
        raise ValueError(f"expected (N, k, D) embeddings for {len(ids)} ids, got shape {tuple(embeddings.shape)}")
    path = Path(path)
    if path.is_file() or (is_occupied(path) and not (path / MANIFEST_NAME).is_file()):
        raise FileExistsError(f"{path} exists and is not an embeddings folder: remove it or choose another path")

    def write(staging: Path) -> None:
        shards = []
        for number, start in enumerate(range(0, max(len(ids), 1), shard_rows)):
            part = embeddings[start : start + shard_rows].to(PRECISIONS[precision])
            shards.append(write_shard(staging, number, part, ids[start : start + shard_rows]))
        write_manifest(staging, shards, role, model, precision, tuple(embeddings.shape[1:]))

    save_folder_atomically(write, path, replace=True)


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        hint = " (the encoding may not be finished: rerun it to resume)" if path.is_dir() else ""
        raise ValueError(f"{path}: not a MetaEmbed embeddings folder, {MANIFEST_NAME} is missing{hint}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest_path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != EMBEDDINGS_FORMAT:
        raise ValueError(f"{manifest_path}: not a MetaEmbed embeddings manifest (write one with `metaembed encode`)")
    if not isinstance(manifest.get("shards"), list) or manifest.get("precision") not in PRECISIONS:
        raise ValueError(f"{manifest_path}: its shards or precision are missing")
    return manifest


def embeddings_info(path) -> dict:
    """{"format", "role", "model", "precision", "count", "num_vectors", "dim"} of an embeddings folder (or
    single file of the earlier format), reading only its manifest (header)."""
    path = Path(path)
    if path.is_file():
        return _single_file_info(path)
    manifest = _read_manifest(path)
    return {key: value for key, value in manifest.items() if key != "shards"}


def iter_embeddings(path, dtype=torch.float32):
    """Yield (embeddings (n, k, D) in `dtype`, ids) shard by shard: one shard in memory at a time."""
    for _, embeddings, ids in iter_embedding_shards(path, dtype):
        yield embeddings, ids


def iter_embedding_shards(path, dtype=torch.float32):
    """`iter_embeddings` with each shard's file name first: (name, embeddings, ids), for messages that name the
    shard (a single file of the earlier format is its own one shard)."""
    path = Path(path)
    if path.is_file():
        embeddings, ids = _load_single_file(path)
        yield path.name, embeddings.to(dtype), ids
        return
    manifest = _read_manifest(path)
    tail = [manifest["num_vectors"], manifest["dim"]]
    for shard in manifest["shards"]:
        vectors_path, ids_path = path / shard["vectors"], path / shard["ids"]
        try:
            with safe_open(vectors_path, framework="pt") as file:
                embeddings = file.get_tensor("embeddings")
            ids = read_json_lines(ids_path)
        except Exception as error:  # missing, truncated or corrupt shards
            raise ValueError(f"{path}: cannot read shard {shard['vectors']}: {error}") from error
        if list(embeddings.shape[1:]) != tail or embeddings.shape[0] != len(ids) or len(ids) != shard["count"]:
            raise ValueError(
                f"{vectors_path}: {len(ids)} ids in {shard['ids']} for embeddings of shape "
                f"{tuple(embeddings.shape)}; the manifest says {shard['count']} x {tail}"
            )
        yield shard["vectors"], embeddings.to(dtype), ids


def load_embeddings(path) -> tuple:
    """(embeddings float32 (N, k, D), ids, metadata {"format", "role", "model"}) of a whole embeddings folder (or
    single file); raises ValueError naming the file when it is not one. For large ones use `iter_embeddings`."""
    info = embeddings_info(path)
    parts, ids = [], []
    for embeddings, shard_ids in iter_embeddings(path):
        parts.append(embeddings)
        ids.extend(shard_ids)
    embeddings = torch.cat(parts) if parts else torch.empty(0, info["num_vectors"], info["dim"])
    return embeddings, ids, {key: info[key] for key in ("format", "role", "model")}


def _single_file_header(path: Path) -> tuple:
    """(metadata, dtype, shape, offset, byte count) of a single embeddings file of the earlier format, read by our
    own header reader: it has no size limit, so files whose ids passed safetensors' 100 MB still load."""
    try:
        header, data_start, size = read_header(path)
    except ValueError as error:  # truncated, or not safetensors at all
        raise ValueError(f"{path}: cannot read embeddings: {error}") from error
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != SINGLE_FILE_FORMAT or "embeddings" not in header:
        raise ValueError(f"{path}: not a MetaEmbed embeddings file (write one with `metaembed encode`)")
    dtype, shape, offset, nbytes = tensor_span(header, data_start, "embeddings", path)
    expected = int(np.prod(shape)) * _NUMPY[dtype][1] if dtype in _NUMPY else -1
    if len(shape) != 3 or nbytes != expected or offset + nbytes > size:
        raise ValueError(f"{path}: tensor 'embeddings' ({dtype} {shape}) is unreadable or truncated")
    return metadata, dtype, shape, offset, nbytes


def _single_file_info(path: Path) -> dict:
    metadata, _, shape, _, _ = _single_file_header(path)
    return {
        "format": SINGLE_FILE_FORMAT,
        "role": metadata.get("role"),
        "model": metadata.get("model"),
        "count": shape[0],
        "num_vectors": shape[1],
        "dim": shape[2],
    }


def _load_single_file(path: Path) -> tuple:
    metadata, dtype, shape, offset, _ = _single_file_header(path)
    try:
        ids = json.loads(metadata["ids"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path}: the ids in its metadata are missing or unreadable") from None
    if len(ids) != shape[0]:
        raise ValueError(f"{path}: {len(ids)} ids for embeddings of shape {tuple(shape)}")
    array = np.fromfile(path, dtype=_NUMPY[dtype][0], count=int(np.prod(shape)), offset=offset)
    embeddings = torch.from_numpy(array)
    if dtype == "BF16":
        embeddings = embeddings.view(torch.bfloat16)
    return embeddings.view(*shape), ids


def relative_entry(entry: dict, shard_folder: Path, folder: Path) -> dict:
    """A `write_shard` entry for a shard written into `shard_folder`, with paths relative to `folder`."""
    move = os.path.relpath(shard_folder, folder)
    return {**entry, **{key: os.path.normpath(os.path.join(move, entry[key])) for key in ("vectors", "ids")}}


__all__ = [
    "save_embeddings",
    "load_embeddings",
    "iter_embeddings",
    "iter_embedding_shards",
    "embeddings_info",
    "write_shard",
    "read_json_lines",
    "write_manifest",
    "EMBEDDINGS_FORMAT",
    "PRECISIONS",
]
