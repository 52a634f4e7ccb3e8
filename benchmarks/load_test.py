"""A load test: many items, many queries, exhaustive and two-stage, in MetaEmbedIndex and in Qdrant's engine.

    python benchmarks/load_test.py                                  # 100,000 items, 1,000 queries (minutes)
    python benchmarks/load_test.py --items 2000 --queries 20 --dim 32   # CI size

Items are synthetic but structured like multi-vector embeddings: each item has a random direction and its R_c
unit vectors scatter around it, and each query's vectors scatter around one item's direction, so the first vector
is a useful coarse signal (as in trained MetaEmbed models) and exhaustive search has a definite answer. Everything
runs in this process (Qdrant through its embedded engine, qdrant-edge-py; nothing leaves the machine).

For each system: queries one at a time (p50 / p99 latency, and queries per second of that sequential stream), a
batched run (queries per second, `--batch` queries per call), and recall@k of its results against exact MaxSim
(float32, exhaustive).
"""

import argparse
import tempfile
import time

import torch

from metaembed.retrieval.index import MetaEmbedIndex


def synthetic(items: int, queries: int, vectors: int, query_vectors: int, dim: int, seed: int = 0) -> tuple:
    """(candidates [items, vectors, dim], queries [queries, query_vectors, dim]) of unit vectors, built in
    pieces; query i scatters around item (i * 7919) % items."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(items, dim, generator=generator), dim=-1)
    candidates = torch.empty(items, vectors, dim, dtype=torch.float32)
    for start in range(0, items, 8192):
        base = directions[start : start + 8192].unsqueeze(1)
        noise = torch.randn(base.shape[0], vectors, dim, generator=generator) / dim**0.5
        candidates[start : start + 8192] = torch.nn.functional.normalize(base + 1.2 * noise, dim=-1)
    targets = (torch.arange(queries) * 7919) % items
    noise = torch.randn(queries, query_vectors, dim, generator=generator) / dim**0.5
    query_batch = torch.nn.functional.normalize(directions[targets].unsqueeze(1) + 1.5 * noise, dim=-1)
    return candidates, query_batch


def percentile(values: list, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def measure(name: str, search, queries: torch.Tensor, exact_ids: list, k: int, batch: int, sequential: int) -> str:
    """One table row: sequential single-query latencies, batched throughput, recall@k against exact."""
    search(queries[:1])  # warm-up
    latencies, found = [], []
    for i in range(min(sequential, queries.shape[0])):
        start = time.perf_counter()
        found.extend(search(queries[i : i + 1]))
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    batched = []
    for b in range(0, queries.shape[0], batch):
        batched.extend(search(queries[b : b + batch]))
    batched_seconds = time.perf_counter() - start
    recall = sum(len(set(a[:k]) & set(b[:k])) for a, b in zip(batched, exact_ids)) / (k * len(exact_ids))
    assert found == batched[: len(found)] or name.startswith("Qdrant")  # one query alone = in a batch
    return (
        f"| {name} | {percentile(latencies, 0.5) * 1e3:.2f} | {percentile(latencies, 0.99) * 1e3:.2f} | "
        f"{len(latencies) / sum(latencies):.1f} | {queries.shape[0] / batched_seconds:.1f} | "
        f"{recall:.3f} |"
    )


class Rows(list):
    """Table rows, each printed as soon as it is measured."""

    def append(self, row: str) -> None:
        super().append(row)
        print(row, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budget", type=int, nargs=2, default=[4, 8], metavar=("R_Q", "R_C"))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shortlist", type=int, default=100, help="two-stage / compressed shortlist")
    parser.add_argument("--batch", type=int, default=64, help="queries per call in the batched run")
    parser.add_argument("--sequential", type=int, default=None, help="queries run one at a time (default: all)")
    parser.add_argument(
        "--qdrant-exhaustive-queries",
        type=int,
        default=None,
        help="queries for Qdrant's exhaustive MaxSim scan (default: all; it is the slowest row)",
    )
    parser.add_argument("--no-qdrant", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (MetaEmbedIndex)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r_q, r_c = args.budget
    k, sequential = args.k, args.sequential or args.queries
    candidates, queries = synthetic(args.items, args.queries, r_c, r_q, args.dim)
    print(
        f"{args.items:,} items x {r_c} vectors x {args.dim} dims, {args.queries:,} queries x {r_q} vectors; "
        f"budget ({r_q}, {r_c}), top-{k}, shortlist {args.shortlist}; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    reference = MetaEmbedIndex(args.dim, r_c, dtype="float32")
    reference.add(candidates)
    exact_ids = reference.search(queries, budget=(r_q, r_c), k=k).ids
    del reference

    print()
    print(f"| system | p50 ms | p99 ms | QPS, one at a time | QPS, batches of {args.batch} | recall@{k} vs exact |")
    print("|---|---|---|---|---|---|")
    rows = Rows()
    systems = {}
    for dtype in ("bfloat16", "int8", "binary"):
        index = MetaEmbedIndex(args.dim, r_c, dtype=dtype)
        index.add(candidates)
        systems[dtype] = index
        label = {
            "bfloat16": "exhaustive, bf16",
            "int8": f"int8 scan + exact re-score of {args.shortlist}",
            "binary": f"binary scan + exact re-score of {args.shortlist}",
        }[dtype]
        kwargs = {} if dtype == "bfloat16" else {"shortlist": args.shortlist}
        rows.append(
            measure(
                f"MetaEmbedIndex {label} ({index.bytes_per_item(r_c):,} B/item)",
                lambda q, i=index, kw=kwargs: i.search(q, budget=(r_q, r_c), k=k, **kw).ids,
                queries,
                exact_ids,
                k,
                args.batch,
                sequential,
            )
        )
    bf16 = systems["bfloat16"]
    rows.append(
        measure(
            f"MetaEmbedIndex two-stage, bf16 (shortlist {args.shortlist})",
            lambda q: bf16.search_two_stage(q, budget=(r_q, r_c), k=k, shortlist=args.shortlist).ids,
            queries,
            exact_ids,
            k,
            args.batch,
            sequential,
        )
    )

    if not args.no_qdrant:
        from metaembed.retrieval.qdrant import Edge, QdrantMetaEmbedIndex

        with tempfile.TemporaryDirectory() as folder:
            edge = Edge(folder)
            start = time.perf_counter()
            store = QdrantMetaEmbedIndex.create(edge, "load", args.dim, (r_c,))
            store.add(candidates, ids=list(range(args.items)), batch_size=1024)
            store.optimize()
            print(
                f"(Qdrant embedded engine: {args.items:,} points upserted and optimized, HNSW on the coarse field, "
                f"in {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
            many = args.qdrant_exhaustive_queries or args.queries
            rows.append(
                measure(
                    f"Qdrant (embedded engine) exhaustive MaxSim ({many} queries)",
                    lambda q: store.search(q, budget=(r_q, r_c), k=k).ids,
                    queries[:many],
                    exact_ids[:many],
                    k,
                    args.batch,
                    min(sequential, many),
                )
            )
            rows.append(
                measure(
                    f"Qdrant (embedded engine) two-stage: HNSW prefetch {args.shortlist} + MaxSim",
                    lambda q: store.search(q, budget=(r_q, r_c), k=k, shortlist=args.shortlist).ids,
                    queries,
                    exact_ids,
                    k,
                    args.batch,
                    sequential,
                )
            )
            edge.close()


if __name__ == "__main__":
    main()
