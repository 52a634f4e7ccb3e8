"""What the benchmark harnesses share: the budget sweep, reading data sets, encoding unique items once, reports."""

import json
from pathlib import Path

from modeling_metaembed.hub_metaembed import write_atomic
from modeling_metaembed.scoring_metaembed import check_budget

# The budgets of the paper's test-time scaling table (Table 3 / Figure 3).
PAPER_BUDGETS = ((1, 1), (2, 4), (4, 8), (8, 16), (16, 64))


def budget_label(budget) -> str:
    return f"({budget[0]},{budget[1]})"


def check_budgets(budgets, model) -> list:
    """The budgets as (r_q, r_c) tuples, each within what `model` produces (R_q query, R_c candidate vectors).
    `None`: the paper's budgets that fit the model, then its full budget (R_q, R_c)."""
    limits = (model.config.num_vectors("query"), model.config.num_vectors("candidate"))
    if budgets is None:
        budgets = [b for b in PAPER_BUDGETS if b[0] <= limits[0] and b[1] <= limits[1]]
        budgets += [limits] if limits not in budgets else []
    budgets = [tuple(b) for b in budgets]
    if not budgets:
        raise ValueError("give at least one budget (r_q, r_c)")
    return [check_budget(budget, limits, what="model's outputs") for budget in budgets]


def load_split(source, config: str | None, split: str = "test"):
    """One split of a data set in its public schema: a Hub repo id (`datasets.load_dataset(repo, config)`, from
    the local cache when offline) or a local folder laid out like the repo (`config/` holding its parquet files)."""
    from datasets import load_dataset

    path = Path(str(source))
    if path.is_dir():
        if config and not (path / config).is_dir():
            raise FileNotFoundError(f"{path} has no {config}/ folder (expected the data set's '{config}' files there)")
        return load_dataset(str(path), data_dir=config, split=split)
    return load_dataset(str(source), config, split=split)


def encode_unique(
    model, items: list, role: str, num_vectors: int, batch_size: int, show_progress_bar: bool, key=None, **kwargs
) -> tuple:
    """Encode each distinct item once. Returns (embeddings [U, num_vectors, D], position of each item in it)."""
    key = key or repr
    index, unique = {}, []
    positions = []
    for item in items:
        k = key(item)
        if k not in index:
            index[k] = len(unique)
            unique.append(item)
        positions.append(index[k])
    embeddings = model.encode(
        unique, role=role, num_vectors=num_vectors, batch_size=batch_size, show_progress_bar=show_progress_bar, **kwargs
    )
    return embeddings, positions


def write_report(results: dict, markdown: str, output_dir) -> Path:
    """`results.json` and `results.md` in `output_dir`, each written atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(output_dir / "results.md", markdown)
    return output_dir


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
