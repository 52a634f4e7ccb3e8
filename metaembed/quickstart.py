"""The offline quickstart: a real MetaEmbed trained and evaluated on a 2-core CPU in minutes, with no Hub.

1. backbone: LiteVL from packaged pretrained weights (all-MiniLM-L6-v2 text encoder, ImageNet EfficientNet-Lite0);
2. model: `MetaEmbedModel.from_vlm` adds the meta tokens (R_q = 4, R_c = 16 here);
3. data (`task`): "pages" (default): query -> page retrieval, each page a grid of several Twemoji, each query the
   name of one or two of its items or the picture of one (`metaembed.pages`); "emoji": single Twemoji <-> its
   name, both directions.
   A fixed hash split of the emoji holds out test concepts that training never sees;
4. training: `MetaEmbedTrainer` with the MMR loss. The ImageNet tower is frozen, so each image goes through it
   once (`metaembed.frozen_features.memoized_tower`), the new projector starts from a closed-form map of the
   tower's features to the text encoder's word embeddings (`warm_start_projector`), and the new meta-token rows
   learn at their own rate;
5. evaluation: Recall@1 and MRR at every budget over the held-out split; ties count against the positive;
6. a Hub-ready checkpoint with its model card, results file and quality-versus-budget plot.

`run_quickstart(QuickstartSettings(...))` returns every number it prints; examples/quickstart.py is its command
line and examples/reproduce_claims.py runs it over seeds and ablations.
"""

import contextlib
import io
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model_cards.card import PLOT_NAME, RESULTS_NAME, write_model_card
from model_cards.results import budget_key, save_results
from modeling_metaembed import MetaEmbedModel
from modeling_metaembed.processing_metaembed import write_atomic

from .backbones import build_litevl
from .frozen_features import memoized_tower, ridge_map, set_mlp_to_linear_map
from .pages import QUERY_KINDS, PageLayout, evaluation_set, render_page, training_records
from .twemoji import ATTRIBUTION, DIRECTIONS, retrieval_records, split_pairs, twemoji_pairs

METRIC_NAMES = {"recall@1": ("recall_at_1", "Recall@1"), "mrr": ("mrr", "MRR")}
TASKS = ("pages", "emoji")
RANKS_NAME = "ranks.json"  # pages task: each held-out query's rank of its page, per kind and budget
# The test pages are fixed (not drawn with the training seed), so every seed is scored on the same pages.
TEST_PAGE_SEED = 10_000


