"""`MetaEmbedIndex`: exact MaxSim search over stored candidate embeddings at any budget (r_q, r_c).

Layout. Vectors are stored vector-major, `[R_c, capacity, D]`: vector j of every item is one contiguous `[N, D]`
matrix. A budget r_c then reads exactly the first r_c matrices, N * r_c * D * bytes, with no copy, for every r_c.
(The item-major `[N, R_c, D]` that `model.encode` returns is not: its prefix `[:, :r_c]` is strided.)

Scoring one block of candidates at (r_q, r_c), for a batch of Q queries flattened to `[Q * r_q, D]`:

    best = max_{j < r_c} (Q_flat @ V_j[block].T)        # r_c GEMMs, float32 accumulation, running max
    score = best.view(Q, r_q, block).sum(dim=1)          # = sum_i max_j <q_i, c_j>: MaxSim

then a running top-k over blocks. The float32 score block is bounded by `max_block_bytes`.

On disk (`save` / `load`): a folder with `vectors.safetensors` (one tensor `vectors`, `[R_c, N, D]`) and
`index.json` (format, shape, dtype, ids, SHA-256 of the tensor file). Saving builds the new folder beside the old
one and swaps it in, so an interrupted save leaves the previous index intact; loading validates everything and
can memory-map the vectors for indexes larger than RAM.
"""

import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from modeling_metaembed.scoring_metaembed import DEFAULT_MAX_BLOCK_BYTES, check_budget, matmul_fp32

FORMAT = "metaembed-index/1"
MANIFEST_NAME = "index.json"
VECTORS_NAME = "vectors.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors dtype names, and the numpy type of the same width used to memory-map the raw bytes.
_SAFETENSORS_DTYPES = {"bfloat16": ("BF16", np.uint16), "float16": ("F16", np.float16), "float32": ("F32", np.float32)}


class IndexFileError(ValueError):
    """An index folder that is missing, truncated, tampered with or inconsistent."""


@dataclass
class SearchResult:
    """Top-k of each query: `scores` [Q, k] float32 (descending), `positions` [Q, k] (rows of the index; None
    from a Qdrant collection, which has no row order), and `ids` (a list per query of the ids given to `add`)."""

    scores: torch.Tensor
    positions: torch.Tensor | None
    ids: list


