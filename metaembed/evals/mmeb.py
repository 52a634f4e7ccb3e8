"""MMEB (Massive Multimodal Embedding Benchmark, `TIGER-Lab/MMEB-eval`): 36 tasks, Precision@1, at every budget.

Schema (one config per task, split "test"): each row is a query `qry_text` (with a `<|image_1|>` placeholder
where its image goes) and `qry_img_path`, and its candidates `tgt_text` / `tgt_img_path` (lists; the first is
the positive). Image paths are relative to the benchmark's image folder (`images.zip` of the data set repo).
Precision@1: the share of queries whose positive outscores every other candidate of its row.

Each distinct query and candidate is encoded once at the largest budget of the sweep; every budget is then a
prefix of those vectors (the point of MetaEmbed), so a sweep costs one encoding pass.
"""

from collections import defaultdict
from pathlib import Path

import torch

from modeling_metaembed.scoring_metaembed import maxsim

from .common import budget_label, check_budgets, encode_unique, load_split, markdown_table
from .metrics import precision_at_1

SOURCE = "TIGER-Lab/MMEB-eval"
IMAGE_TOKEN = "<|image_1|>"
META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")

# task -> (meta-task, in-distribution for MMEB-train?) as in the benchmark's paper (20 IND, 16 OOD).
TASKS = {
    **{t: ("Classification", True) for t in ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")},
    **{t: ("Classification", False) for t in ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{t: ("VQA", True) for t in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    **{t: ("VQA", False) for t in ("ScienceQA", "VizWiz", "GQA", "TextVQA")},
    **{
        t: ("Retrieval", True)
        for t in ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA")
    },
    **{t: ("Retrieval", False) for t in ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")},
    "MSCOCO": ("Grounding", True),
    **{t: ("Grounding", False) for t in ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")},
}
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


def _item(text, image_path, image_root: Path | None, where: str):
    """A `model.encode` input: the text without the image placeholder, and the image file if there is one."""
    text = (text or "").replace(IMAGE_TOKEN, "").strip()
    if not image_path:
        if not text:
            raise ValueError(f"{where} has neither text nor an image")
        return text
    if image_root is None:
        raise ValueError(f"{where} has an image: give image_root, the folder of the data set's unzipped images.zip")
    path = image_root / image_path
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {image_path!r} is not in {image_root}")
    return {"text": text, "image": path} if text else path


def load_task(task: str, source=SOURCE, image_root=None, limit: int | None = None) -> tuple:
    """(queries, candidate lists) of one MMEB task: `queries[i]` is an encode input, `candidates[i]` its list
    (positive first). `source`: the Hub repo or a local folder laid out like it; `image_root`: the image folder."""
    if task not in TASKS:
        raise ValueError(f"unknown MMEB task {task!r}; the tasks are {sorted(TASKS)}")
    rows = load_split(source, task, "test")
    missing = [c for c in COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"MMEB task {task} ({source}) lacks the columns {missing}; it has {rows.column_names}")
    if image_root is None and Path(str(source)).is_dir():
        image_root = Path(str(source)) / "images"
    root = Path(image_root) if image_root is not None else None
    queries, candidates = [], []
    for number, row in enumerate(rows):
        if limit is not None and number >= limit:
            break
        where = f"{task} row {number}"
        texts, paths = list(row["tgt_text"]), list(row["tgt_img_path"] or [])
        if not texts and not paths:
            raise ValueError(f"{where} has no candidates")
        paths = paths or [""] * len(texts)
        texts = texts or [""] * len(paths)
        if len(texts) != len(paths):
            raise ValueError(f"{where}: {len(texts)} tgt_text entries but {len(paths)} tgt_img_path entries")
        queries.append(_item(row["qry_text"], row["qry_img_path"], root, f"{where} (query)"))
        candidates.append([_item(t, p, root, f"{where} candidate {j}") for j, (t, p) in enumerate(zip(texts, paths))])
    return queries, candidates


def _key(item) -> str:
    return repr((item["text"], str(item["image"]))) if isinstance(item, dict) else repr(item)


@torch.no_grad()
def evaluate_task(
    model,
    queries: list,
    candidates: list,
    budgets,
    batch_size: int = 16,
    show_progress_bar: bool = False,
    instructions: dict | None = None,
) -> dict:
    """Precision@1 (in %) of one task at each budget: {"(r_q,r_c)": score}."""
    budgets = check_budgets(budgets, model)
    instructions = instructions or {}
    r_q, r_c = max(b[0] for b in budgets), max(b[1] for b in budgets)
    kwargs = {"batch_size": batch_size, "show_progress_bar": show_progress_bar, "key": _key}
    query_embeddings, query_rows = encode_unique(
        model, queries, "query", r_q, instruction=instructions.get("query"), **kwargs
    )
    flat = [c for row in candidates for c in row]
    candidate_embeddings, flat_rows = encode_unique(
        model, flat, "candidate", r_c, instruction=instructions.get("candidate"), **kwargs
    )
    # Rows that share a candidate list (a classification task's labels) are scored together.
    groups, start = defaultdict(list), 0
    for number, row in enumerate(candidates):
        groups[tuple(flat_rows[start : start + len(row)])].append(number)
        start += len(row)
    hits = {budget: torch.zeros(len(queries), dtype=torch.bool) for budget in budgets}
    for candidate_rows, numbers in groups.items():
        rows = torch.tensor(candidate_rows)
        alike = (rows == rows[0]).expand(len(numbers), -1)  # copies of the positive are not competitors
        group_queries = query_embeddings[[query_rows[n] for n in numbers]]
        group_candidates = candidate_embeddings[rows]
        for budget in budgets:
            scores = maxsim(group_queries, group_candidates, budget=budget)
            hits[budget][numbers] = precision_at_1(scores, alike)
    return {budget_label(budget): 100.0 * hits[budget].float().mean().item() for budget in budgets}


def evaluate(
    model,
    tasks=None,
    source=SOURCE,
    image_root=None,
    budgets=None,
    batch_size: int = 16,
    limit: int | None = None,
    show_progress_bar: bool = True,
    instructions: dict | None = None,
) -> dict:
    """Precision@1 of every task at every budget, with the paper's averages (per meta-task, IND, OOD, overall).

    Returns {"benchmark": "MMEB", "budgets": [...], "tasks": {task: {"meta_task", "in_distribution",
    "num_queries", "scores": {budget: P@1}}}, "averages": {budget: {"Classification": ..., ..., "Overall": ...}}}.
    `limit` keeps the first rows of each task (a quick look; not comparable with published numbers)."""
    budgets = check_budgets(budgets, model)
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown MMEB tasks {unknown}; the tasks are {sorted(TASKS)}")
    results = {
        "benchmark": "MMEB",
        "metric": "precision@1 (%)",
        "budgets": [list(b) for b in budgets],
        "limit": limit,
        "tasks": {},
    }
    for task in tasks:
        queries, candidates = load_task(task, source, image_root, limit)
        scores = evaluate_task(model, queries, candidates, budgets, batch_size, show_progress_bar, instructions)
        meta_task, in_distribution = TASKS[task]
        results["tasks"][task] = {
            "meta_task": meta_task,
            "in_distribution": in_distribution,
            "num_queries": len(queries),
            "scores": scores,
        }
    results["averages"] = averages(results["tasks"], budgets)
    return results


def averages(task_results: dict, budgets) -> dict:
    """Per budget: the mean over tasks of each meta-task, of IND and OOD tasks, and over all tasks evaluated."""
    table = {}
    for budget in budgets:
        label = budget_label(budget)
        groups = defaultdict(list)
        for result in task_results.values():
            score = result["scores"][label]
            groups[result["meta_task"]].append(score)
            groups["IND" if result["in_distribution"] else "OOD"].append(score)
            groups["Overall"].append(score)
        table[label] = {name: sum(values) / len(values) for name, values in groups.items()}
    return table


def markdown(results: dict) -> str:
    """One row per budget, as in the paper's Figure 3: the meta-task averages, IND, OOD and overall."""
    columns = [
        c for c in (*META_TASKS, "IND", "OOD", "Overall") if any(c in row for row in results["averages"].values())
    ]
    counts = defaultdict(int)
    for result in results["tasks"].values():
        counts[result["meta_task"]] += 1
        counts["IND" if result["in_distribution"] else "OOD"] += 1
        counts["Overall"] += 1
    header = ["budget"] + [f"{c} ({counts[c]})" for c in columns]
    rows = [[label] + [values[c] for c in columns] for label, values in results["averages"].items()]
    note = "\nMMEB Precision@1 (%), averaged over tasks (how many in parentheses)"
    note += f"; first {results['limit']} queries per task.\n" if results.get("limit") else ".\n"
    return markdown_table(header, rows) + note


__all__ = ["TASKS", "META_TASKS", "load_task", "evaluate_task", "evaluate", "averages", "markdown"]
