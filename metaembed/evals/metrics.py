"""The benchmarks' metrics: Precision@1 over a candidate set (MMEB) and NDCG@k over graded relevance (ViDoRe)."""

import math

import torch

from metaembed_training.evaluation import positive_ranks


def precision_at_1(scores: torch.Tensor, positive_alike: torch.Tensor | None = None) -> torch.Tensor:
    """Hits of each query whose positive (column 0 of `scores` [Q, C]) scores strictly above every other candidate.

    `positive_alike` [Q, C] (bool) marks candidates identical to the positive (a data set may repeat it among the
    candidates); they are not competitors. A candidate tied with the positive beats it: a model that scores
    everything alike gets no hits, instead of all of them."""
    if scores.dim() != 2 or scores.shape[1] < 1:
        shape = tuple(scores.shape)
        raise ValueError(f"scores must be (queries, candidates) with the positive in column 0, got {shape}")
    if positive_alike is not None:
        alike = positive_alike.clone()
        alike[:, 0] = False
        scores = scores.masked_fill(alike, float("-inf"))
    columns = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return positive_ranks(scores, columns) == 1  # the project's one definition of rank (ties are misses)


def ndcg_at_k(ranking: list, relevance: dict, k: int) -> float:
    """NDCG@k of one ranked list of document ids against `relevance` {doc_id: grade} (grades > 0 are relevant),
    with linear gains and log2 discounts, as trec_eval's ndcg_cut (the metric mteb and ViDoRe report)."""
    gains = [relevance.get(doc, 0) for doc in ranking[:k]]
    dcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains) if gain > 0)
    ideal = sorted((grade for grade in relevance.values() if grade > 0), reverse=True)[:k]
    idcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: list, relevance: dict, k: int) -> float:
    """Share of the relevant documents (grade > 0) found in the top k."""
    relevant = {doc for doc, grade in relevance.items() if grade > 0}
    return len(relevant & set(ranking[:k])) / len(relevant) if relevant else 0.0


__all__ = ["precision_at_1", "ndcg_at_k", "recall_at_k"]
