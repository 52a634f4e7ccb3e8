"""One segment of a `MetaEmbedIndex`: its stored rows, how they are coded, scanned and re-scored, and its files.

A segment holds the vectors of some items vector-major, `[R_c, n, D]`: vector j of every item is one contiguous
`[n, D]` matrix, so a budget r_c reads exactly the first r_c matrices, n * r_c * D * bytes, with no copy. A saved
segment (`Segment.load`) is read or memory-mapped and never changes; the index's items added since it was loaded
live in one in-memory segment that grows (`add`) until the next save writes it.

Scoring. Queries are scored in float32 (never rounded to the storage dtype). bf16 vectors on an x86-64 CPU are
scanned by a compiled kernel (`metaembed.retrieval.scan_kernel`: AMX tiles with the query split into three bf16
parts, or AVX2 FMAs on bf16 widened in registers, or for 128+ query rows blocks widened in L2 and multiplied by
MKL's GEMM), which keeps each query's top-k as it goes. Everything else (other dtypes, GPUs, other CPUs, or no
compiler) uses `modeling_metaembed.scoring_metaembed.scan_maxsim`: the stored vectors widened tile by tile into one
cache-sized float32 buffer and multiplied there (one GEMM per tile), then a max over r_c, a sum over r_q, and a
running top-k over chunks. Every temporary of either is counted against `max_work_bytes`, so a search over a
memory-mapped index far larger than RAM holds a bounded amount of anonymous memory.

Compressed storage. dtype "int8" keeps each vector as int8 with one float32 scale (max |x| / 127). "binary" keeps,
around a center c_j per vector tier (the mean of tier j over the index's first CENTER_SAMPLE items, fitted once that
many are in or at the first search or save: not by the size of the first add; every later segment is coded around
the same centres), the exact component of x - c_j along c_j and one bit per dimension for the rest (its signs,
scaled by their mean magnitude): a vector reads back as c_j + delta * u_j + s * sign(r) with u_j = c_j / |c_j|
(delta chosen so the component along u_j is exact). Trained embeddings share a strong common direction per tier
(here: the mean vector has norm 0.98 of 1); raw sign bits would all agree, and a sign code's error along that
direction, multiplied by the query's large component on it, would swamp the differences that rank items. Both are
searched at any budget by the same scan (codes widened and scaled per tile: an approximate MaxSim against the
full-precision query), and the best `shortlist` items per query are re-scored exactly from full-precision vectors
kept beside the codes (in `full.safetensors`, memory-mapped when loaded).
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from modeling_metaembed.scoring_metaembed import DEFAULT_MAX_WORK_BYTES, plan_scan, scan_maxsim

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
    read_tensors,
    sha256_file,
    write_ids,
)

# Binary: each tier's centre is the mean of this many first items (or of all, if fewer at the first search or save).
CENTER_SAMPLE = 65536


def dtype_name(dtype, compressed: bool = True) -> str:
    """The storage name ("bfloat16", ..., "int8", "binary") of a name or torch dtype; ValueError otherwise."""
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


def sign_table(device) -> torch.Tensor:
    """[256, 8] float32: row b holds +1 / -1 for the 8 bits of byte b (bit 0 first)."""
    key = str(device)
    if key not in _SIGNS:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGNS[key] = (bits.float() * 2 - 1).to(device)
    return _SIGNS[key]


class Segment:
    """The stored rows of some items, `[R_c, n, D]`, in one storage dtype (see the module docstring)."""

    def __init__(self, dim: int, num_vectors: int, dtype: str, device, full_dtype: str):
        self.dim, self.num_vectors = dim, num_vectors
        self.dtype_name, self.full_dtype_name = dtype, full_dtype
        self.compressed = dtype in COMPRESSED
        self.dtype = COMPRESSED.get(dtype) or DTYPES[dtype]
        self.full_dtype = DTYPES[full_dtype]
        self.device = torch.device(device)
        width = dim // 8 if dtype == "binary" else dim
        self.vectors = torch.empty(num_vectors, 0, width, dtype=self.dtype, device=self.device)  # [R_c, cap, D']
        self.scales = torch.empty(num_vectors, 0, device=self.device) if self.compressed else None  # [R_c, cap]
        self.full = torch.empty(num_vectors, 0, dim, dtype=self.full_dtype) if self.compressed else None
        self.offsets = torch.empty(num_vectors, 0, device=self.device) if dtype == "binary" else None
        self.centers = None  # [R_c, D] float32, binary only: each tier's mean over the first CENTER_SAMPLE items
        # [R_c] float32 on CPU, float storage only: the largest L2 norm of each tier's stored vectors, which certifies
        # the AMX kernel's faster two-part scan (scan_kernel.top_k); None where unknown (a file saved without it)
        self.max_norms = None if self.compressed else torch.zeros(num_vectors, dtype=torch.float32)
        # Tiers whose max_norms are known to bound the data: all for norms computed here; none for norms read from
        # files whose checksums were not verified (checked against the vectors before the kernel trusts them)
        self.norms_checked = num_vectors
        self.files = []  # (path, SHA-256 in the manifest) of a saved segment's files, for verify()
        self.folder, self.entry = None, None  # a saved segment: its folder and manifest entry
        self.count = 0  # items held (the tensors above may have room for more)

    # ------------------------------------------------------------------------------------------------ rows
    def rows(self, full: bool = False) -> torch.Tensor:
        """[R_c, n, D'] view of the stored rows (codes when compressed), or with `full` of the full vectors."""
        return (self.full if full and self.compressed else self.vectors)[:, : self.count]

    def add(self, new: torch.Tensor) -> None:
        """Append rows `new` [R_c, n, D] (checked by the caller), coded in this segment's dtype."""
        count = new.shape[1]
        needed = self.count + count
        if needed > self.vectors.shape[1]:  # grow geometrically: amortised O(1) copies per item
            capacity = max(needed, 2 * self.vectors.shape[1], 1024)
            self.vectors = _grown(self.vectors, self.count, capacity)
            if self.compressed:
                self.scales = _grown(self.scales, self.count, capacity)
                self.full = _grown(self.full, self.count, capacity)
            if self.offsets is not None:
                self.offsets = _grown(self.offsets, self.count, capacity)
        if self.compressed:
            for start in range(0, count, 4096):  # quantize a few thousand items at a time
                part = new[:, start : start + 4096]
                where = slice(self.count + start, self.count + start + part.shape[1])
                self.full[:, where] = part.to(device="cpu", dtype=self.full_dtype)
                if self.dtype_name == "int8":
                    codes, scales, _ = quantize(part, "int8")
                    self.vectors[:, where] = codes.to(self.device)
                    self.scales[:, where] = scales.to(self.device)
                elif self.centers is not None:
                    self.code_binary(where.start, where.stop)
        else:
            self.vectors[:, self.count : needed] = new.to(device=self.device, dtype=self.dtype)
            if self.max_norms is not None:
                added_norms = tier_max_norms(self.vectors[:, self.count : needed])
                self.max_norms = torch.maximum(self.max_norms, added_norms)
        self.count = needed
        if self.dtype_name == "binary" and self.centers is None and needed >= CENTER_SAMPLE:
            self.fit_centers()

    def fit_centers(self) -> None:
        """Binary: fix each tier's centre, the mean of the first CENTER_SAMPLE items' stored full vectors (or of
        all items, when fewer are in at the first search or save), and code every item added so far. Codes are
        thus the same whatever sizes the adds had (one add, or one item then the rest)."""
        if self.dtype_name != "binary" or self.centers is not None or not self.count:
            return
        sample = min(self.count, CENTER_SAMPLE)
        total = torch.zeros(self.num_vectors, self.dim, dtype=torch.float64)
        for start in range(0, sample, 4096):  # float64 sums: exact for bf16 vectors, whatever the slicing
            total += self.full[:, start : min(start + 4096, sample)].double().sum(dim=1)
        self.centers = (total / sample).float().to(self.device)  # [R_c, D]
        for start in range(0, self.count, 4096):
            self.code_binary(start, min(start + 4096, self.count))

    def code_binary(self, start: int, stop: int) -> None:
        """Binary codes of items start..stop from their stored full vectors, around the fitted centres."""
        codes, scales, offsets = quantize(self.full[:, start:stop], "binary", center=self.centers.cpu().unsqueeze(1))
        self.vectors[:, start:stop] = codes.to(self.device)
        self.scales[:, start:stop] = scales.to(self.device)
        self.offsets[:, start:stop] = offsets.to(self.device)

    def checked_max_norms(self, r_c: int, max_work_bytes: int = DEFAULT_MAX_WORK_BYTES) -> torch.Tensor:
        """The stored tier norms, the first r_c of them checked against the vectors (once; one pass over those
        tiers) unless they were computed here or their file's checksum was verified: a norm smaller than the data's
        would void the two-part scan's certificate silently."""
        if self.norms_checked < r_c:
            # slices of at most 4 MB of float32: a search's memory must not grow with N (tests/test_search_memory.py)
            found = tier_max_norms(self.vectors[:r_c, : self.count], min(max_work_bytes, 2**22))
            if bool((self.max_norms[:r_c] < found).any()):
                where = self.files[0][0] if self.files else "this index"
                raise IndexFileError(
                    f"{where}: tensor 'max_norms' is smaller than the stored vectors' norms "
                    f"({self.max_norms[:r_c].tolist()} < {found.tolist()}): the file was changed"
                )
            self.norms_checked = r_c
        return self.max_norms

    def verify(self) -> None:
        """The files against the SHA-256 in the manifest, and the stored norms against the vectors."""
        _check_checksums(self.files)
        if self.max_norms is not None and self.count:
            self.checked_max_norms(self.num_vectors)

    # ------------------------------------------------------------------------------------------------ scan
    def load_codes(self, r_c: int):
        """load(start, stop, out) for `scan_maxsim`: stored rows start..stop widened (and scaled) into out."""
        codes, scales, offsets = self.vectors, self.scales, self.offsets
        if self.dtype_name == "binary":
            table = sign_table(self.device)
            centers = self.centers[:r_c].unsqueeze(1)  # [r_c, 1, D]
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

    def scan_top(self, queries, r_c: int, k: int, query_batch_size: int, max_work_bytes: int) -> tuple:
        """Top-k (scores [Q, k], positions [Q, k], on CPU) of a scan over the stored rows (codes when compressed):
        bf16 on an x86-64 CPU by a compiled kernel (`metaembed.retrieval.scan_kernel`), the rest by the torch scan."""
        found = self.kernel_top(queries, r_c, k, query_batch_size, max_work_bytes)
        if found is not None:
            return found
        num_queries, r_q, _ = queries.shape
        step, tile, chunk = plan_scan(
            min(num_queries, query_batch_size), r_q, r_c, self.dim, max_work_bytes, self.device
        )
        load = self.load_codes(r_c)
        all_scores, all_positions = [], []
        for q_start in range(0, num_queries, step):
            batch = queries[q_start : q_start + step].to(device=self.device, dtype=torch.float32).contiguous()
            best_scores = best_positions = None  # [k', Q]
            for start, stop, block in scan_maxsim(batch, self.count, r_c, load, tile, chunk):
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

    def kernel_top(self, queries, r_c: int, k: int, query_batch_size: int, max_work_bytes: int) -> tuple | None:
        """`scan_top` by the compiled CPU kernel, or None where it does not apply (see `scan_kernel.choose`), the
        queries are not finite (the torch scan then gives what torch gives), or its buffers for even one query
        would not fit `max_work_bytes` (a very large k)."""
        if self.compressed:
            return None
        num_queries, r_q, _ = queries.shape
        step = min(num_queries, query_batch_size)
        kind = scan_kernel.choose(self.vectors, r_c, num_values=r_c * self.count * self.dim, rows=step * r_q)
        if kind == "torch":
            return None
        while step > 1 and scan_kernel.work_bytes(kind, step, r_q, self.dim, k, r_c) > max_work_bytes:
            step = (step + 1) // 2
        if scan_kernel.work_bytes(kind, step, r_q, self.dim, k, r_c) > max_work_bytes:
            return None
        max_norm = None  # looked up (two torch calls) only where the AMX kernel's two-part scan can run
        if kind == "amx" and self.max_norms is not None and step * r_q >= scan_kernel.AMX_TWO_PARTS_FROM_ROWS:
            max_norm = float(self.checked_max_norms(r_c, max_work_bytes)[:r_c].max())
        scores, positions = [], []
        for start in range(0, num_queries, step):
            batch = queries[start : start + step].to(device="cpu", dtype=torch.float32).contiguous()
            found = scan_kernel.top_k(kind, self.vectors, r_c, self.count, batch, k, max_norm)
            if found is None:  # a query value is not finite: the torch scan gives what torch gives
                return None
            scores.append(found[0])
            positions.append(found[1])
        if len(scores) == 1:
            return scores[0], positions[0]
        return torch.cat(scores), torch.cat(positions)

    def rescore(self, queries, shortlists: torch.Tensor, r_c: int, k: int, max_work_bytes: int) -> tuple:
        """Exact MaxSim at (r_q = queries' vectors, r_c) of each query's shortlisted rows, from the full vectors;
        the top-k of each shortlist. Queries go in groups whose gathered rows fit `max_work_bytes` (one batched
        product per group); a shortlist too large for that is scanned tile by tile, one query at a time."""
        r_q, size = queries.shape[1], shortlists.shape[1]
        full = self.full if self.compressed else self.vectors
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
    def write(self, folder: Path, ids: list) -> int:
        """This segment's files in `folder` (the items' `ids` beside them); returns how many items they hold."""
        self.fit_centers()
        count = self.count
        tensors = {"vectors": self.vectors[:, :count].contiguous().cpu()}
        if not self.compressed:
            if self.max_norms is None:  # read from a file saved without them: one pass, as the write reads anyway
                self.max_norms, self.norms_checked = tier_max_norms(self.rows()), self.num_vectors
            self.checked_max_norms(self.num_vectors)  # never write norms read unverified without checking them
            tensors["max_norms"] = self.max_norms.contiguous()
        else:
            tensors["scales"] = self.scales[:, :count].contiguous().cpu()
        if self.centers is not None:
            tensors["offsets"] = self.offsets[:, :count].contiguous().cpu()
            tensors["centers"] = self.centers.contiguous().cpu()
        save_file(tensors, str(folder / VECTORS_NAME), metadata={"format": FORMAT})
        if self.compressed:
            full = {"vectors": self.full[:, :count].contiguous()}
            save_file(full, str(folder / FULL_NAME), metadata={"format": FORMAT})
        write_ids(folder / IDS_NAME, ids)
        return count

    @classmethod
    def load(cls, folder: Path, entry: dict, like: "Segment", mmap: bool, verify_checksum: bool) -> "Segment":
        """A saved segment (`entry` from the manifest), validated, with the shape and dtypes of `like`."""
        files = checksummed_files(folder, entry)
        for path, _ in files:
            if not path.is_file():
                raise IndexFileError(f"{path} is missing: the index's manifest names it")
        if verify_checksum:
            _check_checksums(files)
        segment = cls(like.dim, like.num_vectors, like.dtype_name, like.device, like.full_dtype_name)
        count, num_vectors, dim, dtype = entry["count"], like.num_vectors, like.dim, like.dtype_name
        width = dim // 8 if dtype == "binary" else dim
        expected = {"vectors": (dtype, [num_vectors, count, width])}
        if segment.compressed:
            expected["scales"] = ("float32", [num_vectors, count])
        if dtype == "binary" and count:
            expected["offsets"] = ("float32", [num_vectors, count])
            expected["centers"] = ("float32", [num_vectors, dim])
        if not segment.compressed:  # absent from indexes saved by earlier versions
            expected["max_norms"] = ("float32", [num_vectors])
        tensor_path = folder / VECTORS_NAME
        tensors = read_tensors(tensor_path, expected, mmap=mmap, optional=("max_norms",))

        placed = {name: (value if mmap else value.to(segment.device)) for name, value in tensors.items()}
        segment.vectors = placed["vectors"]
        if segment.compressed:
            segment.scales = placed["scales"]
            if "centers" in tensors:
                segment.offsets = placed["offsets"]
                segment.centers = tensors["centers"].to(segment.device)
            full = {"vectors": (like.full_dtype_name, [num_vectors, count, dim])}
            segment.full = read_tensors(folder / FULL_NAME, full, mmap=True)["vectors"]
        else:
            segment.max_norms = validated_max_norms(tensors.get("max_norms"), segment.vectors, tensor_path, mmap)
            # Stored norms are trusted once their file's checksum is verified; else checked before first use.
            segment.norms_checked = num_vectors if verify_checksum or "max_norms" not in tensors else 0
        segment.files, segment.count = files, count
        segment.folder, segment.entry = folder, entry
        return segment


def _check_checksums(files: list) -> None:
    """IndexFileError naming the first of `files` ((path, SHA-256 in the manifest) pairs) whose bytes differ."""
    for path, expected in files:
        if sha256_file(path) != expected:
            raise IndexFileError(f"{path} does not match the checksum in its manifest: it was changed or truncated")


def _grown(tensor: torch.Tensor, count: int, capacity: int) -> torch.Tensor:
    """A [R, capacity, ...] copy of tensor's first `count` rows (axis 1), the rest uninitialised."""
    grown = torch.empty(tensor.shape[0], capacity, *tensor.shape[2:], dtype=tensor.dtype, device=tensor.device)
    grown[:, :count] = tensor[:, :count]
    return grown


def joined(parts: list) -> torch.Tensor:
    """The [R, n, ...] pieces as one tensor along the items: the piece itself (a view) when only one holds items."""
    holding = [part for part in parts if part.shape[1]] or parts[-1:]
    return holding[0] if len(holding) == 1 else torch.cat(holding, dim=1)


def tier_max_norms(vectors: torch.Tensor, work_bytes: int = 2**26) -> torch.Tensor:
    """[R] float32 on CPU: the largest L2 norm in each tier of `vectors` [R, n, D], read a slice at a time (a float32
    copy and its temporaries within `work_bytes`)."""
    found = torch.zeros(vectors.shape[0], dtype=torch.float32)
    step = max(1, work_bytes // 16 // max(1, vectors.shape[0] * vectors.shape[2]))
    for start in range(0, vectors.shape[1], step):
        norms = vectors[:, start : start + step].float().norm(dim=-1).amax(dim=1).cpu()
        found = torch.maximum(found, norms)
    return found


def validated_max_norms(stored, vectors: torch.Tensor, path: Path, mmap: bool) -> torch.Tensor | None:
    """The saved tier norms, validated; for an index saved without them, computed from the vectors read into memory
    (one pass, as a search makes), or None for a memory-mapped one (its AMX scans then use three parts)."""
    if stored is None:
        return None if mmap else tier_max_norms(vectors)
    stored = stored.clone()
    if torch.isnan(stored).any() or (stored < 0).any():  # +inf is a norm past float32's range: three parts
        raise IndexFileError(f"{path}: tensor 'max_norms' holds negative or NaN values")
    return stored


__all__ = ["Segment", "CENTER_SAMPLE", "quantize", "dtype_name", "tier_max_norms", "joined"]
