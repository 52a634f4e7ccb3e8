"""The embeddings-file format: what `metaembed encode` writes and `metaembed score` / `index` / `search` read.

Safetensors with one tensor "embeddings" (N, k, D) and metadata {"format": "metaembed-embeddings/1", "role", "ids"
(a JSON list), "model"}; written atomically. `metaembed.serving.sharded` writes the same file by merging chunks.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_metaembed.hub_metaembed import replace_atomically

EMBEDDINGS_FORMAT = "metaembed-embeddings/1"
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_embeddings(path, embeddings: torch.Tensor, ids: list, role: str, model: str, precision: str = "float32"):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if embeddings.dim() != 3 or embeddings.shape[0] != len(ids):
        raise ValueError(f"expected (N, k, D) embeddings for {len(ids)} ids, got shape {tuple(embeddings.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": EMBEDDINGS_FORMAT, "role": role, "ids": json.dumps(ids), "model": str(model)}
    tensor = embeddings.to(PRECISIONS[precision]).contiguous()
    replace_atomically(path, lambda tmp: save_file({"embeddings": tensor}, str(tmp), metadata=metadata))


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


__all__ = ["save_embeddings", "load_embeddings", "EMBEDDINGS_FORMAT", "PRECISIONS"]
