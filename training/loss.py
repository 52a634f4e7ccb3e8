"""Matryoshka Multi-Vector Retrieval (MMR) loss: an InfoNCE per nested budget, all from one score pass.

Paper Eq. 6-7: for each group g = (r_q, r_c),

    L_g = -1/B sum_u log( exp(S_g(u,u)/tau) / (sum_v exp(S_g(u,v)/tau) + sum_{n in neg(u)} exp(S_g(u,n)/tau)) )

where v runs over every positive of the (global) batch and neg(u) are query u's own hard negatives; the loss
is sum_g w_g L_g. Every group is a prefix slice of one late-interaction pass (`matryoshka_maxsim`).

Many processes: queries stay on their rank; positives (and, with `hard_negatives="shared"`, the hard negatives)
are gathered from every rank with gradients. Gradient convention: each rank returns its queries' summed losses
times world_size / B_global. Data-parallel training averages gradients over ranks, so the update is exactly the
gradient of the mean loss over the global batch, as one process would compute it on the concatenated batch
(ranks may hold unequal numbers of queries). The value a rank returns is its share of that mean times world_size;
the mean of the ranks' values is the global loss (what the Trainer logs).
"""

import torch
from torch import nn

from .distributed import all_reduce_sum, gather_rows_with_grad, rank, world_size
from .similarity import DEFAULT_MAX_BLOCK_BYTES, check_groups, matryoshka_maxsim, paired_matryoshka_maxsim

HARD_NEGATIVE_SCOPES = ("own", "shared")
SCORE_NORMALIZATIONS = ("sum", "mean")


def group_name(group) -> str:
    return f"{group[0]}x{group[1]}"


def vector_redundancy(embeddings: torch.Tensor) -> torch.Tensor:
    """How alike the R vectors of one input are in what they say about that input: each vector k's mean over the
    batch is removed (a constant offset per k carries nothing about any one input), then the mean cosine between
    different vectors of the same input, averaged over the batch. 1: every vector holds the same input-specific
    content (R copies of one vector); about 0: unrelated. `embeddings` [B, R, D], B >= 2 and R >= 2."""
    batch, vectors = embeddings.shape[0], embeddings.shape[1]
    if batch < 2 or vectors < 2:
        return embeddings.sum() * 0.0
    unit = nn.functional.normalize(embeddings.float(), dim=-1)
    specific = nn.functional.normalize(unit - unit.mean(dim=0, keepdim=True), dim=-1)  # [B, R, D]
    gram = specific @ specific.transpose(1, 2)  # [B, R, R]
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=-1)
    return (off_diagonal / (vectors * (vectors - 1))).mean()


