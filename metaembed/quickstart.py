"""The offline quickstart: a real MetaEmbed trained and evaluated on a 2-core CPU in minutes, with no Hub.

1. backbone: LiteVL from packaged pretrained weights (all-MiniLM-L6-v2 text encoder, ImageNet EfficientNet-Lite0);
2. model: `MetaEmbedModel.from_vlm` adds the meta tokens (R_q = 8, R_c = 32 here);
3. data: Twemoji image-caption pairs (packaged), a fixed held-out test split never seen in training;
4. training: `MetaEmbedTrainer` with the MMR loss, both directions (caption -> image, image -> caption);
5. evaluation: Recall@1 and MRR of both directions at every budget, over the whole test split;
6. a Hub-ready checkpoint with its model card, results file and quality-versus-budget plot.

`run_quickstart(QuickstartSettings(...))` returns every number it prints; examples/quickstart.py is its command
line and examples/reproduce_claims.py runs it over seeds and ablations.
"""

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
from .twemoji import ATTRIBUTION, DIRECTIONS, retrieval_records, split_pairs, twemoji_pairs

METRIC_NAMES = {"recall@1": ("recall_at_1", "Recall@1"), "mrr": ("mrr", "MRR")}


@dataclass
class QuickstartSettings:
    output_dir: str = "runs/quickstart"
    seed: int = 0
    pooling: str = "meta_tokens"  # "last_token" / "mean": the paper's single-vector baselines (R_q = R_c = 1)
    mmr: bool = True  # False: the loss sees only the full budget (the paper's "without MMR" ablation)
    num_query_vectors: int = 8
    num_candidate_vectors: int = 32
    # Queries as [content; M_q]: under LiteVL's bidirectional attention this differs from the official
    # [content; M_q; M_c] layout, but training and inference agree and a query row is R_c tokens shorter.
    query_layout: str = "query_only"
    bf16: bool = False  # bf16 autocast in training (on CPU it pays off only where the CPU has AMX)
    image_size: int = 160  # Twemoji images are 72 px; 160 gives a 5x5 grid (25 image tokens)
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 1e-4  # the pretrained text encoder
    projector_learning_rate: float = 2e-3  # the new, randomly initialised image projector
    temperature: float = 0.03  # the paper's InfoNCE temperature
    # Logits = MaxSim / (r_q * tau): every group gets the logit range of (1,1). With the paper's plain sum
    # (MaxSim / tau) this small model collapses to the uniform loss log(batch) at every group (README).
    score_normalization: str = "mean"
    warmup_ratio: float = 0.1
    train_pairs: int | None = None  # a prefix of the training split (the CI test uses a small one)
    test_pairs: int | None = None
    freeze_vision: bool = True  # the ImageNet tower stays as it is; projector and text encoder learn
    save_checkpoint: bool = True
    show_progress_bar: bool = True
    budgets: list = field(default_factory=lambda: [[1, 1], [2, 4], [4, 8], [8, 16], [8, 32]])

    def __post_init__(self):
        if self.pooling != "meta_tokens":
            self.num_query_vectors = self.num_candidate_vectors = 1
            self.budgets = [[1, 1]]
        self.budgets = [list(b) for b in self.budgets if b[0] <= self.num_query_vectors and b[1] <= self.num_candidate_vectors]


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
    projector = [p for p in model.vlm.projector.parameters() if p.requires_grad]
    projector_ids = {id(p) for p in projector}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in projector_ids]
    optimizer = torch.optim.AdamW(
        [{"params": rest, "lr": settings.learning_rate}, {"params": projector, "lr": settings.projector_learning_rate}],
        weight_decay=0.01,
    )  # the Trainer adds its warmup-and-cosine schedule to both groups
    trainer = MetaEmbedTrainer(
        model=model, args=args, train_dataset=ContrastiveDataset(records), optimizers=(optimizer, None)
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, test_pairs: list, settings: QuickstartSettings) -> dict:
    """{direction: {"recall@1": {budget_key: value}, "mrr": {...}}} over the whole test split, plus the time to
    score one query against the test candidates at each budget."""
    from training import ContrastiveDataset, retrieval_metrics

    results = {}
    for direction in DIRECTIONS:
        dataset = ContrastiveDataset(retrieval_records(test_pairs, direction))
        metrics = retrieval_metrics(model, dataset, settings.budgets, show_progress_bar=settings.show_progress_bar)
        results[direction] = {
            name: {budget_key(b): metrics[f"{name}_{b[0]}x{b[1]}"] for b in settings.budgets} for name in METRIC_NAMES
        }
    return results


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


