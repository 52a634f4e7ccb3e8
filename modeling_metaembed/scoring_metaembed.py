"""MaxSim late-interaction scoring at any retrieval budget.

This file ships inside every checkpoint (remote code): it imports only torch.

    s(q, c) = sum_{i <= r_q} max_{j <= r_c} <E_q[i], E_c[j]>

computed as one flat GEMM per candidate chunk, [Nq * r_q, D] x [D, chunk * r_c], with float32 accumulation, then a
max over each candidate's r_c columns and a sum over the r_q rows. The score block never exceeds
`max_block_bytes`, so memory stays bounded for any number of candidates.
"""

import torch

# Bytes of float32 scores one GEMM block may hold ([Nq * r_q, chunk * r_c] floats).
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


def maxsim(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    budget: tuple | None = None,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
) -> torch.Tensor:
    """Late-interaction (MaxSim) scores of every query against every candidate at a retrieval budget.

    Args:
        queries: (Nq, R_q, D) query embeddings (e.g. from `model.encode_queries`).
        candidates: (Nc, R_c, D) candidate embeddings, same D, on the same device.
        budget: (r_q, r_c): use the first r_q query vectors and the first r_c candidate vectors.
            `None` uses all of them.
        max_block_bytes: upper bound on the float32 score block computed at once.

    Returns:
        (Nq, Nc) float32 scores on the tensors' device: for each pair, the sum over the first r_q query vectors
        of the max inner product with the first r_c candidate vectors.
    """
    _check_embeddings(queries, "queries")
    _check_embeddings(candidates, "candidates")
    if queries.shape[-1] != candidates.shape[-1]:
        raise ValueError(
            f"queries have dimension {queries.shape[-1]} but candidates have {candidates.shape[-1]}"
        )
    if queries.device != candidates.device:
        raise ValueError(f"queries are on {queries.device} but candidates are on {candidates.device}")
    r_q, r_c = check_budget(budget, (queries.shape[1], candidates.shape[1]))
    num_queries, num_candidates, dim = queries.shape[0], candidates.shape[0], queries.shape[-1]
    scores = torch.empty(num_queries, num_candidates, dtype=torch.float32, device=queries.device)
    if num_queries == 0 or num_candidates == 0:
        return scores

    compute_dtype = torch.promote_types(queries.dtype, candidates.dtype)
    for q_slice, c_slice in score_blocks(num_queries, num_candidates, r_q, r_c, max_block_bytes):
        q = queries[q_slice, :r_q].to(compute_dtype)
        c = candidates[c_slice, :r_c].to(compute_dtype)
        nq, nc = q.shape[0], c.shape[0]
        q_flat = q.reshape(nq * r_q, dim)  # [nq * r_q, D]
        c_flat = c.reshape(nc * r_c, dim)  # [nc * r_c, D] (a copy only when the prefix is not contiguous)
        block = matmul_fp32(q_flat, c_flat.T)  # [nq * r_q, nc * r_c] float32
        scores[q_slice, c_slice] = block.view(nq, r_q, nc, r_c).amax(dim=3).sum(dim=1)  # [nq, nc]
    return scores


__all__ = ["maxsim", "check_budget", "score_blocks", "matmul_fp32"]
