"""Sharded, resumable encoding: `metaembed encode` under `torchrun` / `accelerate launch`, or one process with
`--chunk-size`.

The inputs are cut, by position, into chunks of `chunk_size` items; chunk i belongs to process i % WORLD_SIZE
(RANK and WORLD_SIZE come from the launcher's environment; no collective is used, so a process that dies does not
hang the others). Each chunk's embeddings are written atomically to `SHARD_DIR/chunk-000042.safetensors` with the
job's key in their metadata. A chunk already written for the same job is skipped: a rerun, with any number of
processes, resumes where the last one stopped. The process that finds every chunk written after finishing its own
merges them, streaming chunk by chunk (never the whole matrix in memory), into OUTPUT: the same embeddings file as
a one-process `metaembed encode`, bit for bit the same whichever processes encoded which chunks (each chunk is
encoded alone, so its batches do not depend on the number of processes).

The job key hashes what determines the output: the model (path and a digest of its weights: the model's, the
checkpoint files' for `--engine vllm`, the server's report for `--server`), the role, number of
vectors, instruction, stored precision, chunk size, reasoner, and every input (id, text, image path with its size and
modification time). A shard folder holding chunks of another job is refused with a clear error.
"""

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metaembed.retrieval.embeddings_file import EMBEDDINGS_FORMAT, PRECISIONS
from metaembed.retrieval.safetensors_header import read_header, tensor_span
from modeling_metaembed.hub_metaembed import replace_atomically

CHUNK_NAME = "chunk-{:06d}.safetensors"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
COPY_BLOCK = 64 << 20  # bytes copied at a time when merging


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
        raise ValueError(f"LOCAL_RANK={local_rank} but CUDA_VISIBLE_DEVICES={visible!r} lists {len(devices)} "
                         "device(s): start at most one process per visible GPU (each runs its own vLLM engine)")  # fmt: skip
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
    """The job key stored in a chunk file, or None when the file is unreadable (e.g. cut short by a crash that
    bypassed the atomic rename: then it is encoded again)."""
    try:
        with safe_open(path, framework="pt") as file:
            return (file.metadata() or {}).get("job")
    except Exception:  # noqa: BLE001  a damaged file is simply redone
        return None


def _write_chunk(path: Path, embeddings: torch.Tensor, key: str, index: int, start: int) -> None:
    metadata = {"job": key, "chunk": str(index), "start": str(start), "count": str(embeddings.shape[0])}
    tensor = embeddings.contiguous()
    replace_atomically(path, lambda tmp: save_file({"embeddings": tensor}, str(tmp), metadata=metadata))


def _tensor_span(path: Path) -> tuple:
    """(dtype string, shape, absolute byte offset, byte count) of the 'embeddings' tensor of a chunk file."""
    header, data_start, _ = read_header(path)
    return tensor_span(header, data_start, "embeddings", path)


def merge_chunks(paths: list, output, ids: list, role: str, model: str, dtype: torch.dtype) -> None:
    """Concatenate chunk files into one embeddings file (the format of `embeddings_file.save_embeddings`), streaming the
    bytes; written atomically."""
    spans = [_tensor_span(path) for path in paths]
    expected = SAFETENSORS_DTYPES[dtype]
    rows, tail = 0, None
    for path, (code, shape, _, _) in zip(paths, spans):
        if code != expected or (tail is not None and shape[1:] != tail):
            raise ValueError(f"{path}: holds {code} {shape}, unlike the other chunks ({expected}, (*, {tail}))")
        tail, rows = shape[1:], rows + shape[0]
    if rows != len(ids):
        raise ValueError(f"the chunks hold {rows} rows for {len(ids)} inputs")
    nbytes = sum(span[3] for span in spans)
    metadata = {"format": EMBEDDINGS_FORMAT, "role": role, "ids": json.dumps(ids), "model": str(model)}
    header = {"__metadata__": metadata,
              "embeddings": {"dtype": expected, "shape": [rows, *tail], "data_offsets": [0, nbytes]}}  # fmt: skip
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            for path, (_, _, offset, count) in zip(paths, spans):
                with open(path, "rb") as source:
                    source.seek(offset)
                    while count:
                        block = source.read(min(count, COPY_BLOCK))
                        if not block:
                            raise ValueError(f"{path}: ends before its tensor does")
                        out.write(block)
                        count -= len(block)

    replace_atomically(output, write)


def encode_sharded(encode, ids: list, items: list, output, *, role: str, model: str, settings: dict,
                   chunk_size: int, shard_dir=None, precision: str = "float32", quiet: bool = False) -> dict:
    """Encode this process's chunks with `encode(items) -> (n, k, D) tensor`, then merge when all are written.

    Returns {"rank", "world_size", "encoded", "skipped", "merged"} (chunk counts of this process)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"--chunk-size must be a positive integer, got {chunk_size!r}")
    rank, size, _ = world()
    dtype = PRECISIONS[precision]
    key = job_key(ids, items, {**settings, "role": role, "precision": precision, "chunk_size": chunk_size})
    shard_dir = Path(shard_dir) if shard_dir is not None else Path(f"{output}.shards")
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
                raise ValueError(f"{shard_dir}: {paths[i].name} belongs to another encoding job (other inputs, "
                                 f"model or options); remove the folder or give another --shard-dir")  # fmt: skip
        todo.append(i)
    report = {"rank": rank, "world_size": size, "encoded": 0, "skipped": len(mine) - len(todo), "merged": False}
    if not quiet:
        print(f"[rank {rank}/{size}] {len(mine)} of {count} chunks are this process's; {report['skipped']} already "
              f"written", file=sys.stderr)  # fmt: skip
    from transformers.utils.logging import tqdm

    for i in tqdm(todo, desc=f"rank {rank}", position=rank, disable=quiet or not todo, unit="chunk"):
        start = i * chunk_size
        embeddings = encode(items[start : start + chunk_size]).to(dtype)
        _write_chunk(paths[i], embeddings, key, i, start)
        report["encoded"] += 1
    # Whoever sees every chunk written merges (the last process to finish always does; two that finish together
    # both write the same bytes, each through its own atomic rename).
    if all(path.exists() and _chunk_key(path) == key for path in paths):
        merge_chunks(paths, output, ids, role, model, dtype)
        report["merged"] = True
    elif not quiet:
        left = sum(not path.exists() for path in paths)
        print(f"[rank {rank}/{size}] done; {left} chunks of other processes are not written yet: the last process "
              f"to finish writes {output}", file=sys.stderr)  # fmt: skip
    return report


__all__ = ["encode_sharded", "merge_chunks", "job_key", "world", "weights_fingerprint", "engine_device"]
