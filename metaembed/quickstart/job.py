"""The main job: a real MetaEmbed trained and evaluated on a 2-core CPU in minutes, with no Hub.

1. backbone: LiteVL from packaged pretrained weights (`backbones`: all-MiniLM-L6-v2, ImageNet EfficientNet-Lite0);
2. model: `MetaEmbedModel.from_vlm` adds the meta tokens (R_q = 4, R_c = 16 here);
3. data (`task`): "pages" (default): query -> page retrieval, each page a grid of several Twemoji, each query the
   name of one or two of its items or the picture of one (`pages`); "emoji": single Twemoji <-> its name, both
   directions (`twemoji`). A fixed hash split of the emoji holds out test concepts that training never sees;
4. training: `MetaEmbedTrainer` with the MMR loss. The ImageNet tower is frozen, so each image goes through it
   once (`frozen_features.memoized_tower`), the new projector starts from a closed-form map of the tower's
   features to the text encoder's word embeddings (`warm_start_projector`), and the new meta-token rows learn at
   their own rate;
5. evaluation (`evaluation`): Recall@1 and MRR at every budget over the held-out split; ties count against the
   positive;
6. a Hub-ready checkpoint with its model card, results file and quality-versus-budget plot (`report`).

`run_quickstart(QuickstartSettings(...))` returns every number it prints; examples/quickstart.py is its command
line and examples/reproduce_claims.py runs it over seeds and ablations.
"""

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from metaembed_model_cards.card import PLOT_NAME, RESULTS_NAME, write_model_card
from metaembed_model_cards.results import save_results
from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.hub_metaembed import write_atomic

from .backbones import build_litevl
from .evaluation import evaluate
from .frozen_features import memoized_tower, ridge_map, set_mlp_to_linear_map
from .pages import PageLayout, render_page, training_records
from .report import results_benchmarks, scoring_time
from .settings import QuickstartSettings
from .twemoji import DIRECTIONS, retrieval_records, split_pairs, twemoji_pairs

RANKS_NAME = "ranks.json"  # pages task: each held-out query's rank of its page, per kind and budget


def load_data(settings: QuickstartSettings) -> tuple:
    train, test = split_pairs(twemoji_pairs())
    return train[: settings.train_pairs], test[: settings.test_pairs]


def build_model(settings: QuickstartSettings, work_dir: Path) -> MetaEmbedModel:
    backbone = build_litevl(work_dir / "backbone", image_size=settings.image_size, seed=settings.seed)
    groups = None if settings.mmr else [[settings.num_query_vectors, settings.num_candidate_vectors]]
    model = MetaEmbedModel.from_vlm(
        backbone,
        num_query_vectors=settings.num_query_vectors,
        num_candidate_vectors=settings.num_candidate_vectors,
        matryoshka_groups=groups,
        pooling=settings.pooling,
        query_layout=settings.query_layout,
        meta_positions=settings.meta_positions,
        meta_regions=settings.meta_regions,
        seed=settings.seed,
        attn_implementation="sdpa",
    )
    if settings.freeze_vision:
        model.vlm.vision_tower.requires_grad_(False)
    return model


