"""Anonymous memory and time of a streamed index build and append against add() + save, and bytes a mapped load reads.

    PYTHONPATH=. MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/index_build_memory.py --items 24000

Random float32 embeddings are written as an embeddings folder (shards of --shard-items), then indexed in bf16:
peak `RssAnon` (sampled every ms) added by each step of this one process, after a warm-up build; bytes read
through read(2) (`rchar` of /proc/self/io) by a mapped load with and without checksums. Linux only (/proc).
"""

import argparse
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

from metaembed.retrieval.embeddings_file import embeddings_info, iter_embeddings, write_manifest, write_shard
from metaembed.retrieval.index import MetaEmbedIndex
from metaembed.retrieval.index_build import build_index


def anonymous() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


def read_chars() -> int:
    with open("/proc/self/io") as io:
        return int(dict(line.split(": ") for line in io.read().splitlines())["rchar"])


def peak_added(fn) -> tuple:
    """(MB of anonymous memory `fn()` added at its peak, seconds)."""
    peak, running = [anonymous()], [True]
    base = peak[0]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    running[0] = False
    sampler.join()
    return (peak[0] - base) / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24_000)
    parser.add_argument("--shard-items", type=int, default=512)
    parser.add_argument("--vectors", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        generator = torch.Generator().manual_seed(0)
        shards = []
        for number, start in enumerate(range(0, args.items, args.shard_items)):
            n = min(args.shard_items, args.items - start)
            embeddings = torch.randn(n, args.vectors, args.dim, generator=generator)
            shards.append(write_shard(folder / "source", number, embeddings, [str(start + i) for i in range(n)]))
        write_manifest(folder / "source", shards, "candidate", "random", "float32", (args.vectors, args.dim))
        source, count = folder / "source", embeddings_info(folder / "source")["count"]
        first = next(iter_embeddings(source))
        build_index(folder / "warm", [first], len(first[1]), args.dim, args.vectors)  # first-use costs
        del first

        def in_memory():
            index = MetaEmbedIndex(args.dim, args.vectors)
            for embeddings, ids in iter_embeddings(source):
                index.add(embeddings, ids=ids)
            index.save(folder / "in-memory")

        def append():
            base = MetaEmbedIndex.load(folder / "index", mmap=True)
            renamed = ((e, ["more-" + i for i in ids]) for e, ids in iter_embeddings(source))
            build_index(folder / "index", renamed, count, args.dim, args.vectors, base=base)

        steps = {
            "build_index (streamed)": lambda: build_index(
                folder / "index", iter_embeddings(source), count, args.dim, args.vectors
            ),
            f"build_index(base=mapped index): append {count:,} more": append,
            "add() of every shard, then save": in_memory,
        }
        on_disk = sum(p.stat().st_size for p in source.glob("*")) / 2**20
        print(
            f"CPU: {platform.processor() or platform.machine()}; {count:,} items, r_c = {args.vectors}, "
            f"D = {args.dim}, {len(shards)} shards, {on_disk:.1f} MB of float32 embeddings; bf16 index\n"
        )
        print("| step | anonymous memory added | seconds |\n|---|---|---|")
        for name, step in steps.items():
            added, seconds = peak_added(step)
            print(f"| {name} | {added:.1f} MB | {seconds:.2f} |")
        size = sum(p.stat().st_size for p in (folder / "index").rglob("*.safetensors")) / 2**20
        print("\n| load | read | seconds |\n|---|---|---|")
        loads = {"load(mmap=True)": {}, "load(mmap=True, verify_checksum=True)": {"verify_checksum": True}}
        for name, options in loads.items():
            before, start = read_chars(), time.perf_counter()
            MetaEmbedIndex.load(folder / "index", mmap=True, **options)
            seconds = time.perf_counter() - start
            print(f"| {name} | {(read_chars() - before) / 2**20:.1f} MB of {size:.1f} MB | {seconds:.3f} |")


if __name__ == "__main__":
    main()