def results_benchmarks(quality: dict, dataset_size: int) -> list:
    """The evaluation as `metaembed-results/1` benchmarks (one per direction and metric)."""
    benchmarks = []
    for direction in DIRECTIONS:
        for name, (metric_type, metric_name) in METRIC_NAMES.items():
            benchmarks.append({
                "name": f"Twemoji {direction} {metric_name}",
                "task": {"type": "image-retrieval" if direction == "text-to-image" else "image-to-text",
                         "name": f"{direction.capitalize()} retrieval"},
                "dataset": {"name": f"Twemoji ({dataset_size} held-out pairs)", "type": "twemoji", "split": "test"},
                "metric": {"type": metric_type, "name": metric_name},
                "scores": quality[direction][name],
            })  # fmt: skip
    return benchmarks


def run_quickstart(settings: QuickstartSettings, command: str | None = None, log=print) -> dict:
    """Build, train, evaluate and (optionally) save; returns settings, sizes, timings and quality per budget."""
    torch.manual_seed(settings.seed)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    train_pairs, test_pairs = load_data(settings)
    log(f"data: {len(train_pairs)} training pairs, {len(test_pairs)} held-out test pairs (Twemoji)")
    with tempfile.TemporaryDirectory(dir=output, prefix=".work-") as work:
        work_dir = Path(work)
        model = build_model(settings, work_dir)
        log(f"model: MetaEmbed over LiteVL (MiniLM-L6 + EfficientNet-Lite0), pooling={settings.pooling}, "
            f"R_q={model.config.num_query_vectors}, R_c={model.config.num_candidate_vectors}, "
            f"MMR groups {model.config.matryoshka_groups}")  # fmt: skip
        train_seconds = train(model, train_pairs, settings, work_dir)
        model.eval()
        quality = evaluate(model, test_pairs, settings)
        timing = scoring_time(model, 64, 10_000, settings.budgets)
        summary = {
            "settings": asdict(settings), "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
            "train_seconds": train_seconds, "quality": quality,
            "seconds_per_query_10k": timing, "dim": model.config.output_dim,
        }  # fmt: skip
        if settings.save_checkpoint:
            checkpoint = output / "checkpoint"
            if checkpoint.exists():
                shutil.rmtree(checkpoint)
            model.save_pretrained(checkpoint)
            save_results(checkpoint / RESULTS_NAME, results_benchmarks(quality, len(test_pairs)), command=command)
            write_model_card(
                checkpoint,
                model_name="MetaEmbed LiteVL Twemoji (quickstart)",
                repo_id="org/metaembed-litevl-twemoji",
                license="apache-2.0",
                base_model=None,
            )
            shutil.copyfile(checkpoint / PLOT_NAME, output / PLOT_NAME)
            summary["checkpoint"] = str(checkpoint)
    write_atomic(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def budget_table(summary: dict) -> str:
    """The printed table: one row per budget with quality, bytes per item and scoring time."""
    dim = summary["dim"]
    lines = [
        f"{'budget':>9} | {'t2i R@1':>7} | {'i2t R@1':>7} | {'t2i MRR':>7} | {'i2t MRR':>7} | "
        f"{'bytes/item':>10} | {'ms/query (10k items)':>20}",
        "-" * 91,
    ]
    for key, seconds in summary["seconds_per_query_10k"].items():
        r_c = int(key.split("x")[1])
        q = summary["quality"]
        lines.append(
            f"{'(' + key.replace('x', ',') + ')':>9} | {q['text-to-image']['recall@1'][key]:7.3f} | "
            f"{q['image-to-text']['recall@1'][key]:7.3f} | {q['text-to-image']['mrr'][key]:7.3f} | "
            f"{q['image-to-text']['mrr'][key]:7.3f} | {r_c * dim * 2:>10,} | {seconds * 1000:20.3f}"
        )
    chance = 1 / summary["test_pairs"]
    lines.append(f"chance R@1 = {chance:.4f} ({summary['test_pairs']} candidates); {ATTRIBUTION}")
    return "\n".join(lines)


__all__ = ["QuickstartSettings", "run_quickstart", "budget_table", "evaluate", "build_model", "load_data"]


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