def train(model, train_pairs: list, settings: QuickstartSettings, work_dir: Path) -> float:
    """Train in place on both directions; returns the wall time in seconds."""
    from metaembed_training import ContrastiveDataset, MetaEmbedTrainer, MetaEmbedTrainingArguments

    if settings.task == "pages":
        records = training_records(train_pairs, settings.layout, settings.train_rounds, settings.seed)
    else:
        records = [r for direction in DIRECTIONS for r in retrieval_records(train_pairs, direction)]
    args = MetaEmbedTrainingArguments(
        output_dir=str(work_dir / "trainer"),
        per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a fraction of the steps
        lr_scheduler_type="cosine",
        temperature=settings.temperature,
        score_normalization=settings.score_normalization,
        redundancy_weight=settings.redundancy_weight,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not settings.show_progress_bar,
        dataloader_num_workers=0,
        bf16=settings.bf16,
    )
    # The new image projector learns at its own, higher rate.
    projector = [p for p in model.vlm.projector.parameters() if p.requires_grad]
    own_rate_ids = {id(p) for p in projector}
    groups, hooks = [{"params": projector, "lr": settings.projector_learning_rate}], []
    if settings.meta_learning_rate is not None:
        embeddings = model.vlm.get_input_embeddings().weight
        groups.append({"params": [embeddings], "lr": settings.meta_learning_rate, "weight_decay": 0.0})
        own_rate_ids.add(id(embeddings))
        meta_rows = torch.zeros(embeddings.shape[0], 1, dtype=embeddings.dtype, device=embeddings.device)
        meta_rows[model.config.query_meta_token_ids + model.config.candidate_meta_token_ids] = 1
        hooks.append(embeddings.register_hook(lambda grad: grad * meta_rows))  # only the meta rows learn
    if settings.attention_learning_rate is not None:  # where every token looks: the attention's queries and keys
        attention = [
            p
            for name, p in model.vlm.language_model.named_parameters()
            if p.requires_grad and (".attention.self.query." in name or ".attention.self.key." in name)
        ]
        if not attention:
            raise ValueError("attention_learning_rate: no attention query/key projections found in the text encoder")
        groups.append({"params": attention, "lr": settings.attention_learning_rate})
        own_rate_ids.update(id(p) for p in attention)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own_rate_ids]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": settings.learning_rate}, *groups], weight_decay=0.01)
    # the Trainer adds its warmup-and-cosine schedule to every group
    trainer = MetaEmbedTrainer(
        model=model, args=args, train_dataset=ContrastiveDataset(records), optimizers=(optimizer, None)
    )
    start = time.perf_counter()
    # A frozen tower gives each image the same output every time: compute it once per image.
    with memoized_tower(model) if settings.freeze_vision else contextlib.nullcontext():
        trainer.train()
    for hook in hooks:  # the model leaves training as a plain model: later training updates every row again
        hook.remove()
    return time.perf_counter() - start


@torch.no_grad()
def warm_start_projector(model, train_pairs: list, settings: QuickstartSettings, penalty: float = 1e3) -> float:
    """Start the new projector from a closed-form map instead of noise: ridge regression from the frozen tower's
    features of each training emoji's tokens (the emoji alone, at the size it has on a page) to the mean input
    embedding of its name's word pieces, set exactly into the projector (`set_mlp_to_linear_map`). An image
    token then enters the text encoder near the words that name it. From a random projector this model sat at
    the uniform loss for its whole run (docs/measurements/quickstart.md). Returns the R^2 of the map on its training data."""
    from modeling_metaembed.processing_litevl import LiteVLImageProcessor
    from modeling_metaembed.processing_metaembed import load_image

    if settings.task == "pages":  # the emoji alone on a page of one cell: its size and place on a real page
        size = settings.image_size // settings.page_grid
        alone = PageLayout(page_size=size, grid=1, margin=settings.layout.margin)
        open_emoji = lambda pair: render_page([pair["image"]], alone)  # noqa: E731
    else:  # the image as training opens it
        size = settings.image_size
        open_emoji = lambda pair: load_image(pair["image"], 0, 10**7)  # noqa: E731
    images = LiteVLImageProcessor(size)
    tower, embeddings = model.vlm.vision_tower, model.vlm.get_input_embeddings().weight.float()
    tokenizer = getattr(model.processor.processor, "tokenizer", model.processor.processor)
    features, targets = [], []
    for start in range(0, len(train_pairs), 64):
        batch = train_pairs[start : start + 64]
        pixels = images([open_emoji(p) for p in batch])["pixel_values"]
        grid = tower(pixels.to(model.vlm.projector[0].weight.dtype)).float()  # [n, C, t, t]
        tokens = grid.flatten(2).transpose(1, 2)  # [n, t*t, C]
        word_pieces = [tokenizer(p["caption"], add_special_tokens=False)["input_ids"] for p in batch]
        names = torch.stack([embeddings[ids].mean(0) for ids in word_pieces])
        features.append(tokens.reshape(-1, tokens.shape[-1]))
        targets.append(names.repeat_interleave(tokens.shape[1], dim=0))
    features, targets = torch.cat(features), torch.cat(targets)
    weight, mean, std, target_mean = ridge_map(features, targets, penalty)
    set_mlp_to_linear_map(model.vlm.projector, weight, mean, std, target_mean)
    predicted = model.vlm.projector(features.to(model.vlm.projector[0].weight.dtype)).float()
    return float(1 - ((predicted - targets) ** 2).sum() / ((targets - target_mean) ** 2).sum())