@dataclass
class QuickstartSettings:
    output_dir: str = "runs/quickstart"
    task: str = "pages"  # "pages": text -> page of several Twemoji; "emoji": one Twemoji <-> its name
    seed: int = 0
    pooling: str = "meta_tokens"  # "last_token" / "mean": the paper's single-vector baselines (R_q = R_c = 1)
    mmr: bool = True  # False: the loss sees only the full budget (the paper's "without MMR" ablation)
    num_query_vectors: int = 4
    num_candidate_vectors: int = 16
    # Queries as [content; M_q]: under LiteVL's bidirectional attention this differs from the official
    # [content; M_q; M_c] layout, but training and inference agree and a query row is R_c tokens shorter.
    query_layout: str = "query_only"
    bf16: bool = False  # bf16 autocast in training (on CPU it pays off only where the CPU has AMX)
    # pages: 192 px = a 6x6 feature grid, 3x3 tokens per item of a 2x2 page; emoji: 96 px = one page cell alone.
    image_size: int | None = None
    page_grid: int = 2  # pages: items per side of a page
    # pages: each round lays out every training emoji once (382 pages of 2x2 per round). 8 (192 steps): at 4 the
    # budget's gain on picture queries did not hold over seeds (docs/quickstart.md).
    train_rounds: int = 8
    test_rounds: int = 2  # pages: rounds of held-out pages (92 pages of 2x2 each), scored separately and pooled
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 2e-5  # the pretrained text encoder
    projector_learning_rate: float = 1e-3  # the new image projector
    # The meta tokens' embedding rows, new like the projector, at their own rate (the vocabulary's rows stay
    # frozen); None: they learn with the text encoder at `learning_rate`, which left a page's vectors near-copies.
    meta_learning_rate: float | None = 1e-2
    # 0.1, not the paper's 0.03: from fresh meta vectors that are near-copies across inputs, 0.03 drives this
    # small model to the uniform loss log(batch) before it learns anything (docs/quickstart.md, measured).
    temperature: float = 0.1
    # Logits = MaxSim / (r_q * tau): every group gets the logit range of (1,1) (see docs/training.md).
    score_normalization: str = "mean"
    warmup_ratio: float = 0.1
    projector_init: str = "closed_form"  # or "random" (the backbone's own initialisation)
    train_pairs: int | None = None  # a prefix of the training emoji (shorter exploration runs)
    test_pairs: int | None = None  # a prefix of the held-out emoji
    freeze_vision: bool = True  # the ImageNet tower stays as it is; projector and text encoder learn
    save_checkpoint: bool = True
    show_progress_bar: bool = True
    budgets: list = field(default_factory=lambda: [[1, 1], [2, 4], [4, 8], [4, 16]])

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.projector_init not in ("closed_form", "random"):
            raise ValueError(f"projector_init must be 'closed_form' or 'random', got {self.projector_init!r}")
        if self.image_size is None:
            self.image_size = 192 if self.task == "pages" else 96
        if self.pooling != "meta_tokens":
            self.num_query_vectors = self.num_candidate_vectors = 1
            self.budgets = [[1, 1]]
        self.budgets = [list(b) for b in self.budgets if b[0] <= self.num_query_vectors and b[1] <= self.num_candidate_vectors]

    @property
    def layout(self) -> PageLayout:
        return PageLayout(page_size=self.image_size, grid=self.page_grid, margin=max(2, self.image_size // 32))

    @property
    def groups(self) -> tuple:
        """The query groups the evaluation reports: directions (emoji) or query kinds (pages)."""
        return DIRECTIONS if self.task == "emoji" else QUERY_KINDS


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
        seed=settings.seed,
        attn_implementation="sdpa",
    )
    if settings.freeze_vision:
        model.vlm.vision_tower.requires_grad_(False)
    return model


def train(model, train_pairs: list, settings: QuickstartSettings, work_dir: Path) -> float:
    """Train in place on both directions; returns the wall time in seconds."""
    from training import ContrastiveDataset, MetaEmbedTrainer, MetaEmbedTrainingArguments

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
    the uniform loss for its whole run (docs/quickstart.md). Returns the R^2 of the map on its training data."""
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


@torch.no_grad()
def evaluate(model, test_pairs: list, settings: QuickstartSettings, ranks_out: dict | None = None) -> dict:
    """{group: {"recall@1": {budget_key: value}, "mrr": {...}}} over the held-out split; groups are the
    directions (emoji) or the query kinds (pages: one item, two items, picture). Pages: `ranks_out`, where given,
    receives each query's rank of its page per kind and budget ({kind: {budget_key: [rank, ...]}}, queries in one
    order for every budget: paired comparisons of budgets)."""
    if settings.task == "pages":
        ranks = page_ranks(model, test_pairs, settings)
        if ranks_out is not None:
            ranks_out.update({kind: {key: r.tolist() for key, r in by_kind.items()} for kind, by_kind in ranks.items()})
        return pages_quality(ranks)
    from training import ContrastiveDataset, retrieval_metrics

    results = {}
    for direction in DIRECTIONS:
        dataset = ContrastiveDataset(retrieval_records(test_pairs, direction))
        metrics = retrieval_metrics(model, dataset, settings.budgets, show_progress_bar=settings.show_progress_bar)
        results[direction] = {
            name: {budget_key(b): metrics[f"{name}_{b[0]}x{b[1]}"] for b in settings.budgets} for name in METRIC_NAMES
        }
    return results


def held_out_pages(test_pairs: list, settings: QuickstartSettings) -> list:
    """The held-out evaluation sets: `test_rounds` rounds of pages of held-out emoji, fixed for every seed."""
    return [evaluation_set(test_pairs, settings.layout, TEST_PAGE_SEED + r) for r in range(settings.test_rounds)]


def query_inputs(round_: dict) -> list:
    """A round's queries as the model takes them: names as text, pictures (PNG bytes) as images."""
    from PIL import Image

    return [Image.open(io.BytesIO(query)) if isinstance(query, bytes) else query for query in round_["queries"]]


