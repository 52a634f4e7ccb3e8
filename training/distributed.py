"""The few collectives contrastive training needs, on top of torch.distributed (any backend: NCCL, gloo)."""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_rows_with_grad(tensor: torch.Tensor) -> tuple:
    """All ranks' rows concatenated in rank order, differentiable: the backward sums, onto each rank's own rows,
    the gradients every rank's loss sends them. Ranks may hold different numbers of rows.

    Returns:
        (gathered tensor, list of each rank's row count).
    """
    if world_size() == 1:
        return tensor, [tensor.shape[0]]
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)
    if longest == 0:  # every rank agrees (same counts), so every rank skips the gather
        return tensor, counts
    if tensor.shape[0] < longest:  # all_gather needs equal shapes: pad, then drop the padding after
        padding = tensor.new_zeros((longest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    parts = dist_nn.all_gather(tensor)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]), counts


def all_reduce_sum(value: int | float, device) -> float:
    """Sum of a Python number over ranks (no gradient)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item()


def all_reduce_max(values: list, device) -> list:
    """Element-wise maximum over ranks of a list of integers (no gradient)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
