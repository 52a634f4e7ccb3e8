"""The embeddings folder: ids beside the vectors (no header limit), shard by shard, the encoder's chunks as shards."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from metaembed.retrieval.embeddings_file import embeddings_info, iter_embeddings, load_embeddings, save_embeddings
from metaembed.retrieval.index import MetaEmbedIndex
from metaembed.serving.sharded import encode_sharded

COUNT = 1_200_000  # ~90-character ids: ~110 MB of JSON, over safetensors' 100 MB header limit


def test_ids_past_the_safetensors_header_limit_round_trip(tmp_path):
    ids = [f"https://example.org/collection/{i:09d}/" + "p" * 48 for i in range(COUNT)]
    assert len(json.dumps(ids)) > 100_000_000
    embeddings = torch.arange(COUNT * 2, dtype=torch.float32).view(COUNT, 1, 2) / COUNT

    # What a one-process `metaembed encode` writes, in shards of 2**16 items.
    save_embeddings(tmp_path / "plain", embeddings, ids, "candidate", "tiny", precision="float32")
    loaded, loaded_ids, meta = load_embeddings(tmp_path / "plain")
    assert loaded_ids == ids and torch.equal(loaded, embeddings) and meta["role"] == "candidate"

    # The sharded encoder: its chunks are the folder's shards, listed by a manifest; nothing is merged.
    report = encode_sharded(
        lambda chunk: embeddings[chunk[0]["row"] : chunk[-1]["row"] + 1],
        ids,
        [{"row": i} for i in range(COUNT)],
        tmp_path / "sharded",
        role="candidate",
        model="tiny",
        settings={},
        chunk_size=500_000,
        quiet=True,
    )
    assert report["finished"] and embeddings_info(tmp_path / "sharded")["count"] == COUNT
    chunks = list(iter_embeddings(tmp_path / "sharded"))
    assert [len(c[1]) for c in chunks] == [500_000, 500_000, 200_000]
    assert [i for c in chunks for i in c[1]] == ids and torch.equal(torch.cat([c[0] for c in chunks]), embeddings)

    # A single file of the earlier format with these ids (as `merge_chunks` wrote it: safetensors refuses to read
    # it) loads through our own header reader.
    header = {
        "__metadata__": {
            "format": "metaembed-embeddings/1",
            "role": "candidate",
            "ids": json.dumps(ids),
            "model": "tiny",
        },
        "embeddings": {"dtype": "F32", "shape": [COUNT, 1, 2], "data_offsets": [0, COUNT * 8]},
    }
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    (tmp_path / "old.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + embeddings.numpy().tobytes())
    old, old_ids, _ = load_embeddings(tmp_path / "old.safetensors")
    assert old_ids == ids and torch.equal(old, embeddings)
    del old, old_ids, header, encoded

    # Into the index, chunk by chunk, and through its files.
    index = MetaEmbedIndex(dim=2, num_vectors=1, dtype="float32")
    for part, part_ids in chunks:
        index.add(part, ids=part_ids)
    index.save(tmp_path / "index")
    reloaded = MetaEmbedIndex.load(tmp_path / "index", mmap=True)
    assert reloaded.ids == ids
    found = reloaded.search(embeddings[COUNT - 5 : COUNT - 4], k=1)
    assert found.ids == [[ids[-1]]]  # the largest vector along (1, 1) scores highest against a positive query


def test_a_single_file_of_the_earlier_format_still_loads(tmp_path):
    embeddings = torch.randn(3, 2, 4)
    metadata = {"format": "metaembed-embeddings/1", "role": "query", "ids": json.dumps(["a", "b", 7]), "model": "m"}
    save_file({"embeddings": embeddings}, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded, ids, meta = load_embeddings(tmp_path / "old.safetensors")
    assert ids == ["a", "b", 7] and torch.equal(loaded, embeddings) and meta["role"] == "query"
    assert embeddings_info(tmp_path / "old.safetensors")["count"] == 3


def test_bad_folders_are_refused_naming_the_file(tmp_path):
    save_embeddings(tmp_path / "e", torch.randn(5, 1, 2), list("abcde"), "candidate", "m", shard_rows=2)
    with pytest.raises(ValueError, match="embeddings.json is missing"):
        load_embeddings(tmp_path)
    (tmp_path / "e" / "chunk-000001.ids.jsonl").write_text('"c"\n')  # one id short
    with pytest.raises(ValueError, match="chunk-000001.safetensors: 1 ids"):
        load_embeddings(tmp_path / "e")
    (tmp_path / "e" / "chunk-000001.ids.jsonl").write_text('"c"\n"d"\n')
    (tmp_path / "e" / "chunk-000002.safetensors").write_bytes(b"\0" * 5)
    with pytest.raises(ValueError, match="cannot read shard chunk-000002.safetensors"):
        load_embeddings(tmp_path / "e")


# Fork a child that replaces an embeddings folder, killed with SIGKILL just before its k-th file-system call
# (k = 1, 2, ... until it finishes); after each kill the folder must hold the old embeddings or the new ones.
KILL_AT_EACH_STEP = """
import json, os, shutil, sys, tempfile
import torch
torch.set_num_threads(1)  # no thread pool to inherit across fork
import modeling_metaembed.folders as folders
from metaembed.retrieval.embeddings_file import load_embeddings, save_embeddings
from tests.crash_points import kill_at_each_step

path = sys.argv[1]
steps = [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "rmdir"), (shutil, "rmtree"), (tempfile, "mkdtemp"),
         (folders, "_exchange")]

def prepare():
    shutil.rmtree(path, ignore_errors=True)
    save_embeddings(path, torch.zeros(5, 1, 2), [f"old-{i}" for i in range(5)], "candidate", "m", shard_rows=2)

def observe():
    embeddings, ids, _ = load_embeddings(path)
    return [ids[-1], float(embeddings.sum())]

new = lambda: save_embeddings(path, torch.ones(3, 1, 2), [f"new-{i}" for i in range(3)], "candidate", "m", shard_rows=2)
print(json.dumps(kill_at_each_step(steps, prepare, new, observe)))
"""


def test_a_kill_at_any_step_of_a_replacing_save_leaves_old_or_new_embeddings(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILL_AT_EACH_STEP, str(tmp_path / "e")]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout)
    assert all(found[:2] in (["old-4", 0.0], ["new-2", 6.0]) for found in seen), seen
    assert len(seen) > 5 and seen[-1] == ["new-2", 6.0, False]


def test_an_ids_file_with_a_bad_line_is_refused_naming_the_line(tmp_path):
    from metaembed.retrieval.embeddings_file import read_json_lines

    path = tmp_path / "ids.jsonl"
    path.write_text('"a"\n"b\\nc"\n7\n"é"\n')
    assert read_json_lines(path) == ["a", "b\nc", 7, "é"]
    for text, line in (('"a"\n"b", "c"\n', 2), ('"a"\n\n"b"\n', 2), ('"a"\n"b\n', 2)):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"line {line}"):
            read_json_lines(path)