def query_kind_masks(kinds: list) -> dict:
    """{kind: [Q] bool}: which of a round's queries are of each kind (`QUERY_KINDS`)."""
    return {kind: torch.tensor([k == kind for k in kinds]) for kind in QUERY_KINDS}


def rank_metrics(ranks: torch.Tensor) -> dict:
    """{"recall@1", "mrr"} of the positives' ranks (1 = best; from `positive_ranks`, ties counted against)."""
    ranks = ranks.float()
    return {"recall@1": (ranks == 1).float().mean().item(), "mrr": (1.0 / ranks).mean().item()}


@torch.no_grad()
def page_ranks(model, test_pairs: list, settings: QuickstartSettings) -> dict:
    """{kind: {budget_key: ranks}}: each round's queries ranked against that round's pages (each query has exactly
    one right page), the rank of the right page per query (1 = best; ties count against it, `positive_ranks`), the
    rounds' queries concatenated in one order for every budget."""
    from PIL import Image

    from training.evaluation import positive_ranks

    ranks = {kind: {budget_key(b): [] for b in settings.budgets} for kind in QUERY_KINDS}
    options = {"batch_size": 32, "show_progress_bar": settings.show_progress_bar}
    for round_ in held_out_pages(test_pairs, settings):
        pages = model.encode_candidates([Image.open(io.BytesIO(png)) for png in round_["pages"]], **options)
        queries = model.encode_queries(query_inputs(round_), **options)
        targets, masks = torch.tensor(round_["targets"]), query_kind_masks(round_["kinds"])
        for budget in settings.budgets:
            found = positive_ranks(model.similarity(queries, pages, budget=tuple(budget)), targets)
            for kind, chosen in masks.items():
                ranks[kind][budget_key(budget)].append(found[chosen])
    return {kind: {key: torch.cat(parts) for key, parts in by_budget.items()} for kind, by_budget in ranks.items()}


def pages_quality(ranks: dict) -> dict:
    """{kind: {metric: {budget_key: value}}} from `page_ranks`."""
    results = {}
    for kind, by_budget in ranks.items():
        metrics = {key: rank_metrics(found) for key, found in by_budget.items()}
        results[kind] = {name: {key: m[name] for key, m in metrics.items()} for name in METRIC_NAMES}
    return results


def evaluate_pages(model, test_pairs: list, settings: QuickstartSettings) -> dict:
    """The pages task's quality per query kind and budget (`page_ranks`, pooled over the rounds)."""
    return pages_quality(page_ranks(model, test_pairs, settings))


def scoring_time(model, num_queries: int, num_candidates: int, budgets: list, repeats: int = 5) -> dict:
    """Seconds per query to score `num_queries` random queries against `num_candidates` candidates (best of
    `repeats`, all queries in one batch), per budget."""
    generator = torch.Generator().manual_seed(0)
    dim = model.config.output_dim
    queries = torch.nn.functional.normalize(torch.randn(num_queries, model.config.num_query_vectors, dim, generator=generator), dim=-1)
    candidates = torch.nn.functional.normalize(
        torch.randn(num_candidates, model.config.num_candidate_vectors, dim, generator=generator), dim=-1
    ).to(torch.bfloat16)
    times = {}
    for r_q, r_c in budgets:
        q, c = queries[:, :r_q].contiguous(), candidates[:, :r_c].contiguous()  # index only what the budget reads
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.similarity(q, c)
            best = min(best, time.perf_counter() - start)
        times[budget_key((r_q, r_c))] = best / num_queries
    return times


