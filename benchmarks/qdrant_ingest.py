"""Qdrant ingest throughput: an embeddings folder streamed into Qdrant, against the per-item .tolist() path it replaced.

    PYTHONPATH=. python benchmarks/qdrant_ingest.py --items 20000

Writes --items synthetic candidates (unit vectors, items x --vectors x --dim, float32) with the project's embeddings
writer to a temporary folder (shards of --shard-items), then, in this one run and for each engine, times:
- "old path": the shards read with `iter_embeddings` and written as `QdrantMetaEmbedIndex.add` wrote them up to
  commit a8bc9e1: its checks, then per item vector 0 and each budget's prefix converted by torch `.tolist()`, a
  `PointStruct` / `Point` per item, one upsert per --batch-size items;
- "streamed": `QdrantMetaEmbedIndex.add_from_embeddings` (the engine's batch write: numpy arrays to qdrant-client,
  memoryviews of the batch's bytes to the embedded engine; point ids without `uuid.UUID` objects).
Each is run --repeats times into a new collection, alternating old and new; each keeps its best. Engines: Qdrant's
embedded engine (`Edge`, float32 and float16 storage), qdrant-client's local mode in memory, and local mode on disk
(`QdrantClient(path=...)`, fewer items: it commits every point to SQLite). Points per second count the reading of
the shards too. Afterwards: the streamed collections' top-10 against the old path's, float16's score deviation.
"""

import argparse
import itertools
import os
import platform
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import torch

