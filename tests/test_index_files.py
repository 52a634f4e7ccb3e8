"""MetaEmbedIndex files at scale: a mapped load reads none of the vectors, values the scan trusts are checked."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from metaembed.retrieval import scan_kernel
from metaembed.retrieval.index import IndexFileError, MetaEmbedIndex

ROOT = Path(__file__).resolve().parent.parent

# Characters this process read through read(2) (/proc/self/io "rchar") while loading: memory-mapped pages are not
# counted, a checksum pass is. Imports and a first load of another index come before, so only the load is counted.
READ_DURING_LOAD = """
import json, sys
import torch
from metaembed.retrieval.index import MetaEmbedIndex

def rchar():
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])

MetaEmbedIndex.load(sys.argv[2], mmap=True)  # imports and first-use costs
read = {}
for name, options in (("default", {}), ("verified", {"verify_checksum": True})):
    before = rchar()
    index = MetaEmbedIndex.load(sys.argv[1], mmap=True, **options)
    read[name] = rchar() - before
print(json.dumps(read))
"""


def test_a_mapped_load_does_not_read_the_vectors(tmp_path):
    index = MetaEmbedIndex(dim=64, num_vectors=2, dtype="float32")
    index.add(torch.randn(100_000, 2, 64))  # 51 MB of vectors
    index.save(tmp_path / "index")
    small = MetaEmbedIndex(dim=8, num_vectors=1)
    small.add(torch.randn(3, 1, 8))
    small.save(tmp_path / "warm")
    size = sum(p.stat().st_size for p in (tmp_path / "index").rglob("*.safetensors"))
    assert size > 50e6
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", READ_DURING_LOAD, str(tmp_path / "index"), str(tmp_path / "warm")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout)
    # Checking the checksums reads every byte (the measure sees reads); a mapped load reads its manifest (ids).
    assert read["verified"] > size and read["default"] < size / 20, read


def _rewrite_norms(folder: Path, max_norms: torch.Tensor) -> None:
    """Store other tier norms and a matching checksum: a change the checksums cannot see."""
    (path,) = list(folder.rglob("vectors.safetensors"))
    tensors = load_file(path)
    tensors["max_norms"] = max_norms
    save_file(tensors, str(path), metadata={"format": "metaembed-index/1"})
    manifest_path = folder / "index.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["segments"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def test_a_wrong_stored_norm_is_caught_before_the_scan_trusts_it(tmp_path, monkeypatch):
    embeddings = torch.nn.functional.normalize(torch.randn(2000, 2, 32), dim=-1) * 3
    index = MetaEmbedIndex(dim=32, num_vectors=2)
    index.add(embeddings)
    norms = index._tail.max_norms.clone()
    index.save(tmp_path / "index")
    MetaEmbedIndex.load(tmp_path / "index", mmap=True).verify()  # what was saved passes
    _rewrite_norms(tmp_path / "index", norms / 2)  # too small: the two-part certificate would be void

    with pytest.raises(IndexFileError, match="max_norms' is smaller than the stored vectors"):
        MetaEmbedIndex.load(tmp_path / "index", mmap=True).verify()
    loaded = MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    queries = torch.randn(8, 2, 32)  # 16 query rows: the AMX kernel's two-part scan, where the CPU has AMX
    monkeypatch.setenv(scan_kernel.ENVIRONMENT, "amx")
    if scan_kernel.choose(loaded.codes, 2, rows=16) == "amx":
        with pytest.raises(IndexFileError, match="max_norms"):
            loaded.search(queries, k=3)
    # Larger norms than the data's only make the certificate conservative: accepted.
    _rewrite_norms(tmp_path / "index", norms * 2)
    loaded = MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    loaded.verify()
    assert loaded.search(queries, k=3).ids == index.search(queries, k=3).ids


def test_verify_names_a_changed_file(tmp_path):
    index = MetaEmbedIndex(dim=8, num_vectors=1, dtype="int8")
    index.add(torch.randn(20, 1, 8))
    index.save(tmp_path / "index")
    loaded = MetaEmbedIndex.load(tmp_path / "index", mmap=True)  # not verified: opens at once
    (full,) = list((tmp_path / "index").rglob("full.safetensors"))
    data = bytearray(full.read_bytes())
    data[-1] ^= 0xFF
    full.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="full.safetensors does not match the checksum"):
        loaded.verify()


@pytest.mark.parametrize("dtype", ["binary", "int8"])
@pytest.mark.parametrize("sample", [None, 700])  # centres fitted at the first search, or once 700 items are in
def test_streamed_adds_code_items_as_one_add_does(dtype, sample, monkeypatch):
    import metaembed.retrieval.segment as module

    if sample is not None:
        monkeypatch.setattr(module, "CENTER_SAMPLE", sample)
    # Trained embeddings share a common direction per tier; the centres must come from more than the first item.
    common = torch.nn.functional.normalize(torch.randn(2, 64), dim=-1)
    embeddings = torch.nn.functional.normalize(common + 0.3 * torch.randn(3000, 2, 64), dim=-1)
    queries = torch.nn.functional.normalize(common + 0.3 * torch.randn(20, 2, 64), dim=-1)
    whole = MetaEmbedIndex(dim=64, num_vectors=2, dtype=dtype)
    whole.add(embeddings)
    streamed = MetaEmbedIndex(dim=64, num_vectors=2, dtype=dtype)
    for start, stop in ((0, 1), (1, 1000), (1000, 3000)):  # one item first, then the rest
        streamed.add(embeddings[start:stop])
    found = streamed.search(queries, k=10, shortlist=20)
    assert found.ids == whole.search(queries, k=10, shortlist=20).ids
    assert torch.equal(streamed.codes, whole.codes) and torch.equal(streamed.scales, whole.scales)
    if dtype == "binary":
        assert torch.equal(streamed._tail.centers, whole._tail.centers)
        assert torch.equal(streamed._tail.offsets, whole._tail.offsets)


# In one process per scenario: fork a child that saves (or appends: load, add, save) over an index, killed with
# SIGKILL just before its k-th file-system call (k = 1, 2, ... until it finishes); after each kill the parent loads
# the folder, which must hold the old index or the new one, complete and verified.
KILL_AT_EACH_STEP = """
import json, os, shutil, sys, tempfile
import torch
torch.set_num_threads(1)  # no thread pool to inherit across fork
from tests.crash_points import kill_at_each_step
import metaembed.retrieval.segment as segment_module
import metaembed.retrieval.index_files as files_module
from metaembed.retrieval.index import MetaEmbedIndex

