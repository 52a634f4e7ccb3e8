"""Synthetic vectors through every stage of the retrieval pipeline, each stage in a fresh process.

    PYTHONPATH=. python benchmarks/pipeline_at_scale.py --items 1000000
    PYTHONPATH=. python benchmarks/pipeline_at_scale.py --items 10000000     # ~22 GB of disk, ~15 minutes here

Stages, as a user runs them: write the embeddings folder as `metaembed encode` writes it (shards of 65,536 items
with their ids beside them, then the manifest); build a bf16 index from it as `metaembed index` does; append 10 %
more as `metaembed index --append` does (a new segment); add 1,000 items to the loaded index in memory and `save`
(the API's append); `load(mmap=True)`; search 8 queries at two budgets. For each: seconds, the peak anonymous memory
(`RssAnon`, sampled every 2 ms) of its process above the process's memory after imports, and bytes on disk. "ids
alone" is what reading every id of the index as `load` does costs (the list it keeps, and the set it checks their
uniqueness with, freed after): the part that must grow with N. A search stage gives the first search's seconds (it checks the stored tier norms that the AMX
kernel trusts against the mapped vectors, once) and the next one's. Linux only (/proc). Default shape: r_c = 4, D = 128, bf16 (N x 1 KB).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARD_ROWS = 1 << 16
QUERIES = 8


def anonymous() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def write_embeddings(folder: Path, count: int, start: int, vectors: int, dim: int, seed: int) -> None:
    """An embeddings folder of `count` random bf16 candidates, written shard by shard as the sharded encoder does."""
    import torch

    from metaembed.retrieval.embeddings_file import write_manifest, write_shard

    generator = torch.Generator().manual_seed(seed)
    shards = []
    for number, first in enumerate(range(0, count, SHARD_ROWS)):
        n = min(SHARD_ROWS, count - first)
        embeddings = torch.randn(n, vectors, dim, generator=generator).mul_(dim**-0.5).bfloat16()
        ids = [f"page-{start + first + i:09d}" for i in range(n)]
        shards.append(write_shard(folder, number, embeddings, ids))
    write_manifest(folder, shards, "candidate", "synthetic", "bfloat16", (vectors, dim))


def run_stage(stage: str, folder: Path, args) -> dict:
    """Run one stage in this process; returns {"seconds", "peak_anon", "base_anon"} (+ what the stage reports)."""
    import torch

    from metaembed.retrieval import scan_kernel
    from metaembed.retrieval.embeddings_file import iter_embeddings
    from metaembed.retrieval.index import MetaEmbedIndex
    from metaembed.retrieval.index_build import build_index
    from metaembed.retrieval.index_files import read_ids, read_manifest

    torch.set_num_threads(os.cpu_count() or 1)
    extra = max(1, args.items // 10)
    index_dir = folder / "index"
    queries = torch.randn(QUERIES, 4, args.dim, generator=torch.Generator().manual_seed(1)) * args.dim**-0.5

    def build():
        chunks = lambda: iter_embeddings(folder / "embeddings", dtype=torch.bfloat16)  # noqa: E731
        build_index(index_dir, chunks, args.items, args.dim, args.vectors, "bfloat16")

    def append():
        base = MetaEmbedIndex.load(index_dir, mmap=True)
        chunks = iter_embeddings(folder / "append", dtype=torch.bfloat16)
        build_index(index_dir, chunks, extra, args.dim, args.vectors, base=base)

    def save_after_add():
        index = MetaEmbedIndex.load(index_dir, mmap=True)
        added = torch.randn(1000, args.vectors, args.dim).mul_(args.dim**-0.5)
        index.add(added, ids=[f"added-{i}" for i in range(1000)])
        index.save(index_dir)

    def ids_alone():  # what a loaded index keeps of its ids (and checks their uniqueness with, briefly)
        ids = []
        for segment_folder, entry in read_manifest(index_dir)[1]:
            ids.extend(read_ids(segment_folder, entry))
        assert len(set(ids)) == len(ids)
        return ids

    found = {}

    def search(budget):
        index = MetaEmbedIndex.load(index_dir, mmap=True)
        start = time.perf_counter()
        result = index.search(queries, budget=budget, k=10)  # the first checks the stored norms it trusts
        middle = time.perf_counter()
        index.search(queries, budget=budget, k=10)
        found["search_seconds"] = [middle - start, time.perf_counter() - middle]
        found["segments"] = index.num_segments
        found["top_score"] = float(result.scores[0, 0])

    stages = {
        "write embeddings": lambda: write_embeddings(
            folder / "embeddings", args.items, 0, args.vectors, args.dim, seed=0
        ),
        "write embeddings to append": lambda: write_embeddings(
            folder / "append", extra, args.items, args.vectors, args.dim, seed=2
        ),
        "build index": build,
        "append 10 %": append,
        "add 1,000 + save": save_after_add,
        "load (mapped)": lambda: MetaEmbedIndex.load(index_dir, mmap=True),
        "ids alone": ids_alone,
        "search (4, 1)": lambda: search((4, 1)),
        "search (4, 4)": lambda: search((4, 4)),
    }
    scan_kernel.compiled()  # first-use costs (loading the compiled kernel, or its build check) before the baseline
    warm = MetaEmbedIndex(args.dim, args.vectors)
    warm.add(torch.randn(4096, args.vectors, args.dim))
    warm.search(queries, k=1)
    del warm
    base = anonymous()
    peak, running = [base], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    kept = stages[stage]()  # noqa: F841  held until measured: "ids alone" is what it keeps
    seconds = time.perf_counter() - start
    peak[0] = max(peak[0], anonymous())
    running[0] = False
    sampler.join()
    return {"seconds": seconds, "peak_anon": peak[0], "base_anon": base, **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--vectors", type=int, default=4, help="r_c: vectors kept per item")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--folder", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage, print JSON
    args = parser.parse_args()
    if args.stage is not None:
        print(json.dumps(run_stage(args.stage, args.folder, args)))
        return
    folder = args.folder or Path(tempfile.mkdtemp(prefix="pipeline-at-scale-", dir=os.environ.get("TMPDIR")))
    folder.mkdir(parents=True, exist_ok=True)
    stages = [
        ("write embeddings", "embeddings"),
        ("write embeddings to append", "append"),
        ("build index", "index"),
        ("append 10 %", "index"),
        ("add 1,000 + save", "index"),
        ("load (mapped)", "index"),
        ("ids alone", "index"),
        ("search (4, 1)", "index"),
        ("search (4, 4)", "index"),
    ]
    print(
        f"CPU: {cpu_name()} ({os.cpu_count()} cores); N = {args.items:,}, r_c = {args.vectors}, D = {args.dim}, "
        f"bf16; {folder}\n"
    )
    print("| stage | seconds | peak RssAnon above imports | on disk after |\n|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1"}
    try:
        for stage, where in stages:
            command = [sys.executable, __file__, "--stage", stage, "--folder", str(folder)]
            command += ["--items", str(args.items), "--vectors", str(args.vectors), "--dim", str(args.dim)]
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            if result.returncode:
                raise SystemExit(f"stage {stage!r} failed:\n{result.stderr[-3000:]}")
            report = json.loads(result.stdout.splitlines()[-1])
            seconds = report["seconds"]
            if "search_seconds" in report:  # the first search, then the next
                seconds = "{:.2f} / {:.2f}".format(*report["search_seconds"])
            else:
                seconds = f"{seconds:.2f}"
            note = f" ({report['segments']} segments)" if "segments" in report else ""
            print(
                f"| {stage}{note} | {seconds} | {(report['peak_anon'] - report['base_anon']) / 2**20:,.0f} MB "
                f"| {on_disk(folder / where) / 1e9:.2f} GB |",
                flush=True,
            )
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
