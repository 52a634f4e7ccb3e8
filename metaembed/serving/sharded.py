"""Sharded, resumable encoding: `metaembed encode` under `torchrun` / `accelerate launch`, or one process with
`--chunk-size`.

The inputs are cut, by position, into chunks of `chunk_size` items; chunk i belongs to process i % WORLD_SIZE
(RANK and WORLD_SIZE come from the launcher's environment; no collective is used, so a process that dies does not
hang the others). Each chunk is written atomically, its ids then its vectors, as a shard of the embeddings folder
OUTPUT (`OUTPUT/chunk-000042.safetensors` + `chunk-000042.ids.jsonl`, or into `--shard-dir`) with the job's key in
its metadata. A chunk already written for the same job is skipped: a rerun, with any number of processes, resumes
where the last one stopped. The process that finds every chunk written after finishing its own writes the folder's
manifest (`embeddings.json`, see `metaembed.retrieval.embeddings_file`): nothing is merged or copied. The result is
bit for bit the same whichever processes encoded which chunks (each chunk is encoded alone, so its batches do not
depend on the number of processes).

The job key hashes what determines the output: the model (path and a digest of its weights: the model's, the
checkpoint files' for `--engine vllm`, the server's report for `--server`), the role, number of
vectors, instruction, stored precision, chunk size, reasoner, and every input (id, text, image path with its size and
modification time). A shard folder holding chunks of another job is refused with a clear error.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from metaembed.retrieval.embeddings_file import PRECISIONS, SHARD_NAME, relative_entry, write_manifest, write_shard
from metaembed.retrieval.safetensors_header import read_header, tensor_span

CHUNK_NAME = SHARD_NAME + ".safetensors"


def world() -> tuple:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun, accelerate launch, Slurm
    wrappers that set RANK/WORLD_SIZE); (0, 1, 0) when run alone."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    values = {}
    for name in names:
        raw = os.environ.get(name)
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    rank, size = values.get("RANK", 0), values.get("WORLD_SIZE", 1)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={size})")
    return rank, size, values.get("LOCAL_RANK", rank)


def engine_device(local_rank: int, environ=os.environ) -> str:
    """CUDA_VISIBLE_DEVICES for this rank's vLLM engine under a launcher: the LOCAL_RANK-th device the launcher sees
    (one engine, one GPU per process). Raises when the rank has no device of its own."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(local_rank)
    devices = [device.strip() for device in visible.split(",") if device.strip()]
    if local_rank >= len(devices):
        raise ValueError(
            f"LOCAL_RANK={local_rank} but CUDA_VISIBLE_DEVICES={visible!r} lists {len(devices)} "
            "device(s): start at most one process per visible GPU (each runs its own vLLM engine)"
        )
    return devices[local_rank]


def _item_record(identifier, item) -> list:
    text, image = item.get("text"), item.get("image")
    record = [str(identifier), text]
    if image is not None:
        stat = os.stat(image)
        record += [os.fspath(image), stat.st_size, stat.st_mtime_ns]
    return record


def job_key(ids: list, items: list, settings: dict) -> str:
    """A digest of everything that determines the embeddings of a chunk (see the module docstring)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for identifier, item in zip(ids, items):
        digest.update(json.dumps(_item_record(identifier, item), default=str).encode() + b"\n")
    return digest.hexdigest()


def weights_fingerprint(checkpoint) -> str:
    """A digest of a checkpoint's weight files read from disk, without loading them: every safetensors header and
    64 strided 8-byte samples of every tensor. The same bytes give the same digest wherever the files were copied
    (no paths, no modification times), so a redeployed model with other weights is told apart from a copy."""
    folder = _local_checkpoint(checkpoint)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{checkpoint}: no *.safetensors weight files to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        header, data_start, _ = read_header(path)
        digest.update(path.name.encode() + json.dumps(header, sort_keys=True).encode())
        with open(path, "rb") as file:
            for name in sorted(key for key in header if key != "__metadata__"):
                _, _, offset, count = tensor_span(header, data_start, name, path)
                step = max(8, count // 64)
                for position in range(offset, offset + count, step)[:64]:
                    file.seek(position)
                    digest.update(file.read(min(8, offset + count - position)))
    return digest.hexdigest()[:16]


def _local_checkpoint(checkpoint) -> Path:
    """The folder of a local checkpoint, or of a Hub id's cached snapshot (no download here)."""
    folder = Path(checkpoint)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(checkpoint), local_files_only=True))