GROUP_LABELS = {
    "text-to-image": "t2i", "image-to-text": "i2t", "one item": "one", "two items": "two", "picture": "pic",
}  # fmt: skip


def candidate_count(summary: dict) -> int:
    """Candidates each query is ranked against: held-out pairs (emoji) or one round's pages."""
    settings = summary["settings"]
    if settings["task"] == "emoji":
        return summary["test_pairs"]
    return summary["test_pairs"] // (settings["page_grid"] ** 2)


def results_benchmarks(summary: dict) -> list:
    """The evaluation as `metaembed-results/1` benchmarks (one per query group and metric)."""
    benchmarks, quality = [], summary["quality"]
    for group in quality:
        for name, (metric_type, metric_name) in METRIC_NAMES.items():
            if summary["settings"]["task"] == "emoji":
                task = {"type": "image-retrieval" if group == "text-to-image" else "image-to-text",
                        "name": f"{group.capitalize()} retrieval"}
                dataset = {"name": f"Twemoji ({summary['test_pairs']} held-out pairs)", "type": "twemoji",
                           "split": "test"}
                title = f"Twemoji {group} {metric_name}"
            else:
                task = {"type": "image-retrieval", "name": f"Text-to-page retrieval, queries naming {group}"}
                dataset = {"name": f"Twemoji pages ({candidate_count(summary)} held-out pages per round, "
                                   f"{summary['settings']['test_rounds']} rounds)", "type": "twemoji-pages",
                           "split": "test"}
                title = f"Twemoji pages, {group} {metric_name}"
            benchmarks.append({"name": title, "task": task, "dataset": dataset,
                               "metric": {"type": metric_type, "name": metric_name}, "scores": quality[group][name]})
    return benchmarks  # fmt: skip


