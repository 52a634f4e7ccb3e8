"""Building or appending to a saved float `MetaEmbedIndex` from chunks, one chunk in memory at a time.

`MetaEmbedIndex.add` grows tensors in memory, so an index built that way needs all of it in RAM. `build_index`
writes the new segment's `vectors.safetensors` directly instead: its header first (the total count is known from
the embeddings folder's manifest), then each chunk's rows into every tier's region at their offsets, the tier
norms last. Appending copies the saved index's tiers into the new segment in blocks read from its memory map, then
the new chunks: the I/O is that of a save, the anonymous memory that of one chunk (plus the ids). The switch to the
new segment is `index_files.save_segment`'s: crash-safe. Compressed indexes (int8 / binary) are built in memory.
"""

import json
import struct
from pathlib import Path

import numpy as np
import torch

from .index import DTYPES, _tier_max_norms, check_candidate_embeddings
from .index_files import FORMAT, IDS_NAME, VECTORS_NAME, save_segment

COPY_ROWS_BYTES = 8 << 20  # bytes of one tier copied at a time from a saved index when appending


def build_index(directory, chunks, count: int, dim: int, num_vectors: int, dtype: str = "bfloat16",
                base=None) -> Path:  # fmt: skip
    """Write a float index of `count` items to `directory` from `chunks` ((embeddings [n, R, D], ids) pairs, e.g.
    `embeddings_file.iter_embeddings`), after the items of `base` (a loaded `MetaEmbedIndex`, e.g. the one saved at
    `directory`: an append). Raises ValueError naming the chunk when the chunks hold another count, shape or
    duplicate ids; the index at `directory` is then left as it was."""
    if dtype not in DTYPES:
        raise ValueError(f"streamed builds store {sorted(DTYPES)}; build {dtype!r} indexes with MetaEmbedIndex.add")
    torch_dtype = DTYPES[dtype]
    width = torch.empty(0, dtype=torch_dtype).element_size()
    first = len(base) if base is not None else 0
    total = first + count
    tier_bytes = total * dim * width
    header = json.dumps({"__metadata__": {"format": FORMAT},
                         "vectors": {"dtype": {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype],
                                     "shape": [num_vectors, total, dim], "data_offsets": [0, num_vectors * tier_bytes]},
                         "max_norms": {"dtype": "F32", "shape": [num_vectors], "data_offsets": [
                             num_vectors * tier_bytes, num_vectors * tier_bytes + 4 * num_vectors]}}).encode()  # fmt: skip
    header += b" " * (-len(header) % 8)
    data_start = 8 + len(header)
    seen = set(base.ids) if base is not None else set()

    def write(segment: Path) -> dict:
        norms = torch.zeros(num_vectors)
        with open(segment / VECTORS_NAME, "wb") as out, open(segment / IDS_NAME, "w", encoding="utf-8") as ids_file:
            out.write(struct.pack("<Q", len(header)) + header)
            out.truncate(data_start + num_vectors * tier_bytes + 4 * num_vectors)
            if base is not None:  # the saved rows, tier by tier, in blocks of its memory map
                stored = base.vectors
                step = max(1, COPY_ROWS_BYTES // (dim * width))
                for tier in range(num_vectors):
                    out.seek(data_start + tier * tier_bytes)
                    for start in range(0, first, step):
                        out.write(_raw(stored[tier, start : start + step]))
                norms = torch.maximum(norms, _tier_max_norms(stored, 2**22))
                ids_file.writelines(json.dumps(i) + "\n" for i in base.ids)
            row = first
            for number, (embeddings, ids) in enumerate(chunks):
                where = f"chunk {number} (items {row - first}..)"
                try:
                    check_candidate_embeddings(embeddings, dim, num_vectors, "this index")
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from None
                n = embeddings.shape[0]
                if len(ids) != n or row + n > total:
                    raise ValueError(f"{where}: {len(ids)} ids for {n} items, {total - row} of {count} items left")
                for position, item_id in enumerate(ids):
                    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                        raise ValueError(f"{where}: id at position {position} must be a str or an int, got {item_id!r}")
                    if item_id in seen:
                        raise ValueError(f"{where}: id {item_id!r} (position {position}) is already in the index")
                    seen.add(item_id)
                part = embeddings[:, :num_vectors].to(torch_dtype).transpose(0, 1)  # [R, n, D]
                for tier in range(num_vectors):
                    out.seek(data_start + tier * tier_bytes + row * dim * width)
                    out.write(_raw(part[tier]))
                norms = torch.maximum(norms, _tier_max_norms(part, 2**22))  # in 1 MB float32 slices
                ids_file.writelines(json.dumps(i) + "\n" for i in ids)
                row += n
            if row != total:
                raise ValueError(f"the chunks hold {row - first} items, {count} were announced")
            out.seek(data_start + num_vectors * tier_bytes)
            out.write(norms.numpy().astype(np.float32).tobytes())
        return {"sha256": VECTORS_NAME, "ids_sha256": IDS_NAME}

    manifest = {"count": total, "num_vectors": num_vectors, "dim": dim, "dtype": dtype,
                "layout": "vector-major [num_vectors, count, dim]"}  # fmt: skip
    save_segment(Path(directory), write, manifest)
    return Path(directory)


def _raw(rows: torch.Tensor) -> bytes:
    """The bytes of a [n, D] tensor as stored (bf16 viewed as int16: numpy has no bfloat16)."""
    rows = rows.contiguous()
    if rows.dtype == torch.bfloat16:
        rows = rows.view(torch.int16)
    return rows.numpy().tobytes()


__all__ = ["build_index"]