class MatryoshkaContrastiveLoss(nn.Module):
    """InfoNCE at every Matryoshka group, weighted and summed.

    Args:
        groups: nested budgets [(r_q, r_c), ...] (e.g. `config.matryoshka_groups`).
        weights: one weight per group (default 1 each: the paper's plain sum).
        temperature: tau of the softmax (paper: 0.03).
        score_normalization: "sum" (paper): a group's logits are its MaxSim scores (a sum over r_q query vectors)
            over tau, so their range grows with r_q; "mean": each group's scores are divided by its r_q first,
            so every group has the same logit range (1/tau). From a backbone whose fresh meta-token vectors are
            nearly alike across inputs, the "sum" logits of large groups start far too sharp, and a small model
            can collapse to the uniform loss log(B) (measured on the quickstart; see README). Rankings at
            inference are the same either way.
        hard_negatives: "own" (paper): a query's hard negatives are extra columns of its own row only;
            "shared": every hard negative of the global batch is a negative for every query.
        gather_across_ranks: gather candidates from every rank (in-batch negatives across GPUs).
        compute_dtype / max_block_bytes: see `matryoshka_maxsim` (used when `similarity` is not given).
        similarity: `(queries, candidates, groups) -> (G, Nq, Nc)` scores of every query against every candidate
            at every group (default: `matryoshka_maxsim`); `MetaEmbedTrainer` passes its `similarity` method.
        paired_similarity: `(queries, candidates, owners, groups) -> (G, K)` scores of each hard negative against
            its own query (default: `paired_matryoshka_maxsim`).
        redundancy_weight: adds this weight times `vector_redundancy` of this process's candidates (positives and
            hard negatives) to the loss (default 0: the paper's loss): a push for a candidate's vectors to hold
            different parts of it, where training leaves them near-copies (docs/measurements/quickstart.md).

    Inputs (forward):
        queries (B, R_q, D), positives (B, R_c, D): row u of positives is query u's positive.
        negatives (K, R_c, D) and negative_owners (K,): hard negatives and the local query each belongs to.

    Returns:
        (loss, {"r_qxr_c": L_g}) where loss = sum_g w_g L_g; the unweighted group losses keep their graph.
    """

    def __init__(
        self,
        groups,
        weights=None,
        temperature: float = 0.03,
        hard_negatives: str = "own",
        score_normalization: str = "sum",
        gather_across_ranks: bool = True,
        compute_dtype: torch.dtype | None = None,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
        similarity=None,
        paired_similarity=None,
        redundancy_weight: float = 0.0,
    ):
        super().__init__()
        if not isinstance(redundancy_weight, (int, float)) or redundancy_weight < 0:
            raise ValueError(f"redundancy_weight must be a non-negative number, got {redundancy_weight!r}")
        self.redundancy_weight = float(redundancy_weight)
        self.groups = check_groups(groups)
        if weights is None:
            weights = [1.0] * len(self.groups)
        if len(weights) != len(self.groups) or any(not isinstance(w, (int, float)) or w < 0 for w in weights):
            raise ValueError(
                f"group weights must be {len(self.groups)} non-negative numbers (one per group), got {weights!r}"
            )
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if hard_negatives not in HARD_NEGATIVE_SCOPES:
            raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_SCOPES}, got {hard_negatives!r}")
        if score_normalization not in SCORE_NORMALIZATIONS:
            raise ValueError(f"score_normalization must be one of {SCORE_NORMALIZATIONS}, got {score_normalization!r}")
        self.weights = [float(w) for w in weights]
        self.score_normalization = score_normalization
        self.temperature = float(temperature)
        self.hard_negatives = hard_negatives
        self.gather_across_ranks = gather_across_ranks
        self.compute_dtype = compute_dtype
        self.max_block_bytes = max_block_bytes
        self.similarity = similarity or self._default_similarity
        self.paired_similarity = paired_similarity or paired_matryoshka_maxsim

    def _default_similarity(self, queries, candidates, groups):
        return matryoshka_maxsim(
            queries, candidates, groups, compute_dtype=self.compute_dtype, max_block_bytes=self.max_block_bytes
        )

    def forward(self, queries, positives, negatives=None, negative_owners=None):
        num_queries = queries.shape[0]
        if num_queries == 0:
            raise ValueError(f"rank {rank()} received an empty batch: every rank needs at least one query")
        if positives.shape[0] != num_queries:
            raise ValueError(f"got {num_queries} queries but {positives.shape[0]} positives: one positive per query")
        has_negatives = negatives is not None and negatives.shape[0] > 0
        if has_negatives and (negative_owners is None or negative_owners.shape[0] != negatives.shape[0]):
            raise ValueError("negative_owners must give, for each hard negative, the index of its query")

        distributed = self.gather_across_ranks and world_size() > 1
        if distributed:
            candidates, counts = gather_rows_with_grad(positives)
            offset = sum(counts[: rank()])
        else:
            candidates, offset = positives, 0
        if self.hard_negatives == "shared" and distributed:
            # Every rank enters this gather, with or without negatives of its own: a rank that skipped it would
            # leave the others waiting in a collective it never joins. An empty slice of the positives keeps a
            # negative-less rank in the autograd graph, so it also joins the gather's backward.
            local = negatives if has_negatives else positives[:0]
            candidates = torch.cat([candidates, gather_rows_with_grad(local)[0]])
        elif self.hard_negatives == "shared" and has_negatives:
            candidates = torch.cat([candidates, negatives])

        # [G, B, N]: every local query against every in-batch candidate, all groups from one pass.
        scores = self.similarity(queries, candidates, self.groups)
        if has_negatives and self.hard_negatives == "own":
            scores = torch.cat([scores, self._own_negative_scores(queries, negatives, negative_owners)], dim=-1)

        targets = torch.arange(offset, offset + num_queries, device=queries.device)
        global_queries = all_reduce_sum(num_queries, queries.device) if distributed else num_queries
        scale = (world_size() if distributed else 1) / global_queries
        total, per_group = 0.0, {}
        for g, group in enumerate(self.groups):
            divisor = self.temperature * (group[0] if self.score_normalization == "mean" else 1)
            loss_g = nn.functional.cross_entropy(scores[g] / divisor, targets, reduction="sum") * scale
            per_group[group_name(group)] = loss_g
            total = total + self.weights[g] * loss_g
        if self.redundancy_weight:
            local = torch.cat([positives, negatives]) if has_negatives else positives
            redundancy = vector_redundancy(local)
            per_group["redundancy"] = redundancy
            total = total + self.redundancy_weight * redundancy
        return total, per_group

    def _own_negative_scores(self, queries, negatives, owners) -> torch.Tensor:
        """[G, B, K_max] scores of each query against its own hard negatives, -inf where a query has fewer."""
        owners = owners.to(queries.device)
        if int(owners.min()) < 0 or int(owners.max()) >= queries.shape[0]:
            raise ValueError(f"negative_owners must index the {queries.shape[0]} queries of this batch")
        paired = self.paired_similarity(queries, negatives, owners, self.groups)  # [G, K]
        counts = torch.bincount(owners, minlength=queries.shape[0])
        # Slot of each negative among its owner's: position in a stable sort by owner minus the owner's start.
        order = torch.sort(owners, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        slots = torch.empty_like(owners)
        slots[order] = torch.arange(owners.shape[0], device=owners.device) - starts[owners[order]]
        padded = paired.new_full((len(self.groups), queries.shape[0], int(counts.max())), float("-inf"))
        padded[:, owners, slots] = paired
        return padded


__all__ = ["MatryoshkaContrastiveLoss", "vector_redundancy", "group_name", "HARD_NEGATIVE_SCOPES"]
