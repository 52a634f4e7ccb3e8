"""Retrieval quality at every budget on held-out records: each query against all positives of the split."""

import torch

from .data import open_image


def _side_input(side: dict, image_root) -> dict | str:
    image = side.get("image")
    if image is not None:
        image = open_image(image, image_root)
    return {"text": side.get("text"), "image": image} if image is not None else {"text": side.get("text")}


def recall_and_mrr(scores: torch.Tensor) -> tuple:
    """(Recall@1, MRR) of a square score matrix whose diagonal holds each query's positive. A candidate tied with
    the positive does not outrank it."""
    target_scores = scores.diagonal()
    rank = (scores > target_scores[:, None]).sum(dim=1) + 1
    return (rank == 1).float().mean().item(), (1.0 / rank.float()).mean().item()


@torch.no_grad()
def retrieval_metrics(model, dataset, budgets, batch_size: int = 16, show_progress_bar: bool = False) -> dict:
    """Recall@1 and MRR of query -> positive retrieval over a dataset's records, at each budget (r_q, r_c).

    Every record's positive is a candidate; the candidate set is all positives of the dataset (duplicates count as
    distinct). Returns {"recall@1_{r_q}x{r_c}": ..., "mrr_{r_q}x{r_c}": ...}.
    """
    records = [dataset[i] for i in range(len(dataset))]
    root = getattr(dataset, "image_root", None)
    queries = [_side_input(r["query"], root) for r in records]
    positives = [_side_input(r["positive"], root) for r in records]
    instructions = [r["query"].get("instruction") for r in records]
    kwargs = {"batch_size": batch_size, "show_progress_bar": show_progress_bar}
    query_embeddings = model.encode(queries, role="query", instruction=instructions, **kwargs)
    candidate_embeddings = model.encode(positives, role="candidate", **kwargs)
    metrics = {}
    for r_q, r_c in budgets:
        scores = model.similarity(query_embeddings, candidate_embeddings, budget=(r_q, r_c))  # [N, N]
        metrics[f"recall@1_{r_q}x{r_c}"], metrics[f"mrr_{r_q}x{r_c}"] = recall_and_mrr(scores)
    return metrics


__all__ = ["recall_and_mrr", "retrieval_metrics"]
