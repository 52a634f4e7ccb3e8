"""MetaEmbed training: the Matryoshka multi-vector contrastive loss on transformers.Trainer (see README, Training).

- `trainer`: `MetaEmbedTrainer` and its arguments; `loss`: the MMR loss; `similarity`: MaxSim at every Matryoshka
  group from one pass; `distributed`: the collectives it needs.
- `data`: the record format, loaders, the collator and the one-source batch sampler; `synthetic`: a small task for
  tests; `reasoning`: Think-Then-Embed traces for records.
- `evaluation`: retrieval quality at every budget; `lora`: LoRA through PEFT; `multi_vector_encoder`: the loss for
  sentence-transformers' trainer.
- `train`: the entry point (`python -m metaembed_training.train`); `building`: the model and data a recipe names; `dry_run`:
  a recipe's steps and memory, offline; `export`: the final export of a run.

Depends on the model package (`modeling_metaembed`); the model package never imports this one, so checkpoints
stay free of training code.
"""

from .data import (
    ContrastiveDataset,
    MetaEmbedCollator,
    RecordError,
    SourceBatchSampler,
    load_colpali_train,
    load_jsonl,
    load_mmeb_train,
    split_holdout,
)
from .evaluation import retrieval_metrics
from .lora import apply_lora, save_adapter, save_merged
from .loss import MatryoshkaContrastiveLoss
from .multi_vector_encoder import MatryoshkaMultiVectorLoss
from .similarity import matryoshka_maxsim
from .trainer import MetaEmbedTrainer, MetaEmbedTrainingArguments

__all__ = [
    "ContrastiveDataset",
    "MetaEmbedCollator",
    "RecordError",
    "SourceBatchSampler",
    "load_colpali_train",
    "load_jsonl",
    "load_mmeb_train",
    "split_holdout",
    "retrieval_metrics",
    "apply_lora",
    "save_adapter",
    "save_merged",
    "MatryoshkaContrastiveLoss",
    "MatryoshkaMultiVectorLoss",
    "matryoshka_maxsim",
    "MetaEmbedTrainer",
    "MetaEmbedTrainingArguments",
]
