"""Compressed indexes (int8, binary) against exact search, on a trained checkpoint's real embeddings.

    python benchmarks/compressed_recall.py --checkpoint runs/quickstart/checkpoint    # after ./run quickstart

Indexes every Twemoji image as a candidate, queries with every caption, and reports for each storage dtype the
bytes per item a scan reads at each budget, and recall@k against the exact top-k (bf16 storage, exhaustive, float32
queries) for several shortlist sizes: the compressed scan keeps the shortlist, which is re-scored exactly from the
full vectors. It also prints the recall of the compressed scan alone (shortlist = k: its own top-k, re-scored).
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoModel

from metaembed.quickstart.twemoji import twemoji_pairs
from metaembed.retrieval.index import MetaEmbedIndex


def recall(found: list, exact: list, k: int) -> float:
    return sum(len(set(a[:k]) & set(b[:k])) for a, b in zip(found, exact)) / (k * len(exact))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/quickstart/checkpoint")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shortlists", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[1, 1, 2, 4, 4, 8, 8, 16, 8, 32], help="r_q r_c pairs"
    )
    parser.add_argument("--limit", type=int, default=None, help="use the first N image-caption pairs (a quick run)")
    parser.add_argument("--embeddings-cache", default=None, help="a .pt file: encode once, reuse in later runs")
    args = parser.parse_args(argv)
    budgets = list(zip(args.budgets[::2], args.budgets[1::2]))

    model = AutoModel.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    config = model.config
    pairs = twemoji_pairs()[: args.limit]
    if args.embeddings_cache and Path(args.embeddings_cache).is_file():
        candidates, queries = torch.load(args.embeddings_cache)
    else:
        candidates = model.encode_candidates([p["image"] for p in pairs], batch_size=32, show_progress_bar=True)
        queries = model.encode_queries([p["caption"] for p in pairs], batch_size=64, show_progress_bar=True)
        if args.embeddings_cache:
            torch.save((candidates, queries), args.embeddings_cache)
    indexes = {}
    for dtype in ("bfloat16", "int8", "binary"):
        indexes[dtype] = MetaEmbedIndex(config.output_dim, config.num_candidate_vectors, dtype=dtype)
        indexes[dtype].add(candidates)
    n = len(pairs)
    k = min(args.k, n)
    shortlists = [s for s in args.shortlists if k <= s <= n]
    print(
        f"{n} images indexed, {n} caption queries, D = {config.output_dim}; recall@{k} against exact search "
        f"(bf16 storage, exhaustive); compressed scans re-scored exactly from the full bf16 vectors"
    )
    print()
    print(f"| budget | dtype | bytes/item | own top-{k} | " + " | ".join(f"shortlist {s}" for s in shortlists) + " |")
    print("|---|---|---|---|" + "---|" * len(shortlists))
    for r_q, r_c in budgets:
        if r_q > config.num_query_vectors or r_c > config.num_candidate_vectors:
            continue
        exact = indexes["bfloat16"].search(queries, budget=(r_q, r_c), k=k).ids
        for dtype, index in indexes.items():
            if dtype == "bfloat16":
                cells = ["1.000 (exact)"] + ["-"] * len(shortlists)
            else:
                cells = [
                    f"{recall(index.search(queries, budget=(r_q, r_c), k=k, shortlist=s).ids, exact, k):.3f}"
                    for s in [k, *shortlists]
                ]
            print(f"| ({r_q}, {r_c}) | {dtype} | {index.bytes_per_item(r_c):,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
