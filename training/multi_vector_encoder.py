"""MetaEmbed's Matryoshka loss for sentence-transformers' `MultiVectorEncoderTrainer`.

A MetaEmbed checkpoint loads as a `MultiVectorEncoder` (its `sentence_metaembed.MetaEmbedModule`); this loss lets
sentence-transformers' own trainer train it with the paper's objective, on data sets in sentence-transformers'
column convention: (query, positive) pairs, or (query, positive, negative_1, ..., negative_n) tuples, where
each negative is its row's own hard negative (the paper's choice; `hard_negatives="shared"` shares them).
"""

import torch
from torch import nn

from .loss import MatryoshkaContrastiveLoss


def metaembed_module(encoder):
    """The MetaEmbed module of a `MultiVectorEncoder` pipeline (a checkpoint loads as a one-module pipeline)."""
    for module in encoder:
        if type(module).__name__ == "MetaEmbedModule":  # class identity differs between remote-code copies
            return module
    raise ValueError("this MultiVectorEncoder has no MetaEmbedModule: load a MetaEmbed checkpoint")


class MatryoshkaMultiVectorLoss(nn.Module):
    """sum_g w_g InfoNCE_g over the nested budgets g = (r_q, r_c) (paper Eq. 6-7), from one score pass.

    Args:
        model: the `MultiVectorEncoder` (a MetaEmbed checkpoint loaded with trust_remote_code=True).
        groups: the budgets; defaults to the checkpoint's `config.matryoshka_groups`.
        weights, temperature, hard_negatives, score_normalization: as in `MatryoshkaContrastiveLoss` (tau 0.03,
            weights 1, "own", "sum").
        gather_across_devices: in-batch negatives from every process under DDP.

    Returns a dict {"loss_<r_q>x<r_c>": w_g L_g}: sentence-transformers logs each and sums them.
    """

    def __init__(
        self,
        model,
        groups=None,
        weights=None,
        temperature: float = 0.03,
        hard_negatives: str = "own",
        score_normalization: str = "sum",
        gather_across_devices: bool = True,
    ):
        super().__init__()
        self.model = model
        config = metaembed_module(model).model.config
        self.objective = MatryoshkaContrastiveLoss(
            groups if groups is not None else config.matryoshka_groups,
            weights=weights,
            temperature=temperature,
            hard_negatives=hard_negatives,
            score_normalization=score_normalization,
            gather_across_ranks=gather_across_devices,
        )

    def forward(self, sentence_features, labels=None) -> dict:
        columns = [dict(features) for features in sentence_features]
        if len(columns) < 2:
            raise ValueError(f"got {len(columns)} column(s): the data needs (query, positive[, negatives...]) columns")
        queries = self.model(columns[0], task=columns[0].get("task", "query"))["token_embeddings"]
        candidates = [self.model(c, task=c.get("task", "document"))["token_embeddings"] for c in columns[1:]]
        positives, negative_columns = candidates[0], candidates[1:]
        negatives = owners = None
        if negative_columns:
            negatives = torch.cat(negative_columns)
            owners = torch.arange(queries.shape[0], device=queries.device).repeat(len(negative_columns))
        _, group_losses = self.objective(queries, positives, negatives, owners)
        return {
            f"loss_{name}": weight * loss for (name, loss), weight in zip(group_losses.items(), self.objective.weights)
        }

    def get_config_dict(self) -> dict:
        return {
            "groups": self.objective.groups,
            "weights": self.objective.weights,
            "temperature": self.objective.temperature,
            "hard_negatives": self.objective.hard_negatives,
            "score_normalization": self.objective.score_normalization,
        }


__all__ = ["MatryoshkaMultiVectorLoss", "metaembed_module"]