from metaembed.retrieval.embeddings_file import iter_embeddings, save_embeddings
from metaembed.retrieval.index import check_candidate_embeddings
from metaembed.retrieval.qdrant import _ID_NAMESPACE, COARSE, ID_KEY, Edge, QdrantMetaEmbedIndex, maxsim_field


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (one name covers several virtualised CPUs)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            fields = dict(line.split(":", 1) for line in file.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def old_point_id(item_id) -> str:
    """`point_id` as of commit a8bc9e1 (the same ids, through a `uuid.UUID`)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{type(item_id).__name__}:{item_id}"))


def old_add(store: QdrantMetaEmbedIndex, embeddings: torch.Tensor, ids: list, batch_size: int) -> None:
    """`QdrantMetaEmbedIndex.add` as of commit a8bc9e1 (its checks, conversion and upserts), less the progress bar."""
    largest = max(store.candidate_budgets)
    check_candidate_embeddings(embeddings, store.dim, largest, "this collection")
    ids = list(ids)
    if len(ids) != embeddings.shape[0]:
        raise ValueError("one id per item")
    for position, item_id in enumerate(ids):
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise ValueError(f"id at position {position} must be a str or an int, got {item_id!r}")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate ids")
    for start in range(0, embeddings.shape[0], batch_size):
        chunk = embeddings[start : start + batch_size, :largest].detach().float().cpu()
        points = []
        for item_id, item in zip(ids[start : start + batch_size], chunk):
            vector = {COARSE: item[0].tolist()}
            for r_c in store.candidate_budgets:
                if r_c > 1:
                    vector[maxsim_field(r_c)] = item[:r_c].tolist()
            points.append((old_point_id(item_id), vector, {ID_KEY: item_id}))
        old_upsert(store, points)


def old_upsert(store: QdrantMetaEmbedIndex, points: list) -> None:
    """The two backends' `upsert` as of commit a8bc9e1."""
    if isinstance(store.client, Edge):
        import qdrant_edge as qe

        built = [qe.Point(pid, vector, payload) for pid, vector, payload in points]
        store.client.shard(store.collection_name).update(qe.UpdateOperation.upsert_points(built))
    else:
        from qdrant_client import models

        structs = [models.PointStruct(id=pid, vector=vector, payload=payload) for pid, vector, payload in points]
        store.client.upsert(store.collection_name, points=structs, wait=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000, help="items for the embedded engine")
    parser.add_argument("--memory-items", type=int, default=5_000, help="items for local mode in memory")
    parser.add_argument("--disk-items", type=int, default=1_000, help="items for local mode on disk (0: skip)")
    parser.add_argument("--vectors", type=int, default=8, help="vectors per item in the file")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 4], help="candidate budgets stored")
    parser.add_argument("--batch-size", type=int, default=256, help="points per write, both paths")
    parser.add_argument("--shard-items", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--queries", type=int, default=50, help="queries for the result checks")
    args = parser.parse_args()
    budgets = tuple(sorted(set(args.budgets)))
    if max(budgets) > args.vectors:
        parser.error(f"--budgets up to {max(budgets)} need --vectors >= {max(budgets)}")

    from qdrant_client import QdrantClient

    torch.manual_seed(0)
    items = max(args.items, args.memory_items, args.disk_items)
    candidates = torch.nn.functional.normalize(torch.randn(items, args.vectors, args.dim), dim=-1)
    ids = [f"doc-{i}" for i in range(items)]
    queries = torch.nn.functional.normalize(torch.randn(args.queries, 4, args.dim), dim=-1)
    fields = 1 + sum(r for r in budgets if r > 1)
    print(
        f"{cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.2f}); qdrant-client {version('qdrant-client')}, qdrant-edge-py "
        f"{version('qdrant-edge-py')}"
    )
    print(
        f"candidates {args.vectors} x {args.dim} float32 in shards of {args.shard_items:,}; budgets {budgets}: "
        f"{fields} vectors of {args.dim} stored per point; batches of {args.batch_size}; best of {args.repeats}"
    )
    rows, stores, extra = [], {}, []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folders = {}
        for count in sorted({args.items, args.memory_items, args.disk_items} - {0}):
            folders[count] = scratch / f"emb-{count}"
            part = candidates[:count]
            save_embeddings(folders[count], part, ids[:count], "candidate", "synthetic", shard_rows=args.shard_items)
        engines = [
            ("embedded engine (Edge)", "float32", args.items),
            ("embedded engine (Edge)", "float16", args.items),
            ("local mode, in memory", "float32", args.memory_items),
            ("local mode, on disk (path=...)", "float32", args.disk_items),
        ]
        serial = itertools.count()
        for engine, datatype, count in engines:
            if not count:
                continue
            best = {"old": float("inf"), "new": float("inf")}
            for repeat in range(args.repeats):
                for path in ("old", "new"):
                    number = next(serial)
                    if engine.startswith("embedded"):
                        client = Edge(scratch / f"edge-{number}")
                    elif "memory" in engine:
                        client = QdrantClient(":memory:")
                    else:
                        client = QdrantClient(path=str(scratch / f"local-{number}"))
                    store = QdrantMetaEmbedIndex.create(client, "items", args.dim, budgets, datatype=datatype)
                    start = time.perf_counter()
                    if path == "old":
                        for embeddings, shard_ids in iter_embeddings(folders[count]):
                            old_add(store, embeddings, shard_ids, args.batch_size)
                    else:
                        store.add_from_embeddings(folders[count], batch_size=args.batch_size)
                    best[path] = min(best[path], time.perf_counter() - start)
                    assert len(store) == count
                    if repeat == args.repeats - 1:
                        stores[(engine, datatype, path)] = store
                    else:
                        client.close()
            stored = fields * args.dim * (2 if datatype == "float16" and engine.startswith("embedded") else 4)
            rows.append((engine, datatype, count, count / best["old"], count / best["new"], stored))
        for (engine, datatype, path), store in stores.items():
            if engine.startswith("embedded") and path == "new":
                start = time.perf_counter()
                store.optimize()
                extra.append(f"{engine} {datatype}: optimize() (HNSW on coarse) {time.perf_counter() - start:.1f} s")
        budget = (4, max(budgets))
        for engine, datatype, count, *_ in rows:
            old, new = stores[(engine, datatype, "old")], stores[(engine, datatype, "new")]
            same = old.search(queries, budget=budget, k=10).ids == new.search(queries, budget=budget, k=10).ids
            extra.append(f"{engine} {datatype}: streamed top-10 at {budget} equal to the old path's: {same}")
        edge32 = stores[("embedded engine (Edge)", "float32", "new")]
        edge16 = stores[("embedded engine (Edge)", "float16", "new")]
        exact, half = edge32.search(queries, budget=budget, k=10), edge16.search(queries, budget=budget, k=10)
        recall = sum(len(set(a) & set(b)) for a, b in zip(exact.ids, half.ids)) / (10 * args.queries)
        exact_all = edge32.search(queries, budget=budget, k=min(200, args.items))
        truth = [dict(zip(row, scores)) for row, scores in zip(exact_all.ids, exact_all.scores.tolist())]
        drift = max(
            abs(s - truth[q][i])
            for q in range(args.queries)
            for i, s in zip(half.ids[q], half.scores[q].tolist())
            if i in truth[q]
        )
        extra.append(
            f"embedded engine float16 against float32 at {budget}, {args.queries} queries: recall@10 {recall:.3f}, "
            f"largest score difference {drift:.2e} (bound r_q * 2^-10 = {4 * 2**-10:.2e})"
        )
        for store in stores.values():
            store.client.close()

    print()
    print("| engine | storage | items | old path points/s | streamed points/s | streamed / old | stored bytes/point |")
    print("|---|---|---|---|---|---|---|")
    for engine, datatype, count, old, new, stored in rows:
        print(f"| {engine} | {datatype} | {count:,} | {old:,.0f} | {new:,.0f} | {new / old:.2f} | {stored:,} |")
    print()
    for line in extra:
        print(f"- {line}")


if __name__ == "__main__":
    main()
