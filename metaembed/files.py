"""Files the command line reads and writes: inputs to encode, and embeddings files.

Inputs (`read_inputs`):
  - a `.jsonl` file, one object per line: {"id": optional, "text": optional, "image": optional path, relative
    to the file's folder}; ids default to the line number;
  - a `.txt` file, one text per line (blank lines skipped); ids are line numbers;
  - a folder of images (png, jpg, jpeg, webp, bmp, gif), in name order; ids are file names.

Embeddings file: safetensors with one tensor "embeddings" (N, k, D) and metadata
{"format": "metaembed-embeddings/1", "role", "ids" (a JSON list), "model"}; written atomically.
"""

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EMBEDDINGS_FORMAT = "metaembed-embeddings/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _jsonl_inputs(path: Path) -> tuple:
    ids, items = [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON: {error}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected an object with 'text' and/or 'image'")
            unknown = set(record) - {"id", "text", "image"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected 'id', 'text', 'image'")
            if record.get("text") is None and record.get("image") is None:
                raise ValueError(f"{where}: needs a 'text' or an 'image'")
            item = {}
            if record.get("text") is not None:
                item["text"] = record["text"]
            if record.get("image") is not None:
                image = Path(record["image"])
                image = image if image.is_absolute() else path.parent / image
                if not image.is_file():
                    raise ValueError(f"{where}: no image file at {image}")
                item["image"] = image
            ids.append(str(record.get("id", number)))
            items.append(item)
    return ids, items


def read_inputs(path) -> tuple:
    """(ids, items) from a .jsonl file, a .txt file, or a folder of images; items are `encode` inputs."""
    path = Path(path)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ValueError(f"{path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        ids, items = [p.name for p in images], [{"image": p} for p in images]
    elif not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    elif path.suffix == ".jsonl":
        ids, items = _jsonl_inputs(path)
    elif path.suffix == ".txt":
        numbered = [(n, line.rstrip("\n")) for n, line in enumerate(path.open(encoding="utf-8"), start=1)]
        numbered = [(n, text) for n, text in numbered if text.strip()]
        ids, items = [str(n) for n, _ in numbered], [{"text": text} for _, text in numbered]
    else:
        raise ValueError(f"{path}: inputs must be a .jsonl file, a .txt file or a folder of images")
    if not items:
        raise ValueError(f"{path}: no inputs")
    duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if duplicates:
        raise ValueError(f"{path}: duplicate ids {duplicates[:5]}")
    return ids, items


def save_embeddings(path, embeddings: torch.Tensor, ids: list, role: str, model: str, precision: str = "float32"):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if embeddings.dim() != 3 or embeddings.shape[0] != len(ids):
        raise ValueError(f"expected (N, k, D) embeddings for {len(ids)} ids, got shape {tuple(embeddings.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": EMBEDDINGS_FORMAT, "role": role, "ids": json.dumps(ids), "model": str(model)}
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        tensor = embeddings.to(PRECISIONS[precision]).contiguous()
        save_file({"embeddings": tensor}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_embeddings(path) -> tuple:
    """(embeddings float32 (N, k, D), ids, metadata); raises ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != EMBEDDINGS_FORMAT or "embeddings" not in file.keys():
                raise ValueError(f"{path}: not a MetaEmbed embeddings file (write one with `metaembed encode`)")
            embeddings = file.get_tensor("embeddings").float()
    except ValueError:
        raise
    except Exception as error:  # missing, truncated or corrupt files
        raise ValueError(f"{path}: cannot read embeddings: {error}") from error
    try:
        ids = json.loads(metadata["ids"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: the ids in its metadata are missing or unreadable") from None
    if embeddings.dim() != 3 or len(ids) != embeddings.shape[0]:
        raise ValueError(f"{path}: {len(ids)} ids for embeddings of shape {tuple(embeddings.shape)}")
    return embeddings, ids, metadata


__all__ = ["read_inputs", "save_embeddings", "load_embeddings", "EMBEDDINGS_FORMAT", "PRECISIONS"]
