"""ViDoRe v1 and v2 (visual document retrieval): text queries against page images, NDCG@5, at every budget.

Two public schemas (split "test"):
- v1, question-answer format (`vidore/docvqa_test_subsampled`, ...): one row per page, `image`,
  `image_filename` and an optional `query`. The corpus is every page; the queries are the distinct non-empty
  ones, each relevant to the page of its (last) row, as the benchmark's own evaluator has it.
- v2, BEIR format (`vidore/esg_reports_v2`, ...): configs `corpus` (`corpus-id`, `image`), `queries`
  (`query-id`, `query`, optional `language`) and `qrels` (`query-id`, `corpus-id`, `score`).

Pages are encoded once as candidates at the largest r_c of the sweep into a `MetaEmbedIndex`, queries once at
the largest r_q; each budget is then an exact search of the same index.
"""

from pathlib import Path

import torch

from metaembed.retrieval.index import MetaEmbedIndex

from .common import budget_label, check_budgets, load_split, markdown_table
from .metrics import ndcg_at_k, recall_at_k

V1 = (
    "vidore/arxivqa_test_subsampled",
    "vidore/docvqa_test_subsampled",
    "vidore/infovqa_test_subsampled",
    "vidore/tabfquad_test_subsampled",
    "vidore/tatdqa_test",
    "vidore/shiftproject_test",
    "vidore/syntheticDocQA_artificial_intelligence_test",
    "vidore/syntheticDocQA_energy_test",
    "vidore/syntheticDocQA_government_reports_test",
    "vidore/syntheticDocQA_healthcare_industry_test",
)
V2 = (
    "vidore/esg_reports_v2",
    "vidore/biomedical_lectures_v2",
    "vidore/economics_reports_v2",
    "vidore/esg_reports_human_labeled_v2",
)
BENCHMARKS = {"v1": V1, "v2": V2}


def _is_beir(source) -> bool:
    path = Path(str(source))
    if path.is_dir():
        return (path / "corpus").is_dir()
    return source in V2


def load_dataset(source, language: str | None = None) -> tuple:
    """(query texts, query ids, page images, page ids, qrels {query id: {page id: grade}}) of one data set: a Hub
    repo id or a local folder laid out like it (v1: the parquet files; v2: `corpus/`, `queries/`, `qrels/`)."""
    if _is_beir(source):
        corpus, queries, qrels_rows = (load_split(source, name) for name in ("corpus", "queries", "qrels"))
        schema = (
            ("corpus", corpus, ("corpus-id", "image")),
            ("queries", queries, ("query-id", "query")),
            ("qrels", qrels_rows, ("query-id", "corpus-id", "score")),
        )
        for name, rows, needed in schema:
            missing = [c for c in needed if c not in rows.column_names]
            if missing:
                raise ValueError(f"{source} {name} lacks the columns {missing}; it has {rows.column_names}")
        if language is not None:
            if "language" not in queries.column_names:
                raise ValueError(f"{source} queries have no 'language' column to select {language!r} with")
            queries = queries.filter(lambda row: row["language"] == language)
        page_ids = list(corpus["corpus-id"])
        known_pages = set(page_ids)
        qrels = {}
        for number, row in enumerate(qrels_rows):
            if row["corpus-id"] not in known_pages:
                raise ValueError(f"{source} qrels row {number} names page {row['corpus-id']!r}, not in the corpus")
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = row["score"]
        kept = [(q, t) for q, t in zip(queries["query-id"], queries["query"]) if q in qrels]
        query_ids, texts = [q for q, _ in kept], [t for _, t in kept]
        return texts, query_ids, corpus["image"], page_ids, qrels

    if language is not None:
        raise ValueError(f"{source} is a ViDoRe v1 data set: it has no languages to select")
    rows = load_split(source, None)
    missing = [c for c in ("query", "image", "image_filename") if c not in rows.column_names]
    if missing:
        raise ValueError(f"{source} lacks the columns {missing}; it has {rows.column_names}")
    page_ids, images, seen = [], [], set()
    qrels = {}
    for row in rows:
        if row["image_filename"] not in seen:
            seen.add(row["image_filename"])
            page_ids.append(row["image_filename"])
            images.append(row["image"])
        if row["query"]:
            qrels[row["query"]] = {row["image_filename"]: 1}  # the last row of a repeated query decides
    texts = list(qrels)
    return texts, texts, images, page_ids, qrels