def run_quickstart(settings: QuickstartSettings, command: str | None = None, log=print) -> dict:
    """Build, train, evaluate and (optionally) save; returns settings, sizes, timings and quality per budget."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    train_pairs, test_pairs = load_data(settings)
    if settings.task == "pages":
        log(f"data: pages of {settings.page_grid}x{settings.page_grid} Twemoji at {settings.image_size} px; "
            f"{settings.train_rounds} rounds of {len(train_pairs)} training emoji, {settings.test_rounds} rounds of "
            f"{len(test_pairs)} held-out emoji")  # fmt: skip
    else:
        log(f"data: {len(train_pairs)} training pairs, {len(test_pairs)} held-out test pairs (Twemoji)")
    with tempfile.TemporaryDirectory(dir=output, prefix=".work-") as work:
        work_dir = Path(work)
        model = build_model(settings, work_dir)
        log(f"model: MetaEmbed over LiteVL (MiniLM-L6 + EfficientNet-Lite0), pooling={settings.pooling}, "
            f"R_q={model.config.num_query_vectors}, R_c={model.config.num_candidate_vectors}, "
            f"MMR groups {model.config.matryoshka_groups}")  # fmt: skip
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
            "settings": asdict(settings), "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
            "projector_fit_r2": fit, "train_seconds": train_seconds, "quality": quality,
            "seconds_per_query_10k": timing, "dim": model.config.output_dim,
        }  # fmt: skip
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


def budget_table(summary: dict) -> str:
    """The printed table: one row per budget with quality per query group, bytes per item and scoring time."""
    dim, quality = summary["dim"], summary["quality"]
    labels = [GROUP_LABELS.get(group, group) for group in quality]
    header = [f"{label} R@1" for label in labels] + [f"{label} MRR" for label in labels]
    lines = [f"{'budget':>9} | " + " | ".join(f"{h:>7}" for h in header) + f" | {'bytes/item':>10} | "
             f"{'ms/query (10k items)':>20}"]  # fmt: skip
    lines.append("-" * len(lines[0]))
    for key, seconds in summary["seconds_per_query_10k"].items():
        r_c = int(key.split("x")[1])
        cells = [quality[g][metric][key] for metric in ("recall@1", "mrr") for g in quality]
        lines.append(f"{'(' + key.replace('x', ',') + ')':>9} | " + " | ".join(f"{v:7.3f}" for v in cells)
                     + f" | {r_c * dim * 2:>10,} | {seconds * 1000:20.3f}")  # fmt: skip
    count = candidate_count(summary)
    lines.append(f"chance R@1 = {1 / count:.4f} ({count} candidates per query); {ATTRIBUTION}")
    return "\n".join(lines)


__all__ = ["QuickstartSettings", "run_quickstart", "budget_table", "evaluate", "build_model", "load_data", "TASKS"]


@torch.no_grad()
def frozen_features(pairs: list, image_size: int = 160, batch_size: int = 64) -> tuple:
    """(image features [N, 1280]: EfficientNet-Lite0's pooled ImageNet features, caption embeddings [N, 384]:
    all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length, as published)) of frozen pretrained models."""
    from transformers import AutoModel, AutoTokenizer

    from modeling_metaembed.processing_litevl import LiteVLImageProcessor
    from modeling_metaembed.processing_metaembed import load_image

    from .backbones import minilm_path, pretrained_efficientnet_lite

    tower = pretrained_efficientnet_lite("lite0", image_size)
    images = LiteVLImageProcessor(image_size)
    tokenizer, text_model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()
    image_features, text_features = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        pixels = images([load_image(p["image"], i, 10**7) for i, p in enumerate(batch)])["pixel_values"]
        image_features.append(tower(pixels).mean(dim=(2, 3)))
        tokens = tokenizer([p["caption"] for p in batch], padding=True, return_tensors="pt")
        states = text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        text_features.append(torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(image_features), torch.cat(text_features)


def _cosine_metrics(queries: torch.Tensor, candidates: torch.Tensor) -> dict:
    from training.evaluation import recall_and_mrr

    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(candidates, dim=-1).T
    return dict(zip(METRIC_NAMES, recall_and_mrr(scores)))


def ridge_reference(train_pairs: list, test_pairs: list, image_size: int = 160) -> dict:
    """The trivial reference: ridge regression from frozen image features to frozen caption embeddings, scored
    by cosine. Its penalty is picked on the last fifth of the training split (by the sum of both directions'
    Recall@1). Returns {direction: {"recall@1": ..., "mrr": ...}, "penalty": ...}."""
    x_all, y_all = frozen_features(train_pairs + test_pairs, image_size)  # load the frozen models once
    cut_test = len(train_pairs)
    x_train, y_train, x_test, y_test = x_all[:cut_test], y_all[:cut_test], x_all[cut_test:], y_all[cut_test:]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6

    def fit(x, y, penalty):
        x = (x - mean) / std
        return torch.linalg.solve(x.T @ x + penalty * torch.eye(x.shape[1]), x.T @ y)

    def both(weights, x, y):
        predicted = ((x - mean) / std) @ weights
        return {"text-to-image": _cosine_metrics(y, predicted), "image-to-text": _cosine_metrics(predicted, y)}

    cut = len(train_pairs) * 4 // 5
    penalties = [10.0**k for k in range(0, 6)]
    scores = [
        sum(m["recall@1"] for m in both(fit(x_train[:cut], y_train[:cut], p), x_train[cut:], y_train[cut:]).values())
        for p in penalties
    ]
    penalty = penalties[max(range(len(penalties)), key=scores.__getitem__)]
    return {**both(fit(x_train, y_train, penalty), x_test, y_test), "penalty": penalty}


@torch.no_grad()
def pages_ridge_reference(train_pairs: list, test_pairs: list, settings: QuickstartSettings, train_rounds: int = 2,
                          penalty: float = 1e3) -> dict:  # fmt: skip
    """Closed-form references for the pages task, no training: ridge regression from the frozen tower's features
    of a page to the frozen all-MiniLM-L6-v2 embedding of the names on it, scored by cosine with the query's
    embedding, on the same held-out pages as the trained models.
    - "pooled": one vector per page (features averaged over the page -> mean of its names' embeddings);
    - "per cell": one vector per grid cell (features averaged over the cell -> its item's name), a page scored
      by its best cell: several vectors per page, placed with knowledge of the layout the models never get.
    Picture queries are scored against the tower's own features of the page, pooled or per cell.
    Returns {"pooled": {kind: {"recall@1", "mrr"}}, "per cell": {...}}."""
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    from modeling_metaembed.processing_litevl import LiteVLImageProcessor
    from training.evaluation import positive_ranks

    from .backbones import minilm_path, pretrained_efficientnet_lite
    from .pages import layout_pages

    layout, grid = settings.layout, settings.page_grid
    tower = pretrained_efficientnet_lite("lite0", settings.image_size)
    images = LiteVLImageProcessor(settings.image_size)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    text_model = AutoModel.from_pretrained(minilm_path()).eval()

    def cell_features(pngs_or_pages):  # [P, grid*grid, C]: the tower's features averaged over each cell
        out = []
        for start in range(0, len(pngs_or_pages), 64):
            part = pngs_or_pages[start : start + 64]
            batch = [Image.open(io.BytesIO(p)) if isinstance(p, bytes) else p for p in part]
            features = tower(images(batch)["pixel_values"])  # [n, C, g, g]
            n, channels, g, _ = features.shape
            cells = features.view(n, channels, grid, g // grid, grid, g // grid).mean(dim=(3, 5))
            out.append(cells.permute(0, 2, 3, 1).reshape(n, grid * grid, channels))
        return torch.cat(out)

    def embed(texts):
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        states, mask = text_model(**tokens).last_hidden_state, tokens["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)

    train_pages = layout_pages(train_pairs, layout, train_rounds, settings.seed)
    x_cells = cell_features([render_page([p["image"] for p in page], layout) for page in train_pages])
    y_cells = embed([p["caption"] for page in train_pages for p in page]).view(len(train_pages), grid * grid, -1)
    maps = {"pooled": ridge_map(x_cells.mean(1), y_cells.mean(1), penalty),
            "per cell": ridge_map(x_cells.flatten(0, 1), y_cells.flatten(0, 1), penalty)}  # fmt: skip
    feature_mean = x_cells.flatten(0, 1).mean(0)
    ranks = {name: {kind: [] for kind in QUERY_KINDS} for name in maps}
    for round_ in held_out_pages(test_pairs, settings):
        cells, masks = cell_features(round_["pages"]), query_kind_masks(round_["kinds"])
        pictures = masks["picture"]
        is_picture = pictures.tolist()
        named = embed([q for q, picture in zip(round_["queries"], is_picture) if not picture])
        # A picture is compared with the pages in the tower's own feature space (centred, cosine): the map to the
        # names' space would only lose what tells two pictures apart.
        shown_pngs = [q for q, picture in zip(round_["queries"], is_picture) if picture]
        shown = torch.nn.functional.normalize(cell_features(shown_pngs).mean(1) - feature_mean, dim=-1)
        targets = torch.tensor(round_["targets"])
        for name, (weight, mean, std, target_mean) in maps.items():
            inputs = cells.mean(1, keepdim=True) if name == "pooled" else cells  # [P, V, C]
            vectors = torch.nn.functional.normalize(((inputs - mean) / std) @ weight + target_mean, dim=-1)
            scores = torch.empty(len(targets), len(cells))
            scores[~pictures] = torch.einsum("qd,pvd->qpv", named, vectors).amax(-1)
            features = torch.nn.functional.normalize(inputs - feature_mean, dim=-1)
            scores[pictures] = torch.einsum("qc,pvc->qpv", shown, features).amax(-1)
            found = positive_ranks(scores, targets)
            for kind, chosen in masks.items():
                ranks[name][kind].append(found[chosen])
    return {name: {kind: rank_metrics(torch.cat(found)) for kind, found in per_kind.items()}
            for name, per_kind in ranks.items()}  # fmt: skip
