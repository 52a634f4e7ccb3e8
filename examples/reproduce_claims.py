"""The paper's three claims at small scale, on the quickstart's tasks, over several seeds (CPU).

    python examples/reproduce_claims.py --seeds 0 1 2                  # pages task; runs/reproduce/results.{json,md}
    python examples/reproduce_claims.py --seeds 0 1 2 --task emoji     # single Twemoji <-> names

Trains, with the quickstart's settings and identical apart from the one under test:
- metaembed:   MetaEmbed with the MMR loss (every group), evaluated at every budget (test-time scaling);
- no_mmr:      MetaEmbed trained on the full budget only, evaluated at every budget (the paper's ablation);
- last_token:  a single vector, the last token's state (the paper's Table 5 baseline);
- mean:        a single vector, the mean of the token states (Table 5);
and adds references that need no training: chance, and closed-form ridge maps between frozen features (pages:
one pooled vector per page, and one vector per grid cell; emoji: image features to caption embeddings). A run
whose summary.json already exists (same settings) is reused, so an interrupted reproduction resumes where it
stopped. Reports the mean and sample standard deviation over the seeds, and each seed's value.
"""

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

from closed_form_references import pages_ridge_reference, ridge_reference  # examples/, beside this script

from metaembed.quickstart import TASKS, QuickstartSettings, candidate_count, load_data, run_quickstart
from metaembed.quickstart.report import GROUP_LABELS
from modeling_metaembed.hub_metaembed import write_atomic

VARIANTS = {
    "metaembed": {},
    "no_mmr": {"mmr": False},
    "last_token": {"pooling": "last_token"},
    "mean": {"pooling": "mean"},
}
METRICS = ("recall@1", "mrr")


def run_variant(base: QuickstartSettings, name: str, seed: int, output: Path) -> dict:
    settings = replace(
        base,
        seed=seed,
        output_dir=str(output / f"{base.task}-{name}-seed{seed}"),
        save_checkpoint=False,
        **VARIANTS[name],
    )
    summary_path = Path(settings.output_dir) / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary["settings"] == json.loads(json.dumps(asdict(settings))):
            print(f"{name} seed {seed}: reusing {summary_path}", flush=True)
            return summary
    print(f"{name} seed {seed}: training", flush=True)
    summary = run_quickstart(settings, log=lambda *args: None)
    print(f"{name} seed {seed}: done in {summary['total_seconds']:.0f} s", flush=True)
    return summary


def aggregate(summaries: list) -> dict:
    """{metric: {group: {budget: {"mean", "std", "values"}}}} over the seeds."""
    table = {}
    for metric in METRICS:
        table[metric] = {}
        for group, per_metric in summaries[0]["quality"].items():
            table[metric][group] = {}
            for key in per_metric[metric]:
                values = [s["quality"][group][metric][key] for s in summaries]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                table[metric][group][key] = {"mean": statistics.fmean(values), "std": std, "values": values}
    return table


def markdown(results: dict) -> str:
    groups = results["groups"]
    labels = [GROUP_LABELS.get(g, g) for g in groups]
    count = results["candidates"]
    chance_mrr = sum(1 / r for r in range(1, count + 1)) / count
    lines = [
        f"Task: {results['task']}; {count} candidates per query; mean ± std over seeds {results['seeds']} "
        f"(each seed's value in results.json). Chance: Recall@1 {1 / count:.4f}, MRR {chance_mrr:.4f}.",
        "",
        "| model | budget (r_q, r_c) | "
        + " | ".join(f"R@1 {x}" for x in labels)
        + " | "
        + " | ".join(f"MRR {x}" for x in labels)
        + " |",
        "|---|---|" + "---|" * (2 * len(groups)),
    ]
    for name, table in results["variants"].items():
        for key in table["recall@1"][groups[0]]:
            stats = [table[m][g][key] for m in METRICS for g in groups]
            cells = [f"{cell['mean']:.3f} ± {cell['std']:.3f}" for cell in stats]
            lines.append(f"| {name} | ({key.replace('x', ', ')}) | " + " | ".join(cells) + " |")
    for name, reference in results["references"].items():
        cells = [f"{reference[g][m]:.3f}" for m in METRICS for g in groups]
        lines.append(f"| {name} (closed form, no training) | – | " + " | ".join(cells) + " |")
    cells = [f"{1 / count:.4f}"] * len(groups) + [f"{chance_mrr:.4f}"] * len(groups)
    lines.append("| chance | – | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="pages")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", default="runs/reproduce")
    parser.add_argument("--epochs", type=float, default=QuickstartSettings.epochs)
    parser.add_argument("--train-rounds", type=int, default=QuickstartSettings.train_rounds)
    parser.add_argument("--train-pairs", type=int, default=None)
    parser.add_argument("--test-pairs", type=int, default=None)
    parser.add_argument(
        "--meta-regions",
        default=QuickstartSettings.meta_regions,
        type=lambda value: None if value.lower() == "none" else value,
        help='candidate meta tokens read regions ("pyramid", the default) or the whole input ("none")',
    )
    args = parser.parse_args(argv)
    output = Path(args.output)
    base = QuickstartSettings(
        task=args.task,
        epochs=args.epochs,
        train_rounds=args.train_rounds,
        train_pairs=args.train_pairs,
        test_pairs=args.test_pairs,
        meta_regions=args.meta_regions,
        show_progress_bar=False,
    )
    variants, summaries = {}, {}
    for name in args.variants:
        summaries[name] = [run_variant(base, name, seed, output) for seed in args.seeds]
        variants[name] = aggregate(summaries[name])
    train_pairs, test_pairs = load_data(base)
    if base.task == "pages":
        references = pages_ridge_reference(train_pairs, test_pairs, base)
    else:
        ridge = ridge_reference(train_pairs, test_pairs, base.image_size)
        references = {"ridge": {d: ridge[d] for d in base.groups}}
    first = next(iter(summaries.values()))[0]
    results = {
        "command": "python examples/reproduce_claims.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "task": base.task,
        "seeds": args.seeds,
        "settings": asdict(base),
        "groups": list(base.groups),
        "candidates": candidate_count(first),
        "train_seconds": {name: [s["train_seconds"] for s in runs] for name, runs in summaries.items()},
        "variants": variants,
        "references": references,
    }
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / f"results-{base.task}.json", json.dumps(results, indent=2) + "\n")
    write_atomic(output / f"results-{base.task}.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
