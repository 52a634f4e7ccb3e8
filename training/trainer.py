"""`MetaEmbedTrainer`: Matryoshka multi-vector contrastive training on `transformers.Trainer`.

One forward pass per side (queries; positives + hard negatives) per step, one late-interaction pass for all
groups (`MatryoshkaContrastiveLoss`), each group's loss logged. Opt-in GradCache (`gradcache_chunk_size`) for
contrastive batches larger than memory. Runs on one CPU, one GPU, or many processes (DDP / FSDP2 through
`accelerate launch` or `torchrun`), with batches drawn from one source data set at a time.
"""

import contextlib
import os
from dataclasses import dataclass, field

import torch
from accelerate.data_loader import prepare_data_loader
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .data import ContrastiveDataset, MetaEmbedCollator, SourceBatchSampler
from .distributed import all_reduce_max
from .evaluation import sharded_retrieval_metrics
from .lora import VISION_PARTS
from .loss import HARD_NEGATIVE_SCOPES, SCORE_NORMALIZATIONS, MatryoshkaContrastiveLoss
from .similarity import check_groups, matryoshka_maxsim, paired_matryoshka_maxsim

logger = logging.get_logger(__name__)
PLACEHOLDER_MODES = ("auto", "always", "never")
# Backbones whose number of FSDP forwards per chunk depends on the data, which no padding chunk can even out.
FSDP_REFUSED_FAMILIES = {
    "mllama": "Llama-3.2-Vision (mllama) cannot train under FSDP on several processes: in a chunk that mixes rows "
    "with and without images it embeds the two kinds in two backbone forwards, in other chunks in one, so processes "
    "whose chunks mix differently fall out of step in FSDP's all-gathers (a hang or a crash). Train it with DDP "
    "(training/accelerate/ddp.yaml; the paper's LoRA recipe fits) or in one process.",
}