def check_candidate_embeddings(embeddings, dim: int, num_vectors: int, holder: str) -> None:
    """Raise ValueError naming the problem unless `embeddings` is a floating [N, R, D] tensor with D = `dim`,
    R >= `num_vectors` and finite values in its first `num_vectors` vectors. `holder` names the store in messages."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must be a tensor of shape (items, vectors, dim), got {shape}")
    _, vectors, found = embeddings.shape
    if found != dim:
        raise ValueError(f"embeddings have dimension {found} but {holder} holds dimension {dim}")
    if vectors < num_vectors:
        raise ValueError(f"embeddings have {vectors} vectors per item but {holder} keeps {num_vectors}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    finite = torch.isfinite(embeddings[:, :num_vectors]).flatten(1).all(dim=1)
    if not finite.all():
        raise ValueError(f"item {int((~finite).nonzero()[0])} of this batch has non-finite values (NaN or inf)")


def as_query_batch(queries, dim: int, holder: str) -> torch.Tensor:
    """`queries` as a floating [Q, R_q, D] tensor (a single [R_q, D] query gets a batch axis), D checked against
    `dim`; ValueError otherwise. `holder` names the store in messages."""
    if isinstance(queries, torch.Tensor) and queries.dim() == 2:
        queries = queries.unsqueeze(0)
    if not isinstance(queries, torch.Tensor) or queries.dim() != 3 or not queries.is_floating_point():
        shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
        raise ValueError(f"queries must be a floating-point tensor of shape (queries, vectors, dim), got {shape}")
    if queries.shape[-1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[-1]} but {holder} holds dimension {dim}")
    return queries


def _dtype_name(dtype) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


class MetaEmbedIndex:
    """Candidate embeddings kept at their first `num_vectors` vectors, searchable at any budget up to that.

    Args:
        dim: the embedding dimension D (`model.config.output_dim`).
        num_vectors: R_c vectors kept per item (budgets up to r_c = num_vectors are searchable).
        dtype: storage precision: "bfloat16" (default), "float16" or "float32". Scores accumulate in float32.
        device: where the vectors live and the search runs ("cpu", "cuda", ...).
    """

    def __init__(self, dim: int, num_vectors: int, dtype="bfloat16", device="cpu"):
        for name, value in (("dim", dim), ("num_vectors", num_vectors)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.dim, self.num_vectors = dim, num_vectors
        self.dtype_name = _dtype_name(dtype)
        self.dtype = DTYPES[self.dtype_name]
        self.device = torch.device(device)
        self._vectors = torch.empty(num_vectors, 0, dim, dtype=self.dtype, device=self.device)  # [R_c, capacity, D]
        self._count = 0
        self.ids: list = []
        self._id_set: set = set()

    # ------------------------------------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"MetaEmbedIndex({self._count} items, {self.num_vectors} vectors x {self.dim} dims, "
                f"{self.dtype_name}, {self.device})")  # fmt: skip

    @property
    def vectors(self) -> torch.Tensor:
        """[R_c, N, D] view of the stored vectors (row j of each item is `vectors[j, item]`)."""
        return self._vectors[:, : self._count]

    @property
    def nbytes(self) -> int:
        return self.num_vectors * self._count * self.dim * self._vectors.element_size()

    def add(self, embeddings: torch.Tensor, ids: list | None = None) -> None:
        """Append items: `embeddings` [N, R, D] with R >= num_vectors (the first num_vectors are kept), e.g.
        `model.encode_candidates(...)`. `ids` (one per item, str or int, unique in the index) default to the
        items' positions. Nothing is added when any check fails."""
        check_candidate_embeddings(embeddings, self.dim, self.num_vectors, "this index")
        count = embeddings.shape[0]
        ids = list(range(self._count, self._count + count)) if ids is None else list(ids)
        self._check_new_ids(ids, count)

        needed = self._count + count
        if needed > self._vectors.shape[1]:  # grow geometrically: amortised O(1) copies per item
            capacity = max(needed, 2 * self._vectors.shape[1], 1024)
            grown = torch.empty(self.num_vectors, capacity, self.dim, dtype=self.dtype, device=self.device)
            grown[:, : self._count] = self.vectors
            self._vectors = grown
        new = embeddings[:, : self.num_vectors].to(device=self.device, dtype=self.dtype)
        self._vectors[:, self._count : needed] = new.transpose(0, 1)
        self._count = needed
        self.ids.extend(ids)
        self._id_set.update(ids)

    def _check_new_ids(self, ids: list, count: int) -> None:
        if len(ids) != count:
            raise ValueError(f"got {len(ids)} ids for {count} items: give one id per item")
        seen = set()
        for position, item_id in enumerate(ids):
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise ValueError(f"id at position {position} must be a str or an int, got {item_id!r}")
            if item_id in self._id_set or item_id in seen:
                raise ValueError(f"id {item_id!r} (position {position}) is already in the index")
            seen.add(item_id)

    def add_items(self, model, items: list, ids: list | None = None, batch_size: int = 16,
                  show_progress_bar: bool = True, **encode_kwargs) -> None:  # fmt: skip
        """Encode `items` (texts, images, or {"text", "image"} dicts) as candidates with `model` and add them."""
        embeddings = model.encode(items, role="candidate", batch_size=batch_size,
                                  show_progress_bar=show_progress_bar, **encode_kwargs)  # fmt: skip
        self.add(embeddings, ids=ids)

    # ------------------------------------------------------------------------------------------------ search
    @torch.no_grad()
    def search(
        self,
        queries: torch.Tensor,
        budget: tuple | None = None,
        k: int = 10,
        query_batch_size: int = 64,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    ) -> SearchResult:
        """Exact top-k by MaxSim at `budget` = (r_q, r_c) (default: all query vectors, all stored vectors).

        `queries` [Q, R_q, D] (e.g. `model.encode_queries(...)`); a single query may be [R_q, D]. Queries are
        scored `query_batch_size` at a time, each batch in one pass over the first r_c stored matrices."""
        queries, (r_q, r_c) = self._check_search(queries, budget, k)
        if not isinstance(query_batch_size, int) or query_batch_size < 1:
            raise ValueError(f"query_batch_size must be positive, got {query_batch_size!r}")

        all_scores, all_positions = [], []
        for start in range(0, queries.shape[0], query_batch_size):
            batch = queries[start : start + query_batch_size, :r_q].to(device=self.device, dtype=self.dtype)
            scores, positions = self._search_batch(batch, r_c, k, max_block_bytes)
            all_scores.append(scores)
            all_positions.append(positions)
        scores = torch.cat(all_scores) if all_scores else torch.empty(0, k)
        positions = torch.cat(all_positions) if all_positions else torch.empty(0, k, dtype=torch.long)
        return self._result(scores, positions)

    @torch.no_grad()
    def search_two_stage(
        self,
        queries: torch.Tensor,
        budget: tuple | None = None,
        k: int = 10,
        shortlist: int = 100,
        query_batch_size: int = 64,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    ) -> SearchResult:
        """Coarse-to-fine search: an exact scan at budget (1, 1) (one vector per side, N * D * bytes read) keeps
        the best `shortlist` items per query, then MaxSim at `budget` re-ranks them. Reads N * D + shortlist *
        r_c * D values per query instead of N * r_c * D; recall against `search` is measured by
        `benchmarks/two_stage_recall.py`."""
        queries, (r_q, r_c) = self._check_search(queries, budget, k)
        if not isinstance(shortlist, int) or isinstance(shortlist, bool) or shortlist < 1:
            raise ValueError(f"shortlist must be a positive integer, got {shortlist!r}")
        if k > shortlist:
            raise ValueError(f"k={k} is larger than the shortlist ({shortlist}) it is re-ranked from")
        coarse = self.search(queries, budget=(1, 1), k=min(shortlist, len(self)), query_batch_size=query_batch_size,
                             max_block_bytes=max_block_bytes)  # fmt: skip
        queries = queries[:, :r_q].to(device=self.device, dtype=self.dtype)
        shortlists = coarse.positions.to(self.device)  # [Q, s]
        size = shortlists.shape[1]
        # Re-rank a few queries at a time: their shortlisted vectors, gathered, stay under max_block_bytes.
        step = max(1, max_block_bytes // (size * r_c * self.dim * 4))
        scores, positions = [], []
        for start in range(0, queries.shape[0], step):
            rows = shortlists[start : start + step]  # [q, s]
            vectors = self._vectors[:r_c, rows.reshape(-1)].float()  # [r_c, q * s, D] (a small copy)
            vectors = vectors.view(r_c, rows.shape[0], size, self.dim).permute(1, 0, 2, 3)  # [q, r_c, s, D]
            sims = torch.einsum("qid,qjsd->qijs", queries[start : start + step].float(), vectors)  # [q, r_q, r_c, s]
            fine = sims.amax(dim=2).sum(dim=1)  # [q, s]
            top = fine.topk(k, dim=1)
            scores.append(top.values.cpu())
            positions.append(rows.gather(1, top.indices).cpu())
        return self._result(torch.cat(scores), torch.cat(positions))

    def _check_search(self, queries, budget, k) -> tuple:
        """The queries as a [Q, R_q, D] tensor and the budget (r_q, r_c), once every search argument is valid."""
        queries = as_query_batch(queries, self.dim, "this index")
        budget = check_budget(budget, (queries.shape[1], self.num_vectors), what="queries and the index")
        if self._count == 0:
            raise ValueError("the index is empty: add items before searching")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self._count:
            raise ValueError(f"k must be an integer in 1..{self._count} (the number of items), got {k!r}")
        return queries, budget

    def _result(self, scores: torch.Tensor, positions: torch.Tensor) -> SearchResult:
        ids = [[self.ids[p] for p in row] for row in positions.tolist()]
        return SearchResult(scores=scores, positions=positions, ids=ids)

    def _search_batch(self, queries: torch.Tensor, r_c: int, k: int, max_block_bytes: int) -> tuple:
        num_queries, r_q, _ = queries.shape
        flat = queries.reshape(num_queries * r_q, self.dim)
        block = max(1, max_block_bytes // (4 * num_queries * r_q * 2))  # the running max and one GEMM result
        best_scores = best_positions = None
        for start in range(0, self._count, block):
            stop = min(start + block, self._count)
            best = matmul_fp32(flat, self._vectors[0, start:stop].T)  # [Q * r_q, block]
            for j in range(1, r_c):
                torch.maximum(best, matmul_fp32(flat, self._vectors[j, start:stop].T), out=best)
            scores = best.view(num_queries, r_q, stop - start).sum(dim=1)  # [Q, block]
            top = scores.topk(min(k, stop - start), dim=1)
            positions = top.indices + start
            if best_scores is not None:
                merged = torch.cat([best_scores, top.values], dim=1)
                order = merged.topk(k, dim=1).indices
                best_scores = merged.gather(1, order)
                best_positions = torch.cat([best_positions, positions], dim=1).gather(1, order)
            else:
                best_scores, best_positions = top.values, positions
        return best_scores.cpu(), best_positions.cpu()

    # ------------------------------------------------------------------------------------------------ files
    def save(self, directory) -> Path:
        """Write `vectors.safetensors` and `index.json` into `directory`, replacing an index saved there before
        only once the new one is complete."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a folder")
        if directory.is_dir() and any(directory.iterdir()) and not (directory / MANIFEST_NAME).is_file():
            raise FileExistsError(f"{directory} holds files but no {MANIFEST_NAME}: refusing to replace it")
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            tensor_path = staging / VECTORS_NAME
            save_file({"vectors": self.vectors.contiguous().cpu()}, str(tensor_path), metadata={"format": FORMAT})
            manifest = {
                "format": FORMAT,
                "count": self._count,
                "num_vectors": self.num_vectors,
                "dim": self.dim,
                "dtype": self.dtype_name,
                "layout": "vector-major [num_vectors, count, dim]",
                "sha256": _sha256(tensor_path),
                "ids": self.ids,
            }
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
            _fsync_folder(staging)
            _swap_in(staging, directory)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return directory

    @classmethod
    def load(cls, directory, device="cpu", mmap: bool = False, verify_checksum: bool = True) -> "MetaEmbedIndex":
        """Load a saved index, validating its manifest, tensor header, shapes, dtype and (by default) checksum.

        `mmap=True` maps the vector file instead of reading it (CPU only): an index larger than RAM is searched
        from the page cache. Adding to a memory-mapped index copies it into memory first."""
        directory = Path(directory)
        if mmap and torch.device(device).type != "cpu":
            raise ValueError(f"mmap=True maps the file into CPU memory; it cannot be used with device={device!r}")
        manifest_path, tensor_path = directory / MANIFEST_NAME, directory / VECTORS_NAME
        for path in (manifest_path, tensor_path):
            if not path.is_file():
                raise IndexFileError(f"{path} is missing: {directory} is not a saved MetaEmbedIndex")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise IndexFileError(f"{manifest_path} is not valid JSON: {error}") from error
        manifest = _check_manifest(manifest, manifest_path)
        if verify_checksum and _sha256(tensor_path) != manifest["sha256"]:
            raise IndexFileError(
                f"{tensor_path} does not match the checksum in {manifest_path}: it was changed or truncated"
            )
        shape = [manifest["num_vectors"], manifest["count"], manifest["dim"]]
        vectors = _read_vectors(tensor_path, shape, manifest["dtype"], mmap=mmap)

        index = cls(manifest["dim"], manifest["num_vectors"], dtype=manifest["dtype"], device=device)
        index._vectors = vectors.to(index.device) if not mmap else vectors
        index._count = manifest["count"]
        index.ids = list(manifest["ids"])
        index._id_set = set(index.ids)
        return index


def _check_manifest(manifest, path: Path) -> dict:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise IndexFileError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    for key in ("count", "num_vectors", "dim"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "count" else 1):
            raise IndexFileError(f"{path}: {key} must be a non-negative integer, got {value!r}")
    if manifest.get("dtype") not in DTYPES:
        raise IndexFileError(f"{path}: dtype must be one of {sorted(DTYPES)}, got {manifest.get('dtype')!r}")
    ids = manifest.get("ids")
    if not isinstance(ids, list) or len(ids) != manifest["count"]:
        raise IndexFileError(f"{path}: ids must be a list of {manifest['count']} entries")
    if len(set(ids)) != len(ids) or any(not isinstance(i, (str, int)) or isinstance(i, bool) for i in ids):
        raise IndexFileError(f"{path}: ids must be unique strings or integers")
    if not isinstance(manifest.get("sha256"), str):
        raise IndexFileError(f"{path}: sha256 is missing")
    return manifest


def _read_vectors(path: Path, shape: list, dtype_name: str, mmap: bool) -> torch.Tensor:
    """The `vectors` tensor of a safetensors file, checked against the manifest, read or memory-mapped."""
    safetensors_dtype, numpy_dtype = _SAFETENSORS_DTYPES[dtype_name]
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise IndexFileError(f"{path} is truncated (no safetensors header)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise IndexFileError(f"{path} is truncated (header of {header_length} bytes in a {size}-byte file)")
        try:
            header = json.loads(file.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise IndexFileError(f"{path} has an unreadable safetensors header: {error}") from error
    entry = header.get("vectors") if isinstance(header, dict) else None
    if not isinstance(entry, dict):
        raise IndexFileError(f"{path} holds no 'vectors' tensor")
    if entry.get("dtype") != safetensors_dtype or entry.get("shape") != shape:
        raise IndexFileError(
            f"{path}: tensor is {entry.get('dtype')} {entry.get('shape')}, "
            f"the manifest says {safetensors_dtype} {shape}"
        )
    begin, end = entry["data_offsets"]
    item_size = np.dtype(numpy_dtype).itemsize
    if end - begin != int(np.prod(shape)) * item_size or 8 + header_length + end > size:
        raise IndexFileError(f"{path} is truncated: the tensor's bytes are incomplete")
    offset = 8 + header_length + begin
    count = int(np.prod(shape))
    if mmap:
        array = np.memmap(path, dtype=numpy_dtype, mode="r", offset=offset, shape=(count,))
    else:
        array = np.fromfile(path, dtype=numpy_dtype, count=count, offset=offset)
    with warnings.catch_warnings():  # a read-only map: torch warns that writes would be undefined (we never write)
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    if dtype_name == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.view(*shape)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def _swap_in(staging: Path, directory: Path) -> None:
    """Move the complete `staging` folder to `directory`; an old index there is moved aside first and removed
    last, so at every moment either the old or the new complete index exists."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    backup.rmdir()
    os.replace(directory, backup)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(backup, directory)
        raise
    shutil.rmtree(backup)


__all__ = ["MetaEmbedIndex", "SearchResult", "IndexFileError"]
