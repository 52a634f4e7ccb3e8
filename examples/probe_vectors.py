"""How alike are a checkpoint's meta vectors? A probe of why a budget does or does not pay (CPU, a minute).

    python examples/probe_vectors.py runs/quickstart/checkpoint

On the quickstart's first round of held-out pages and its queries, prints the mean cosine between the vectors of
one input (near 1: the vectors are near-copies, so MaxSim over more of them adds nothing) and between the first
vectors of different inputs, and Recall@1 at every budget of the checkpoint after removing each side's mean vector
(a shared direction that every input carries does not rank anything). Last, whether one input per page is what
limits the model: for queries naming one item and for picture queries, MRR over every held-out round of the page
encoded whole against each of its items encoded alone (the page scored by its best item), the most that vectors
keeping the items apart could give.
"""

import argparse
import io
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel

from metaembed.quickstart import QuickstartSettings, load_data
from metaembed.quickstart.evaluation import (
    TEST_PAGE_SEED,
    held_out_pages,
    query_inputs,
    query_kind_masks,
    rank_metrics,
)
from metaembed.quickstart.pages import layout_pages, render_page
from metaembed_training.evaluation import positive_ranks

# The query kinds that name or show one item: the ones a page's best single item can answer.
ALONE_KINDS = ("one item", "picture")


def within_input_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine between two different vectors of the same input ([N, R, D] unit vectors)."""
    count = embeddings.shape[1]
    if count < 2:
        return float("nan")
    gram = embeddings @ embeddings.transpose(1, 2)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    return (off_diagonal / (count * count - count)).mean().item()


def across_inputs_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine between the first vectors of two different inputs."""
    first = embeddings[:, 0]
    gram, count = first @ first.T, first.shape[0]
    return ((gram.sum() - gram.diagonal().sum()) / (count * count - count)).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a quickstart checkpoint folder (its summary.json is one level up)")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    summary = json.loads((checkpoint.parent / "summary.json").read_text())
    # a run from before meta_regions existed trained free meta tokens
    settings = QuickstartSettings(**{"meta_regions": None, **summary["settings"]})
    if settings.task != "pages":
        raise SystemExit(f"{checkpoint}: the probe reads the pages task; this one was trained on {settings.task!r}")
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    _, test_pairs = load_data(settings)
    round_ = held_out_pages(test_pairs, settings)[0]
    with torch.no_grad():
        pages = model.encode_candidates([Image.open(io.BytesIO(png)) for png in round_["pages"]])
        queries = model.encode_queries(query_inputs(round_))
    targets = torch.tensor(round_["targets"])
    print(f"{checkpoint}: {len(round_['pages'])} held-out pages, {len(round_['queries'])} queries")
    print(
        f"mean cosine between the vectors of one input: queries {within_input_cosine(queries):.3f}, "
        f"pages {within_input_cosine(pages):.3f}"
    )
    print(
        f"mean cosine between the first vectors of different inputs: queries {across_inputs_cosine(queries):.3f}, "
        f"pages {across_inputs_cosine(pages):.3f}"
    )
    centered_queries = torch.nn.functional.normalize(queries - queries.mean(0, keepdim=True), dim=-1)
    centered_pages = torch.nn.functional.normalize(pages - pages.mean(0, keepdim=True), dim=-1)
    print("| budget | Recall@1 | Recall@1, each side's mean vector removed |")
    print("|---|---|---|")
    for budget in settings.budgets:
        plain = positive_ranks(model.similarity(queries, pages, budget=tuple(budget)), targets)
        centered = positive_ranks(model.similarity(centered_queries, centered_pages, budget=tuple(budget)), targets)
        recall, recall_centered = (plain == 1).float().mean(), (centered == 1).float().mean()
        print(f"| ({budget[0]}, {budget[1]}) | {recall:.3f} | {recall_centered:.3f} |")
    budgets = sorted({(1, 1), (model.config.num_query_vectors, model.config.num_candidate_vectors)})
    results = items_alone(model, settings, test_pairs, budgets)
    count = len(held_out_pages(test_pairs, settings)) * len(round_["pages"]) * settings.layout.items_per_page
    for kind in ALONE_KINDS:
        print(
            f"\n{kind} queries, MRR over {settings.test_rounds} test round(s): the page encoded whole against each "
            f"item encoded alone (the page scored by its best item; {count} single-item pages)"
        )
        print("| budget | page whole | items alone |")
        print("|---|---|---|")
        for budget, by_kind in results.items():
            whole, alone = by_kind[kind]
            print(f"| ({budget[0]}, {budget[1]}) | {whole:.3f} | {alone:.3f} |")


@torch.no_grad()
def items_alone(model, settings: QuickstartSettings, test_pairs: list, budgets: list) -> dict:
    """Is one input per page what limits the model? {budget: {kind: (MRR of the page encoded whole, MRR with each
    item encoded alone)}} for the queries that name or show one item, over every held-out round. "Alone" puts each
    item in its cell of an otherwise empty page and scores a page by its best item: as if the page's vectors had
    kept its items apart. If that is no better than the page whole, no arrangement of the meta vectors has a budget
    gain to take; what limits the model is recognising the items. (Training never shows it a page with empty
    cells: a caveat.)"""
    per_page = settings.layout.items_per_page
    ranks = {budget: {kind: ([], []) for kind in ALONE_KINDS} for budget in budgets}
    for number, round_ in enumerate(held_out_pages(test_pairs, settings)):
        pages_items = layout_pages(test_pairs, settings.layout, 1, TEST_PAGE_SEED + number)  # the round's pages
        if len(pages_items) != len(round_["pages"]):
            raise RuntimeError("the probe's pages are not the evaluation's: the page layout code changed")
        alone = []
        for page in pages_items:
            for slot, item in enumerate(page):
                paths = [None] * per_page
                paths[slot] = item["image"]
                alone.append(render_page(paths, settings.layout))
        whole_pages = [Image.open(io.BytesIO(png)) for png in round_["pages"]]
        pages = model.encode_candidates(whole_pages, show_progress_bar=False)
        items = model.encode_candidates(alone, show_progress_bar=False)  # [pages * per_page, R_c, D], page-major
        queries = model.encode_queries(query_inputs(round_), show_progress_bar=False)
        targets, masks = torch.tensor(round_["targets"]), query_kind_masks(round_["kinds"])
        for budget in budgets:
            whole = positive_ranks(model.similarity(queries, pages, budget=budget), targets)
            best_item = model.similarity(queries, items, budget=budget).view(len(queries), len(pages), per_page)
            apart = positive_ranks(best_item.max(dim=-1).values, targets)
            for kind in ALONE_KINDS:
                ranks[budget][kind][0].append(whole[masks[kind]])
                ranks[budget][kind][1].append(apart[masks[kind]])
    mrr = lambda found: rank_metrics(torch.cat(found))["mrr"]  # noqa: E731
    return {
        budget: {kind: (mrr(whole), mrr(apart)) for kind, (whole, apart) in by_kind.items()}
        for budget, by_kind in ranks.items()
    }


if __name__ == "__main__":
    main()
