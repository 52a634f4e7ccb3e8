"""MaxSim late-interaction scoring at any retrieval budget.

This file ships inside every checkpoint (remote code): it imports only torch.

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <E_q[i], E_c[j]>

`maxsim` scans the candidates in tiles (`scan_maxsim`): each tile of stored vectors (bf16, fp16, int8, ...) is
widened to float32 into one preallocated, cache-sized buffer and multiplied there by the float32 queries with one
flat GEMM, [Q * r_q, D] x [D, tile * r_c], into a preallocated score tile; then a max over each candidate's r_c
columns and a sum over the r_q rows. Queries are never rounded to the candidates' precision, no float32 copy of
the candidates ever goes through memory, and every temporary (the widened queries, the tile, its scores, the
reductions) is counted against one byte budget, `max_work_bytes` (`plan_scan`), whatever N, D, r_q, r_c, dtype
and device.
"""

import torch

# Bytes of float32 scores one GEMM block of `score_blocks` may hold ([Nq * r_q, chunk * r_c] floats); used by
# training (`training.similarity`), whose blocks carry gradients. Search and `maxsim` use `max_work_bytes`.
DEFAULT_MAX_BLOCK_BYTES = 256 * 1024 * 1024


def check_budget(budget, available: tuple, what: str = "embeddings") -> tuple:
    """Validate a budget (r_q, r_c) against the vectors available (R_q, R_c); `None` means all of them."""
    if budget is None:
        return tuple(available)
    if not isinstance(budget, (tuple, list)) or len(budget) != 2:
        raise ValueError(f"budget must be a pair (r_q, r_c), got {budget!r}")
    for name, value, limit in zip(("r_q", "r_c"), budget, available):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"budget {name} must be an integer, got {value!r}")
        if not 1 <= value <= limit:
            raise ValueError(f"budget {name}={value} is outside 1..{limit}: the {what} hold {limit} vectors")
    return tuple(budget)


