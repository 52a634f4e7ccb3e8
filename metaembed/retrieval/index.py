"""`MetaEmbedIndex`: MaxSim search over stored candidate embeddings at any budget (r_q, r_c).

Layout. Vectors are stored vector-major, `[R_c, capacity, D]`: vector j of every item is one contiguous `[N, D]`
matrix. A budget r_c then reads exactly the first r_c matrices, N * r_c * D * bytes, with no copy, for every r_c.
(The item-major `[N, R_c, D]` that `model.encode` returns is not: its prefix `[:, :r_c]` is strided.)

Scoring. Queries are scored in float32 (never rounded to the storage dtype). bf16 vectors on an x86-64 CPU are
scanned by a compiled kernel (`metaembed.retrieval.scan_kernel`: AMX tiles with the query split into three bf16
parts, or AVX2 FMAs on bf16 widened in registers, or for 128+ query rows blocks widened in L2 and multiplied by MKL's
GEMM), which keeps each query's top-k as it goes. Everything else (other
dtypes, GPUs, other CPUs, or no compiler) uses `modeling_metaembed.scoring_metaembed.scan_maxsim`: the stored
vectors widened tile by tile into one cache-sized float32 buffer and multiplied there (one GEMM per tile), then a
max over r_c, a sum over r_q, and a running top-k over chunks. Every temporary of either is counted against
`max_work_bytes`, so a search over a memory-mapped index far larger than RAM holds a bounded amount of anonymous
memory.

Compressed storage. dtype "int8" keeps each vector as int8 with one float32 scale (max |x| / 127). "binary" keeps,
around a center c_j per vector tier (the mean of tier j over the first CENTER_SAMPLE items, fitted once that many
are in or at the first search or save: not by the size of the first add), the exact component of x - c_j along c_j
and one bit per dimension for the rest (its signs, scaled by their mean magnitude): a vector reads back as
c_j + delta * u_j + s * sign(r) with u_j = c_j / |c_j| (delta chosen so the component along u_j is exact).
Trained embeddings share a strong common direction per tier (here: the mean vector has norm 0.98 of 1); raw sign
bits would all agree, and a sign code's error along that direction, multiplied by the query's large component on
it, would swamp the differences that rank items. Both are searched at any budget by the same scan
(codes widened and scaled per tile: an approximate MaxSim against the full-precision query), and the best
`shortlist` items per query are re-scored exactly from full-precision vectors kept beside the codes (in
`full.safetensors`, memory-mapped when loaded), so the top-k is exact MaxSim over that shortlist; its recall
against exhaustive exact search is measured (`benchmarks/compressed_recall.py`).

On disk (`save` / `load`, `index_files`): a folder whose `index.json` (format, shape, dtypes, SHA-256 of each file)
lists segment folders, each holding `vectors.safetensors` (`vectors` `[R_c, N, D]`; for int8 / binary the codes
`[R_c, N, D]` int8 or `[R_c, N, D / 8]` uint8, `scales` `[R_c, N]`, and for binary `offsets` `[R_c, N]` and
`centers` `[R_c, D]`), `full.safetensors` for compressed indexes, and `ids.jsonl`. A loaded index keeps each saved segment as a
read-only index of its own (`_sealed`) and holds items added afterwards in its own tensors; a search runs per
segment and merges the top-k. Saving writes only those new items, as a new segment, and switches `index.json` to the
new list atomically, so a crash at any point leaves the old index or the new one; loading validates everything and
can memory-map the vectors (reading none of them) for indexes larger than RAM.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from modeling_metaembed.scoring_metaembed import DEFAULT_MAX_WORK_BYTES, check_budget, plan_scan, scan_maxsim

from . import scan_kernel
from .index_files import (
    COMPRESSED,
    DTYPES,
    FORMAT,
    FULL_NAME,
    IDS_NAME,
    VECTORS_NAME,
    IndexFileError,
    checksummed_files,
    read_ids,
    read_manifest,
    read_tensors,
    save_segments,
    sha256_file,
    write_ids,
)

# Binary: each tier's centre is the mean of this many first items (or of all, if fewer at the first search or save).
CENTER_SAMPLE = 65536
# Items re-scored exactly per query after a compressed scan, unless `shortlist` says otherwise.
DEFAULT_SHORTLIST = 100


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


def _dtype_name(dtype, compressed: bool = True) -> str:
    if compressed and dtype in COMPRESSED:
        return dtype
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    allowed = sorted(DTYPES) + (sorted(COMPRESSED) if compressed else [])
    raise ValueError(f"dtype must be one of {allowed}, got {dtype!r}")


def quantize(vectors: torch.Tensor, dtype_name: str, center: torch.Tensor | None = None) -> tuple:
    """(codes, scales, offsets) of float vectors [..., D]. "int8": x / s rounded to int8 with s = max |x| / 127
    (offsets None). "binary", around `center` c (broadcastable to the vectors; zero when None), u = c / |c|:
    r = x - c, gamma = <r, u>, the rest p = r - gamma u packed as sign bits (bit b of byte i is dimension 8 i + b;
    1 = positive), s = mean |p| (the scale making s * sign(p) the closest such vector to p), and the offset
    delta = gamma - s <sign(p), u>, so that c + delta u + s sign(p) reads back x's component along u exactly."""
    x = vectors.float()
    if dtype_name == "int8":
        scales = x.abs().amax(dim=-1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(x / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return codes, scales, None
    center = torch.zeros(x.shape[-1]) if center is None else center.float()
    norm = center.norm(dim=-1, keepdim=True)
    direction = torch.where(norm > 0, center / norm.clamp_min(1e-30), torch.zeros_like(center))
    residual = x - center
    gamma = (residual * direction).sum(dim=-1)
    rest = residual - gamma.unsqueeze(-1) * direction
    signs = torch.where(rest > 0, 1.0, -1.0)
    scales = rest.abs().mean(dim=-1)
    offsets = gamma - scales * (signs * direction).sum(dim=-1)
    bits = (rest > 0).to(torch.uint8).view(*x.shape[:-1], x.shape[-1] // 8, 8)
    codes = (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8)
    return codes, scales, offsets


_SIGNS = {}


def _sign_table(device) -> torch.Tensor:
    """[256, 8] float32: row b holds +1 / -1 for the 8 bits of byte b (bit 0 first)."""
    key = str(device)
    if key not in _SIGNS:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGNS[key] = (bits.float() * 2 - 1).to(device)
    return _SIGNS[key]


class MetaEmbedIndex:
    """Candidate embeddings kept at their first `num_vectors` vectors, searchable at any budget up to that.

    Args:
        dim: the embedding dimension D (`model.config.output_dim`).
        num_vectors: R_c vectors kept per item (budgets up to r_c = num_vectors are searchable).
        dtype: storage precision: "bfloat16" (default), "float16" or "float32", searched exactly; or compressed,
            "int8" (a byte per dimension and a scale per vector) or "binary" (a bit per dimension, D a multiple
            of 8, and a scale per vector), searched approximately and re-scored exactly on a shortlist.
        device: where the searched vectors live and the search runs ("cpu", "cuda", ...).
        full_dtype: for "int8" / "binary": the precision of the full vectors kept for re-scoring (CPU memory, or
            memory-mapped from disk once saved and loaded).
    """

    def __init__(self, dim: int, num_vectors: int, dtype="bfloat16", device="cpu", full_dtype="bfloat16"):
        for name, value in (("dim", dim), ("num_vectors", num_vectors)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.dim, self.num_vectors = dim, num_vectors
        self.dtype_name = _dtype_name(dtype)
        self.compressed = self.dtype_name in COMPRESSED
        if self.dtype_name == "binary" and dim % 8:
            raise ValueError(f"dtype 'binary' packs 8 dimensions per byte: dim must be a multiple of 8, got {dim}")
        self.dtype = COMPRESSED.get(self.dtype_name) or DTYPES[self.dtype_name]
        self.device = torch.device(device)
        self.full_dtype_name = _dtype_name(full_dtype, compressed=False) if self.compressed else self.dtype_name
        self.full_dtype = DTYPES[self.full_dtype_name]
        width = dim // 8 if self.dtype_name == "binary" else dim
        self._vectors = torch.empty(num_vectors, 0, width, dtype=self.dtype, device=self.device)  # [R_c, cap, D']
        self._scales = torch.empty(num_vectors, 0, device=self.device) if self.compressed else None  # [R_c, cap]
        self._full = torch.empty(num_vectors, 0, dim, dtype=self.full_dtype) if self.compressed else None
        self._offsets = torch.empty(num_vectors, 0, device=self.device) if self.dtype_name == "binary" else None
        self._centers = None  # [R_c, D] float32, binary only: each tier's mean over the first CENTER_SAMPLE items
        # [R_c] float32 on CPU, float storage only: the largest L2 norm of each tier's stored vectors, which certifies
        # the AMX kernel's faster two-part scan (scan_kernel.top_k); None where unknown (an index saved without it)
        self._max_norms = None if self.compressed else torch.zeros(num_vectors, dtype=torch.float32)
        # Tiers whose _max_norms are known to bound the data: all for norms computed here; none for norms read from
        # files whose checksums were not verified (checked against the vectors before the kernel trusts them)
        self._norms_checked = num_vectors
        self._files = []  # (path, SHA-256 in the manifest) of the files a loaded segment reads, for verify()
        # A loaded index: its saved segments, each an index of its own (read or memory-mapped, never changed), in
        # order; the tensors above then hold only the items added since (the next save's new segment).
        self._sealed: list = []
        self._sealed_count = 0
        self._folder, self._entry = None, None  # a loaded segment: its folder and manifest entry
        self._count = 0  # items in the tensors above
        self.ids: list = []  # every item's id, in order: the saved segments' then the new ones
        self._id_set: set = set()

    # ------------------------------------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return self._sealed_count + self._count

    def __repr__(self) -> str:
        stored = f"{self.dtype_name} (+ {self.full_dtype_name} for re-scoring)" if self.compressed else self.dtype_name
        return (
            f"MetaEmbedIndex({len(self)} items, {self.num_vectors} vectors x {self.dim} dims, {stored}, {self.device})"
        )

    @property
    def vectors(self) -> torch.Tensor:
        """[R_c, N, D] view of the full-precision vectors (row j of each item is `vectors[j, item]`); for a
        compressed index, those kept for re-scoring. A copy when the index spans several segments."""
        return _joined([(part._full if self.compressed else part._vectors)[:, : part._count] for part in self._parts()])

    @property
    def codes(self) -> torch.Tensor:
        """[R_c, N, D'] view of what a scan reads: the vectors, or a compressed index's int8 / packed-bit codes."""
        self._fit_centers()
        return _joined([part._vectors[:, : part._count] for part in self._parts()])

    @property
    def scales(self) -> torch.Tensor | None:
        """[R_c, N] float32 scale of each compressed vector (None for float storage)."""
        return None if self._scales is None else _joined([part._scales[:, : part._count] for part in self._parts()])

    @property
    def num_segments(self) -> int:
        """Saved segments this index was loaded from, plus one if items were added since (`save` writes them)."""
        return len(self._sealed) + (1 if self._count else 0)

    def _parts(self) -> list:
        """The pieces that hold the items, in order: the saved segments, then this object's own tensors."""
        return [*self._sealed, self]

    @property
    def nbytes(self) -> int:
        """Bytes a full-budget scan reads: the stored vectors, or a compressed index's codes and scales."""
        return self.bytes_per_item(self.num_vectors) * len(self)

    def bytes_per_item(self, r_c: int | None = None) -> int:
        """Bytes one item costs a scan at candidate budget r_c (default: all stored vectors)."""
        r_c = self.num_vectors if r_c is None else r_c
        extra = {"int8": 4, "binary": 8}.get(self.dtype_name, 0)  # float32 scale (and offset) per vector
        return r_c * (self._vectors.shape[2] * self._vectors.element_size() + extra)

    def add(self, embeddings: torch.Tensor, ids: list | None = None) -> None:
        """Append items: `embeddings` [N, R, D] with R >= num_vectors (the first num_vectors are kept), e.g.
        `model.encode_candidates(...)`. `ids` (one per item, str or int, unique in the index) default to the
        items' positions. Nothing is added when any check fails."""
        check_candidate_embeddings(embeddings, self.dim, self.num_vectors, "this index")
        count = embeddings.shape[0]
        ids = list(range(len(self), len(self) + count)) if ids is None else list(ids)
        self._check_new_ids(ids, count)

        needed = self._count + count
        if needed > self._vectors.shape[1]:  # grow geometrically: amortised O(1) copies per item
            capacity = max(needed, 2 * self._vectors.shape[1], 1024)
            self._vectors = _grown(self._vectors, self._count, capacity)
            if self.compressed:
                self._scales = _grown(self._scales, self._count, capacity)
                self._full = _grown(self._full, self._count, capacity)
            if self._offsets is not None:
                self._offsets = _grown(self._offsets, self._count, capacity)
        new = embeddings[:, : self.num_vectors].transpose(0, 1)  # [R_c, n, D]
        if self.compressed:
            for start in range(0, count, 4096):  # quantize a few thousand items at a time
                part = new[:, start : start + 4096]
                where = slice(self._count + start, self._count + start + part.shape[1])
                self._full[:, where] = part.to(device="cpu", dtype=self.full_dtype)
                if self.dtype_name == "int8":
                    codes, scales, _ = quantize(part, "int8")
                    self._vectors[:, where] = codes.to(self.device)
                    self._scales[:, where] = scales.to(self.device)
                elif self._centers is not None:
                    self._code_binary(where.start, where.stop)
        else:
            self._vectors[:, self._count : needed] = new.to(device=self.device, dtype=self.dtype)
            if self._max_norms is not None:
                added_norms = _tier_max_norms(self._vectors[:, self._count : needed])
                self._max_norms = torch.maximum(self._max_norms, added_norms)
        self._count = needed
        self.ids.extend(ids)
        self._id_set.update(ids)
        if self.dtype_name == "binary" and self._centers is None and needed >= CENTER_SAMPLE:
            self._fit_centers()

    def _fit_centers(self) -> None:
        """Binary: fix each tier's centre, the mean of the first CENTER_SAMPLE items' stored full vectors (or of
        all items, when fewer are in the index at its first search or save), and code every item added so far.
        Codes are thus the same whatever sizes the adds had (one add, or one item then the rest)."""
        if self.dtype_name != "binary" or self._centers is not None or not self._count:
            return
        sample = min(self._count, CENTER_SAMPLE)
        total = torch.zeros(self.num_vectors, self.dim, dtype=torch.float64)
        for start in range(0, sample, 4096):  # float64 sums: exact for bf16 vectors, whatever the slicing
            total += self._full[:, start : min(start + 4096, sample)].double().sum(dim=1)
        self._centers = (total / sample).float().to(self.device)  # [R_c, D]
        for start in range(0, self._count, 4096):
            self._code_binary(start, min(start + 4096, self._count))

    def _code_binary(self, start: int, stop: int) -> None:
        """Binary codes of items start..stop from their stored full vectors, around the fitted centres."""
        codes, scales, offsets = quantize(self._full[:, start:stop], "binary", center=self._centers.cpu().unsqueeze(1))
        self._vectors[:, start:stop] = codes.to(self.device)
        self._scales[:, start:stop] = scales.to(self.device)
        self._offsets[:, start:stop] = offsets.to(self.device)

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

    def verify(self) -> None:
        """Check a loaded index's files against the SHA-256 in its manifest and the stored tier norms against the
        vectors; IndexFileError naming the file otherwise. Reads every byte (a mapped `load` reads none of them)."""
        for part in self._parts():
            for path, expected in part._files:
                if sha256_file(path) != expected:
                    raise IndexFileError(
                        f"{path} does not match the checksum in its manifest: it was changed or truncated"
                    )
            if part._max_norms is not None and part._count:
                part._checked_max_norms(self.num_vectors)

    def _checked_max_norms(self, r_c: int, max_work_bytes: int = DEFAULT_MAX_WORK_BYTES) -> torch.Tensor:
        """The stored tier norms, the first r_c of them checked against the vectors (once; one pass over those
        tiers) unless they were computed here or their file's checksum was verified: a norm smaller than the data's
        would void the two-part scan's certificate silently."""
        if self._norms_checked < r_c:
            # slices of at most 1 MB of float32: a search's memory must not grow with N (tests/test_search_memory.py)
            found = _tier_max_norms(self._vectors[:r_c, : self._count], min(max_work_bytes, 2**22))
            if bool((self._max_norms[:r_c] < found).any()):
                where = self._files[0][0] if self._files else "this index"
                raise IndexFileError(
                    f"{where}: tensor 'max_norms' is smaller than the stored vectors' norms "
                    f"({self._max_norms[:r_c].tolist()} < {found.tolist()}): the file was changed"
                )
            self._norms_checked = r_c
        return self._max_norms

    def add_items(
        self,
        model,
        items: list,
        ids: list | None = None,
        batch_size: int = 16,
        show_progress_bar: bool = True,
        **encode_kwargs,
    ) -> None:
        """Encode `items` (texts, images, or {"text", "image"} dicts) as candidates with `model` and add them."""
        embeddings = model.encode(
            items, role="candidate", batch_size=batch_size, show_progress_bar=show_progress_bar, **encode_kwargs
        )
        self.add(embeddings, ids=ids)

    # ------------------------------------------------------------------------------------------------ search
    @torch.no_grad()
    def search(
        self,
        queries: torch.Tensor,
        budget: tuple | None = None,
        k: int = 10,
        query_batch_size: int = 64,
        max_work_bytes: int = DEFAULT_MAX_WORK_BYTES,
        shortlist: int | None = None,
    ) -> SearchResult:
        """Top-k by MaxSim at `budget` = (r_q, r_c) (default: all query vectors, all stored vectors).

        `queries` [Q, R_q, D] (e.g. `model.encode_queries(...)`); a single query may be [R_q, D]. They are scored
        in float32 as given (never rounded to the storage dtype), up to `query_batch_size` in one pass over the
        first r_c stored matrices; all temporaries together stay under `max_work_bytes`.

        Float storage: the exact top-k. int8 / binary storage: the `shortlist` (default 100) best items by the
        compressed scan are re-scored exactly from the full vectors and the top-k of those returned."""
        queries, (r_q, r_c) = self._check_search(queries, budget, k)
        if not isinstance(query_batch_size, int) or isinstance(query_batch_size, bool) or query_batch_size < 1:
            raise ValueError(f"query_batch_size must be positive, got {query_batch_size!r}")
        shortlist = self._check_shortlist(shortlist, k)
        queries = queries[:, :r_q]

        def search_part(part) -> tuple:
            kept = min(shortlist if self.compressed else k, part._count)
            coarse = part._scan_top(queries, r_c, kept, query_batch_size, max_work_bytes)
            if not self.compressed:
                return coarse
            return part._rescore(queries, coarse[1], r_c, min(k, part._count), max_work_bytes)

        return self._result(*self._across_parts(search_part, k))

    @torch.no_grad()
    def search_two_stage(
        self,
        queries: torch.Tensor,
        budget: tuple | None = None,
        k: int = 10,
        shortlist: int = 100,
        query_batch_size: int = 64,
        max_work_bytes: int = DEFAULT_MAX_WORK_BYTES,
    ) -> SearchResult:
        """Coarse-to-fine search: a scan at budget (1, 1) (one vector per side, N * D values read; compressed
        codes for an int8 / binary index) keeps the best `shortlist` items per query, then exact MaxSim at `budget`
        re-ranks them (from the full vectors). Reads N * D + shortlist * r_c * D values per query instead of
        N * r_c * D; recall against `search` is measured by `benchmarks/two_stage_recall.py`."""
        queries, (r_q, r_c) = self._check_search(queries, budget, k)
        if not isinstance(shortlist, int) or isinstance(shortlist, bool) or shortlist < 1:
            raise ValueError(f"shortlist must be a positive integer, got {shortlist!r}")
        if k > shortlist:
            raise ValueError(f"k={k} is larger than the shortlist ({shortlist}) it is re-ranked from")
        if not isinstance(query_batch_size, int) or isinstance(query_batch_size, bool) or query_batch_size < 1:
            raise ValueError(f"query_batch_size must be positive, got {query_batch_size!r}")

        def search_part(part) -> tuple:
            coarse = part._scan_top(queries[:, :1], 1, min(shortlist, part._count), query_batch_size, max_work_bytes)
            return part._rescore(queries[:, :r_q], coarse[1], r_c, min(k, part._count), max_work_bytes)

        return self._result(*self._across_parts(search_part, k))

    def _across_parts(self, search_part, k: int) -> tuple:
        """Top-k (scores [Q, k], positions [Q, k] in the whole index) from `search_part(part)`, each part's own
        top-k (positions within the part): one search per segment, merged. Each part's top-k holds every item of
        the whole top-k that lies in it, so the merge is exact."""
        found, offset = [], 0
        for part in self._parts():
            if part._count:
                scores, positions = search_part(part)
                found.append((scores, positions + offset))
            offset += part._count
        if len(found) == 1:
            return found[0]
        scores, positions = torch.cat([f[0] for f in found], dim=1), torch.cat([f[1] for f in found], dim=1)
        top = scores.topk(k, dim=1)
        return top.values, positions.gather(1, top.indices)

    def _check_search(self, queries, budget, k) -> tuple:
        """The queries as a [Q, R_q, D] tensor and the budget (r_q, r_c), once every search argument is valid."""
        queries = as_query_batch(queries, self.dim, "this index")
        budget = check_budget(budget, (queries.shape[1], self.num_vectors), what="queries and the index")
        if len(self) == 0:
            raise ValueError("the index is empty: add items before searching")
        self._fit_centers()
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(self):
            raise ValueError(f"k must be an integer in 1..{len(self)} (the number of items), got {k!r}")
        return queries, budget

    def _check_shortlist(self, shortlist, k: int) -> int | None:
        if shortlist is None:
            return min(max(DEFAULT_SHORTLIST, k), len(self)) if self.compressed else None
        if not self.compressed:
            raise ValueError(
                f"shortlist applies to int8 / binary indexes; this {self.dtype_name} index is searched "
                "exactly (for a coarse-to-fine search use search_two_stage)"
            )
        if not isinstance(shortlist, int) or isinstance(shortlist, bool) or shortlist < k:
            raise ValueError(f"shortlist must be an integer of at least k={k}, got {shortlist!r}")
        return min(shortlist, len(self))

    def _result(self, scores: torch.Tensor, positions: torch.Tensor) -> SearchResult:
        ids = [[self.ids[p] for p in row] for row in positions.tolist()]
        return SearchResult(scores=scores, positions=positions, ids=ids)

    def _load_codes(self, r_c: int):
        """load(start, stop, out) for `scan_maxsim`: stored rows start..stop widened (and scaled) into out."""
        codes, scales, offsets = self._vectors, self._scales, self._offsets
        if self.dtype_name == "binary":
            table = _sign_table(self.device)
            centers = self._centers[:r_c].unsqueeze(1)  # [r_c, 1, D]
            directions = centers / centers.norm(dim=-1, keepdim=True).clamp_min(1e-30)

            def load(start, stop, out):  # bytes -> 8 signs each through a [256, 8] table; c + delta u + s signs
                index = codes[:r_c, start:stop].reshape(-1).to(torch.int32)
                torch.index_select(table, 0, index, out=out.view(-1, 8))
                out.mul_(scales[:r_c, start:stop].unsqueeze(-1)).add_(centers)
                out.addcmul_(offsets[:r_c, start:stop].unsqueeze(-1), directions)

        elif self.dtype_name == "int8":

            def load(start, stop, out):
                out.copy_(codes[:r_c, start:stop])
                out.mul_(scales[:r_c, start:stop].unsqueeze(-1))

        else:

            def load(start, stop, out):
                out.copy_(codes[:r_c, start:stop])

        return load

    def _scan_top(self, queries, r_c: int, k: int, query_batch_size: int, max_work_bytes: int) -> tuple:
        """Top-k (scores [Q, k], positions [Q, k], on CPU) of a scan over the stored rows (codes when compressed):
        bf16 on an x86-64 CPU by a compiled kernel (`metaembed.retrieval.scan_kernel`), the rest by the torch scan."""
        found = self._kernel_top(queries, r_c, k, query_batch_size, max_work_bytes)
        if found is not None:
            return found
        num_queries, r_q, _ = queries.shape
        step, tile, chunk = plan_scan(
            min(num_queries, query_batch_size), r_q, r_c, self.dim, max_work_bytes, self.device
        )
        load = self._load_codes(r_c)
        all_scores, all_positions = [], []
        for q_start in range(0, num_queries, step):
            batch = queries[q_start : q_start + step].to(device=self.device, dtype=torch.float32).contiguous()
            best_scores = best_positions = None  # [k', Q]
            for start, stop, block in scan_maxsim(batch, self._count, r_c, load, tile, chunk):
                top = block.topk(min(k, stop - start), dim=0)  # [k', Q]
                positions = top.indices + start
                if best_scores is not None:
                    merged = torch.cat([best_scores, top.values])
                    order = merged.topk(min(k, merged.shape[0]), dim=0).indices
                    best_scores = merged.gather(0, order)
                    best_positions = torch.cat([best_positions, positions]).gather(0, order)
                else:
                    best_scores, best_positions = top.values, positions
            all_scores.append(best_scores.T.cpu())
            all_positions.append(best_positions.T.cpu())
        return torch.cat(all_scores), torch.cat(all_positions)

    def _kernel_top(self, queries, r_c: int, k: int, query_batch_size: int, max_work_bytes: int) -> tuple | None:
        """`_scan_top` by the compiled CPU kernel, or None where it does not apply (see `scan_kernel.choose`), the
        queries are not finite (the torch scan then gives what torch gives), or its buffers for even one query
        would not fit `max_work_bytes` (a very large k)."""
        if self.compressed:
            return None
        num_queries, r_q, _ = queries.shape
        step = min(num_queries, query_batch_size)
        kind = scan_kernel.choose(self._vectors, r_c, num_values=r_c * self._count * self.dim, rows=step * r_q)
        if kind == "torch":
            return None
        while step > 1 and scan_kernel.work_bytes(kind, step, r_q, self.dim, k, r_c) > max_work_bytes:
            step = (step + 1) // 2
        if scan_kernel.work_bytes(kind, step, r_q, self.dim, k, r_c) > max_work_bytes:
            return None
        max_norm = None  # looked up (two torch calls) only where the AMX kernel's two-part scan can run
        if kind == "amx" and self._max_norms is not None and step * r_q >= scan_kernel.AMX_TWO_PARTS_FROM_ROWS:
            max_norm = float(self._checked_max_norms(r_c, max_work_bytes)[:r_c].max())
        scores, positions = [], []
        for start in range(0, num_queries, step):
            batch = queries[start : start + step].to(device="cpu", dtype=torch.float32).contiguous()
            found = scan_kernel.top_k(kind, self._vectors, r_c, self._count, batch, k, max_norm)
            if found is None:  # a query value is not finite: the torch scan gives what torch gives
                return None
            scores.append(found[0])
            positions.append(found[1])
        if len(scores) == 1:
            return scores[0], positions[0]
        return torch.cat(scores), torch.cat(positions)

    def _rescore(self, queries, shortlists: torch.Tensor, r_c: int, k: int, max_work_bytes: int) -> tuple:
        """Exact MaxSim at (r_q = queries' vectors, r_c) of each query's shortlisted rows, from the full vectors;
        the top-k of each shortlist. Queries go in groups whose gathered rows fit `max_work_bytes` (one batched
        product per group); a shortlist too large for that is scanned tile by tile, one query at a time."""
        r_q, size = queries.shape[1], shortlists.shape[1]
        full = self._full if self.compressed else self._vectors
        device = self.device
        # Per query: the gathered rows in the stored dtype, widened, regrouped item-major, and the similarities.
        per_query = size * r_c * self.dim * (full.element_size() + 8) + 4 * (r_q * self.dim + 2 * r_q * size * r_c)
        group = max_work_bytes // 2 // per_query
        scores, positions = [], []
        if group >= 1:
            for start in range(0, queries.shape[0], group):
                rows = shortlists[start : start + group]  # [G, s]
                g = rows.shape[0]
                gathered = full[:r_c, rows.reshape(-1).to(full.device)].to(device=device, dtype=torch.float32)
                items = gathered.view(r_c, g, size, self.dim).permute(1, 2, 0, 3).reshape(g, size * r_c, self.dim)
                del gathered
                q = queries[start : start + group].to(device=device, dtype=torch.float32)  # [G, r_q, D]
                sims = torch.bmm(q, items.transpose(1, 2))  # [G, r_q, s * r_c]
                fine = sims.view(g, r_q, size, r_c).amax(dim=3).sum(dim=1).cpu()  # [G, s]
                top = fine.topk(k, dim=1)
                scores.append(top.values)
                positions.append(rows.gather(1, top.indices))
            return torch.cat(scores), torch.cat(positions)
        _, tile, chunk = plan_scan(1, r_q, r_c, self.dim, max_work_bytes, device)
        for query, rows in zip(queries, shortlists):
            rows_here = rows.to(full.device)

            def load(start, stop, out):  # gather the shortlisted rows (a tile in the stored dtype), widen
                out.copy_(full[:r_c, rows_here[start:stop]])

            q = query.unsqueeze(0).to(device=device, dtype=torch.float32).contiguous()
            fine = torch.cat([block[:, 0].cpu() for _, _, block in scan_maxsim(q, size, r_c, load, tile, chunk)])
            top = fine.topk(k)
            scores.append(top.values)
            positions.append(rows[top.indices])
        return torch.stack(scores), torch.stack(positions)

    # ------------------------------------------------------------------------------------------------ files
    def save(self, directory) -> Path:
        """Write the index into `directory` (`metaembed.retrieval.index_files`): the items added since it was loaded
        go into a new segment; the segments it was loaded from are kept where they already lie in `directory`, or
        copied in file by file from elsewhere. `index.json` then switches to the new list atomically: the old index
        or the new one, complete, is at `directory` at every instant, whatever happens. Saving after an append thus
        writes the new items only."""
        directory = Path(directory)
        kept = self._saved_segments()
        write = None
        if self._count or not kept:  # the new items (or, for an empty index, an empty segment to hold its shape)
            write = self._write_segment
        save_segments(directory, kept, write, self._manifest_fields())
        return directory

    def _saved_segments(self) -> list:
        """(folder, manifest entry, ids) of each segment this index was loaded from, in order."""
        kept, offset = [], 0
        for segment in self._sealed:
            kept.append((segment._folder, segment._entry, self.ids[offset : offset + segment._count]))
            offset += segment._count
        return kept

    def _manifest_fields(self) -> dict:
        fields = {
            "count": len(self),
            "num_vectors": self.num_vectors,
            "dim": self.dim,
            "dtype": self.dtype_name,
            "layout": "vector-major [num_vectors, count, dim] per segment",
        }
        if self.compressed:
            fields["full_dtype"] = self.full_dtype_name
        return fields

    def _write_segment(self, folder: Path) -> int:
        """The in-memory items' files in `folder`; returns how many items they hold."""
        self._fit_centers()
        count = self._count
        tensors = {"vectors": self._vectors[:, :count].contiguous().cpu()}
        if not self.compressed:
            tensors["max_norms"] = self._max_norms.contiguous()
        else:
            tensors["scales"] = self._scales[:, :count].contiguous().cpu()
        if self._centers is not None:
            tensors["offsets"] = self._offsets[:, :count].contiguous().cpu()
            tensors["centers"] = self._centers.contiguous().cpu()
        save_file(tensors, str(folder / VECTORS_NAME), metadata={"format": FORMAT})
        if self.compressed:
            full = {"vectors": self._full[:, :count].contiguous()}
            save_file(full, str(folder / FULL_NAME), metadata={"format": FORMAT})
        write_ids(folder / IDS_NAME, self.ids[len(self) - count :])
        return count

    @classmethod
    def load(cls, directory, device="cpu", mmap: bool = False, verify_checksum: bool | None = None) -> "MetaEmbedIndex":
        """Load a saved index, validating its manifest, each segment's tensor headers, shapes and dtypes, its ids,
        and checksums when `verify_checksum` (default: when read into memory, not when mapped).

        `mmap=True` maps the vector files instead of reading them (CPU only): an index larger than RAM is searched
        from the page cache, and opening it reads none of the vectors. `verify()` checks the checksums later; the
        stored tier norms, which the AMX kernel's faster scan trusts, are checked against the vectors before their
        first use when the checksums were not. A compressed index's full vectors are always mapped (they are read
        only to re-score shortlists). Items added after loading are held in memory until the next `save`, which
        writes them as a new segment."""
        directory = Path(directory)
        if mmap and torch.device(device).type != "cpu":
            raise ValueError(f"mmap=True maps the file into CPU memory; it cannot be used with device={device!r}")
        manifest, segments = read_manifest(directory)
        verify_checksum = not mmap if verify_checksum is None else verify_checksum
        index = cls(
            manifest["dim"],
            manifest["num_vectors"],
            dtype=manifest["dtype"],
            device=device,
            full_dtype=manifest.get("full_dtype", "bfloat16"),
        )
        ids = []
        for folder, entry in segments:
            segment = index._load_segment(folder, entry, mmap, verify_checksum)
            ids.extend(read_ids(folder, entry))
            index._sealed.append(segment)
            if index._centers is None:  # binary: every segment is coded around the first one's centres
                index._centers = segment._centers
        if len(set(ids)) != len(ids):
            raise IndexFileError(f"{directory}: an id appears twice in its segments")
        index._sealed_count = len(ids)
        index.ids = ids
        index._id_set = set(ids)
        return index

    def _load_segment(self, folder: Path, entry: dict, mmap: bool, verify_checksum: bool) -> "MetaEmbedIndex":
        """One saved segment as an index of its own (no ids: the whole index keeps them), validated."""
        files = checksummed_files(folder, entry)
        for path, _ in files:
            if not path.is_file():
                raise IndexFileError(f"{path} is missing: the index's manifest names it")
        if verify_checksum:
            for path, expected in files:
                if sha256_file(path) != expected:
                    raise IndexFileError(
                        f"{path} does not match the checksum in its manifest: it was changed or truncated"
                    )
        count, num_vectors, dim = entry["count"], self.num_vectors, self.dim
        width = dim // 8 if self.dtype_name == "binary" else dim
        expected = {"vectors": (self.dtype_name, [num_vectors, count, width])}
        if self.compressed:
            expected["scales"] = ("float32", [num_vectors, count])
        if self.dtype_name == "binary" and count:
            expected["offsets"] = ("float32", [num_vectors, count])
            expected["centers"] = ("float32", [num_vectors, dim])
        if not self.compressed:  # absent from indexes saved by earlier versions
            expected["max_norms"] = ("float32", [num_vectors])
        tensor_path = folder / VECTORS_NAME
        tensors = read_tensors(tensor_path, expected, mmap=mmap, optional=("max_norms",))

        segment = type(self)(dim, num_vectors, self.dtype_name, self.device, self.full_dtype_name)
        segment._vectors = tensors["vectors"] if mmap else tensors["vectors"].to(self.device)
        if self.compressed:
            segment._scales = tensors["scales"] if mmap else tensors["scales"].to(self.device)
            if "centers" in tensors:
                segment._offsets = tensors["offsets"] if mmap else tensors["offsets"].to(self.device)
                segment._centers = tensors["centers"].to(self.device)
                if self._centers is not None and not torch.equal(segment._centers, self._centers):
                    raise IndexFileError(f"{tensor_path}: its binary centres differ from the first segment's")
            full = {"vectors": (self.full_dtype_name, [num_vectors, count, dim])}
            segment._full = read_tensors(folder / FULL_NAME, full, mmap=True)["vectors"]
        else:
            segment._max_norms = _validated_max_norms(tensors.get("max_norms"), segment._vectors, tensor_path, mmap)
            # Stored norms are trusted once their file's checksum is verified; else checked before first use.
            segment._norms_checked = num_vectors if verify_checksum or "max_norms" not in tensors else 0
        segment._files = files
        segment._count = count
        segment._folder, segment._entry = folder, entry
        return segment


def _grown(tensor: torch.Tensor, count: int, capacity: int) -> torch.Tensor:
    """A [R, capacity, ...] copy of tensor's first `count` rows (axis 1), the rest uninitialised."""
    grown = torch.empty(tensor.shape[0], capacity, *tensor.shape[2:], dtype=tensor.dtype, device=tensor.device)
    grown[:, :count] = tensor[:, :count]
    return grown


def _joined(parts: list) -> torch.Tensor:
    """The [R, n, ...] pieces as one tensor along the items: the piece itself (a view) when only one holds items."""
    holding = [part for part in parts if part.shape[1]] or parts[-1:]
    return holding[0] if len(holding) == 1 else torch.cat(holding, dim=1)


def _tier_max_norms(vectors: torch.Tensor, work_bytes: int = 2**26) -> torch.Tensor:
    """[R] float32 on CPU: the largest L2 norm in each tier of `vectors` [R, n, D], read a slice at a time (a float32
    copy and its temporaries within `work_bytes`)."""
    found = torch.zeros(vectors.shape[0], dtype=torch.float32)
    step = max(1, work_bytes // 16 // max(1, vectors.shape[0] * vectors.shape[2]))
    for start in range(0, vectors.shape[1], step):
        norms = vectors[:, start : start + step].float().norm(dim=-1).amax(dim=1).cpu()
        found = torch.maximum(found, norms)
    return found


def _validated_max_norms(stored, vectors: torch.Tensor, path: Path, mmap: bool) -> torch.Tensor | None:
    """The saved tier norms, validated; for an index saved without them, computed from the vectors read into memory
    (one pass, as a search makes), or None for a memory-mapped one (its AMX scans then use three parts)."""
    if stored is None:
        return None if mmap else _tier_max_norms(vectors)
    stored = stored.clone()
    if torch.isnan(stored).any() or (stored < 0).any():  # +inf is a norm past float32's range: three parts
        raise IndexFileError(f"{path}: tensor 'max_norms' holds negative or NaN values")
    return stored


__all__ = ["MetaEmbedIndex", "SearchResult", "IndexFileError", "quantize"]
