"""Render a checkpoint's model card (README.md) and its quality-against-budget plot from the checkpoint's config
and an evaluation results file: every number in the card is computed from those two, none is typed in."""

import io
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_metaembed import MetaEmbedConfig
from modeling_metaembed.hub_metaembed import write_atomic

from .results import budget_key, load_results, parse_budget

TEMPLATE_PATH = Path(__file__).with_name("metaembed_card.md")
PLOT_NAME = "budget_quality.png"
RESULTS_NAME = "eval_results.json"
TAGS = ["metaembed", "multi-vector", "late-interaction", "matryoshka", "retrieval", "sentence-transformers"]


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024 or unit == "MiB":
            return f"{count:,} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def _human_flops(count: int) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= threshold:
            return f"{count / threshold:.2f} {suffix}"
    return str(count)


def budget_rows(config: MetaEmbedConfig, results: dict | None) -> list:
    """One row per budget (trained groups plus any measured one): cost columns and each benchmark's value."""
    benchmarks = results["benchmarks"] if results else []
    budgets = {tuple(group) for group in config.matryoshka_groups}
    for benchmark in benchmarks:
        budgets |= {parse_budget(key) for key in benchmark["scores"]}
    dim = config.output_dim
    rows = []
    for r_q, r_c in sorted(budgets):
        values = []
        for benchmark in benchmarks:
            value = benchmark["scores"].get(budget_key((r_q, r_c)))
            values.append("–" if value is None else f"{value:.4f}".rstrip("0").rstrip("."))  # 0.5000 -> 0.5
        rows.append(
            {
                "r_q": r_q,
                "r_c": r_c,
                "bytes": _human_bytes(r_c * dim * 2),
                "flops": _human_flops(2 * r_q * r_c * dim),
                "scores": values,
            }
        )
    return rows


def plot_quality(results: dict) -> bytes:
    """A PNG: each benchmark's quality at each measured budget, budgets in increasing cost order."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    budgets = sorted(
        {parse_budget(key) for b in results["benchmarks"] for key in b["scores"]}, key=lambda b: b[0] * b[1]
    )
    figure, axes = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for benchmark in results["benchmarks"]:
        points = [
            (i, benchmark["scores"][budget_key(b)])
            for i, b in enumerate(budgets)
            if budget_key(b) in benchmark["scores"]
        ]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=benchmark["name"])
    axes.set_xticks(range(len(budgets)), [f"({r_q},{r_c})" for r_q, r_c in budgets])
    axes.set_xlabel("retrieval budget (r_q, r_c)")
    metrics = sorted({b["metric"]["name"] for b in results["benchmarks"]})
    axes.set_ylabel(" / ".join(metrics))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("Quality against retrieval budget")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def render_model_card(
    config: MetaEmbedConfig,
    results: dict | None = None,
    *,
    repo_id: str = "org/metaembed",
    model_name: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    datasets: list | None = None,
    results_file: str = RESULTS_NAME,
    plot_file: str | None = PLOT_NAME,
) -> str:
    """The card's text: YAML metadata (with a model-index entry per benchmark and budget) and the body."""
    model_name = model_name or repo_id.split("/")[-1]
    family = config.vlm_config.model_type
    text_only = getattr(config.vlm_config, "vision_config", None) is None  # VLM configs hold a vision part
    eval_results = []
    for benchmark in (results or {}).get("benchmarks", []):
        for key, value in sorted(benchmark["scores"].items(), key=lambda item: parse_budget(item[0])):
            r_q, r_c = parse_budget(key)
            eval_results.append(
                EvalResult(
                    task_type=benchmark["task"]["type"],
                    task_name=benchmark["task"]["name"],
                    dataset_type=benchmark["dataset"]["type"],
                    dataset_name=benchmark["dataset"]["name"],
                    dataset_config=benchmark["dataset"].get("config"),
                    dataset_split=benchmark["dataset"].get("split"),
                    metric_type=benchmark["metric"]["type"],
                    metric_value=value,
                    metric_name=f"{benchmark['metric']['name']} at budget ({r_q}, {r_c})",
                )
            )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="feature-extraction" if text_only else "visual-document-retrieval",
        tags=TAGS + ([] if text_only else ["multimodal"]),
        base_model=base_model,
        license=license,
        datasets=datasets or None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    largest = max(config.matryoshka_groups, key=lambda g: g[0] * g[1])
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        family=family,
        num_query_vectors=config.num_query_vectors,
        num_candidate_vectors=config.num_candidate_vectors,
        dim=config.output_dim,
        embedding_dim=config.embedding_dim,
        groups=", ".join(f"({a}, {b})" for a, b in config.matryoshka_groups),
        inputs="text" if text_only else "text, images, and text with an image",
        budget_rows=budget_rows(config, results),
        benchmark_names=[b["name"] for b in (results or {}).get("benchmarks", [])],
        benchmarks=(results or {}).get("benchmarks", []),
        results_file=results_file,
        results_command=(results or {}).get("command"),
        plot_file=plot_file if results else None,
        example_r_q=min(largest[0], 4) if largest[0] > 1 else 1,
        example_r_c=min(largest[1], 16) if largest[1] > 1 else 1,
        example_candidate='"a document"' if text_only else '{"text": "a caption", "image": "page.png"}',
    )
    return str(card)


def write_model_card(folder, results_path=None, **card_kwargs) -> Path:
    """Render README.md (and budget_quality.png when there are results) into a checkpoint folder.

    `results_path` defaults to the folder's eval_results.json when present; the results file is copied into
    the folder so the published card's numbers travel with their source."""
    folder = Path(folder)
    config = MetaEmbedConfig.from_pretrained(folder)
    if results_path is None and (folder / RESULTS_NAME).is_file():
        results_path = folder / RESULTS_NAME
    results = load_results(results_path) if results_path is not None else None
    if results is not None:
        if Path(results_path).resolve() != (folder / RESULTS_NAME).resolve():
            write_atomic(folder / RESULTS_NAME, Path(results_path).read_bytes())
        write_atomic(folder / PLOT_NAME, plot_quality(results))
    text = render_model_card(config, results, **card_kwargs)
    write_atomic(folder / "README.md", text)
    return folder / "README.md"


__all__ = ["render_model_card", "write_model_card", "plot_quality", "budget_rows", "PLOT_NAME", "RESULTS_NAME"]
