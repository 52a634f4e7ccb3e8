"""Streamed index build and append: the same index as `MetaEmbedIndex.add`, within a memory budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaembed.retrieval.embeddings_file import iter_embeddings, write_manifest, write_shard
from metaembed.retrieval.index import MetaEmbedIndex
from metaembed.retrieval.index_build import build_index

ROOT = Path(__file__).resolve().parent.parent


def _chunks(count, vectors, dim, size, prefix, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, count, size):
        n = min(size, count - start)
        yield torch.randn(n, vectors, dim, generator=generator), [f"{prefix}{start + i}" for i in range(n)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8", "binary"])
def test_a_streamed_build_and_append_equal_adds(tmp_path, dtype, monkeypatch):
    import metaembed.retrieval.segment as module

    monkeypatch.setattr(module, "CENTER_SAMPLE", 300)  # binary: centres from the first 300 items, inside chunk 4
    reference = MetaEmbedIndex(dim=32, num_vectors=3, dtype=dtype)
    for embeddings, ids in [*_chunks(500, 4, 32, 64, "a"), *_chunks(130, 4, 32, 50, "b", seed=1)]:
        reference.add(embeddings, ids=ids)
    build_index(tmp_path / "index", lambda: _chunks(500, 4, 32, 64, "a"), 500, 32, 3, dtype)
    base = MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    build_index(tmp_path / "index", _chunks(130, 4, 32, 50, "b", seed=1), 130, 32, 3, base=base)
    built = MetaEmbedIndex.load(tmp_path / "index", verify_checksum=True)
    built.verify()
    assert built.ids == reference.ids and torch.equal(built.vectors, reference.vectors)
    assert torch.equal(built.codes, reference.codes)
    if dtype in ("int8", "binary"):
        assert torch.equal(built.scales, reference.scales)
    if dtype == "binary":
        assert torch.equal(built._tail.centers, reference._tail.centers)
        offsets = torch.cat([segment.offsets for segment in built._saved], dim=1)
        assert torch.equal(offsets, reference._tail.offsets[:, :630])
    elif dtype != "int8":  # each segment's norms bound its own items: together, those of all
        norms = torch.stack([segment.max_norms for segment in built._saved]).amax(dim=0)
        torch.testing.assert_close(norms, reference._tail.max_norms, rtol=0, atol=0)
    # The append wrote a segment of its own, and left the first one as it was (its files untouched).
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        ".metaembed-index.lock",
        "index.json",
        "segment-000001",
        "segment-000002",
    ]
    assert [segment.count for segment in built._saved] == [500, 130] and built.num_segments == 2
    queries = torch.randn(4, 2, 32, generator=torch.Generator().manual_seed(2))
    # A compressed index re-scores a shortlist per segment (two here, one in the reference): compare them with every
    # item re-scored, where both give the exact top-k.
    every = {"shortlist": 630} if dtype in ("int8", "binary") else {}
    assert built.search(queries, k=5, **every).ids == reference.search(queries, k=5, **every).ids
    if dtype == "binary":
        with pytest.raises(ValueError, match="reads its first items twice"):
            build_index(tmp_path / "other", _chunks(10, 4, 32, 10, "c"), 10, 32, 3, dtype)

    with pytest.raises(ValueError, match=r"chunk 0 \(items 0..\): id 'a0' \(position 0\) is already in the index"):
        build_index(tmp_path / "index", _chunks(10, 4, 32, 10, "a"), 10, 32, 3, dtype, base=built)
    with pytest.raises(ValueError, match="the chunks hold 10 items, 11 were announced"):
        build_index(tmp_path / "index", _chunks(10, 4, 32, 10, "c"), 11, 32, 3, dtype, base=built)
    assert MetaEmbedIndex.load(tmp_path / "index").ids == reference.ids  # a failed build leaves the index as it was


# A fresh process builds an index from an embeddings folder, then appends as many items again, while a thread samples
# its anonymous memory (RssAnon); prints the most each step added over what the process held before it.
MEASURE = """
import json, sys, threading, time
import torch
from metaembed.retrieval.embeddings_file import embeddings_info, iter_embeddings
from metaembed.retrieval.index import MetaEmbedIndex
from metaembed.retrieval.index_build import build_index

def anonymous():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

source, index_dir = sys.argv[1:3]
info = embeddings_info(source)
# First-use costs (thread pools, allocator arenas, libraries' buffers) once, on a small build, before measuring.
first = next(iter_embeddings(source))
build_index(index_dir + ".warm", [first], len(first[1]), info["dim"], 4, "bfloat16")
build_index(index_dir + ".warm", [(first[0], ["x" + i for i in first[1]])], len(first[1]), info["dim"], 4, "bfloat16",
            base=MetaEmbedIndex.load(index_dir + ".warm", mmap=True))
del first
peak, running = [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.001)

added = {}
for step in ("build", "append"):
    base = MetaEmbedIndex.load(index_dir, mmap=True) if step == "append" else None
    renamed = ((e, [f"{step}-{i}" for i in ids]) for e, ids in iter_embeddings(source))
    before = anonymous()
    peak[0], running[0] = before, True
    sampler = threading.Thread(target=sample)
    sampler.start()
    build_index(index_dir, renamed, info["count"], info["dim"], 4, "bfloat16", base=base)
    running[0] = False
    sampler.join()
    added[step] = peak[0] - before
    del base
print(json.dumps(added))
"""


def test_build_and_append_stay_within_a_memory_budget_on_data_several_times_larger(tmp_path):
    budget = 32 << 20
    count, vectors, dim, rows = 24_000, 4, 512, 512  # 197 MB of float32 embeddings, shards of 4 MB
    shards = [
        write_shard(tmp_path / "source", number, embeddings, ids)
        for number, (embeddings, ids) in enumerate(_chunks(count, vectors, dim, rows, ""))
    ]
    write_manifest(tmp_path / "source", shards, "candidate", "m", "float32", (vectors, dim))
    source_bytes = sum(p.stat().st_size for p in (tmp_path / "source").glob("*.safetensors"))
    assert source_bytes > 5 * budget
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, "-c", MEASURE, str(tmp_path / "source"), str(tmp_path / "index")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    added = json.loads(result.stdout)
    print("anonymous memory added (MB):", {k: round(v / 2**20, 1) for k, v in added.items()})
    index = MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    index_bytes = sum(p.stat().st_size for p in (tmp_path / "index").rglob("vectors.safetensors"))
    assert len(index) == 2 * count and index_bytes > 5 * budget  # 197 MB of bf16 vectors after the append
    assert max(added.values()) < budget, {k: f"{v / 2**20:.1f} MB" for k, v in added.items()}
    first, _ = next(iter_embeddings(tmp_path / "source"))
    assert torch.equal(index.vectors[:, : first.shape[0]], first[:, :4].bfloat16().transpose(0, 1))
