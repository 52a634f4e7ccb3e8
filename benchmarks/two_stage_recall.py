"""Two-stage search against exhaustive search, on a trained checkpoint's real embeddings.

    python benchmarks/two_stage_recall.py --checkpoint runs/quickstart/checkpoint    # after ./run quickstart

Indexes every Twemoji image as a candidate, queries with every caption, and reports, per budget and shortlist
size, recall@k of `search_two_stage` against the exact `search` top-k (the share of the exhaustive top-k that
two-stage search also returns) and the share of index bytes it reads per query.
"""

import argparse

import torch
from transformers import AutoModel

from metaembed.quickstart.twemoji import twemoji_pairs
from metaembed.retrieval.index import MetaEmbedIndex


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/quickstart/checkpoint")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shortlists", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 4, 8, 8, 16, 8, 32], help="r_q r_c pairs")
    parser.add_argument("--limit", type=int, default=None, help="use the first N image-caption pairs (a quick run)")
    args = parser.parse_args(argv)
    budgets = list(zip(args.budgets[::2], args.budgets[1::2]))

    model = AutoModel.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    pairs = twemoji_pairs()[: args.limit]
    index = MetaEmbedIndex(model.config.output_dim, model.config.num_candidate_vectors)
    index.add_items(model, [p["image"] for p in pairs], batch_size=32)
    queries = model.encode_queries([p["caption"] for p in pairs], batch_size=64, show_progress_bar=True)

    n, r_c_max = len(index), model.config.num_candidate_vectors
    print(f"{n} images indexed, {len(pairs)} caption queries, recall@{args.k} of two-stage against exhaustive search")
    print("| budget | exhaustive bytes/query | " + " | ".join(f"shortlist {s}" for s in args.shortlists) + " |")
    print("|---|---|" + "---|" * len(args.shortlists))
    for r_q, r_c in budgets:
        if r_q > model.config.num_query_vectors or r_c > r_c_max:
            continue
        exact = index.search(queries, budget=(r_q, r_c), k=args.k)
        cells = []
        for shortlist in args.shortlists:
            staged = index.search_two_stage(queries, budget=(r_q, r_c), k=args.k, shortlist=shortlist)
            overlap = [len(set(a) & set(b)) / args.k for a, b in zip(exact.ids, staged.ids)]
            read = (n + shortlist * r_c) / (n * r_c)
            cells.append(f"{torch.tensor(overlap).mean():.3f} (reads {read:.0%})")
        print(f"| ({r_q}, {r_c}) | {n * r_c * model.config.output_dim * 2:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
