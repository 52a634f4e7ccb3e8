"""What the main job reports: the printed budget table (quality per query group, bytes per item and the time to
score one query against 10,000 candidates at each budget) and the evaluation as model-card results."""

import time

import torch

from metaembed_model_cards.results import budget_key

from .evaluation import METRIC_NAMES
from .twemoji import ATTRIBUTION

GROUP_LABELS = {
    "text-to-image": "t2i",
    "image-to-text": "i2t",
    "one item": "one",
    "two items": "two",
    "picture": "pic",
}


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
                task = {
                    "type": "image-retrieval" if group == "text-to-image" else "image-to-text",
                    "name": f"{group.capitalize()} retrieval",
                }
                dataset = {
                    "name": f"Twemoji ({summary['test_pairs']} held-out pairs)",
                    "type": "twemoji",
                    "split": "test",
                }
                title = f"Twemoji {group} {metric_name}"
            else:
                # One task entry per query kind: the Hub's model-index merges results that share task type and
                # dataset (type, config, split), so each kind is its own dataset config.
                if group == "picture":
                    task_name = "Picture-to-page retrieval, queries showing one item's picture"
                else:
                    task_name = f"Text-to-page retrieval, queries naming {group}"
                task = {"type": "visual-document-retrieval", "name": task_name}
                dataset = {
                    "name": f"Twemoji pages ({candidate_count(summary)} held-out pages per round, "
                    f"{summary['settings']['test_rounds']} rounds)",
                    "type": "twemoji-pages",
                    "config": group.replace(" ", "-"),
                    "split": "test",
                }
                title = f"Twemoji pages, {group} {metric_name}"
            benchmarks.append(
                {
                    "name": title,
                    "task": task,
                    "dataset": dataset,
                    "metric": {"type": metric_type, "name": metric_name},
                    "scores": quality[group][name],
                }
            )
    return benchmarks


def budget_table(summary: dict) -> str:
    """The printed table: one row per budget with quality per query group, bytes per item and scoring time."""
    dim, quality = summary["dim"], summary["quality"]
    labels = [GROUP_LABELS.get(group, group) for group in quality]
    header = [f"{label} R@1" for label in labels] + [f"{label} MRR" for label in labels]
    lines = [
        f"{'budget':>9} | " + " | ".join(f"{h:>7}" for h in header) + f" | {'bytes/item':>10} | "
        f"{'ms/query (10k items)':>20}"
    ]
    lines.append("-" * len(lines[0]))
    for key, seconds in summary["seconds_per_query_10k"].items():
        r_c = int(key.split("x")[1])
        cells = [quality[g][metric][key] for metric in ("recall@1", "mrr") for g in quality]
        lines.append(
            f"{'(' + key.replace('x', ',') + ')':>9} | "
            + " | ".join(f"{v:7.3f}" for v in cells)
            + f" | {r_c * dim * 2:>10,} | {seconds * 1000:20.3f}"
        )
    count = candidate_count(summary)
    lines.append(f"chance R@1 = {1 / count:.4f} ({count} candidates per query); {ATTRIBUTION}")
    return "\n".join(lines)


def scoring_time(model, num_queries: int, num_candidates: int, budgets: list, repeats: int = 5) -> dict:
    """Seconds per query to score `num_queries` random queries against `num_candidates` candidates (best of
    `repeats`, all queries in one batch), per budget."""
    generator = torch.Generator().manual_seed(0)
    dim = model.config.output_dim
    queries = torch.nn.functional.normalize(
        torch.randn(num_queries, model.config.num_query_vectors, dim, generator=generator), dim=-1
    )
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


__all__ = ["budget_table", "candidate_count", "results_benchmarks", "scoring_time", "GROUP_LABELS"]