def run_quickstart(settings: QuickstartSettings, command: str | None = None, log=print) -> dict:
    """Build, train, evaluate and (optionally) save; returns settings, sizes, timings and quality per budget."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    train_pairs, test_pairs = load_data(settings)
    if settings.task == "pages":
        log(
            f"data: pages of {settings.page_grid}x{settings.page_grid} Twemoji at {settings.image_size} px; "
            f"{settings.train_rounds} rounds of {len(train_pairs)} training emoji, {settings.test_rounds} rounds of "
            f"{len(test_pairs)} held-out emoji"
        )
    else:
        log(f"data: {len(train_pairs)} training pairs, {len(test_pairs)} held-out test pairs (Twemoji)")
    with tempfile.TemporaryDirectory(dir=output, prefix=".work-") as work:
        work_dir = Path(work)
        model = build_model(settings, work_dir)
        log(
            f"model: MetaEmbed over LiteVL (MiniLM-L6 + EfficientNet-Lite0), pooling={settings.pooling}, "
            f"R_q={model.config.num_query_vectors}, R_c={model.config.num_candidate_vectors}, "
            f"MMR groups {model.config.matryoshka_groups}"
        )
        fit = None
        if settings.projector_init == "closed_form":
            fit = warm_start_projector(model, train_pairs, settings)
            log(f"projector: closed-form start, R^2 = {fit:.3f} on the training emoji's tokens")
        train_seconds = train(model, train_pairs, settings, work_dir)
        model.eval()
        ranks = {}
        quality = evaluate(model, test_pairs, settings, ranks_out=ranks)
        timing = scoring_time(model, 64, 10_000, settings.budgets)
        summary = {
            "settings": asdict(settings),
            "train_pairs": len(train_pairs),
            "test_pairs": len(test_pairs),
            "projector_fit_r2": fit,
            "train_seconds": train_seconds,
            "quality": quality,
            "seconds_per_query_10k": timing,
            "dim": model.config.output_dim,
        }
        if settings.save_checkpoint:
            checkpoint = output / "checkpoint"
            if checkpoint.exists():
                shutil.rmtree(checkpoint)
            model.save_pretrained(checkpoint)
            save_results(checkpoint / RESULTS_NAME, results_benchmarks(summary), command=command)
            name = "pages" if settings.task == "pages" else "twemoji"
            write_model_card(
                checkpoint,
                model_name=f"MetaEmbed LiteVL Twemoji {name} (quickstart)",
                repo_id=f"org/metaembed-litevl-{name}",
                license="apache-2.0",
                base_model=None,
            )
            shutil.copyfile(checkpoint / PLOT_NAME, output / PLOT_NAME)
            summary["checkpoint"] = str(checkpoint)
    summary["total_seconds"] = time.perf_counter() - started
    if ranks:  # each query's rank per budget: what paired comparisons of two budgets need (tests/test_quickstart.py)
        write_atomic(output / RANKS_NAME, json.dumps(ranks) + "\n")
    write_atomic(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["run_quickstart", "build_model", "load_data", "train", "warm_start_projector", "RANKS_NAME"]
