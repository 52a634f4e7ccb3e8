"""Late-interaction scores at every Matryoshka group from one pass over the largest group.

For nested groups (r_q^1, r_c^1) <= ... <= (r_q^G, r_c^G) the token similarities of the largest group hold every
smaller group's as a prefix: group g's score of query u and candidate v is

    S_g[u, v] = sum_{i < r_q^g} max_{j < r_c^g} <Q[u, i], C[v, j]>

so one GEMM per block gives all G scores: a running max over the candidate-vector tiers, then a running sum over
the query-vector tiers. `MatryoshkaMaxSim` is an autograd function that never holds more than one block of token
similarities: its backward recomputes each block and turns the score gradients into a sparse weight matrix
(one entry per (query vector, candidate, group) at the argmax), so the memory of `matryoshka_maxsim` stays bounded
by `max_block_bytes` plus the (G, Nq, Nc) scores, however large the batch.
"""

import torch

from modeling_metaembed.scoring_metaembed import matmul_fp32, score_blocks

# Float32 bytes of one block of token similarities [nq * R_q, nc * R_c] (the backward holds two such blocks).
DEFAULT_MAX_BLOCK_BYTES = 128 * 1024 * 1024


def check_groups(groups, num_query_vectors: int | None = None, num_candidate_vectors: int | None = None) -> list:
    """Validate Matryoshka groups: a non-empty list of (r_q, r_c) pairs, nested (both non-decreasing), within the
    vectors available. Returns them as a list of int tuples; raises ValueError naming the offending group."""
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError(f"matryoshka groups must be a non-empty list of (r_q, r_c) pairs, got {groups!r}")
    checked = []
    for index, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or len(group) != 2:
            raise ValueError(f"matryoshka group {index} must be a pair (r_q, r_c), got {group!r}")
        r_q, r_c = group
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in (r_q, r_c)):
            raise ValueError(f"matryoshka group {index} {tuple(group)} must hold positive integers")
        if num_query_vectors is not None and r_q > num_query_vectors:
            raise ValueError(f"matryoshka group {index} {tuple(group)}: r_q={r_q} exceeds R_q={num_query_vectors}")
        if num_candidate_vectors is not None and r_c > num_candidate_vectors:
            raise ValueError(f"matryoshka group {index} {tuple(group)}: r_c={r_c} exceeds R_c={num_candidate_vectors}")
        if checked and (r_q < checked[-1][0] or r_c < checked[-1][1]):
            raise ValueError(
                f"matryoshka groups must be nested (r_q and r_c non-decreasing): group {index} {tuple(group)} "
                f"follows {checked[-1]}"
            )
        checked.append((r_q, r_c))
    if len(set(checked)) != len(checked):
        raise ValueError(f"matryoshka groups repeat a budget: {checked}")
    return checked


def _group_scores(block: torch.Tensor, groups: list) -> torch.Tensor:
    """block [nq, R_q, nc, R_c] float32 -> scores [G, nq, nc]."""
    scores, running_max, previous_r_c = [], None, 0
    for r_q, r_c in groups:
        tier_max = block[..., previous_r_c:r_c].amax(dim=-1) if r_c > previous_r_c else None  # [nq, R_q, nc]
        if tier_max is not None:
            running_max = tier_max if running_max is None else torch.maximum(running_max, tier_max)
        previous_r_c = r_c
        scores.append(running_max[:, :r_q].sum(dim=1))
    return torch.stack(scores)


def _block_weights(block: torch.Tensor, grad_scores: torch.Tensor, groups: list) -> torch.Tensor:
    """d(sum_g <grad_g, S_g>) / d(block): one entry per (query vector, candidate, group) at the arg max."""
    nq, r_q_max, nc, r_c_max = block.shape
    weights = torch.zeros_like(block)
    for g, (r_q, r_c) in enumerate(groups):
        argmax = block[:, :r_q, :, :r_c].argmax(dim=-1, keepdim=True)  # [nq, r_q, nc, 1]
        grad = grad_scores[g][:, None, :, None].expand(nq, r_q, nc, 1)
        weights[:, :r_q].scatter_add_(3, argmax, grad)
    return weights