@torch.no_grad()
def evaluate_dataset(
    model,
    source,
    budgets=None,
    batch_size: int = 8,
    show_progress_bar: bool = True,
    language: str | None = None,
    index_dtype: str = "bfloat16",
    k: int = 5,
) -> dict:
    """NDCG@k and Recall@k (in %) of one data set at each budget, searched in a `MetaEmbedIndex`."""
    budgets = check_budgets(budgets, model)
    texts, query_ids, images, page_ids, qrels = load_dataset(source, language)
    if not texts:
        raise ValueError(f"{source} has no queries with relevant pages")
    r_q, r_c = max(b[0] for b in budgets), max(b[1] for b in budgets)
    kwargs = {"batch_size": batch_size, "show_progress_bar": show_progress_bar}
    pages = model.encode(list(images), role="candidate", num_vectors=r_c, **kwargs)
    queries = model.encode(texts, role="query", num_vectors=r_q, **kwargs)
    index = MetaEmbedIndex(dim=pages.shape[-1], num_vectors=r_c, dtype=index_dtype)
    index.add(pages, ids=[str(p) if not isinstance(p, (str, int)) else p for p in page_ids])
    scores = {}
    for budget in budgets:
        found = index.search(queries, budget=budget, k=min(max(k, 10), len(index)))
        ndcg = [ndcg_at_k(ranking, qrels[q], k) for ranking, q in zip(found.ids, query_ids)]
        recall = [recall_at_k(ranking, qrels[q], k) for ranking, q in zip(found.ids, query_ids)]
        scores[budget_label(budget)] = {
            f"ndcg@{k}": 100.0 * sum(ndcg) / len(ndcg),
            f"recall@{k}": 100.0 * sum(recall) / len(recall),
        }
    return {"num_queries": len(texts), "num_pages": len(page_ids), "scores": scores}


def evaluate(
    model,
    datasets="v2",
    budgets=None,
    batch_size: int = 8,
    show_progress_bar: bool = True,
    language: str | None = None,
    index_dtype: str = "bfloat16",
    k: int = 5,
) -> dict:
    """Every data set of `datasets` ("v1", "v2", or a list of repo ids / local folders) at every budget, with the
    average NDCG@k per budget. Returns {"benchmark", "metric", "budgets", "datasets": {name: ...}, "averages"}."""
    budgets = check_budgets(budgets, model)
    if isinstance(datasets, (str, Path)):
        names = list(BENCHMARKS.get(str(datasets), [datasets]))
    else:
        names = list(datasets)
    results = {"benchmark": "ViDoRe", "metric": f"ndcg@{k} (%)", "budgets": [list(b) for b in budgets], "datasets": {}}
    for name in names:
        results["datasets"][str(name)] = evaluate_dataset(
            model, name, budgets, batch_size, show_progress_bar, language, index_dtype, k
        )
    results["averages"] = {
        budget_label(b): sum(d["scores"][budget_label(b)][f"ndcg@{k}"] for d in results["datasets"].values())
        / len(results["datasets"])
        for b in budgets
    }
    return results


def markdown(results: dict) -> str:
    """One row per budget: NDCG per data set and their average."""
    names = list(results["datasets"])
    metric = results["metric"].split(" ")[0]
    header = ["budget"] + [Path(n).name.removeprefix("vidore/") for n in names] + ["average"]
    rows = [
        [label] + [results["datasets"][n]["scores"][label][metric] for n in names] + [average]
        for label, average in results["averages"].items()
    ]
    return markdown_table(header, rows) + f"\nViDoRe {metric.upper()} (%).\n"


__all__ = ["V1", "V2", "load_dataset", "evaluate_dataset", "evaluate", "markdown"]
