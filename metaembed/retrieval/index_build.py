"""Building or appending to a saved `MetaEmbedIndex` from chunks, one chunk in memory at a time.

`MetaEmbedIndex.add` grows tensors in memory, so an index built that way needs all of it in RAM. `build_index`
writes the new segment's files directly instead: each file's header first (the count is known from the embeddings
folder's manifest), then each chunk's rows into every tier's region at their offsets, per-tier values (norms,
centres) last. Appending writes the new items as one more segment and keeps the saved ones as they are: the I/O is
that of the new items, the anonymous memory that of one chunk (plus the ids). Every dtype gives the same files as
`add` then `save` would (the same arithmetic per item); a binary index without saved items first reads the first
`CENTER_SAMPLE` items once for its centres (a second pass: `chunks` must then be a function returning the chunks).
The switch to the new list of segments is `index_files.save_segments`'s: crash-safe.
"""

import json
import struct
from pathlib import Path

import numpy as np
import torch

from . import segment as segment_module
from .index import check_candidate_embeddings
from .index_files import COMPRESSED, DTYPES, FORMAT, FULL_NAME, IDS_NAME, VECTORS_NAME, save_segments
from .segment import quantize, tier_max_norms

SAFETENSORS = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int8: "I8", torch.uint8: "U8"}