class MatryoshkaMaxSim(torch.autograd.Function):
    """scores[g] = MaxSim at group g for every query against every candidate, with a block-recomputing backward."""

    @staticmethod
    def forward(ctx, queries, candidates, groups, compute_dtype, max_block_bytes):
        r_q, r_c = groups[-1]
        q = queries[:, :r_q].to(compute_dtype)  # [Nq, r_q, D]
        c = candidates[:, :r_c].to(compute_dtype)  # [Nc, r_c, D]
        num_q, num_c, dim = q.shape[0], c.shape[0], q.shape[-1]
        scores = torch.empty(len(groups), num_q, num_c, dtype=torch.float32, device=queries.device)
        for qs, cs in score_blocks(num_q, num_c, r_q, r_c, max_block_bytes):
            q_flat, c_flat = q[qs].reshape(-1, dim), c[cs].reshape(-1, dim)
            block = matmul_fp32(q_flat, c_flat.T).view(q_flat.shape[0] // r_q, r_q, c_flat.shape[0] // r_c, r_c)
            scores[:, qs, cs] = _group_scores(block, groups)
        ctx.save_for_backward(q, c)
        ctx.groups, ctx.max_block_bytes = groups, max_block_bytes
        ctx.shapes = (queries.shape, candidates.shape, queries.dtype, candidates.dtype)
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        q, c = ctx.saved_tensors
        groups, (q_shape, c_shape, q_dtype, c_dtype) = ctx.groups, ctx.shapes
        r_q, r_c = groups[-1]
        num_q, num_c, dim = q.shape[0], c.shape[0], q.shape[-1]
        grad_q = torch.zeros(num_q, r_q, dim, dtype=torch.float32, device=q.device)
        grad_c = torch.zeros(num_c, r_c, dim, dtype=torch.float32, device=c.device)
        grad_scores = grad_scores.float()
        for qs, cs in score_blocks(num_q, num_c, r_q, r_c, ctx.max_block_bytes):
            q_flat, c_flat = q[qs].reshape(-1, dim), c[cs].reshape(-1, dim)
            nq, nc = q_flat.shape[0] // r_q, c_flat.shape[0] // r_c
            block = matmul_fp32(q_flat, c_flat.T).view(nq, r_q, nc, r_c)
            weights = _block_weights(block, grad_scores[:, qs, cs], groups).view(nq * r_q, nc * r_c)
            del block
            weights = weights.to(q.dtype)
            grad_q[qs] += matmul_fp32(weights, c_flat).view(nq, r_q, dim)
            grad_c[cs] += matmul_fp32(weights.T, q_flat).view(nc, r_c, dim)
        # Vectors beyond the largest group get no gradient.
        full_q = grad_q.new_zeros(q_shape)
        full_q[:, :r_q] = grad_q
        full_c = grad_c.new_zeros(c_shape)
        full_c[:, :r_c] = grad_c
        return full_q.to(q_dtype), full_c.to(c_dtype), None, None, None


def _check_embeddings(tensor, name: str, groups: list, axis: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or not tensor.is_floating_point():
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape (N, vectors, dim), got {shape}")
    needed = groups[-1][axis]
    if tensor.shape[1] < needed:
        raise ValueError(f"{name} hold {tensor.shape[1]} vectors but the largest group {groups[-1]} needs {needed}")


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 tensor cores with fp32 accumulation on CUDA; fp32 elsewhere (a CPU bf16 upcast buys nothing)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def matryoshka_maxsim(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    groups,
    compute_dtype: torch.dtype | None = None,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
) -> torch.Tensor:
    """MaxSim scores of every query against every candidate at every Matryoshka group, differentiable.

    Args:
        queries: (Nq, R_q, D) query embeddings.
        candidates: (Nc, R_c, D) candidate embeddings.
        groups: nested budgets [(r_q, r_c), ...]; the last (largest) one bounds the vectors read.
        compute_dtype: GEMM input precision (accumulation is always float32); defaults to bf16 on CUDA, fp32 on CPU.
        max_block_bytes: bound on one block of float32 token similarities (memory stays bounded).

    Returns:
        (G, Nq, Nc) float32 scores.
    """
    groups = check_groups(groups)
    _check_embeddings(queries, "queries", groups, 0)
    _check_embeddings(candidates, "candidates", groups, 1)
    if queries.shape[-1] != candidates.shape[-1]:
        raise ValueError(f"queries have dimension {queries.shape[-1]} but candidates have {candidates.shape[-1]}")
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(queries.device)
    return MatryoshkaMaxSim.apply(queries, candidates, groups, compute_dtype, max_block_bytes)


def paired_matryoshka_maxsim(
    queries: torch.Tensor, candidates: torch.Tensor, owners: torch.Tensor, groups
) -> torch.Tensor:
    """Scores of each candidate against its own query only (hard negatives), at every group.

    Args:
        queries: (Nq, R_q, D); candidates: (K, R_c, D); owners: (K,) index of each candidate's query.

    Returns:
        (G, K) float32 scores; memory O(K * R_q * R_c), so plain autograd is fine here.
    """
    groups = check_groups(groups)
    r_q, r_c = groups[-1]
    q = queries[owners, :r_q].float()  # [K, r_q, D]
    c = candidates[:, :r_c].float()  # [K, r_c, D]
    block = torch.bmm(q, c.transpose(1, 2))  # [K, r_q, r_c]
    return _group_scores(block.unsqueeze(2), groups).squeeze(-1)  # [G, K]


__all__ = ["check_groups", "matryoshka_maxsim", "paired_matryoshka_maxsim", "default_compute_dtype"]
