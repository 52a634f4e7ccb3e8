"""Inputs of the command line (`metaembed encode`, `index --model`, `search --model`): what a user points it at.

`read_inputs` takes
  - a `.jsonl` file, one object per line: {"id": optional, "text": optional, "image": optional path, relative
    to the file's folder}; ids default to the line number;
  - a `.txt` file, one text per line (blank lines skipped); ids are line numbers;
  - a folder of images (png, jpg, jpeg, webp, bmp, gif), in name order; ids are file names.
"""

import json
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


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


__all__ = ["read_inputs", "IMAGE_SUFFIXES"]