folder, scenario = sys.argv[1], sys.argv[2]
generator = torch.Generator().manual_seed(0)
old = MetaEmbedIndex(dim=16, num_vectors=2, dtype="int8")
old.add(torch.randn(30, 2, 16, generator=generator), ids=[f"old-{i}" for i in range(30)])
more = torch.randn(12, 2, 16, generator=generator)
steps = [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree"),
         (tempfile, "mkdtemp"), (segment_module, "save_file"), (segment_module, "write_ids"), (shutil, "copyfile"),
         (files_module, "write_atomic")]

def save_new():
    if scenario == "append":  # what `metaembed index --append` does
        index = MetaEmbedIndex.load(folder)
        index.add(more, ids=[f"new-{i}" for i in range(12)])
    else:
        index = MetaEmbedIndex(dim=16, num_vectors=2, dtype="float32")
        index.add(more, ids=[f"new-{i}" for i in range(12)])
    index.save(folder)

def prepare():
    shutil.rmtree(folder, ignore_errors=True)
    old.save(folder)

def observe():
    loaded = MetaEmbedIndex.load(folder, verify_checksum=True)
    loaded.verify()
    return [len(loaded), loaded.ids[-1]]

print(json.dumps(kill_at_each_step(steps, prepare, save_new, observe)))
"""


@pytest.mark.parametrize("scenario", ["save", "append"])
def test_a_kill_at_any_step_of_a_save_leaves_the_old_or_the_new_index(tmp_path, scenario):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILL_AT_EACH_STEP, str(tmp_path / "index"), scenario]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout)
    new = [42, "new-11"] if scenario == "append" else [12, "new-11"]
    assert all(found[:2] in ([30, "old-29"], new) for found in seen), seen
    assert len(seen) > 10 and seen[0][:2] == [30, "old-29"] and seen[-1] == [*new, False]  # every step, then done
    assert any(found == [*new, True] for found in seen)  # killed after the switch (while removing the old segment)


# Bytes this process read and wrote through read(2) / write(2) while appending 50 items to a mapped 100,000-item
# index, by `load` + `add` + `save` and by `build_index` (what `metaembed index --append` runs).
IO_DURING_APPEND = """
import json, sys
import torch
from metaembed.retrieval.index import MetaEmbedIndex
from metaembed.retrieval.index_build import build_index