class _TensorFile:
    """A safetensors file written in place: `tensors` {name: (torch dtype, shape)}; rows placed by offset."""

    def __init__(self, path: Path, tensors: dict):
        header, offset, self.places = {"__metadata__": {"format": FORMAT}}, 0, {}
        for name, (dtype, shape) in tensors.items():
            nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.places[name] = (offset, shape, nbytes // max(1, int(np.prod(shape[:2]))) if len(shape) > 1 else 0)
            offset += nbytes
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.start = 8 + len(encoded)
        self.file = open(path, "wb")  # noqa: SIM115  closed by close()
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.file.truncate(self.start + offset)

    def rows(self, name: str, tier: int, row: int, values: torch.Tensor) -> None:
        """Write `values` (rows of tier `tier`, from item `row` on) into tensor `name` [R, total, ...]."""
        offset, shape, row_bytes = self.places[name]
        self.file.seek(self.start + offset + (tier * shape[1] + row) * row_bytes)
        self.file.write(_raw(values))

    def whole(self, name: str, values: torch.Tensor) -> None:
        self.file.seek(self.start + self.places[name][0])
        self.file.write(_raw(values))

    def close(self) -> None:
        self.file.close()


def build_index(
    directory,
    chunks,
    count: int,
    dim: int,
    num_vectors: int,
    dtype: str = "bfloat16",
    base=None,
    full_dtype: str = "bfloat16",
) -> Path:
    """Write an index of `count` items to `directory` from `chunks` ((embeddings [n, R, D], ids) pairs, e.g.
    `embeddings_file.iter_embeddings(path)`, or a function returning them), as one new segment after the segments
    of `base` (a `MetaEmbedIndex` loaded from disk, e.g. the one saved at `directory`: an append, which writes the
    new items only; its dtype is kept). Raises ValueError naming the chunk when the chunks hold another count,
    shape or duplicate ids; the index at `directory` is then left as it was."""
    if base is not None:
        if base._tail.count:
            raise ValueError("base holds items added since it was loaded: save it first, then append to it")
        if (base.dim, base.num_vectors) != (dim, num_vectors):
            raise ValueError(
                f"the index holds {base.num_vectors} vectors x {base.dim} dims; "
                f"the new items were announced as {num_vectors} x {dim}"
            )
        dtype, full_dtype = base.dtype_name, base.full_dtype_name
    if dtype not in DTYPES and dtype not in COMPRESSED:
        raise ValueError(f"dtype must be one of {sorted(DTYPES) + sorted(COMPRESSED)}, got {dtype!r}")
    compressed, binary = dtype in COMPRESSED, dtype == "binary"
    stored_dtype = COMPRESSED.get(dtype) or DTYPES[dtype]
    full_torch = DTYPES[full_dtype] if compressed else stored_dtype
    existing = base._known_ids() if base is not None else set()
    width = dim // 8 if binary else dim
    centers = base._tail.centers if base is not None and len(base) else None
    if binary and centers is None and count:
        centers = _centers(chunks, min(count, segment_module.CENTER_SAMPLE), num_vectors, dim, full_torch)
    tensors = {"vectors": (stored_dtype, (num_vectors, count, width))}
    if compressed:
        tensors["scales"] = (torch.float32, (num_vectors, count))
    if binary and count:
        tensors["offsets"] = (torch.float32, (num_vectors, count))
        tensors["centers"] = (torch.float32, (num_vectors, dim))
    if not compressed:
        tensors["max_norms"] = (torch.float32, (num_vectors,))

    def write(segment: Path) -> int:
        vectors = _TensorFile(segment / VECTORS_NAME, tensors)
        full = None
        if compressed:
            full = _TensorFile(segment / FULL_NAME, {"vectors": (full_torch, (num_vectors, count, dim))})
        norms, seen, row = torch.zeros(num_vectors), set(), 0
        try:
            with open(segment / IDS_NAME, "w", encoding="utf-8") as ids_file:
                for number, (embeddings, ids) in enumerate(chunks() if callable(chunks) else chunks):
                    where = f"chunk {number} (items {row}..)"
                    _check_chunk(embeddings, ids, where, existing, seen, dim, num_vectors, count - row)
                    part = embeddings[:, :num_vectors].transpose(0, 1)  # [R, n, D]
                    if compressed:
                        kept = part.to(full_torch)  # binary codes are those of the kept full vectors, as in add
                        coded = quantize(kept if binary else part, dtype, center=_unsqueezed(centers))
                        for tier in range(num_vectors):
                            vectors.rows("vectors", tier, row, coded[0][tier])
                            vectors.rows("scales", tier, row, coded[1][tier])
                            if binary:
                                vectors.rows("offsets", tier, row, coded[2][tier])
                            full.rows("vectors", tier, row, kept[tier])
                    else:
                        kept = part.to(stored_dtype)
                        for tier in range(num_vectors):
                            vectors.rows("vectors", tier, row, kept[tier])
                        norms = torch.maximum(norms, tier_max_norms(kept, 2**22))  # in 1 MB float32 slices
                    ids_file.writelines(json.dumps(i) + "\n" for i in ids)
                    row += embeddings.shape[0]
            if row != count:
                raise ValueError(f"the chunks hold {row} items, {count} were announced")
            if "centers" in tensors:
                vectors.whole("centers", centers)
            if not compressed:
                vectors.whole("max_norms", norms)
        finally:
            vectors.close()
            if full is not None:
                full.close()
        return count

    manifest = {
        "count": count + (len(base) if base is not None else 0),
        "num_vectors": num_vectors,
        "dim": dim,
        "dtype": dtype,
        "layout": "vector-major [num_vectors, count, dim] per segment",
    }
    if compressed:
        manifest["full_dtype"] = full_dtype
    kept = base._saved_segments() if base is not None else []
    save_segments(Path(directory), kept, write if count or not kept else None, manifest)
    return Path(directory)


def _check_chunk(embeddings, ids, where: str, existing: set, seen: set, dim: int, num_vectors: int, left: int) -> None:
    try:
        check_candidate_embeddings(embeddings, dim, num_vectors, "this index")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if len(ids) != embeddings.shape[0] or embeddings.shape[0] > left:
        raise ValueError(f"{where}: {len(ids)} ids for {embeddings.shape[0]} items, {left} items left to write")
    for position, item_id in enumerate(ids):
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise ValueError(f"{where}: id at position {position} must be a str or an int, got {item_id!r}")
        if item_id in seen or item_id in existing:
            raise ValueError(f"{where}: id {item_id!r} (position {position}) is already in the index")
        seen.add(item_id)


def _centers(chunks, sample: int, num_vectors: int, dim: int, full_dtype) -> torch.Tensor:
    """Binary: each tier's mean over the first `sample` items as stored in full, as `MetaEmbedIndex` fits it."""
    if not callable(chunks) and not isinstance(chunks, (list, tuple)):
        raise ValueError(
            "a binary index reads its first items twice (centres, then codes): pass chunks as a "
            "function returning them, e.g. lambda: iter_embeddings(path)"
        )
    total, seen = torch.zeros(num_vectors, dim, dtype=torch.float64), 0
    for embeddings, _ in chunks() if callable(chunks) else chunks:
        if seen >= sample:
            break
        part = embeddings[: sample - seen, :num_vectors].transpose(0, 1).to(full_dtype)
        total += part.double().sum(dim=1)
        seen += part.shape[1]
    return (total / max(seen, 1)).float()


def _unsqueezed(centers):
    return None if centers is None else centers.unsqueeze(1)


def _raw(rows: torch.Tensor) -> bytes:
    """The bytes of a tensor as stored (bf16 viewed as int16: numpy has no bfloat16)."""
    rows = rows.contiguous()
    if rows.dtype == torch.bfloat16:
        rows = rows.view(torch.int16)
    return rows.numpy().tobytes()


__all__ = ["build_index"]
