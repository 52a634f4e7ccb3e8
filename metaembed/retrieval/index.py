"""`MetaEmbedIndex`: MaxSim search over stored candidate embeddings at any budget (r_q, r_c).

An index is a list of segments (`metaembed.retrieval.segment`): the segments it was loaded from, each read or
memory-mapped and never changed, then one in memory that holds the items added since. Each segment stores its vectors
vector-major, `[R_c, n, D]`, so a budget r_c reads exactly the first r_c matrices, with no copy, for every r_c (the
item-major `[N, R_c, D]` that `model.encode` returns is not: its prefix `[:, :r_c]` is strided). A search runs on
each segment (the compiled kernel, or the torch scan; a compressed segment's shortlist re-scored from its full
vectors) and merges their top-k: exact, since each segment's top-k holds every item of the whole top-k that lies in
it. How the rows are coded and scanned: the `segment` module.

On disk (`save` / `load`, `index_files`): a folder whose `index.json` (format, shape, dtypes, and per segment its
count and the SHA-256 of each file) lists segment folders, each holding `vectors.safetensors` (`vectors`
`[R_c, n, D]`; for int8 / binary the codes `[R_c, n, D]` int8 or `[R_c, n, D / 8]` uint8, `scales` `[R_c, n]`, and
for binary `offsets` `[R_c, n]` and `centers` `[R_c, D]`), `full.safetensors` for compressed indexes, and
`ids.jsonl`. Saving writes only the items added since `load`, as a new segment, and switches `index.json` to the new
list atomically, so a crash at any point leaves the old index or the new one; loading validates everything and can
memory-map the vectors (reading none of them) for indexes larger than RAM.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_metaembed.scoring_metaembed import DEFAULT_MAX_WORK_BYTES, check_budget

from .index_files import COMPRESSED, FORMAT, IndexFileError, checksummed_files, read_ids, read_manifest, save_segments
from .segment import Segment, dtype_name, joined, quantize

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
        self.dtype_name = dtype_name(dtype)
        self.compressed = self.dtype_name in COMPRESSED
        if self.dtype_name == "binary" and dim % 8:
            raise ValueError(f"dtype 'binary' packs 8 dimensions per byte: dim must be a multiple of 8, got {dim}")
        self.full_dtype_name = dtype_name(full_dtype, compressed=False) if self.compressed else self.dtype_name
        self._saved: list = []  # the segments this index was loaded from, in order (never changed)
        self._saved_count = 0
        self._tail = Segment(dim, num_vectors, self.dtype_name, device, self.full_dtype_name)  # items added since
        self.dtype, self.full_dtype, self.device = self._tail.dtype, self._tail.full_dtype, self._tail.device
        self.ids: list = []  # every item's id, in order: the saved segments' then the new ones
        self._id_set: set | None = set()  # the ids as a set, for duplicate checks; built at the first add after load

    # ------------------------------------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return self._saved_count + self._tail.count

    def __repr__(self) -> str:
        stored = f"{self.dtype_name} (+ {self.full_dtype_name} for re-scoring)" if self.compressed else self.dtype_name
        return (
            f"MetaEmbedIndex({len(self)} items, {self.num_vectors} vectors x {self.dim} dims, {stored}, "
            f"{self.device}{f', {self.num_segments} segments' if self.num_segments > 1 else ''})"
        )

    def _segments(self) -> list:
        """Every segment that holds items, in order: the saved ones, then the one in memory."""
        return [segment for segment in (*self._saved, self._tail) if segment.count]

    @property
    def num_segments(self) -> int:
        """Segments holding items: the saved ones, plus one if items were added since the last save or load."""
        return len(self._segments())

    def chunks(self, size: int = 4096):
        """Yield (full vectors [R_c, n, D], ids) of up to `size` items at a time, in order, segment by segment:
        views of the stored (or mapped) tensors, never a copy of the whole index (unlike `vectors` when the index
        spans several segments). For a compressed index, the full vectors kept for re-scoring."""
        offset = 0
        for segment in self._segments():
            rows = segment.rows(full=True)
            for start in range(0, segment.count, size):
                stop = min(start + size, segment.count)
                yield rows[:, start:stop], self.ids[offset + start : offset + stop]
            offset += segment.count

    @property
    def vectors(self) -> torch.Tensor:
        """[R_c, N, D] view of the full-precision vectors (row j of each item is `vectors[j, item]`); for a
        compressed index, those kept for re-scoring. A copy when the index spans several segments."""
        return joined([segment.rows(full=True) for segment in self._segments()] or [self._tail.rows(full=True)])

    @property
    def codes(self) -> torch.Tensor:
        """[R_c, N, D'] view of what a scan reads: the vectors, or a compressed index's int8 / packed-bit codes."""
        self._tail.fit_centers()
        return joined([segment.rows() for segment in self._segments()] or [self._tail.rows()])

    @property
    def scales(self) -> torch.Tensor | None:
        """[R_c, N] float32 scale of each compressed vector (None for float storage)."""
        if not self.compressed:
            return None
        self._tail.fit_centers()
        return joined([s.scales[:, : s.count] for s in self._segments()] or [self._tail.scales[:, :0]])

    @property
    def nbytes(self) -> int:
        """Bytes a full-budget scan reads: the stored vectors, or a compressed index's codes and scales."""
        return self.bytes_per_item(self.num_vectors) * len(self)

    def bytes_per_item(self, r_c: int | None = None) -> int:
        """Bytes one item costs a scan at candidate budget r_c (default: all stored vectors)."""
        r_c = self.num_vectors if r_c is None else r_c
        extra = {"int8": 4, "binary": 8}.get(self.dtype_name, 0)  # float32 scale (and offset) per vector
        vectors = self._tail.vectors
        return r_c * (vectors.shape[2] * vectors.element_size() + extra)

    def add(self, embeddings: torch.Tensor, ids: list | None = None) -> None:
        """Append items: `embeddings` [N, R, D] with R >= num_vectors (the first num_vectors are kept), e.g.
        `model.encode_candidates(...)`. `ids` (one per item, str or int, unique in the index) default to the
        items' positions. Nothing is added when any check fails."""
        check_candidate_embeddings(embeddings, self.dim, self.num_vectors, "this index")
        count = embeddings.shape[0]
        ids = list(range(len(self), len(self) + count)) if ids is None else list(ids)
        self._check_new_ids(ids, count)
        self._tail.add(embeddings[:, : self.num_vectors].transpose(0, 1))  # [R_c, n, D]
        self.ids.extend(ids)
        self._known_ids().update(ids)

    def _known_ids(self) -> set:
        """The ids as a set. A loaded index builds it only when items are added: a search-only process (a server)
        holds the ids list alone, about half the memory of list and set (10M ids: 0.7 GB instead of 1.3 GB)."""
        if self._id_set is None:
            self._id_set = set(self.ids)
        return self._id_set

    def _check_new_ids(self, ids: list, count: int) -> None:
        if len(ids) != count:
            raise ValueError(f"got {len(ids)} ids for {count} items: give one id per item")
        seen = set()
        for position, item_id in enumerate(ids):
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise ValueError(f"id at position {position} must be a str or an int, got {item_id!r}")
            if item_id in self._known_ids() or item_id in seen:
                raise ValueError(f"id {item_id!r} (position {position}) is already in the index")
            seen.add(item_id)

    def verify(self) -> None:
        """Check a loaded index's files against the SHA-256 in its manifest and the stored tier norms against the
        vectors; IndexFileError naming the file otherwise. Reads every byte (a mapped `load` reads none of them)."""
        for segment in (*self._saved, self._tail):
            segment.verify()

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
        compressed scan are re-scored exactly from the full vectors and the top-k of those returned; the shortlist
        is per segment (an index appended to S times re-scores up to S + 1 shortlists: never fewer candidates)."""
        queries, (r_q, r_c) = self._check_search(queries, budget, k)
        if not isinstance(query_batch_size, int) or isinstance(query_batch_size, bool) or query_batch_size < 1:
            raise ValueError(f"query_batch_size must be positive, got {query_batch_size!r}")
        shortlist = self._check_shortlist(shortlist, k)
        queries = queries[:, :r_q]

        def search_part(part) -> tuple:
            kept = min(shortlist if self.compressed else k, part.count)
            coarse = part.scan_top(queries, r_c, kept, query_batch_size, max_work_bytes)
            if not self.compressed:
                return coarse
            return part.rescore(queries, coarse[1], r_c, min(k, part.count), max_work_bytes)

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
        re-ranks them (from the full vectors). Reads N * D + shortlist * r_c * D values per query (per segment:
        shortlist items from each) instead of N * r_c * D; recall against `search` is measured by
        `benchmarks/two_stage_recall.py`."""
        queries, (r_q, r_c) = self._check_search(queries, budget, k)
        if not isinstance(shortlist, int) or isinstance(shortlist, bool) or shortlist < 1:
            raise ValueError(f"shortlist must be a positive integer, got {shortlist!r}")
        if k > shortlist:
            raise ValueError(f"k={k} is larger than the shortlist ({shortlist}) it is re-ranked from")
        if not isinstance(query_batch_size, int) or isinstance(query_batch_size, bool) or query_batch_size < 1:
            raise ValueError(f"query_batch_size must be positive, got {query_batch_size!r}")

        def search_part(part) -> tuple:
            coarse = part.scan_top(queries[:, :1], 1, min(shortlist, part.count), query_batch_size, max_work_bytes)
            return part.rescore(queries[:, :r_q], coarse[1], r_c, min(k, part.count), max_work_bytes)

        return self._result(*self._across_parts(search_part, k))

    def _across_parts(self, search_part, k: int) -> tuple:
        """Top-k (scores [Q, k], positions [Q, k] in the whole index) from `search_part(segment)`, each segment's own
        top-k (positions within it): one search per segment, merged. Each segment's top-k holds every item of the
        whole top-k that lies in it, so the merge is exact."""
        found, offset = [], 0
        for segment in (*self._saved, self._tail):
            if segment.count:
                scores, positions = search_part(segment)
                found.append((scores, positions + offset))
            offset += segment.count
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
        self._tail.fit_centers()
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

    # ------------------------------------------------------------------------------------------------ files
    def save(self, directory) -> Path:
        """Write the index into `directory` (`metaembed.retrieval.index_files`): the items added since it was loaded
        go into a new segment; the segments it was loaded from are kept where they already lie in `directory`, or
        copied in file by file from elsewhere. `index.json` then switches to the new list atomically: the old index
        or the new one, complete, is at `directory` at every instant, whatever happens. Saving after an append thus
        writes the new items only.

        Afterwards the index is the one at `directory`: its segments are those just listed there (the new items
        become a saved segment, still in memory), so a later save writes only what is added after this one. One
        writer per folder: a save from an index loaded before another writer saved to `directory` raises
        `IndexFileError` instead of dropping that writer's items."""
        directory = Path(directory)
        kept = self._saved_segments()
        write = None
        if self._tail.count or not kept:  # the new items (or, for an empty index, an empty segment to hold its shape)
            write = lambda folder: self._tail.write(folder, self.ids[self._saved_count :])  # noqa: E731
        listed = save_segments(directory, kept, write, self._manifest_fields())
        # Adopt what was written: each saved segment now lives where the manifest lists it, the new items too.
        segments = [*self._saved, self._tail] if write is not None else list(self._saved)
        for segment, (folder, entry) in zip(segments, listed, strict=True):
            segment.folder, segment.entry, segment.files = folder, entry, checksummed_files(folder, entry)
        if write is not None:
            self._saved.append(self._tail)
            self._saved_count += self._tail.count
            self._tail = Segment(self.dim, self.num_vectors, self.dtype_name, self.device, self.full_dtype_name)
            self._tail.centers = next((s.centers for s in self._saved if s.centers is not None), None)
        return directory

    def _saved_segments(self) -> list:
        """(folder, manifest entry, ids, rewrite) of each saved segment, in order: what `save_segments` keeps, copies
        or (its files gone) rewrites from the tensors held."""
        kept, offset = [], 0
        for segment in self._saved:
            start, stop = offset, offset + segment.count

            def rewrite(folder, segment=segment, start=start, stop=stop) -> int:
                return segment.write(folder, self.ids[start:stop])

            kept.append((segment.folder, segment.entry, lambda start=start, stop=stop: self.ids[start:stop], rewrite))
            offset = stop
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
        manifest, entries = read_manifest(directory)
        verify_checksum = not mmap if verify_checksum is None else verify_checksum
        index = cls(
            manifest["dim"],
            manifest["num_vectors"],
            dtype=manifest["dtype"],
            device=device,
            full_dtype=manifest.get("full_dtype", "bfloat16"),
        )
        ids = []
        for folder, entry in entries:
            segment = Segment.load(folder, entry, index._tail, mmap, verify_checksum)
            centers = index._tail.centers
            if centers is not None and segment.centers is not None and not torch.equal(segment.centers, centers):
                raise IndexFileError(f"{folder}: its binary centres differ from the first segment's")
            if centers is None:  # binary: every segment is coded around the first one's centres, new items too
                index._tail.centers = segment.centers
            ids.extend(read_ids(folder, entry))
            index._saved.append(segment)
        if len(set(ids)) != len(ids):  # a set for the check only: its table is freed, the strings are the list's
            raise IndexFileError(f"{directory}: an id appears twice in its segments")
        index._saved_count = len(ids)
        index.ids = ids
        index._id_set = None  # built from the ids at the first add
        return index


__all__ = ["MetaEmbedIndex", "SearchResult", "IndexFileError", "quantize", "FORMAT"]
