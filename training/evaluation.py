"""Retrieval quality at every budget on held-out records: each query against all positives of the split.

One definition of rank everywhere (training evaluation, the quickstart, the benchmark harness): a positive's
rank is 1 + the number of *other* candidates that score at least as high. A tie counts against the positive, and
a NaN positive score is last, so a collapsed model (every score alike) gets Recall@1 = 0 and MRR = 1/N, never the
perfect score an optimistic tie rule would give it.

Evaluation scales with the data set: records are read (and images opened) one batch at a time; embeddings are
kept at the largest budget only; under several processes each encodes its own shard and the candidate shards
are passed round by broadcast, so no process ever holds more than two shards of candidates; scores are computed
in bounded blocks on the embeddings' device (bf16 GEMMs with fp32 accumulation on a GPU).
"""

import math

import torch
import torch.distributed as dist

from .data import open_image
from .distributed import rank as process_rank
from .distributed import world_size
from .similarity import DEFAULT_MAX_BLOCK_BYTES, check_groups, matryoshka_maxsim


def positive_ranks(scores: torch.Tensor, positive_columns: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of each row's positive among the row's candidates; ties and NaN count against it.

    Args:
        scores: (Q, N) scores.
        positive_columns: (Q,) column of each row's positive.
    """
    positive = scores.gather(1, positive_columns[:, None])  # [Q, 1]
    others_at_least = (scores >= positive).sum(dim=1) - 1  # the positive compares >= with itself
    return torch.where(positive.squeeze(1).isnan(), scores.shape[1], others_at_least + 1)


def recall_and_mrr(scores: torch.Tensor) -> tuple:
    """(Recall@1, MRR) of a square score matrix whose diagonal holds each query's positive (ties count against
    the positive, see the module docstring)."""
    ranks = positive_ranks(scores, torch.arange(scores.shape[0], device=scores.device)).float()
    return (ranks == 1).float().mean().item(), (1.0 / ranks).mean().item()


def _side_input(side: dict, image_root) -> dict:
    image = side.get("image")
    if image is not None:
        image = open_image(image, image_root)
    return {"text": side.get("text"), "image": image} if image is not None else {"text": side.get("text")}


def model_encoder(model, dataset, batch_size: int = 16):
    """`embed(records) -> (query embeddings, positive embeddings)` through `model.encode`, opening each batch's
    images only when that batch is encoded."""
    root = getattr(dataset, "image_root", None)

    def embed(records):
        queries = [_side_input(r["query"], root) for r in records]
        positives = [_side_input(r["positive"], root) for r in records]
        instructions = [r["query"].get("instruction") for r in records]
        options = {"batch_size": batch_size, "show_progress_bar": False}
        return (
            model.encode(queries, role="query", instruction=instructions, **options),
            model.encode(positives, role="candidate", **options),
        )

    return embed


def _nested(budgets) -> bool:
    """Whether the budgets can be scored as Matryoshka groups in one pass (`check_groups`' rule)."""
    try:
        check_groups(budgets)
    except ValueError:
        return False
    return True


@torch.no_grad()
def sharded_retrieval_metrics(
    embed,
    dataset,
    budgets,
    batch_size: int = 16,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    show_progress_bar: bool = False,
) -> dict:
    """Recall@1 and MRR of query -> positive retrieval over a dataset's records at each budget, with this process
    encoding only its shard of the records (every process must call it: it runs collectives when there are
    several).

    Args:
        embed: `embed(records) -> (queries (n, R_q, D), positives (n, R_c, D))` for a list of records.
        dataset: indexable records (a `ContrastiveDataset`); every record's positive is a candidate.
        budgets: [(r_q, r_c), ...].
        batch_size: records per `embed` call; every process makes the same number of calls (FSDP needs it), the
            last shard being padded with repeats that are then ignored.
        max_block_bytes: bound on one block of float32 scores.

    Returns:
        {"recall@1_{r_q}x{r_c}": ..., "mrr_{r_q}x{r_c}": ...}
    """
    from transformers.utils.logging import tqdm

    budgets = [tuple(b) for b in budgets]
    num_records, processes, me = len(dataset), world_size(), process_rank()
    if num_records < 2:
        raise ValueError(f"retrieval evaluation needs at least 2 records, got {num_records}")
    shard = math.ceil(num_records / processes)
    start = me * shard
    indices = [min(i, num_records - 1) for i in range(start, start + shard)]  # padded with repeats of the last
    max_r_q, max_r_c = max(b[0] for b in budgets), max(b[1] for b in budgets)

    queries, positives = [], []
    steps = range(0, shard, batch_size)
    for offset in tqdm(steps, desc="Evaluating retrieval", disable=not show_progress_bar or me != 0):
        q, c = embed([dataset[i] for i in indices[offset : offset + batch_size]])
        compact = torch.bfloat16 if q.device.type == "cuda" else torch.float32
        queries.append(q[:, :max_r_q].to(compact))
        positives.append(c[:, :max_r_c].to(compact))
    queries, positives = torch.cat(queries), torch.cat(positives)
    device = queries.device

    passes = [budgets] if _nested(budgets) else [[b] for b in budgets]
    valid = torch.tensor([start + i < num_records for i in range(shard)], device=device)
    own_columns = torch.arange(start, start + shard, device=device)
    hits = {b: torch.zeros((), dtype=torch.float64, device=device) for b in budgets}
    reciprocal = {b: torch.zeros((), dtype=torch.float64, device=device) for b in budgets}
    step = max(1, max_block_bytes // (4 * len(budgets) * shard))  # candidates per block of (G, n, step) scores

    def blocks(candidates):
        for c0 in range(0, shard, step):
            yield c0, matryoshka_maxsim(queries, candidates[c0 : c0 + step], groups, max_block_bytes=max_block_bytes)

    for groups in passes:
        # Each positive's own score, read from the very block products that score the other candidates: the same
        # inputs, shapes and kernel give the same bits, so an exact duplicate of the positive ties with it exactly.
        target = torch.empty(len(groups), shard, device=device)
        rows = torch.arange(shard, device=device)
        for c0, block in blocks(positives):
            mine = rows[c0 : c0 + block.shape[-1]]
            target[:, mine] = block[:, mine, mine - c0]
        ahead = torch.zeros(len(groups), shard, dtype=torch.long, device=device)  # other candidates >= positive
        for source in range(processes):
            first = source * shard
            for c0, block in blocks(_candidate_shard(positives, source, me)):
                columns = torch.arange(first + c0, first + c0 + block.shape[-1], device=device)
                counted = (columns < num_records)[None, :] & (columns[None, :] != own_columns[:, None])  # [n, nc]
                at_least = (block >= target[:, :, None]) | block.isnan()
                ahead += (at_least & counted).sum(dim=-1)
        ranks = torch.where(target.isnan(), num_records, ahead + 1).double()
        for g, budget in enumerate(groups):
            hits[budget] += ((ranks[g] == 1) & valid).sum()
            reciprocal[budget] += torch.where(valid, 1.0 / ranks[g], 0.0).sum()

    totals = torch.stack([torch.stack([hits[b], reciprocal[b]]) for b in budgets])  # [B, 2]
    if processes > 1:
        dist.all_reduce(totals)
    metrics = {}
    for (r_q, r_c), (hit, rr) in zip(budgets, totals.tolist()):
        metrics[f"recall@1_{r_q}x{r_c}"] = hit / num_records
        metrics[f"mrr_{r_q}x{r_c}"] = rr / num_records
    return metrics


def _candidate_shard(local: torch.Tensor, source: int, me: int) -> torch.Tensor:
    """Process `source`'s candidate shard, sent to every process (shards have equal shapes by construction)."""
    if world_size() == 1:
        return local
    buffer = local if source == me else torch.empty_like(local)
    dist.broadcast(buffer, src=source)
    return buffer


def retrieval_metrics(model, dataset, budgets, batch_size: int = 16, show_progress_bar: bool = False) -> dict:
    """Recall@1 and MRR of query -> positive retrieval over a dataset's records, at each budget (r_q, r_c), in
    one process through `model.encode`.

    Every record's positive is a candidate; the candidate set is all positives of the dataset (duplicates count as
    distinct). Returns {"recall@1_{r_q}x{r_c}": ..., "mrr_{r_q}x{r_c}": ...}.
    """
    embed = model_encoder(model, dataset, batch_size)
    return sharded_retrieval_metrics(
        embed, dataset, budgets, batch_size=max(batch_size, 64), show_progress_bar=show_progress_bar
    )


__all__ = ["positive_ranks", "recall_and_mrr", "retrieval_metrics", "sharded_retrieval_metrics", "model_encoder"]