def _chunk_key(path: Path):
    """The job key stored in a chunk file, or None when the chunk is unreadable or its ids file is missing (e.g.
    cut short by a crash that bypassed the atomic rename: then it is encoded again)."""
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception:  # noqa: BLE001  a damaged file is simply redone
        return None
    if not (path.parent / metadata.get("ids", "")).is_file():
        return None
    return metadata.get("job")


def _write_chunk(folder: Path, embeddings: torch.Tensor, ids: list, key: str, index: int, start: int) -> dict:
    return write_shard(folder, index, embeddings, ids, metadata={"job": key, "chunk": str(index), "start": str(start)})


def _chunk_shape(path: Path) -> tuple:
    """(num_vectors, dim) of a chunk's embeddings."""
    header, _, _ = read_header(path)
    return tuple(header["embeddings"]["shape"][1:])


def _chunk_entry(path: Path) -> dict:
    """The manifest entry of a finished chunk file."""
    header, _, _ = read_header(path)
    metadata = header.get("__metadata__", {})
    return {"vectors": path.name, "ids": metadata["ids"], "count": int(metadata["count"])}


def encode_sharded(
    encode,
    ids: list,
    items: list,
    output,
    *,
    role: str,
    model: str,
    settings: dict,
    chunk_size: int,
    shard_dir=None,
    precision: str = "float32",
    quiet: bool = False,
) -> dict:
    """Encode this process's chunks with `encode(items) -> (n, k, D) tensor` into the embeddings folder `output`
    (or `shard_dir`), then write its manifest when all are written.

    Returns {"rank", "world_size", "encoded", "skipped", "finished"} (chunk counts of this process; whether it
    wrote the manifest)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"--chunk-size must be a positive integer, got {chunk_size!r}")
    rank, size, _ = world()
    dtype = PRECISIONS[precision]
    key = job_key(ids, items, {**settings, "role": role, "precision": precision, "chunk_size": chunk_size})
    output = Path(output)
    if output.is_file():
        raise ValueError(
            f"{output} is a file (an embeddings file of an earlier version?): the output is now a "
            f"folder of shards; remove it or choose another path"
        )
    shard_dir = Path(shard_dir) if shard_dir is not None else output  # the chunks are the output's shards
    shard_dir.mkdir(parents=True, exist_ok=True)
    count = (len(items) + chunk_size - 1) // chunk_size
    paths = [shard_dir / CHUNK_NAME.format(i) for i in range(count)]
    mine = list(range(rank, count, size))
    todo = []
    for i in mine:
        if paths[i].exists():
            stored = _chunk_key(paths[i])
            if stored == key:
                continue
            if stored is not None:
                raise ValueError(
                    f"{shard_dir}: {paths[i].name} belongs to another encoding job (other inputs, "
                    f"model or options); remove the folder or give another --shard-dir"
                )
        todo.append(i)
    report = {"rank": rank, "world_size": size, "encoded": 0, "skipped": len(mine) - len(todo), "finished": False}
    if not quiet:
        print(
            f"[rank {rank}/{size}] {len(mine)} of {count} chunks are this process's; {report['skipped']} already "
            f"written",
            file=sys.stderr,
        )
    from transformers.utils.logging import tqdm

    for i in tqdm(todo, desc=f"rank {rank}", position=rank, disable=quiet or not todo, unit="chunk"):
        start = i * chunk_size
        embeddings = encode(items[start : start + chunk_size]).to(dtype)
        _write_chunk(shard_dir, embeddings, ids[start : start + chunk_size], key, i, start)
        report["encoded"] += 1
    # Whoever sees every chunk written lists them in the manifest (the last process to finish always does; two that
    # finish together write the same manifest, each through its own atomic rename).
    if all(path.exists() and _chunk_key(path) == key for path in paths):
        shards = [relative_entry(_chunk_entry(path), shard_dir, output) for path in paths]
        shape = _chunk_shape(paths[0]) if paths else (0, 0)
        output.mkdir(parents=True, exist_ok=True)
        write_manifest(output, shards, role, model, precision, shape)
        report["finished"] = True
    elif not quiet:
        left = sum(not path.exists() for path in paths)
        print(
            f"[rank {rank}/{size}] done; {left} chunks of other processes are not written yet: the last process "
            f"to finish writes {output}",
            file=sys.stderr,
        )
    return report


__all__ = ["encode_sharded", "job_key", "world", "weights_fingerprint", "engine_device"]