@dataclass
class MetaEmbedTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the MMR loss, GradCache and mixed-modality settings."""

    matryoshka_groups: list | None = field(
        default=None, metadata={"help": "Nested budgets [[r_q, r_c], ...]; default: the model config's groups."}
    )
    group_weights: list | None = field(default=None, metadata={"help": "One loss weight per group (default 1)."})
    temperature: float = field(default=0.03, metadata={"help": "InfoNCE temperature tau (paper: 0.03)."})
    hard_negatives: str = field(
        default="own", metadata={"help": "'own': a query's hard negatives score against it only (paper); 'shared'."}
    )
    score_normalization: str = field(
        default="sum",
        metadata={
            "help": "'sum': logits are MaxSim / tau (paper); 'mean': MaxSim / (r_q * tau), one range for all groups."
        },
    )
    gradcache_chunk_size: int | None = field(
        default=None, metadata={"help": "GradCache: rows per forward chunk (None: off, one forward per side)."}
    )
    placeholder_image: str = field(
        default="auto",
        metadata={
            "help": "Placeholder image for chunks without images: auto (several processes with FSDP, or with a "
            "trainable vision tower), always, never."
        },
    )
    max_negatives: int | None = field(default=None, metadata={"help": "Hard negatives kept per record (None: all)."})
    redundancy_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a penalty on how alike a candidate's vectors are (loss.vector_redundancy; 0: off)."
        },
    )
    similarity_block_mb: int = field(default=128, metadata={"help": "Bound on one block of token similarities."})
    eval_retrieval: bool = field(
        default=True, metadata={"help": "Also report recall@1 / MRR at every group on the eval set."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Records are dicts: keep every column."})

    def __post_init__(self):
        super().__post_init__()
        if self.matryoshka_groups is not None:
            self.matryoshka_groups = [list(g) for g in check_groups(self.matryoshka_groups)]
        if self.hard_negatives not in HARD_NEGATIVE_SCOPES:
            raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_SCOPES}, got {self.hard_negatives!r}")
        if self.score_normalization not in SCORE_NORMALIZATIONS:
            raise ValueError(
                f"score_normalization must be one of {SCORE_NORMALIZATIONS}, got {self.score_normalization!r}"
            )
        if self.placeholder_image not in PLACEHOLDER_MODES:
            raise ValueError(f"placeholder_image must be one of {PLACEHOLDER_MODES}, got {self.placeholder_image!r}")
        if self.gradcache_chunk_size is not None and self.gradcache_chunk_size < 1:
            raise ValueError(f"gradcache_chunk_size must be a positive integer, got {self.gradcache_chunk_size!r}")


def unwrap_metaembed(model):
    """The MetaEmbedModel inside DDP/FSDP/PEFT wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def is_fsdp(args) -> bool:
    """Whether this run shards the model with FSDP (Trainer arguments or `accelerate launch`'s environment)."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def needs_vision_on_every_rank(model, args) -> bool:
    """Whether a chunk without images must still run the vision tower: with several processes, FSDP all-gathers
    the tower's shards in its forward (every rank must join, frozen or not), and DDP waits for the gradient of
    every trainable parameter. DDP with a frozen tower (every paper recipe) needs nothing."""
    if args.world_size <= 1:
        return False
    if is_fsdp(args):
        return True
    return any(
        parameter.requires_grad and any(part in VISION_PARTS for part in name.split("."))
        for name, parameter in model.named_parameters()
    )


class RandomState:
    """CPU and current-GPU random states, captured before a chunk's forward and restored for its re-forward
    (GradCache), so dropout masks match."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def restored(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class MetaEmbedTrainer(Trainer):
    """Trains a `MetaEmbedModel` (or a PEFT model around one) with the Matryoshka multi-vector contrastive loss.

    Args:
        model: a MetaEmbedModel, possibly wrapped by PEFT (see `training.lora.apply_lora`).
        args: `MetaEmbedTrainingArguments`.
        train_dataset / eval_dataset: `ContrastiveDataset`s (see `training.data`).
        data_collator: defaults to a `MetaEmbedCollator` on the model's processor.
        loss: defaults to `MatryoshkaContrastiveLoss` built from the arguments and the model config.
    """

    def __init__(self, model=None, args: MetaEmbedTrainingArguments = None, data_collator=None, loss=None, **kwargs):
        if args is None:
            raise ValueError("MetaEmbedTrainer needs MetaEmbedTrainingArguments (output_dir at least)")
        if not isinstance(args, MetaEmbedTrainingArguments):
            raise ValueError(f"args must be MetaEmbedTrainingArguments, got {type(args).__name__}")
        metaembed = unwrap_metaembed(model)
        config = metaembed.config
        if config.vlm_config.model_type in FSDP_REFUSED_FAMILIES and is_fsdp(args) and args.world_size > 1:
            raise ValueError(FSDP_REFUSED_FAMILIES[config.vlm_config.model_type])
        groups = args.matryoshka_groups or config.matryoshka_groups
        groups = check_groups(groups, config.num_query_vectors, config.num_candidate_vectors)
        if metaembed.processor is None:
            raise ValueError("the model has no processor: load it with from_pretrained or build it with from_vlm")
        self.metaembed = metaembed
        has_vision = metaembed.processor.has_vision
        placeholder = args.placeholder_image == "always" or (
            args.placeholder_image == "auto" and has_vision and needs_vision_on_every_rank(model, args)
        )
        if placeholder and not has_vision:
            raise ValueError("placeholder_image='always' needs a vision backbone; this model is text-only")
        if data_collator is None:
            train_dataset = kwargs.get("train_dataset")
            data_collator = MetaEmbedCollator(
                metaembed.processor,
                image_root=getattr(train_dataset, "image_root", None),
                chunk_size=args.gradcache_chunk_size,
                placeholder_image=placeholder,
                max_negatives=args.max_negatives,
            )
        if loss is None:
            loss = MatryoshkaContrastiveLoss(
                groups,
                weights=args.group_weights,
                temperature=args.temperature,
                hard_negatives=args.hard_negatives,
                score_normalization=args.score_normalization,
                max_block_bytes=args.similarity_block_mb * 1024 * 1024,
                similarity=self.similarity,
                paired_similarity=self.paired_similarity,
                redundancy_weight=args.redundancy_weight,
            )
        self.loss_fn = loss
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self.loss_is_scaled_for_ga = False  # the loss is a per-batch mean: the Trainer divides it for accumulation
        self._group_sums, self._group_steps = {}, 0
        self._eval_group_sums, self._eval_group_steps = {}, 0
        self._check_batch_fits(self.train_dataset, "train")

    # ---------------------------------------------------------------------------------------------- similarity
    def similarity(self, queries: torch.Tensor, candidates: torch.Tensor, groups=None) -> torch.Tensor:
        """Matryoshka MaxSim scores of every query against every candidate at every group: the scores the loss
        trains on. Override it to plug in another late-interaction kernel; the loss calls it once per step.

        Args:
            queries: (Nq, R_q, D) query embeddings (on the accelerator during training).
            candidates: (Nc, R_c, D) candidate embeddings: the (gathered) positives, then shared hard negatives.
            groups: nested budgets [(r_q, r_c), ...]; default: the loss's groups.

        Returns:
            (G, Nq, Nc) float32 scores, differentiable with respect to both inputs. The default kernel runs on the
            inputs' device, bf16 GEMMs with fp32 accumulation on a GPU, in blocks of at most
            `similarity_block_mb` (its backward recomputes each block instead of storing it).
        """
        return matryoshka_maxsim(
            queries,
            candidates,
            groups if groups is not None else self.loss_fn.groups,
            max_block_bytes=self.args.similarity_block_mb * 1024 * 1024,
        )

    def paired_similarity(self, queries, candidates, owners, groups=None) -> torch.Tensor:
        """(G, K) scores of each hard negative (candidates[k]) against its own query (queries[owners[k]]) at
        every group, with hard_negatives="own". Override it together with `similarity`."""
        return paired_matryoshka_maxsim(
            queries, candidates, owners, groups if groups is not None else self.loss_fn.groups
        )

    def _check_batch_fits(self, dataset, what: str) -> None:
        if dataset is None:
            return
        if len(dataset) < self.args.world_size:
            raise ValueError(
                f"the {what} data holds {len(dataset)} records, fewer than the {self.args.world_size} processes: "
                "every process needs at least one record per batch"
            )

    # ---------------------------------------------------------------------------------------------------- data
    def get_train_dataloader(self):
        dataset = self.train_dataset
        if not isinstance(dataset, ContrastiveDataset):
            return super().get_train_dataloader()
        sampler = SourceBatchSampler(
            dataset.sources,
            batch_size=self._train_batch_size,
            world_size=self.args.world_size,
            rank=self.args.process_index,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            drop_last=self.args.dataloader_drop_last,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
        )
        # The sampler already gives this process its share of one global batch, so accelerate is told of one
        # process: nothing is re-sharded, and a share shorter than the per-device batch (a source's short last
        # batch, split unevenly) is passed on, neither dropped nor padded on that process alone. Not listed in the
        # accelerator's loaders, which only its save_state / load_state read; the Trainer calls neither.
        return prepare_data_loader(
            loader,
            self.accelerator.device,
            num_processes=1,
            process_index=0,
            put_on_device=self.accelerator.device_placement,
            rng_types=list(self.accelerator.rng_types),
            dispatch_batches=False,
            non_blocking=self.accelerator.non_blocking,
            use_stateful_dataloader=self.accelerator.use_stateful_dataloader,
        )

    # ---------------------------------------------------------------------------------------------------- loss
    def _embed_chunk(self, model, chunk: dict, role: str) -> torch.Tensor:
        """Embeddings [rows, R, D] of one processed chunk; a placeholder row runs but only adds 0 * its output,
        which keeps the vision tower in the graph (its collectives and gradient hooks run on every process)."""
        embeddings = model(**chunk["inputs"], role=role).embeddings
        placeholders = int(chunk.get("num_placeholders", 0))
        if placeholders:
            real, extra = embeddings[:-placeholders], embeddings[-placeholders:]
            embeddings = real + 0.0 * extra.sum()
        return embeddings

    def _embed_side(self, model, chunks: list, role: str) -> torch.Tensor:
        return torch.cat([self._embed_chunk(model, chunk, role) for chunk in chunks])

    def _same_chunk_counts(self, inputs: dict) -> dict:
        """`inputs` with each side's chunks padded to the largest count any process has in this step.

        Every chunk is one forward of the sharded model (under FSDP an all-gather per unit; GradCache also re-runs
        it with a backward), so a process with fewer chunks (a short last batch, fewer hard negatives) would leave
        the others waiting in a collective it never joins. A padding chunk re-runs the process's last chunk of that
        side with every row a placeholder: the same modules run (the vision tower too when that chunk holds an
        image, real or placeholder), and its embeddings, [0, R, D], add nothing to the loss or the gradients."""
        sides = ("queries", "candidates")
        targets = all_reduce_max([len(inputs[side]) for side in sides], self.args.device)
        padded = dict(inputs)
        for side, target in zip(sides, targets):
            last = inputs[side][-1]
            padding = {"inputs": last["inputs"], "num_placeholders": len(last["inputs"]["input_ids"])}
            padded[side] = list(inputs[side]) + [padding] * (target - len(inputs[side]))
        return padded

    def _loss_from_embeddings(self, queries, candidates, owners):
        num_positives = queries.shape[0]
        return self.loss_fn(queries, candidates[:num_positives], candidates[num_positives:], owners)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self._same_chunk_counts(inputs)
        queries = self._embed_side(model, inputs["queries"], "query")
        candidates = self._embed_side(model, inputs["candidates"], "candidate")
        loss, per_group = self._loss_from_embeddings(queries, candidates, inputs["negative_owners"])
        self._record_groups(per_group)
        if return_outputs:
            return loss, {"query_embeddings": queries, "candidate_embeddings": candidates}
        return loss

    def _record_groups(self, per_group: dict) -> None:
        sums = self._group_sums if self.model.training else self._eval_group_sums
        for name, value in per_group.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        if self.model.training:
            self._group_steps += 1
        else:
            self._eval_group_steps += 1

    # ------------------------------------------------------------------------------------------------ GradCache
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.gradcache_chunk_size is None:
            return super().training_step(model, inputs, num_items_in_batch)
        return self._gradcache_step(model, inputs)

    def _gradcache_step(self, model, inputs) -> torch.Tensor:
        """GradCache (Gao et al. 2021): embed every chunk without a graph, take the loss's gradient with respect to
        the embeddings, then re-run each chunk with the same random state and push that gradient through it."""
        model.train()
        inputs = self._same_chunk_counts(self._prepare_inputs(inputs))
        device = self.args.device
        plan = [(chunk, "query") for chunk in inputs["queries"]] + [
            (chunk, "candidate") for chunk in inputs["candidates"]
        ]
        states, parts = [], []
        with torch.no_grad(), self.compute_loss_context_manager():
            for chunk, role in plan:
                states.append(RandomState(device))
                parts.append(self._embed_chunk(model, chunk, role))
        cached = [p.detach().requires_grad_() for p in parts]
        queries = torch.cat([p for p, (_, role) in zip(cached, plan) if role == "query"])
        candidates = torch.cat([p for p, (_, role) in zip(cached, plan) if role == "candidate"])
        loss, per_group = self._loss_from_embeddings(queries, candidates, inputs["negative_owners"])
        self._record_groups(per_group)
        loss = loss / self.current_gradient_accumulation_steps
        loss.backward()  # gradients of the cached embeddings only: no model parameter is in this graph

        # Reduce gradients once, on the last chunk: accelerate's no_sync is DDP's no_sync, and FSDP2's
        # set_requires_gradient_sync(False) (no reduce-scatter until the last chunk's backward).
        for index, ((chunk, role), state, part) in enumerate(zip(plan, states, cached)):
            last = index == len(plan) - 1
            sync_context = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync_context, state.restored():
                with self.compute_loss_context_manager():
                    embeddings = self._embed_chunk(model, chunk, role)
                    surrogate = (embeddings * part.grad).sum()
                self.accelerator.backward(surrogate)
        return loss.detach()

    # ----------------------------------------------------------------------------------------------- evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_group_sums, self._eval_group_steps = {}, 0
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=True,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        metrics = dict(output.metrics)
        for name, total in self._eval_group_sums.items():
            metrics[f"{metric_key_prefix}_loss_{name}"] = total / max(1, self._eval_group_steps)
        if self.args.eval_retrieval and isinstance(dataloader.dataset, ContrastiveDataset):
            metrics.update(
                {f"{metric_key_prefix}_{k}": v for k, v in self.retrieval_metrics(dataloader.dataset).items()}
            )
        return output._replace(metrics=metrics)

    def retrieval_metrics(self, dataset) -> dict:
        """Recall@1 and MRR at every group over `dataset`, each process encoding its shard through the trained
        (wrapped) model and the training collator (placeholder images included), then scoring against every
        shard in bounded blocks (`training.evaluation.sharded_retrieval_metrics`)."""
        model = self.model
        was_training = model.training
        model.eval()

        def embed(records):
            records = [{key: value for key, value in r.items() if key != "negatives"} for r in records]
            inputs = self._prepare_inputs(self.data_collator(records))
            with self.compute_loss_context_manager():
                return self._embed_side(model, inputs["queries"], "query"), self._embed_side(
                    model, inputs["candidates"], "candidate"
                )

        try:
            return sharded_retrieval_metrics(
                embed,
                dataset,
                self.loss_fn.groups,
                batch_size=self.args.eval_batch_size,
                max_block_bytes=self.args.similarity_block_mb * 1024 * 1024,
            )
        finally:
            model.train(was_training)

    def log(self, logs: dict, start_time=None) -> None:
        if self._group_steps and "loss" in logs:  # a training log: add each group's mean loss since the last one
            for name, total in self._group_sums.items():
                logs[f"loss_{name}"] = round(total / self._group_steps, 6)
            self._group_sums, self._group_steps = {}, 0
        super().log(logs, start_time)


__all__ = ["MetaEmbedTrainer", "MetaEmbedTrainingArguments", "unwrap_metaembed"]
