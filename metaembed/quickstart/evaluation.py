"""The quickstart's evaluation: Recall@1 and MRR at every budget over the held-out split, per query group.

Pages: `test_rounds` fixed rounds of held-out pages (`held_out_pages`, the same for every training seed), each
query ranked against its round's pages; the rank of the right page per query and budget (`page_ranks`, ties count
against it) is what the summary, `ranks.json` and the tests' paired comparisons of budgets read. Emoji: both
directions through `training.retrieval_metrics`.
"""

import io

import torch

from metaembed_model_cards.results import budget_key

from .pages import QUERY_KINDS, evaluation_set
from .settings import QuickstartSettings
from .twemoji import DIRECTIONS, retrieval_records

METRIC_NAMES = {"recall@1": ("recall_at_1", "Recall@1"), "mrr": ("mrr", "MRR")}
# The test pages are fixed (not drawn with the training seed), so every seed is scored on the same pages.
TEST_PAGE_SEED = 10_000


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
    from metaembed_training import ContrastiveDataset, retrieval_metrics

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

    from metaembed_training.evaluation import positive_ranks

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


__all__ = [
    "evaluate",
    "evaluate_pages",
    "page_ranks",
    "pages_quality",
    "held_out_pages",
    "query_inputs",
    "query_kind_masks",
    "rank_metrics",
    "METRIC_NAMES",
    "TEST_PAGE_SEED",
]
