"""Search memory is bounded: on a memory-mapped index far larger than the work budget, `MetaEmbedIndex.search`,
`search_two_stage` and `maxsim` add no more anonymous memory (RssAnon: heap and anonymous maps, not the page
cache of the mapped file) than `max_work_bytes`, measured in a fresh process."""

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch

from metaembed.retrieval import scan_kernel
from metaembed.retrieval.index_files import LEGACY_FORMAT as FORMAT  # the layout written by hand below

ROOT = Path(__file__).resolve().parent.parent
COUNT, VECTORS, DIM = 48_000, 8, 512  # 393 MB of bf16 vectors
BUDGET = 32 * 2**20
SLACK = 4 * 2**20  # allocator rounding, the results and the queries themselves
SMALL_COUNT = 16_384  # a third of COUNT; its (1,1) scan reads 16 MiB, so "auto" still runs the kernel on it
GROWTH_SLACK = 2**19  # allocator rounding between two runs of the same call


def write_index(folder: Path, count: int = COUNT) -> int:
    """A saved bf16 MetaEmbedIndex of random vectors, written in 4 MB chunks (never whole in memory), with the
    largest vector norm of each tier as `MetaEmbedIndex.add` keeps it (so AMX batches take the two-part scan)."""
    folder.mkdir()
    nbytes = VECTORS * count * DIM * 2
    header = json.dumps(
        {
            "__metadata__": {"format": FORMAT},
            "vectors": {"dtype": "BF16", "shape": [VECTORS, count, DIM], "data_offsets": [0, nbytes]},
            "max_norms": {"dtype": "F32", "shape": [VECTORS], "data_offsets": [nbytes, nbytes + 4 * VECTORS]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    digest = hashlib.sha256()
    generator = torch.Generator().manual_seed(0)
    max_norms = torch.zeros(VECTORS)
    with open(folder / "vectors.safetensors", "wb") as file:
        for piece in (struct.pack("<Q", len(header)), header):
            file.write(piece)
            digest.update(piece)
        for tier in range(VECTORS):
            for start in range(0, count, 4096):
                chunk = (torch.randn(min(4096, count - start), DIM, generator=generator) / DIM**0.5).bfloat16()
                max_norms[tier] = max(max_norms[tier], chunk.float().norm(dim=-1).max())
                data = chunk.view(torch.int16).numpy().tobytes()
                file.write(data)
                digest.update(data)
        data = max_norms.numpy().tobytes()
        file.write(data)
        digest.update(data)
    manifest = {
        "format": FORMAT,
        "count": count,
        "num_vectors": VECTORS,
        "dim": DIM,
        "dtype": "bfloat16",
        "layout": "vector-major",
        "sha256": digest.hexdigest(),
        "ids": list(range(count)),
    }
    (folder / "index.json").write_text(json.dumps(manifest))
    return nbytes


MEASURE = r"""
import json, sys, threading, time
import torch
from metaembed.retrieval import scan_kernel
from metaembed.retrieval.index import MetaEmbedIndex
from modeling_metaembed.scoring_metaembed import maxsim

def anonymous():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

budget = int(sys.argv[2])
queries = torch.nn.functional.normalize(torch.randn(8, 16, 512), dim=-1)
scan_kernel.compiled()  # the compiled scan (built once, cached) is loaded before measuring, like torch itself
warm = MetaEmbedIndex(512, 8)  # warm-up on a small index: thread pools, BLAS buffers
warm.add(torch.randn(300, 8, 512))
for b in [(1, 1), (4, 8), (16, 8)]:
    warm.search(queries, b, k=10, max_work_bytes=budget)
    warm.search(queries[:1], b, k=10, max_work_bytes=budget)
    warm.search_two_stage(queries, b, k=10, shortlist=200, max_work_bytes=budget)
    maxsim(queries, warm.vectors.transpose(0, 1), b, max_work_bytes=budget)

peak, running = [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.0002)

def measure(index, repeats=2):
    # Anonymous memory each call adds at its peak, less its result (maxsim's [Q, N] scores are the answer); the
    # largest of `repeats` runs, since the sampler can miss a short-lived peak.
    runs = {
        "search (1,1) one query": lambda: index.search(queries[:1], (1, 1), k=10, max_work_bytes=budget),
        "search (4,8) 8 queries": lambda: index.search(queries, (4, 8), k=10, max_work_bytes=budget),
        "search (16,8) 8 queries": lambda: index.search(queries, (16, 8), k=10, max_work_bytes=budget),
        "search_two_stage (8,8)": lambda: index.search_two_stage(queries, (8, 8), k=10, shortlist=2000,
                                                                 max_work_bytes=budget),
        "maxsim (2,4) item-major view": lambda: maxsim(queries, index.vectors.transpose(0, 1), (2, 4),
                                                       max_work_bytes=budget),
    }
    added = {}
    for name, run in runs.items():
        for _ in range(repeats):
            base = anonymous()
            peak[0], running[0] = base, True
            sampler = threading.Thread(target=sample)
            sampler.start()
            result = run()
            running[0] = False
            sampler.join()
            extra = peak[0] - base - (result.nbytes if isinstance(result, torch.Tensor) else 0)
            added[name] = max(added.get(name, extra), extra)
            del result
    return added

large = MetaEmbedIndex.load(sys.argv[1], mmap=True, verify_checksum=False)
small = MetaEmbedIndex.load(sys.argv[3], mmap=True, verify_checksum=False)
for index in (large, small):  # checks the stored norms now (a first search would, in slices of 1 MB), not measured
    index.verify()
# Every measured call once on the small index first: the 300-item warm-up above is below the size from which
# "auto" runs the compiled kernel, and a kernel's first run grows per-thread state once (allocator arenas) that
# would otherwise be counted against the large index alone.
measure(small, repeats=1)
report = {"added": measure(large), "added_small": measure(small), "kernel": scan_kernel.choose(large.codes, 1),
          "kernel_small": scan_kernel.choose(small.codes, 1),
          "norms_known": large._saved[0].max_norms is not None}
print(json.dumps(report))
"""


def test_search_adds_at_most_its_work_budget_on_a_mapped_index_larger_than_it(tmp_path):
    nbytes = write_index(tmp_path / "index")
    assert nbytes > 10 * BUDGET
    # A third of the items: what a compiled-kernel search adds must not grow with the index (a per-item buffer of
    # 32 bytes, e.g. float32 scores of 8 queries, would add 1 MB more here, and 10 GB at a billion items). The torch
    # scan's score chunk does grow with N, by design, up to a quarter of the budget: it is held to the budget alone.
    write_index(tmp_path / "small", count=SMALL_COUNT)
    # Every scan the CPU can run: the one "auto" picks here (AMX or AVX2), the AVX2 kernel (register and GEMM
    # paths: (16,8) x 8 queries is 128 query rows) and the torch scan. A kernel this CPU lacks falls back.
    # The user's environment (compiler, PATH, extension cache), with the allocator threshold and the kernel fixed.
    compiled = scan_kernel.features()["avx2"]  # the compiled kernel builds and loads on this CPU
    for kernel in ("auto", "avx2", "torch"):
        # A fixed mmap threshold: every large temporary is its own map, counted while alive and returned when freed.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "METAEMBED_CPU_KERNEL": kernel}
        command = [sys.executable, "-c", MEASURE, str(tmp_path / "index"), str(BUDGET), str(tmp_path / "small")]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        added, added_small = report["added"], report["added_small"]
        assert len(added) == len(added_small) == 5
        # The scan measured is the one asked for (not a silent fallback to the torch scan), at both sizes.
        expected = {"auto": {"amx", "avx2"}, "avx2": {"avx2"}}.get(kernel, {"torch"}) if compiled else {"torch"}
        assert {report["kernel"], report["kernel_small"]} <= expected, (kernel, report)
        assert report["norms_known"]  # so AMX batches run the two-part scan and its re-score here
        for name, extra in added.items():
            assert extra <= BUDGET + SLACK, f"{kernel}: {name} added {extra / 2**20:.1f} MB of anonymous memory"
            if report["kernel"] != "torch" and name.startswith("search"):
                growth = extra - added_small[name]
                assert growth <= GROWTH_SLACK, f"{kernel}: {name} added {growth / 2**20:.1f} MB more at 3x the items"