def io():
    fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])

new = torch.randn(50, 2, 64)
found = {}
for way in ("save", "build_index"):
    before = io()
    index = MetaEmbedIndex.load(sys.argv[1], mmap=True)
    ids = [f"{way}-{i}" for i in range(50)]
    if way == "save":
        index.add(new, ids=ids)
        index.save(sys.argv[1])
    else:
        build_index(sys.argv[1], [(new, ids)], 50, 64, 2, base=index)
    found[way] = [after - start for after, start in zip(io(), before)]
print(json.dumps(found))
"""


def test_an_append_writes_the_new_items_only_and_leaves_the_saved_segment_as_it_was(tmp_path):
    index = MetaEmbedIndex(dim=64, num_vectors=2, dtype="float32")
    embeddings = torch.randn(100_000, 2, 64)
    index.add(embeddings)
    index.save(tmp_path / "index")
    first = tmp_path / "index" / "segment-000001" / "vectors.safetensors"
    size, stamp = first.stat().st_size, (first.stat().st_ino, first.stat().st_mtime_ns)
    assert size > 50e6
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", IO_DURING_APPEND, str(tmp_path / "index")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for way, (read, written) in json.loads(result.stdout).items():
        # The old code copied the saved tiers into the new segment: size read and written. Now the ids are read
        # (100,000 short lines) and 50 items written, with their checksums.
        assert read < size / 20 and written < size / 20, (way, read, written)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # the same file, never rewritten
    loaded = MetaEmbedIndex.load(tmp_path / "index", verify_checksum=True)
    assert len(loaded) == 100_100 and loaded.num_segments == 3 and loaded.ids[:100_000] == index.ids


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "binary"])
def test_a_search_over_segments_equals_one_over_a_single_segment(tmp_path, dtype, monkeypatch):
    import metaembed.retrieval.segment as module

    monkeypatch.setattr(module, "CENTER_SAMPLE", 200)
    common = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    embeddings = torch.nn.functional.normalize(common + 0.4 * torch.randn(900, 3, 32), dim=-1)
    queries = torch.nn.functional.normalize(common[:2] + 0.4 * torch.randn(7, 2, 32), dim=-1)
    whole = MetaEmbedIndex(dim=32, num_vectors=3, dtype=dtype)
    whole.add(embeddings)
    folder = tmp_path / "index"
    for start, stop in ((0, 300), (300, 301), (301, 900)):  # three saves: three segments, one of a single item
        index = MetaEmbedIndex.load(folder, mmap=True) if start else MetaEmbedIndex(32, 3, dtype=dtype)
        index.add(embeddings[start:stop], ids=list(range(start, stop)))
        index.save(folder)
    segmented = MetaEmbedIndex.load(folder, mmap=True)
    assert segmented.num_segments == 3 and segmented.ids == whole.ids
    assert torch.equal(segmented.codes, whole.codes) and torch.equal(segmented.vectors, whole.vectors)
    exhaustive = {"shortlist": 900} if dtype != "bfloat16" else {}  # every item re-scored: exact on both sides
    for budget in ((1, 1), (2, 3)):
        for k in (1, 10):
            found = segmented.search(queries, budget=budget, k=k, **exhaustive)
            expected = whole.search(queries, budget=budget, k=k, **exhaustive)
            assert found.ids == expected.ids
            torch.testing.assert_close(found.scores, expected.scores, rtol=1e-5, atol=1e-5)
        found = segmented.search_two_stage(queries, budget=budget, k=5, shortlist=900)
        assert found.ids == whole.search_two_stage(queries, budget=budget, k=5, shortlist=900).ids
    if dtype != "bfloat16":  # a shortlist per segment: each segment's best are re-scored, never fewer than one's
        found = segmented.search(queries, k=10, shortlist=20)
        coarse = whole.search(queries, k=10, shortlist=20)
        assert (found.scores[:, 0] >= coarse.scores[:, 0] - 1e-5).all()


def test_earlier_single_segment_folders_load_and_convert_on_save(tmp_path):
    index = MetaEmbedIndex(dim=16, num_vectors=2, dtype="int8")
    index.add(torch.randn(40, 2, 16), ids=[f"a{i}" for i in range(40)])
    folder = tmp_path / "index"
    index.save(folder)
    manifest = json.loads((folder / "index.json").read_text())
    (entry,) = manifest.pop("segments")
    earlier = {**manifest, "format": "metaembed-index/2", "segment": entry.pop("name"), **entry}
    (folder / "index.json").write_text(json.dumps(earlier))  # as version 2 wrote it
    loaded = MetaEmbedIndex.load(folder, verify_checksum=True)
    assert loaded.ids == index.ids and torch.equal(loaded.codes, index.codes)
    loaded.add(torch.randn(5, 2, 16), ids=[f"b{i}" for i in range(5)])
    loaded.save(folder)
    assert json.loads((folder / "index.json").read_text())["format"] == "metaembed-index/3"
    assert MetaEmbedIndex.load(folder, verify_checksum=True).ids == index.ids + [f"b{i}" for i in range(5)]


def test_saving_a_loaded_index_elsewhere_copies_its_segments(tmp_path):
    index = MetaEmbedIndex(dim=16, num_vectors=2)
    index.add(torch.randn(40, 2, 16))
    index.save(tmp_path / "a")
    loaded = MetaEmbedIndex.load(tmp_path / "a", mmap=True)
    loaded.add(torch.randn(3, 2, 16))
    loaded.save(tmp_path / "b")
    copied = MetaEmbedIndex.load(tmp_path / "b", verify_checksum=True)
    copied.verify()
    assert len(copied) == 43 and copied.num_segments == 2 and torch.equal(copied.vectors, loaded.vectors)
    assert len(MetaEmbedIndex.load(tmp_path / "a")) == 40  # the source is left as it was


def test_a_repeated_id_in_the_saved_files_is_refused_and_a_loaded_index_holds_no_id_set(tmp_path):
    index = MetaEmbedIndex(dim=8, num_vectors=1)
    index.add(torch.randn(3, 1, 8), ids=["a", "b", "c"])
    index.save(tmp_path / "index")
    loaded = MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    assert loaded._id_set is None  # a search-only process holds the ids list alone
    with pytest.raises(ValueError, match="'b' .* is already in the index"):
        loaded.add(torch.randn(1, 1, 8), ids=["b"])
    loaded.add(torch.randn(1, 1, 8), ids=["d"])
    loaded.save(tmp_path / "index")
    (second,) = (tmp_path / "index").glob("segment-000002")
    (second / "ids.jsonl").write_text('"a"\n')  # the new segment now repeats the first one's id
    with pytest.raises(IndexFileError, match="an id appears twice"):
        MetaEmbedIndex.load(tmp_path / "index", verify_checksum=False)


def test_saving_again_writes_only_what_was_added_since_the_last_save(tmp_path):
    index = MetaEmbedIndex(dim=16, num_vectors=2)
    index.add(torch.randn(1000, 2, 16))
    index.save(tmp_path / "index")
    first = tmp_path / "index" / "segment-000001" / "vectors.safetensors"
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    index.add(torch.randn(1, 2, 16))
    index.save(tmp_path / "index")
    index.save(tmp_path / "index")  # nothing new: the manifest is rewritten, no segment
    manifest = json.loads((tmp_path / "index" / "index.json").read_text())
    assert [entry["count"] for entry in manifest["segments"]] == [1000, 1]
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp
    assert MetaEmbedIndex.load(tmp_path / "index", verify_checksum=True).ids == list(range(1001))


def test_an_index_loaded_before_another_writer_saved_is_refused_not_merged_away(tmp_path):
    index = MetaEmbedIndex(dim=16, num_vectors=2)
    index.add(torch.randn(10, 2, 16), ids=[f"a{i}" for i in range(10)])
    index.save(tmp_path / "index")
    first, second = MetaEmbedIndex.load(tmp_path / "index"), MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    second.add(torch.randn(3, 2, 16), ids=["b0", "b1", "b2"])
    second.save(tmp_path / "index")
    first.add(torch.randn(2, 2, 16), ids=["c0", "c1"])
    with pytest.raises(IndexFileError, match="changed since this index was loaded"):
        first.save(tmp_path / "index")
    assert MetaEmbedIndex.load(tmp_path / "index", verify_checksum=True).ids[-3:] == ["b0", "b1", "b2"]
    first.save(tmp_path / "elsewhere")  # saving it somewhere else is fine
    assert len(MetaEmbedIndex.load(tmp_path / "elsewhere")) == 12


def test_a_folder_removed_after_a_save_or_a_legacy_folder_saved_twice_keeps_every_item(tmp_path):
    index = MetaEmbedIndex(dim=16, num_vectors=2, dtype="int8")
    index.add(torch.randn(20, 2, 16))
    index.save(tmp_path / "a")
    loaded = MetaEmbedIndex.load(tmp_path / "a", mmap=True)
    loaded.save(tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")  # both copies gone: the mapped tensors still hold the items
    loaded.add(torch.randn(1, 2, 16))
    loaded.save(tmp_path / "b")
    loaded.save(tmp_path / "b")
    again = MetaEmbedIndex.load(tmp_path / "b", verify_checksum=True)
    assert len(again) == 21 and torch.equal(again.codes[:, :20], index.codes)


def test_a_copy_checks_the_source_bytes_against_their_manifest(tmp_path):
    index = MetaEmbedIndex(dim=16, num_vectors=2)
    index.add(torch.randn(20, 2, 16))
    index.save(tmp_path / "a")
    loaded = MetaEmbedIndex.load(tmp_path / "a", mmap=True)
    (path,) = (tmp_path / "a").glob("segment-*/ids.jsonl")
    vectors = path.with_name("vectors.safetensors")
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF  # damaged after the mapped (unverified) load
    vectors.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="does not match the checksum in its manifest: not copied"):
        loaded.save(tmp_path / "b")


def test_chunks_walk_every_segment_without_joining_them(tmp_path):
    index = MetaEmbedIndex(dim=16, num_vectors=2)
    index.add(torch.randn(30, 2, 16))
    index.save(tmp_path / "index")
    loaded = MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    loaded.add(torch.randn(7, 2, 16))
    pieces = list(loaded.chunks(size=8))
    assert [v.shape[1] for v, _ in pieces] == [8, 8, 8, 6, 7]  # never across a segment's end
    assert torch.equal(torch.cat([v for v, _ in pieces], dim=1), loaded.vectors)
    assert [i for _, ids in pieces for i in ids] == loaded.ids