def _check_embeddings(tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, vectors, dim), got {type(tensor).__name__}")
    if tensor.dim() != 3:
        raise ValueError(f"{name} must have shape (N, vectors, dim), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 accumulation and a float32 result, whatever the inputs' precision."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        # Half-precision tensor-core GEMM writing float32 directly: no rounding of the scores before max/sum.
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    # CPU (and older torch): upcast this chunk only.
    return a.float() @ b.float()


def score_blocks(num_queries: int, num_candidates: int, r_q: int, r_c: int, max_block_bytes: int):
    """Yield (query slice, candidate slice) pairs whose float32 score block [nq * r_q, nc * r_c] fits
    max_block_bytes. Queries are chunked too, so a huge query batch cannot blow the bound either."""
    query_chunk = max(1, min(num_queries, max_block_bytes // (4 * r_q * r_c)))
    for q_start in range(0, num_queries, query_chunk):
        nq = min(query_chunk, num_queries - q_start)
        candidate_chunk = max(1, max_block_bytes // (4 * nq * r_q * r_c))
        for c_start in range(0, num_candidates, candidate_chunk):
            yield slice(q_start, q_start + nq), slice(c_start, min(c_start + candidate_chunk, num_candidates))


# Every temporary of one search (widened queries, candidate tile, score tile, reductions, running top-k) fits this.
DEFAULT_MAX_WORK_BYTES = 64 * 1024 * 1024
# Float32 bytes of one widened candidate tile on CPU: a few L2-sized MB, so a tile is read from memory once,
# widened in cache and multiplied from cache. Larger tiles cost no more memory traffic but leave the cache.
DEFAULT_TILE_BYTES = 2 * 1024 * 1024
# Below this many query rows the GEMM runs as queries x tile^T (a GEMV-like shape MKL does well); from it on as
# tile x queries^T (measured 3x faster at 16 rows on an AVX-512 Xeon).
_TRANSPOSED_FROM_ROWS = 8
# Extra bytes per widened value allowed for what producing a tile may allocate (a gather in the stored dtype, a
# bit-unpacking index) and for the GEMM's own packing of its operand.
_EXTRA_BYTES_PER_VALUE = 8


def plan_scan(
    num_queries: int,
    r_q: int,
    r_c: int,
    dim: int,
    max_work_bytes: int,
    device=None,
    tile_bytes: int | None = None,
    value_bytes: int = 4,
) -> tuple:
    """(queries per pass, candidates per tile, candidates per score chunk) whose temporaries fit `max_work_bytes`.

    The budget is split: a quarter for the widened queries, half for one tile (the widened candidates, their
    extra, the score tile and the reductions), a quarter for a chunk of scores and its top-k. Raises ValueError
    when even one query against one candidate does not fit."""
    if not isinstance(max_work_bytes, int) or isinstance(max_work_bytes, bool) or max_work_bytes < 1:
        raise ValueError(f"max_work_bytes must be a positive integer, got {max_work_bytes!r}")
    if tile_bytes is None:
        on_cpu = device is None or torch.device(device).type == "cpu"
        tile_bytes = DEFAULT_TILE_BYTES if on_cpu else max_work_bytes
    per_value = value_bytes + _EXTRA_BYTES_PER_VALUE

    def tile_item_bytes(nq):  # one candidate in a tile: widened vectors + extra, scores, max, sum
        rows = nq * r_q
        return r_c * dim * per_value + value_bytes * (rows * r_c + rows + 2 * nq)

    query_bytes = r_q * dim * value_bytes
    minimum = 4 * query_bytes + 2 * tile_item_bytes(1) + 4 * 3 * value_bytes
    if minimum > max_work_bytes:
        raise ValueError(
            f"max_work_bytes={max_work_bytes:,} is too small to score one query against one candidate at budget "
            f"({r_q}, {r_c}) and dimension {dim}: it needs at least {minimum:,}"
        )
    queries = max(1, min(num_queries, max_work_bytes // 4 // query_bytes))
    while queries > 1 and 2 * tile_item_bytes(queries) > max_work_bytes:
        queries = (queries + 1) // 2
    tile = max(1, min(max_work_bytes // 2 // tile_item_bytes(queries), tile_bytes // (r_c * dim * value_bytes)))
    chunk = max(tile, (max_work_bytes // 4 // (3 * value_bytes * queries)) // tile * tile)
    return queries, tile, chunk


def scan_maxsim(queries: torch.Tensor, num_candidates: int, r_c: int, load, tile: int, chunk: int):
    """Yield (start, stop, scores [stop - start, Q]) over the candidates, `chunk` at a time (the view is reused:
    consume it before the next step).

    Args:
        queries: [Q, r_q, D] contiguous, in the working precision (float32, or float64 for float64 inputs).
        num_candidates: N, the candidates scanned.
        r_c: candidate vectors per candidate.
        load: `load(start, stop, out)` writes candidates start..stop's first r_c vectors, widened, into
            `out` [r_c, stop - start, D] (vector-major). It may allocate at most a tile in the stored dtype.
        tile / chunk: candidates per GEMM and per yielded block (from `plan_scan`).
    """
    num_queries, r_q, dim = queries.shape
    rows = num_queries * r_q
    flat = queries.reshape(rows, dim)  # [M, D]
    transposed = rows >= _TRANSPOSED_FROM_ROWS
    options = {"dtype": queries.dtype, "device": queries.device}
    widened = torch.empty(r_c * tile * dim, **options)
    sims = torch.empty(rows * r_c * tile, **options)
    best = torch.empty(rows * tile, **options)
    block = torch.empty(chunk, num_queries, **options)  # [chunk, Q]
    for chunk_start in range(0, num_candidates, chunk):
        chunk_stop = min(chunk_start + chunk, num_candidates)
        for start in range(chunk_start, chunk_stop, tile):
            stop = min(start + tile, chunk_stop)
            n = stop - start
            vectors = widened[: r_c * n * dim].view(r_c, n, dim)
            load(start, stop, vectors)
            out = block[start - chunk_start : stop - chunk_start]  # [n, Q]
            if transposed:  # [r_c * n, D] x [D, M] -> [r_c, n, M], max over r_c -> [n, Q, r_q], sum over r_q
                s = sims[: r_c * n * rows].view(r_c * n, rows)
                torch.mm(vectors.view(r_c * n, dim), flat.T, out=s)
                top = s.view(r_c, n * rows)
                if r_c > 1:
                    top = torch.amax(top, dim=0, out=best[: n * rows])
                torch.sum(top.view(n, num_queries, r_q), dim=2, out=out)
            else:  # [M, D] x [D, r_c * n] -> [M, r_c, n], max over r_c -> [Q, r_q, n], sum over r_q
                s = sims[: rows * r_c * n].view(rows, r_c * n)
                torch.mm(flat, vectors.view(r_c * n, dim).T, out=s)
                top = s.view(rows, r_c, n)
                if r_c > 1:
                    top = torch.amax(top, dim=1, out=best[: rows * n].view(rows, n))
                out.copy_(top.view(num_queries, r_q, n).sum(dim=1).T)
        yield chunk_start, chunk_stop, block[: chunk_stop - chunk_start]


def working_dtype(*dtypes) -> torch.dtype:
    """float64 when any input is float64, else float32: stored half precision is widened, never the reverse."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def maxsim(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    budget: tuple | None = None,
    max_work_bytes: int = DEFAULT_MAX_WORK_BYTES,
) -> torch.Tensor:
    """Late-interaction (MaxSim) scores of every query against every candidate at a retrieval budget.

    Args:
        queries: (Nq, R_q, D) query embeddings (e.g. from `model.encode_queries`).
        candidates: (Nc, R_c, D) candidate embeddings, same D, on the same device. May be memory-mapped and far
            larger than memory: they are read tile by tile.
        budget: (r_q, r_c): use the first r_q query vectors and the first r_c candidate vectors.
            `None` uses all of them.
        max_work_bytes: upper bound on all temporaries together (the result is not one of them).

    Returns:
        (Nq, Nc) float32 scores on the tensors' device: for each pair, the sum over the first r_q query vectors
        of the max inner product with the first r_c candidate vectors, computed in float32 (float64 if an input
        is float64) from the inputs as given.
    """
    _check_embeddings(queries, "queries")
    _check_embeddings(candidates, "candidates")
    if queries.shape[-1] != candidates.shape[-1]:
        raise ValueError(f"queries have dimension {queries.shape[-1]} but candidates have {candidates.shape[-1]}")
    if queries.device != candidates.device:
        raise ValueError(f"queries are on {queries.device} but candidates are on {candidates.device}")
    r_q, r_c = check_budget(budget, (queries.shape[1], candidates.shape[1]))
    num_queries, num_candidates, dim = queries.shape[0], candidates.shape[0], queries.shape[-1]
    scores = torch.empty(num_queries, num_candidates, dtype=torch.float32, device=queries.device)
    if num_queries == 0 or num_candidates == 0:
        return scores

    work = working_dtype(queries.dtype, candidates.dtype)
    value_bytes = torch.empty(0, dtype=work).element_size()
    step, tile, chunk = plan_scan(num_queries, r_q, r_c, dim, max_work_bytes, queries.device, value_bytes=value_bytes)

    def load(start, stop, out):  # item-major [n, r_c, D] -> vector-major [r_c, n, D], widened
        out.copy_(candidates[start:stop, :r_c].transpose(0, 1))

    for q_start in range(0, num_queries, step):
        q = queries[q_start : q_start + step, :r_q].to(work).contiguous()  # [nq, r_q, D]
        for start, stop, block in scan_maxsim(q, num_candidates, r_c, load, tile, chunk):
            scores[q_start : q_start + q.shape[0], start:stop] = block.T
    return scores


__all__ = ["maxsim", "check_budget", "plan_scan", "scan_maxsim", "score_blocks", "matmul_fp32"]
