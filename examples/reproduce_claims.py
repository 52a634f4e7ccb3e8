"""The paper's claims at small scale, on the quickstart's data, over several seeds (CPU).

    python examples/reproduce_claims.py --seeds 0 1 2 --image-size 96   # ~55 min; runs/reproduce/results.{json,md}

Trains, with identical settings apart from the one under test:
- metaembed:   MetaEmbed with the MMR loss (every group), evaluated at every budget (test-time scaling);
- no_mmr:      MetaEmbed trained on the full budget only, evaluated at every budget (the paper's Fig. 4b ablation);
- last_token:  a single vector, the last token's state (the paper's Table 5 baseline);
- mean:        a single vector, the mean of the token states (Table 5);
and adds two references that need no training: ridge regression from frozen image features to frozen caption
embeddings, and chance. A run whose summary.json already exists (same settings) is reused, so an interrupted
reproduction resumes where it stopped. Reports mean and sample standard deviation of Recall@1 over the seeds.
"""

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

from metaembed.quickstart import QuickstartSettings, load_data, ridge_reference, run_quickstart
from metaembed.twemoji import DIRECTIONS
from modeling_metaembed.processing_metaembed import write_atomic

VARIANTS = {
    "metaembed": {},
    "no_mmr": {"mmr": False},
    "last_token": {"pooling": "last_token"},
    "mean": {"pooling": "mean"},
}


def run_variant(base: QuickstartSettings, name: str, seed: int, output: Path) -> dict:
    settings = replace(base, seed=seed, output_dir=str(output / f"{name}-seed{seed}"), save_checkpoint=False,
                       **VARIANTS[name])  # fmt: skip
    summary_path = Path(settings.output_dir) / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary["settings"] == asdict(settings):
            print(f"{name} seed {seed}: reusing {summary_path}", flush=True)
            return summary
    print(f"{name} seed {seed}: training", flush=True)
    return run_quickstart(settings, log=lambda *args: None)


def aggregate(summaries: list) -> dict:
    """{metric: {direction: {budget: {"mean", "std", "values"}}}} of Recall@1 and MRR over the seeds."""
    table = {}
    for metric in ("recall@1", "mrr"):
        table[metric] = {}
        for direction in DIRECTIONS:
            table[metric][direction] = {}
            for key in summaries[0]["quality"][direction][metric]:
                values = [s["quality"][direction][metric][key] for s in summaries]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                table[metric][direction][key] = {"mean": statistics.fmean(values), "std": std, "values": values}
    return table


def markdown(results: dict) -> str:
    seeds = len(results["seeds"])
    lines = [
        f"{results['test_pairs']} held-out Twemoji pairs, mean ± std over {seeds} seeds "
        f"(chance: Recall@1 {results['chance']:.4f}, MRR {results['chance_mrr']:.4f})",
        "",
        "| model | budget (r_q, r_c) | R@1 text → image | R@1 image → text | MRR text → image | MRR image → text |",
        "|---|---|---|---|---|---|",
    ]
    for name, table in results["variants"].items():
        for key in table["recall@1"]["text-to-image"]:
            cells = [
                f"{table[metric][d][key]['mean']:.3f} ± {table[metric][d][key]['std']:.3f}"
                for metric in ("recall@1", "mrr") for d in DIRECTIONS
            ]
            lines.append(f"| {name} | ({key.replace('x', ', ')}) | " + " | ".join(cells) + " |")
    ridge, chance = results["ridge"], results["chance"]
    cells = [f"{ridge[d][metric]:.3f}" for metric in ("recall@1", "mrr") for d in DIRECTIONS]
    lines.append("| ridge (frozen features, no training) | – | " + " | ".join(cells) + " |")
    lines.append(f"| chance | – | {chance:.4f} | {chance:.4f} | {results['chance_mrr']:.4f} | {results['chance_mrr']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", default="runs/reproduce")
    parser.add_argument("--epochs", type=float, default=QuickstartSettings.epochs)
    parser.add_argument("--train-pairs", type=int, default=None)
    parser.add_argument("--test-pairs", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=QuickstartSettings.image_size)
    args = parser.parse_args(argv)
    output = Path(args.output)
    base = QuickstartSettings(epochs=args.epochs, train_pairs=args.train_pairs, test_pairs=args.test_pairs,
                              image_size=args.image_size, show_progress_bar=False)  # fmt: skip
    variants = {}
    for name in args.variants:
        variants[name] = aggregate([run_variant(base, name, seed, output) for seed in args.seeds])
    train_pairs, test_pairs = load_data(base)
    results = {
        "command": "python examples/reproduce_claims.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seeds": args.seeds, "settings": asdict(base), "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
        "chance": 1 / len(test_pairs), "chance_mrr": sum(1 / r for r in range(1, len(test_pairs) + 1)) / len(test_pairs),
        "variants": variants, "ridge": ridge_reference(train_pairs, test_pairs, base.image_size),
    }  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(output / "results.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
