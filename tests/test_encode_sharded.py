"""`metaembed encode` sharded over processes (torchrun) and resumable: the folder equals a one-process run's."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from metaembed.cli import main
from metaembed.retrieval.embeddings_file import load_embeddings
from modeling_metaembed import MetaEmbedModel
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 3
NUM_ITEMS = 13  # 5 chunks of 3, 3, 3, 3, 1


@contextlib.contextmanager
def one_thread():
    """Encode on one thread in this process, as the subprocesses below do (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def job(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    random_image(seed=3).save(folder / "a.png")
    random_image(width=40, height=70, seed=4).save(folder / "b.png")
    lines = []
    for i in range(NUM_ITEMS):
        record = {"id": f"item-{i}", "text": f"page {i}: " + "words " * (i % 5)}
        if i % 4 == 1:
            record["image"] = "a.png" if i % 8 == 1 else "b.png"
        if i % 6 == 5:
            del record["text"]
            record["image"] = "a.png"
        lines.append(record)
    inputs = folder / "items.jsonl"
    inputs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    checkpoint = str(tiny_checkpoint("qwen2_5_vl"))
    reference = folder / "one-process.safetensors"
    # One thread, as each torchrun worker below (OMP_NUM_THREADS=1): the same chunks on the same number of threads
    # are the same arithmetic, so the files are compared bit for bit. (Across thread counts float32 sums split
    # differently: on an AMD EPYC two threads and one differed by 6e-8.)
    with one_thread():
        assert main(["encode", checkpoint, str(inputs), str(reference), "--chunk-size", str(CHUNK), "--quiet"]) == 0
    return {"folder": folder, "inputs": inputs, "checkpoint": checkpoint, "reference": reference, "lines": lines}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _assert_same_file(path, reference):
    got, got_ids, got_meta = load_embeddings(path)
    want, want_ids, want_meta = load_embeddings(reference)
    assert got_ids == want_ids and got_meta == {**want_meta}
    assert torch.equal(got, want)


def test_one_process_chunked_equals_plain_encode(job):
    embeddings, ids, meta = load_embeddings(job["reference"])
    assert ids == [line["id"] for line in job["lines"]] and meta["role"] == "candidate"
    model = MetaEmbedModel.from_pretrained(job["checkpoint"])
    items = [
        {k: (job["folder"] / v if k == "image" else v) for k, v in line.items() if k != "id"} for line in job["lines"]
    ]
    # Chunks are batched apart from each other, so only float rounding may differ from one model.encode call.
    torch.testing.assert_close(embeddings, model.encode(items), atol=1e-5, rtol=0)


def test_two_processes_under_torchrun_equal_one_process(job):
    output = job["folder"] / "two-processes.safetensors"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "metaembed",
        "encode",
        job["checkpoint"],
        str(job["inputs"]),
        str(output),
        "--chunk-size",
        str(CHUNK),
    ]
    result = subprocess.run(command, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each process took its own chunks (0, 2, 4 and 1, 3) and said so; one of them merged.
    assert "[rank 0/2] 3 of 5 chunks" in result.stderr and "[rank 1/2] 2 of 5 chunks" in result.stderr
    _assert_same_file(output, job["reference"])
    chunks = sorted(output.glob("chunk-*.safetensors"))  # the chunks are the output's shards: nothing merged
    assert [c.name for c in chunks] == [f"chunk-{i:06d}.safetensors" for i in range(5)]

    # A rerun with another number of processes reuses every chunk: nothing is encoded again.
    before = {c.name: c.stat().st_mtime_ns for c in chunks}
    os.remove(output / "embeddings.json")
    assert main(["encode", job["checkpoint"], str(job["inputs"]), str(output), "--chunk-size", str(CHUNK)]) == 0
    assert {c.name: c.stat().st_mtime_ns for c in chunks} == before
    _assert_same_file(output, job["reference"])


def test_an_interrupted_run_resumes_where_it_stopped(job, capsys):
    output = job["folder"] / "interrupted.safetensors"
    # A real SIGKILL right after the second chunk is written: no cleanup code runs.
    script = (
        "import os, signal, sys\n"
        "import metaembed.serving.sharded as sharded\n"
        "from metaembed.cli import main\n"
        "write, written = sharded._write_chunk, []\n"
        "def killing_write(*args):\n"
        "    write(*args); written.append(1)\n"
        "    if len(written) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "sharded._write_chunk = killing_write\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [
        sys.executable,
        "-c",
        script,
        "encode",
        job["checkpoint"],
        str(job["inputs"]),
        str(output),
        "--chunk-size",
        str(CHUNK),
        "--quiet",
    ]
    result = subprocess.run(command, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    shard_dir = output
    written = sorted(shard_dir.glob("chunk-*.safetensors"))
    assert [c.name for c in written] == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    assert not (output / "embeddings.json").exists()  # not an embeddings folder until every chunk is in
    before = {c.name: c.stat().st_mtime_ns for c in written}
    (shard_dir / ".chunk-000002.safetensors.x.tmp").write_bytes(b"half a write")  # what a kill mid-write leaves
    (shard_dir / "chunk-000003.safetensors").write_bytes(b"\x00" * 5)  # a damaged chunk is encoded again

    capsys.readouterr()
    with one_thread():  # the chunks encoded now join the ones the killed run wrote (one thread, as the reference)
        assert main(["encode", job["checkpoint"], str(job["inputs"]), str(output), "--chunk-size", str(CHUNK)]) == 0
    assert "5 of 5 chunks are this process's; 2 already written" in capsys.readouterr().err
    assert {c.name: c.stat().st_mtime_ns for c in written} == before  # the finished chunks were not redone
    _assert_same_file(output, job["reference"])
    with safe_open(shard_dir / "chunk-000003.safetensors", framework="pt") as chunk:
        assert chunk.metadata()["start"] == "9"

    # The same shard folder for another job (another instruction) is refused, naming the folder.
    capsys.readouterr()
    assert (
        main(
            [
                "encode",
                job["checkpoint"],
                str(job["inputs"]),
                str(output),
                "--chunk-size",
                str(CHUNK),
                "--instruction",
                "Represent: ",
                "--shard-dir",
                str(shard_dir),
            ]
        )
        == 2
    )
    assert "belongs to another encoding job" in capsys.readouterr().err


def test_bad_launcher_environment_is_refused(job, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    output = job["folder"] / "bad.safetensors"
    assert main(["encode", job["checkpoint"], str(job["inputs"]), str(output), "--quiet"]) == 2
    assert "RANK=2 is outside 0..WORLD_SIZE-1" in capsys.readouterr().err
